#!/usr/bin/env bash
# The GPU test run, recorded: the CUDA pytest suites and compute-sanitizer (memcheck, racecheck,
# synccheck) over tests/sanitize_ops.py, summarised in ONE JSON, tests/results/gpu_h200.json
# (commit, date, device, torch, cuda, pass / fail / skip counts per suite, a verdict per
# sanitizer tool: pass, fail, timeout, or unavailable where compute-sanitizer is not installed).
# Commit the JSON with each change that affects the GPU code.
#
#   bash tests/run_gpu.sh                 # everything
#   bash tests/run_gpu.sh pytest          # the pytest suites only
#   bash tests/run_gpu.sh sanitize        # the sanitizers only
#
# A JSON already there for the same commit is merged into, so the parts can run in separate
# calls. Needs mage_ext importable with its CUDA kernels (benchmarks/gpu_session.sh builds it;
# its stage `gpu-tests` runs this). Environment: MAGE_COMMIT (the commit, where the tree has no
# git history), MAGE_GPU_JSON (another path), MAGE_SANITIZE_TOOLS (default
# "memcheck racecheck synccheck"), MAGE_SANITIZE_TIMEOUT (seconds per tool, default 1200), OUT
# (logs go to $OUT/gpu_tests, and the JSON is copied to $OUT), MAGE_PYTEST_ARGS (extra pytest
# arguments for every suite, e.g. "-n 8" with pytest-xdist to spread the suites over the cores),
# MAGE_GPU_SUITES (the pytest suites to run, default "cuda cuda_graphs soak properties rest_a
# rest_b"; rest_a / rest_b: every other test file, a-l / m-z: the whole of it took > 365 s with
# -n 14 on the H200, so run the halves in separate device calls).
set -uo pipefail
cd "$(dirname "$0")/.."
parts=" ${*:-pytest sanitize} "
logs=${OUT:-/tmp/mage-out}/gpu_tests
mkdir -p "$logs"
json=${MAGE_GPU_JSON:-tests/results/gpu_h200.json}
export PYTHONPATH=$PWD:${PYTHONPATH:-}

if ! python3 -c "import mage_ext, torch, sys; sys.exit(0 if torch.cuda.is_available() and mage_ext.cuda_kernels_built() else 1)"; then
  echo "run_gpu.sh: needs a GPU and mage_ext built with its CUDA kernels" >&2
  exit 2
fi

status=0
report=()
if [[ $parts == *" pytest "* ]]; then
  # name | files (the CUDA-only files first; "rest_*": every other test file, whose CUDA
  # parametrisations run here too)
  cuda_files="tests/python/test_cuda.py tests/python/test_device_errors.py"
  graph_files="tests/python/test_cuda_graphs.py"
  soak_files="tests/python/test_soak.py"
  prop_files="tests/python/test_properties.py"
  # every other test file, in two halves (a-l, m-z) that each fit one 10-minute device call
  rest_a="" rest_b=""
  for f in tests/python/test_*.py; do
    case " $cuda_files $graph_files $soak_files $prop_files " in *" $f "*) continue ;; esac
    case $(basename "$f") in test_[a-l]*) rest_a+=" $f" ;; *) rest_b+=" $f" ;; esac
  done
  for suite in "cuda|$cuda_files" "cuda_graphs|$graph_files" "soak|$soak_files" \
               "properties|$prop_files" "rest_a|$rest_a" "rest_b|$rest_b"; do
    name=${suite%%|*}
    files=${suite#*|}
    case " ${MAGE_GPU_SUITES:-cuda cuda_graphs soak properties rest_a rest_b} " in
      *" $name "*) ;;
      *) continue ;;
    esac
    echo "== pytest: $name =="
    # shellcheck disable=SC2086
    # -v: each result is logged with its name as it happens, so a suite cut by a time limit
    # still names its failures (-q only prints them in the final summary)
    python3 -m pytest $files -v -p no:cacheprovider ${MAGE_PYTEST_ARGS:-} --junitxml="$logs/$name.xml" \
      >"$logs/$name.log" 2>&1 || status=1
    tail -3 "$logs/$name.log"
    report+=(--suite "$name=$logs/$name.xml")
  done
fi

if [[ $parts == *" sanitize "* ]]; then
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  for tool in ${MAGE_SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    echo "== compute-sanitizer: $tool =="
    if [ -z "$cs" ]; then
      report+=(--sanitizer "$tool=unavailable:compute-sanitizer not found")
      echo "unavailable"
      continue
    fi
    log="$logs/sanitize_$tool.log"
    timeout "${MAGE_SANITIZE_TIMEOUT:-1200}" "$cs" --tool "$tool" --kernel-name kns=mage \
      --error-exitcode 99 python3 tests/sanitize_ops.py >"$log" 2>&1
    rc=$?
    summary=$(grep -E "(ERROR|RACECHECK|SYNCCHECK) SUMMARY" "$log" | tail -1 | tr -d '=' | sed 's/^ *//')
    if [ $rc -eq 124 ]; then
      verdict=timeout
    elif [ $rc -eq 0 ] && grep -q "sanitize_ops: all ops ran" "$log"; then
      verdict=pass
    else
      verdict=fail
    fi
    [ "$verdict" = pass ] || status=1
    echo "$verdict (exit $rc): $summary"
    report+=(--sanitizer "$tool=$verdict:$summary")
  done
fi

python3 tests/gpu_report.py --json "$json" ${report[@]+"${report[@]}"} >"$logs/report.log" 2>&1 || status=1
cat "$json"
[ -n "${OUT:-}" ] && cp "$json" "$OUT/"
exit $status
