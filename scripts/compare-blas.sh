#!/usr/bin/env bash
# Builds moet_bench_layers twice, with Eigen's own GEMM and with Eigen backed by OpenBLAS, and
# runs the same cases in each, so the default (MOET_BLAS) can be chosen by measurement.
#   scripts/compare-blas.sh [extra moet_bench_layers flags]
set -euo pipefail
cd "$(dirname "$0")/.."
filter='frozen_linear|molora_soft/1024/1024|molora_top2|mov_soft'
for blas in OPENBLAS EIGEN; do
  dir="build-blas-${blas,,}"
  cmake -S . -B "$dir" -DMOET_BLAS="$blas" -DMOET_BUILD_TESTS=OFF -DMOET_BUILD_EXAMPLES=OFF > /dev/null
  cmake --build "$dir" -j2 --target moet_bench_layers > /dev/null
done
for blas in OPENBLAS EIGEN; do
  echo "== MOET_BLAS=$blas"
  "build-blas-${blas,,}/bench/moet_bench_layers" --benchmark_filter="$filter" --benchmark_color=false "$@" 2>/dev/null |
    grep -E "_median|vs floor|^(frozen|molora|mov)" | sed 's/\/min_time:0.500//; s/_time_median//'
done
