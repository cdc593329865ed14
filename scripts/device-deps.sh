#!/usr/bin/env bash
# Run HERE (the Debian 12 machine), before a GPU session: downloads the Debian packages moet
# needs into .devdeps/ so that they can travel to the GPU machine, whose image has nvcc, CMake
# and PyTorch but none of Eigen, Boost.Hana, Catch2, Google Benchmark or nlohmann-json, and
# cannot download anything. scripts/gpu-check.sh unpacks them there (not into /).
# .devdeps/ (12 MB) is git-ignored; name it in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devdeps
cd .devdeps
apt-get update -q > /dev/null
# header-only libraries, Catch2 v2, Google Benchmark (its static and shared libraries)
apt-get download libeigen3-dev libboost1.81-dev catch2 nlohmann-json3-dev libbenchmark-dev libbenchmark1debian
ls -la
du -sh .
