#!/usr/bin/env bash
# compute-sanitizer over the GPU tests of the allocator, the torch layer and the KV caches,
# on a GPU machine (Firecracker kinds: the tool works there, not under gVisor).
#
#   bash tests/run_compute_sanitizer.sh      # logs and a summary under $OUT (or ./gpu-logs)
#
# memcheck runs over every test that touches device memory; racecheck and synccheck (slow)
# over the allocator's own cuda tests. The summary line per tool is the sanitizer's own
# "ERROR SUMMARY: N errors", summed over the processes it followed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-logs}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SAN="${COMPUTE_SANITIZER:-compute-sanitizer}"
"$SAN" --version | tee "$OUT/sanitizer_version.txt"
status=0
run() {
  local tool=$1; shift
  "$SAN" --tool "$tool" --target-processes all --print-limit 20 python3 -m pytest -q -p no:cacheprovider "$@" \
    > "$OUT/sanitizer_$tool.log" 2>&1
  local rc=$?
  local errors
  errors=$(grep -oE "ERROR SUMMARY: [0-9]+" "$OUT/sanitizer_$tool.log" | awk '{s += $3} END {print s + 0}')
  echo "compute-sanitizer $tool: $errors errors, pytest exit $rc ($(grep -E '^[0-9]+ (passed|failed)' "$OUT/sanitizer_$tool.log" | tail -1))" \
    | tee -a "$OUT/sanitizer_summary.txt"
  [ "$errors" = 0 ] && [ $rc = 0 ] || status=1
}
run memcheck -k cuda tests/test_allocator_behaviour.py tests/test_large_handles.py tests/test_virtual_pages.py \
  tests/test_repair.py tests/test_torch_gpu.py tests/test_graphs_gpu.py tests/test_kv_cache.py tests/test_offload_cache.py
run racecheck -k cuda tests/test_allocator_behaviour.py tests/test_virtual_pages.py
run synccheck -k cuda tests/test_allocator_behaviour.py tests/test_virtual_pages.py
exit $status
