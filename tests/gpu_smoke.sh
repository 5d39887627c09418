#!/usr/bin/env bash
# The torch adapter on a GPU machine: build vmmalloc and the adapter, then the adapter's GPU
# tests (graphs, compile, MemPool) and the torch tests; logs under $OUT (or ./gpu-logs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-logs}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -3
( time python3 -m vmmalloc.torch_adapter ) 2>&1 | tail -20 | tee "$OUT/adapter_build.log"
timeout "${SMOKE_TIMEOUT:-540}" python3 -m pytest -q -rs --durations=15 tests/test_graphs_gpu.py tests/test_torch_gpu.py "$@" 2>&1 | tee "$OUT/smoke.log" | tail -150
