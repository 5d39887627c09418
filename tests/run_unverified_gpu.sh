#!/usr/bin/env bash
# What was built without a GPU run to prove it, in one device call (about 9 minutes on an
# H200): the introspection test, the soak, the sleep/wake and compile benchmarks in full, and
# memcheck over the torch-level tests. Logs and results under $OUT (or ./gpu-logs), tarred.
#
#   VMMALLOC_COMMIT=$(git rev-parse --short HEAD) bash tests/run_unverified_gpu.sh
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
timeout $(left 120) python3 -m pytest -q -rs tests/test_history_gpu.py tests/test_sleep_gpu.py > "$L/tests.log" 2>&1; stamp tests $?
VMMALLOC=1 timeout 200 python3 tests/gpu_soak.py --seconds 180 --out "$L/soak.json" > "$L/soak.log" 2>&1; stamp soak $?
timeout $(left 400) python3 -m bench.run sleep_wake --backend cuda --out "$L" > "$L/sleep_wake.log" 2>&1; stamp sleep_wake $?
timeout $(left 560) compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
  python3 -m pytest -q -p no:cacheprovider tests/test_torch_gpu.py tests/test_graphs_gpu.py -k "not compile and not static_cache and not hugging_face" \
  > "$L/sanitizer_memcheck_torch.log" 2>&1; stamp memcheck $?
# compile_graphs in full (3 rounds of 3 systems) needs a call of its own: about 15 minutes.
