#!/usr/bin/env bash
# What was built or changed without a GPU run to prove it, in one device call (under 10
# minutes on an H200): the IPC tests at the final code (the review mends ran on the host
# backend only), the torch-level tests whose tail the last call did not reach, and
# compute-sanitizer memcheck over the torch-level tests, stopping at the first failure so its
# report is complete. Logs under $OUT (or ./gpu-logs), tarred.
#
#   VMMALLOC_COMMIT=$(git rev-parse --short HEAD) bash tests/run_unverified_gpu.sh
#
# Needing calls of their own: `python -m bench.run sleep_wake --backend cuda` (16 and 64 GiB,
# about 10 minutes) and `python -m bench.run compile_graphs --backend cuda` (about 15).
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
timeout $(left 330) python3 -m pytest -q -rs --durations=15 tests/test_ipc_gpu.py tests/test_shared_memory.py tests/test_sleep_gpu.py \
  tests/test_torch_gpu.py > "$L/tests.log" 2>&1; stamp tests $?
timeout $(left 560) compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
  python3 -m pytest -q -x -rf -p no:cacheprovider tests/test_torch_gpu.py tests/test_graphs_gpu.py \
  -k "not compile and not static_cache and not hugging_face" > "$L/sanitizer_memcheck_torch.log" 2>&1; stamp memcheck $?
