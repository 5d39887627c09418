#!/usr/bin/env bash
# Quick GPU check of the torch adapter: build, the graph/pool tests, the torch tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-logs}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -3
python3 -m vmmalloc.torch_adapter 2>&1 | tail -30
python3 -m pytest -q -x -rs tests/test_graphs_gpu.py "$@" 2>&1 | tee "$OUT/graphs.log" | tail -60
