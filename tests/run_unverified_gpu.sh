#!/usr/bin/env bash
# What is built or measured only in part, for the next device calls (each under 10 minutes
# on an H200; pick one with STEP=...). Logs under $OUT (or ./gpu-logs), tarred.
#
#   STEP=sweep   VMMALLOC_COMMIT=$(git rev-parse --short HEAD) bash tests/run_unverified_gpu.sh
#   STEP=memcheck ...   STEP=compile_train ...   STEP=compile_decode ...   STEP=compile_history ...
#   STEP="compile_train memcheck" ...   # steps in order, in one call
#
# - sweep: the context sweep's system not yet measured (the paged peer: 474 ms a step at
#   16K, the slowest), merged into the committed bench/results/graph_decode_sweep.json (same
#   points), a worker per point; the points left after one call in the next (POINTS=...).
# - memcheck: compute-sanitizer memcheck over what no sanitizer run finished (issue 26): the
#   offload and KV cache tests, the compile, static-cache and Hugging Face tests (and the
#   large handles and virtual pages again, which the pools' change touched), in shards that run at once (tests/run_sanitizer_shards.sh) in the time the call has left;
#   about 25 s a model-based test under the sanitizer, one shard per compile test.
# - compile_train / compile_decode: issue 19's workloads, merged into a copy of the committed
#   bench/results/compile_graphs.json under results/. compile_train's three rounds are nine
#   processes, 527 s on an H200 (f4f1a4e): a call of its own (if cut after its last round,
#   `python -m bench.compile_graphs train --from-log` summarizes its log). compile_decode runs
#   a round at a time, added to the stored rounds of the same commit (VMMALLOC_COMMIT).
# - compile_history: the train workload's warm-up and recording under native and vmmalloc
#   with memory history on: each pool's peak live bytes, when, and what was live then
#   (bench/pool_trace.py), beside its reserved bytes; the snapshots are kept for the viewer.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-logs}"; L="$OUT/logs"; mkdir -p "$L"
export PYTHONUNBUFFERED=1
T0=$SECONDS
trap 'cd "$OUT" && tar czf logs.tgz logs && rm -rf logs' EXIT
left() { local l=$(( $1 - (SECONDS - T0) )); [ $l -lt 5 ] && l=5; echo $l; }
stamp() { echo "$1 at $((SECONDS - T0)) s, exit $2" >> "$L/steps.txt"; }
python3 -m pip install --no-build-isolation --no-deps -q -e . > "$L/build.log" 2>&1
python3 -m vmmalloc.torch_adapter > "$L/adapter_build.log" 2>&1; stamp build $?
for step in ${STEP:-sweep}; do
case "$step" in
  sweep)
    mkdir -p "$L/results"; cp bench/results/graph_decode_sweep.json "$L/results/"
    # The paged peer's whole sweep outlasts a device call (cut after 420 s of one, 2026-12-04):
    # a worker per point keeps what finished; POINTS names the points still to run, e.g.
    # POINTS=32768,65536,variable in the next call. Each call starts from the committed
    # bench/results/graph_decode_sweep.json: commit the first call's before the second.
    timeout $(left 580) python3 -m bench.graph_decode sweep "$L/results" --systems paged \
      --worker-per-point ${POINTS:+--points "$POINTS"} > "$L/sweep.log" 2>&1; stamp sweep $? ;;
  memcheck)
    compute-sanitizer --version > "$L/sanitizer_version.txt"
    lim=$(left 585); g=tests/test_graphs_gpu.py
    # None of these reads mem_get_info (the shards would move it for each other).
    OUT="$L" LIMIT=$lim SHARDS=4 bash tests/run_sanitizer_shards.sh offload -k cuda tests/test_offload_cache.py &
    OUT="$L" LIMIT=$lim SHARDS=3 bash tests/run_sanitizer_shards.sh kv -k cuda tests/test_kv_cache.py &
    OUT="$L" LIMIT=$lim SHARDS=2 bash tests/run_sanitizer_shards.sh pages -k cuda tests/test_large_handles.py \
      tests/test_virtual_pages.py &
    OUT="$L" LIMIT=$lim SHARDS=4 bash tests/run_sanitizer_shards.sh compile \
      $g::test_compile_reduce_overhead_training_and_a_two_path_tree_match_native \
      $g::test_static_cache_generate_compiles_and_matches_native \
      $g::test_eager_allocations_of_another_thread_during_capture_stay_out_of_the_graph_pool \
      tests/test_torch_gpu.py::test_hugging_face_forward_and_generate_match_native &
    wait; stamp memcheck 0 ;;
  compile_train)
    mkdir -p "$L/results"; cp bench/results/compile_graphs.json "$L/results/"
    timeout $(left 580) python3 -m bench.compile_graphs train --out "$L/results" \
      > "$L/$step.log" 2>&1; stamp "$step" $? ;;
  compile_decode)
    # A round is three processes that each load the 8B shape and compile: one round at a time,
    # each added to bench/results/compile_graphs.json's rounds of the same commit (copy the
    # previous call's result there, uncommitted, before the next), until the call's time is out.
    mkdir -p "$L/results"; cp bench/results/compile_graphs.json "$L/results/"
    for _ in $(seq "${ROUNDS:-3}"); do
      timeout $(left 580) python3 -m bench.compile_graphs decode --rounds 1 --add-rounds --out "$L/results" \
        >> "$L/$step.log" 2>&1; rc=$?; stamp "$step round" $rc; [ $rc = 0 ] || break
    done ;;
  compile_history)
    timeout $(left 580) python3 -m bench.compile_graphs train --history 2 --out "$L" \
      > "$L/$step.log" 2>&1; stamp "$step" $? ;;
  *) echo "unknown step $step (sweep, memcheck, compile_train, compile_decode, compile_history)" >&2; exit 2 ;;
esac
done
