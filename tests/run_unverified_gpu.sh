#!/usr/bin/env bash
# What was built or changed without a GPU run to prove it, in one device call (under 10
# minutes on an H200): the graph decoder after its review mends (mapping to block ends, the
# weights in the recording's key, no cycle through the output, the refusals, the patch's kept
# cache), the KV and offload cache tests on cuda, and compute-sanitizer memcheck over the KV
# and offload cache tests (issue 26: the one set memcheck has not finished). Logs under $OUT
# (or ./gpu-logs), tarred.
#
#   VMMALLOC_COMMIT=$(git rev-parse --short HEAD) bash tests/run_unverified_gpu.sh
#
# Needing calls of their own: `python -m bench.run graph_decode --backend cuda` (about 5
# minutes: the graph path after the one-mask-per-shape fix, and the paged peer's first run),
# `VMMALLOC=1 python -m bench.graph_decode_profile` (about 2 minutes: where a replayed step's
# time goes), `python -m bench.graph_decode sweep` (contexts 2K-64K, longer), and
# `python -m bench.run compile_graphs --backend cuda` (about 15).
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
timeout $(left 260) python3 -m pytest -q -rs --durations=15 tests/test_graph_decode.py tests/test_length_attention.py \
  tests/test_kv_cache.py tests/test_offload_cache.py -k "cuda or gpu or graph" > "$L/tests.log" 2>&1; stamp tests $?
timeout $(left 570) compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
  python3 -m pytest -q -rf -p no:cacheprovider -k cuda tests/test_kv_cache.py tests/test_offload_cache.py \
  > "$L/sanitizer_memcheck_kv.log" 2>&1; stamp memcheck_kv $?
