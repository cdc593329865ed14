#!/usr/bin/env bash
# Builds moet's Catch2 test programs with AddressSanitizer + UndefinedBehaviorSanitizer
# (MOET_SANITIZE=address,undefined, in build-asan/) and runs them; any sanitizer report fails.
#   scripts/sanitize.sh                 every test program
#   scripts/sanitize.sh --ci            the subset CI runs (docs/reliability.md says which and why)
#   scripts/sanitize.sh test_config ... the programs named
set -euo pipefail
cd "$(dirname "$0")/.."

all=(test_gradients_lora test_gradients_ia3 test_gradients_router test_custom_expert test_properties test_errors
     test_training test_safetensors test_gradients_ops test_config test_decoder test_checkpoint test_calm
     test_reproducible test_model_api test_calm_augments test_hf_fidelity test_arena test_backend_ops test_hardening)
# CI: the programs that read files (safetensors, config.json, checkpoints and adapter folders:
# the untrusted input). Each test program takes 1-2 min to compile with ASan + UBSan on this
# project's 2-core machines; CI builds these three (about 3 min) so that a CI run stays under 30
# minutes with the GPU model tests (issue 16); the full list runs here (about 15 min), and the
# fuzzers (scripts/fuzz.sh, also ASan + UBSan) cover the readers in CI as well.
ci=(test_safetensors test_config test_checkpoint)

case "${1:-}" in
  --ci) tests=("${ci[@]}") ;;
  "") tests=("${all[@]}") ;;
  *) tests=("$@") ;;
esac

build=build-asan
selection=$(IFS=';'; echo "${tests[*]}")
cmake -S . -B "$build" -DMOET_SANITIZE=address,undefined -DMOET_BUILD_BENCHMARKS=OFF -DMOET_BUILD_EXAMPLES=OFF \
  -DMOET_CUDA=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="-g1" "-DMOET_TEST_SELECTION=$selection" >/dev/null
cmake --build "$build" -j2 --target moet_selected_tests

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1:check_initialization_order=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
failed=()
for t in "${tests[@]}"; do
  start=$SECONDS
  if "$build/tests/$t" >"$build/$t.log" 2>&1; then
    echo "sanitize.sh: $t passed under ASan+UBSan ($((SECONDS - start)) s)"
  else
    echo "sanitize.sh: $t FAILED under ASan+UBSan; the end of $build/$t.log:" >&2
    tail -n 40 "$build/$t.log" >&2
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "sanitize.sh: ${#failed[@]} of ${#tests[@]} failed: ${failed[*]}" >&2
  exit 1
fi
echo "sanitize.sh: ${#tests[@]} test programs passed under ASan+UBSan"
