#!/usr/bin/env bash
# The runtime's GoogleTests built with AddressSanitizer + UndefinedBehaviorSanitizer
# (MAGE_SANITIZE=ON, in $SANITIZE_BUILD, default build/sanitize), then run.
#
#   tests/run_sanitized.sh          # the torch-free readers' tests (JSON, safetensors header,
#                                   # tokenizer): about a minute to build; what CI runs
#   tests/run_sanitized.sh --all    # every GoogleTest, the LibTorch runtime and ops included:
#                                   # each source parses LibTorch's headers under the sanitizers
#                                   # (tens of minutes on 2 cores), so not in CI
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${MAX_JOBS:-$(nproc)}
dir=${SANITIZE_BUILD:-build/sanitize}
cmake -S . -B "$dir" -G Ninja -DMAGE_SANITIZE=ON -DMAGE_BUILD_TESTS=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [ "${1:-}" = "--all" ]; then
  cmake --build "$dir" -j "$jobs"
  # LibTorch is not instrumented: its one-time allocations would read as leaks.
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} "$dir"/mage_base_tests
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} "$dir"/mage_cpp_tests
else
  cmake --build "$dir" -j "$jobs" --target mage_base_tests
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} "$dir"/mage_base_tests
fi
