#!/usr/bin/env bash
# One call on the GPU machine (see /work/.library/device): installs the carried wheels, makes
# sure the extension with its CUDA kernels is importable (a carried abi3 build, else builds
# here), then runs the stages named on the command line, logging each under $OUT.
#   bash benchmarks/gpu_session.sh tests bench-quick
# Stages: tests (pytest, CUDA included), cuda-tests (tests/python/test_cuda.py), bench-quick,
#         bench-full, e2e, train-attention (bench_train_attention.py), mage-ft (bench_mage_ft.py), profile, ncu (Nsight Compute, full set, of benchmarks/ncu_steps.py), sanitize (compute-sanitizer memcheck + racecheck),
#         gpu-tests (tests/run_gpu.sh: CUDA pytest suites + memcheck / racecheck / synccheck,
#         recorded in $OUT/gpu_h200.json; gpu-tests-pytest / gpu-tests-sanitize: one half each,
#         merged into a tests/results/gpu_h200.json of the same commit), <cmd...>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mage-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # scripts under benchmarks/ import mage_ext from here
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
  | tee "$OUT/gpu.txt"
if ! python3 -c "import mage_ext, sys; sys.exit(0 if mage_ext.cuda_kernels_built() else 1)"; then
  echo "building the extension here"
  rm -f mage_ext/_C*.so
  MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
fi
status=0
for stage in "$@"; do
  echo "=== $stage ==="
  start=$(date +%s)
  case "$stage" in
    tests) python3 -m pytest tests/python -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    bench-quick) python3 benchmarks/bench_kernels.py --quick --output kernels_h200_quick.json 2>&1 | tee "$OUT/bench_quick.log" ;;
    bench-full) python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/bench_full.log" ;;
    cuda-tests) python3 -m pytest tests/python/test_cuda.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -5 ;;
    e2e) python3 benchmarks/bench_e2e.py --out "$OUT/e2e_h200.json" 2>&1 | tr '\r' '\n' \
           | grep -v '^prefill' | tee "$OUT/e2e.log" ;;
    train-attention) python3 benchmarks/bench_train_attention.py 2>&1 | tee "$OUT/train_attention.log" | tail -60 ;;
    mage-ft) python3 benchmarks/bench_mage_ft.py 2>&1 | tee "$OUT/mage_ft.log" | tail -20 ;;
    profile) python3 benchmarks/profile_ops.py 2>&1 | grep -E "^---|mage::" | tee "$OUT/profile.log" ;;
    ncu) ncu --set full --import-source no --kernel-name regex:"attention_tile|attention_wgmma|scores_kernel|scores_wgmma|topk|merge" \
           -f -o "$OUT/ncu" python3 benchmarks/ncu_steps.py >"$OUT/ncu_run.log" 2>&1
         ncu -i "$OUT/ncu.ncu-rep" --page details >"$OUT/ncu_details.txt" 2>&1
         ncu -i "$OUT/ncu.ncu-rep" --page raw --csv >"$OUT/ncu_raw.csv" 2>&1
         tail -3 "$OUT/ncu_run.log"; grep -c "attention_tile" "$OUT/ncu_details.txt" ;;
    gpu-tests) bash tests/run_gpu.sh 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    gpu-tests-pytest) bash tests/run_gpu.sh pytest 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    gpu-tests-sanitize) bash tests/run_gpu.sh sanitize 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    sanitize) for tool in memcheck racecheck; do
                compute-sanitizer --tool $tool --kernel-name kns=mage python3 tests/sanitize_ops.py 2>&1 \
                  | tail -4 | tee -a "$OUT/sanitize.log"; done ;;
    *) bash -c "$stage" 2>&1 | tee -a "$OUT/extra.log" ;;
  esac
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "=== $stage: $(( $(date +%s) - start ))s ==="
done
exit $status
