#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan, no LibTorch) and runs each for a bounded
# time from the committed seed corpus (tests/fuzz/corpus/<fuzzer>/, copied: new inputs stay out
# of the tree). Any crash, sanitizer report or broken invariant fails the script; the input is
# left in $OUT/artifacts.
#
#   tests/fuzz/run_fuzzers.sh              # 30 s each (CI)
#   FUZZ_SECONDS=3600 tests/fuzz/run_fuzzers.sh fuzz_tokenizer_encode   # longer, one target
#
# Environment: FUZZ_SECONDS (per target, default 30), FUZZ_JOBS (build jobs), OUT (scratch dir).
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${FUZZ_SECONDS:-30}
out=${OUT:-build/fuzz-run}
cmake -S . -B build/fuzz -G Ninja -DMAGE_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/fuzz -j "${FUZZ_JOBS:-$(nproc)}"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(fuzz_json fuzz_safetensors_header fuzz_tokenizer_encode fuzz_tokenizer_load)
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
mkdir -p "$out/artifacts"
for t in "${targets[@]}"; do
  work="$out/corpus/$t"
  rm -rf "$work" && mkdir -p "$work"
  cp tests/fuzz/corpus/"$t"/* "$work"/
  echo "== $t: ${seconds}s =="
  build/fuzz/"$t" "$work" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$out/artifacts/$t-" 2>&1 \
    | grep -E "^(#[0-9]+ +DONE|INFO: seed corpus|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY|.*runtime error)" || true
  # grep hides libFuzzer's progress lines; its exit status is the fuzzer's
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FUZZ FAIL: $t (input in $out/artifacts)"; exit 1; }
done
echo "fuzzers: no crash in ${seconds}s each"
