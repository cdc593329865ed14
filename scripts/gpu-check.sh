#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repository root, in one device call (device time is scarce):
#   run(command="scripts/gpu-check.sh", carry=[".devdeps"])     after scripts/device-deps.sh here
# and, if device time is left while the machine is still warm (build-gpu/ kept), a second call
#   run(command="scripts/gpu-check.sh compile", carry=[".devdeps"])
# that times torch.compile'd PyTorch styles of a few model cases against the first call's moet
# numbers (compilation takes minutes, so it gets its own call). Should flash attention fault on the
# device (the tests and the benchmarks die at its first use), a second call
#   run(command="scripts/gpu-check.sh materialized", carry=[".devdeps"])
# runs everything with MOET_CUDA_ATTENTION=materialized and the tests without their [flash] cases,
# so that the other numbers still come back (memcheck keeps the flash cases: it names the fault).
# Unpacks the carried Debian packages into /tmp/devroot (the image has nvcc, CMake and PyTorch,
# not Eigen, Boost, Catch2, Google Benchmark or nlohmann-json), configures a CUDA build for
# sm_90 with Eigen's own GEMM (no OpenBLAS there), builds the CUDA tests and benchmarks, and runs:
# the CUDA tests (layers and whole models against the CPU), compute-sanitizer memcheck and
# racecheck over them, moet_bench_cuda (layers), moet_bench_cuda_model (GPT-2 small and a
# Llama-shaped 1B training and decoding) and the PyTorch comparison. Each step has a time limit so
# that the whole stays within one device call (10 minutes); every log lands in $OUT (the device
# call brings it back) or ./gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
case $mode in
  all | compile | materialized) ;;
  *) echo "usage: scripts/gpu-check.sh [all|compile|materialized], got $mode"; exit 2 ;;
esac
out=${OUT:-gpu-check-out}
mkdir -p "$out"
root=/tmp/devroot
mkdir -p "$root"
ls .devdeps/*.deb > /dev/null 2>&1 || { echo "no .devdeps/*.deb: run scripts/device-deps.sh here and carry .devdeps"; exit 2; }
for f in .devdeps/*.deb; do  # dpkg -x, or ar + tar where there is no dpkg (Debian 12 .debs hold data.tar.xz)
  if command -v dpkg > /dev/null; then dpkg -x "$f" "$root"; else ar p "$f" data.tar.xz | tar -xJ -C "$root"; fi
done
arch_lib=$root/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$arch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
step() {  # name, seconds, command...: runs it (at most that long), keeps the whole log, prints its tail and status
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc"
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$out/device.txt" 2>&1
cat "$out/device.txt"
if [ "$mode" = compile ]; then
  [ -f build-gpu/bench_cuda_model.json ] || { echo "no build-gpu/bench_cuda_model.json: run scripts/gpu-check.sh first"; exit 2; }
  step compare_compile 560 python3 -u bench/compare_pytorch.py --device cuda --markdown --compile --model-warmup 1 --model-iters 2 \
    --cases 'train_step/(gpt2_small|llama_1b)/(frozen|lora16|molora64_top2)' --moet-model-json build-gpu/bench_cuda_model.json
  echo "logs in $out"
  exit 0
fi
if [ "$mode" = materialized ]; then
  export MOET_CUDA_ATTENTION=materialized
  echo "MOET_CUDA_ATTENTION=materialized: the cuBLASLt attention everywhere; tests without [flash]"
fi
step configure 30 cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DMOET_CUDA=ON -DMOET_BLAS=EIGEN \
  -DCMAKE_PREFIX_PATH="$root/usr" -DCMAKE_CUDA_ARCHITECTURES="90-real;90-virtual" || exit 1
step build 180 cmake --build build-gpu -j"$(nproc)" --target test_cuda_layers test_cuda_model test_cuda_errors moet_bench_cuda \
  moet_bench_cuda_model || exit 1
if [ "$mode" = materialized ]; then
  step tests 50 bash -c 'for t in test_cuda_layers test_cuda_model test_cuda_errors; do build-gpu/tests/cuda/$t "~[flash]" || exit 1; done'
else
  step tests 50 ctest --test-dir build-gpu -R "^test_cuda_(layers|model|errors)$" --output-on-failure
fi
step memcheck 60 ctest --test-dir build-gpu -L memcheck --output-on-failure
step racecheck 40 ctest --test-dir build-gpu -L racecheck --output-on-failure
step bench 40 build-gpu/bench/moet_bench_cuda --benchmark_out="$out/bench_cuda.json" --benchmark_out_format=json
step bench_model 130 build-gpu/bench/moet_bench_cuda_model --benchmark_out="$out/bench_cuda_model.json" --benchmark_out_format=json
cp "$out"/bench_cuda*.json build-gpu/ 2> /dev/null  # for the compile call
# PyTorch on the same machine against the JSON above (eager styles, SDPA, PEFT where importable)
step compare 60 python3 -u bench/compare_pytorch.py --device cuda --markdown --model-warmup 1 --model-iters 2 \
  --moet-json "$out/bench_cuda.json" --moet-model-json "$out/bench_cuda_model.json"
echo "logs in $out"
