#!/usr/bin/env bash
# Runs every test: the C++ suite (GoogleTest through CTest) and the Python suite (pytest).
# Needs the package installed (pip install --no-build-isolation -e ".[test]").
# CUDA tests run where a GPU and the CUDA kernels are present and skip elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${MAX_JOBS:-$(nproc)}
echo "== C++ tests (GoogleTest) =="
cmake -S . -B build/cpp-tests -G Ninja -DMAGE_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cpp-tests -j "$jobs"
ctest --test-dir build/cpp-tests --output-on-failure

echo "== Python tests (pytest) =="
python3 -m pytest tests/python -q "$@"
