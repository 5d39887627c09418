#!/usr/bin/env bash
# One compute-sanitizer tool over a set of tests split into shards that run at once, for a
# GPU machine. The sanitizer is bound by the host (each process keeps about one core busy
# and leaves the GPU mostly idle), so on a 16-core machine shards finish a set in a fraction
# of one process's time; memcheck is about 25 s a model-based test.
#
#   SHARDS=4 LIMIT=400 bash tests/run_sanitizer_shards.sh offload -k cuda tests/test_offload_cache.py
#
# NAME (the first argument) names the logs: $OUT/sanitizer_<tool>_<NAME>_<i>.log, one per
# shard, and one line in $OUT/sanitizer_summary.txt with the sanitizer's own
# "ERROR SUMMARY: N errors" summed over the shards and the processes they followed. A shard
# cut by LIMIT says so (no summary line of its own); memcheck prints each error as it
# happens, so a cut shard still shows every error before the cut.
#
# Tests that measure the device's free memory (torch.cuda.mem_get_info) do not belong in a
# sharded set: the other shards move that figure. The rest of the arguments are pytest's;
# the tests they select are split round-robin by node id.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-logs}"; mkdir -p "$OUT"
NAME="${1:?usage: run_sanitizer_shards.sh NAME PYTEST_ARGS...}"; shift
TOOL="${TOOL:-memcheck}"; SHARDS="${SHARDS:-4}"; LIMIT="${LIMIT:-580}"
SAN="${COMPUTE_SANITIZER:-compute-sanitizer}"
export PYTHONUNBUFFERED=1

mapfile -t ids < <(python3 -m pytest --collect-only -q -p no:cacheprovider "$@" 2>/dev/null | grep '::')
if [ "${#ids[@]}" = 0 ]; then
  echo "run_sanitizer_shards.sh $NAME: pytest selected no tests from: $*" >&2; exit 2
fi
[ "$SHARDS" -gt "${#ids[@]}" ] && SHARDS=${#ids[@]}
pids=()
for ((s = 0; s < SHARDS; s++)); do
  shard=()
  for ((i = s; i < ${#ids[@]}; i += SHARDS)); do shard+=("${ids[$i]}"); done
  log="$OUT/sanitizer_${TOOL}_${NAME}_$s.log"
  timeout "$LIMIT" "$SAN" --tool "$TOOL" --target-processes all --print-limit 20 \
    python3 -m pytest -q -rf -p no:cacheprovider "${shard[@]}" > "$log" 2>&1 &
  pids+=($!)
done
status=0
for ((s = 0; s < SHARDS; s++)); do
  wait "${pids[$s]}"; rc=$?
  [ $rc = 0 ] || status=1
  [ $rc = 124 ] && echo "CUT by the ${LIMIT} s limit" >> "$OUT/sanitizer_${TOOL}_${NAME}_$s.log"
done
logs=("$OUT"/sanitizer_"${TOOL}"_"${NAME}"_*.log)
errors=$(cat "${logs[@]}" | grep -oE "(ERROR|RACECHECK) SUMMARY: [0-9]+" | awk '{s += $3} END {print s + 0}')
reported=$(cat "${logs[@]}" | grep -cE "(ERROR|RACECHECK) SUMMARY")
cut=$(cat "${logs[@]}" | grep -c "^CUT by")
outcomes=$(cat "${logs[@]}" | grep -E '^[0-9]+ (passed|failed)|^(FAILED|ERROR) ' | sort | uniq -c | tr '\n' ';')
echo "compute-sanitizer $TOOL $NAME: ${#ids[@]} tests in $SHARDS shards, $errors errors in $reported summaries, $cut shards cut; $outcomes" \
  | tee -a "$OUT/sanitizer_summary.txt"
[ "$errors" = 0 ] || status=1
exit $status
