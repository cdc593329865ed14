#!/usr/bin/env bash
# Installs what moet needs to build, test and benchmark, from Debian 12 packages. Run as root.
#   scripts/install-deps.sh          compilers, CMake, Eigen, Boost.Hana, Catch2, Google Benchmark,
#                                    nlohmann-json, OpenBLAS (OpenMP build), numpy (tests/peft_reference.py),
#                                    libsentencepiece (moet_bench_tokenizer's baseline; moet never needs it)
#   scripts/install-deps.sh --torch  also Debian's python3-torch for bench/compare_pytorch.py, with
#                                    libblas pointed at OpenBLAS so PyTorch runs at its best
#   scripts/install-deps.sh --fuzz   also clang and its runtime (libFuzzer, sanitizers) for
#                                    scripts/fuzz.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

packages=(g++ make cmake pkg-config libeigen3-dev libboost-dev catch2 libbenchmark-dev nlohmann-json3-dev
          libopenblas-openmp-dev python3-numpy libsentencepiece-dev)
[[ "${1:-}" == "--torch" ]] && packages+=(python3-torch)
[[ "${1:-}" == "--fuzz" ]] && packages+=(clang libclang-rt-14-dev)

missing=()
for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ "${1:-}" == "--torch" ]]; then
  arch=$(gcc -dumpmachine)
  blas=$(update-alternatives --list "libblas.so.3-${arch}" | grep -m1 openblas || true)
  [[ -n "$blas" ]] && update-alternatives --set "libblas.so.3-${arch}" "$blas"
  update-alternatives --display "libblas.so.3-${arch}" | sed -n 2p
fi
