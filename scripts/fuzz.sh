#!/usr/bin/env bash
# Builds moet's libFuzzer harnesses (fuzz/, clang + ASan + UBSan), replays every committed
# regression input (fuzz/regressions/<target>/), then fuzzes each target for a given time from
# seeds moet writes itself (fuzz/make_seeds.cpp) with fuzz/moet.dict, and prints executions and
# coverage per target. A finding (crash, sanitizer report, timeout, allocation over the limit,
# an exception that is not a moet::error) fails the script and leaves its input in
# build-fuzz/findings/<target>/: commit it under fuzz/regressions/<target>/ with the fix.
#
#   scripts/fuzz.sh                        15 s per target (CI runs 10 s: about a minute in all)
#   scripts/fuzz.sh --seconds 1800 --parallel 2    the long run (docs/reliability.md)
#   scripts/fuzz.sh --seconds 60 config adapters   some targets only
#   scripts/fuzz.sh --regressions-only
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=15
parallel=1
only_regressions=0
targets=()
while (($#)); do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --parallel) parallel="$2"; shift 2 ;;
    --regressions-only) only_regressions=1; shift ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
((${#targets[@]})) || targets=(safetensors config adapters checkpoint tokenizer jsonl)

if ! command -v clang++ >/dev/null; then
  echo "fuzz.sh: clang++ not found (scripts/install-deps.sh --fuzz installs clang)" >&2
  exit 1
fi
build=build-fuzz
cmake -S fuzz -B "$build" -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$build" -j2 --target make_seeds $(printf 'fuzz_%s ' "${targets[@]}")

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
limits=(-rss_limit_mb=2048 -malloc_limit_mb=64 -timeout=30)

status=0
for t in "${targets[@]}"; do
  shopt -s nullglob
  inputs=(fuzz/regressions/"$t"/*)
  shopt -u nullglob
  if ((${#inputs[@]})); then
    if "$build/fuzz_$t" "${limits[@]}" "${inputs[@]}" >"$build/regressions_$t.log" 2>&1; then
      echo "fuzz.sh: $t: ${#inputs[@]} regression inputs pass"
    else
      echo "fuzz.sh: $t: a regression input fails; see $build/regressions_$t.log" >&2
      tail -n 30 "$build/regressions_$t.log" >&2
      status=1
    fi
  fi
done
((only_regressions)) && exit $status

rm -rf "$build/seeds"
"$build/make_seeds" "$build/seeds"

run_one() {
  local t="$1"
  mkdir -p "$build/corpus/$t" "$build/findings/$t"
  cp -n "$build/seeds/$t"/* "$build/corpus/$t"/ 2>/dev/null || true
  "$build/fuzz_$t" "${limits[@]}" -max_total_time="$seconds" -dict=fuzz/moet.dict -print_final_stats=1 \
    -artifact_prefix="$build/findings/$t/" "$build/corpus/$t" >"$build/fuzz_$t.log" 2>&1
}

pids=()
names=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  names+=("$t")
  while (($(jobs -rp | wc -l) >= parallel)); do sleep 1; done
done
for i in "${!pids[@]}"; do
  t="${names[$i]}"
  if wait "${pids[$i]}"; then result=ok; else result=FINDING; status=1; fi
  done_line=$(grep -a -E '^#[0-9]+[[:space:]]+DONE' "$build/fuzz_$t.log" | tail -n1 || true)
  execs=$(grep -a -E '^stat::number_of_executed_units' "$build/fuzz_$t.log" | awk '{print $2}' || true)
  echo "fuzz.sh: $t: $result, ${seconds} s, ${execs:-?} executions; ${done_line:-$(tail -n1 "$build/fuzz_$t.log")}"
  if [[ $result == FINDING ]]; then
    grep -a -E 'ERROR|SUMMARY|runtime error|Test unit written|terminate|what\(\)' "$build/fuzz_$t.log" | head -n 20 >&2 || true
  fi
done
exit $status
