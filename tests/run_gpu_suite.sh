#!/usr/bin/env bash
# Builds vmmalloc and runs the whole test suite (GPU tests included) plus the core
# benchmark on the cuda backend. Made for the GPU machine, where nothing can be
# downloaded: the build uses the installed torch/pybind11/setuptools.
#
#   bash tests/run_gpu_suite.sh            # logs and results under $OUT (or ./gpu-logs)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -5 | tee "$OUT/build.log"
python3 -c "import vmmalloc; print('cuda:', vmmalloc.cuda_available() or vmmalloc.cuda_unavailable_reason())"

python3 -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.log"
status=$(( status | ${PIPESTATUS[0]} ))

python3 -m bench.run core_hot_path --backend cuda --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
status=$(( status | ${PIPESTATUS[0]} ))

# A short soak through torch (tests/gpu_soak.py; longer: --seconds 240).
VMMALLOC=1 python3 tests/gpu_soak.py --seconds "${SOAK_SECONDS:-30}" --out "$OUT/soak.json" 2>&1 | tee "$OUT/soak.log"
status=$(( status | ${PIPESTATUS[0]} ))

echo "GPU suite summary: $(grep -E '^[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -1) (exit $status)"
exit $status
