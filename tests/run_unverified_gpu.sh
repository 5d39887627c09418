#!/usr/bin/env bash
# What was built or changed without a GPU run to prove it, in one device call (under 10
# minutes on an H200): flash over rows padded to whole pages (RowSpans' row_positions), the
# graph and KV tests on cuda at the final layout (K and V share pages: the layout itself ran on
# the GPU at 33873f8, the row_positions change after it did not); the A/B of the key buckets
# (flash told 20K against told the whole 32K reservation); the fused small kernels
# (GraphDecoder(fuse_small_kernels=True): its test on cuda here, its speed in graph_decode with
# patch_generate(graph_fuse=True) against False); and compute-sanitizer memcheck over
# the offload cache tests (issue 26: the set memcheck has not reached). Logs under $OUT (or
# ./gpu-logs), tarred.
#
#   VMMALLOC_COMMIT=$(git rev-parse --short HEAD) bash tests/run_unverified_gpu.sh
#
# Needing calls of their own: `python -m bench.run graph_decode --backend cuda` (about 510 s:
# six systems, the fused A/B included; give it the whole call; predicted at the shared-pages layout: KV mapped / held
# about 1.028, the step as at 5f27f5d), `VMMALLOC=1 python -m bench.graph_decode_profile`
# (about 30 s after a build), `python -m bench.graph_decode sweep` (contexts 2K-64K, longer),
# `python -m bench.compile_graphs train` and `python -m bench.compile_graphs decode` (issue 19;
# the whole `bench.run compile_graphs` is about 15 minutes, more than one call: one workload a
# call, about 4 minutes a round for train), with the graphs' pool snapshot (bench/NOTES.md:
# where the pool's 0.98 GB over its peak comes from).
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
timeout $(left 240) python3 -m pytest -q -rs --durations=15 tests/test_graph_decode.py tests/test_length_attention.py \
  tests/test_kv_cache.py tests/test_offload_cache.py -k "cuda or gpu or graph or spans" > "$L/tests.log" 2>&1; stamp tests $?
timeout $(left 300) python3 -m bench.decode_attention --capacity 32768 --out "$OUT/decode_attention_32k.json" \
  > "$L/decode_attention_32k.log" 2>&1; stamp decode_attention_32k $?
timeout $(left 570) compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
  python3 -m pytest -q -rf -p no:cacheprovider -k cuda tests/test_offload_cache.py \
  > "$L/sanitizer_memcheck_offload.log" 2>&1; stamp memcheck_offload $?
