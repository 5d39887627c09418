#!/usr/bin/env bash
# Builds vmmalloc and runs the whole test suite (GPU tests included) plus the core
# benchmark on the cuda backend. Made for the GPU machine, where nothing can be
# downloaded: the build uses the installed torch/pybind11/setuptools.
#
#   bash tests/run_gpu_suite.sh            # logs and results under $OUT (or ./gpu-logs)
#   PART=a bash tests/run_gpu_suite.sh     # the graph, KV and pool tests (400 s on an H200, c7d037d)
#   PART=b bash tests/run_gpu_suite.sh     # the other tests (500 s)
#   PART=c bash tests/run_gpu_suite.sh     # the core benchmark and a 240 s soak (about 300 s)
# The whole suite is longer than one 10-minute device call; the three parts are three calls
# (b with the benchmark and soak after it outran one, 2026-12-04).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -5 | tee "$OUT/build.log"
python3 -c "import vmmalloc; print('cuda:', vmmalloc.cuda_available() or vmmalloc.cuda_unavailable_reason())"

PART_A="tests/test_graph_decode.py tests/test_graphs_gpu.py tests/test_kv_cache.py tests/test_offload_cache.py
  tests/test_length_attention.py tests/test_virtual_pages.py tests/test_private_pools.py"
case "${PART:-all}" in
  all) tests="tests" ;;
  a) tests="$PART_A" ;;
  b) tests="$(ls tests/test_*.py | grep -v -F -x -f <(printf '%s\n' $PART_A) | tr '\n' ' ')" ;;
  c) tests="" ;;
  *) echo "PART must be a, b, c or all, got ${PART}" >&2; exit 2 ;;
esac
if [ -n "$tests" ]; then
  # shellcheck disable=SC2086  # the file list splits on spaces
  python3 -m pytest -q -rs $tests 2>&1 | tee "$OUT/pytest.log"
  status=$(( status | ${PIPESTATUS[0]} ))
fi
case "${PART:-all}" in
  a|b)
    echo "GPU suite summary (part ${PART}): $(grep -E '^[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -1) (exit $status)"
    exit $status ;;
esac

python3 -m bench.run core_hot_path --backend cuda --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
status=$(( status | ${PIPESTATUS[0]} ))

# A soak through torch (tests/gpu_soak.py): 30 s after the whole suite, 240 s as part c.
soak_default=30
[ "${PART:-all}" = c ] && soak_default=240
VMMALLOC=1 python3 tests/gpu_soak.py --seconds "${SOAK_SECONDS:-$soak_default}" --out "$OUT/soak.json" 2>&1 | tee "$OUT/soak.log"
status=$(( status | ${PIPESTATUS[0]} ))

if [ "${PART:-all}" = c ]; then
  echo "GPU suite summary (part c): benchmark and soak (exit $status)"
else
  echo "GPU suite summary: $(grep -E '^[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -1) (exit $status)"
fi
exit $status
