#!/usr/bin/env bash
# A/B of allocator settings on the FSDP2 benchmark's workload (2 GPUs, ranks pinned), each
# setting in its own torchrun, the settings in rotating order over rounds:
#   bash bench/multi_gpu_ab.sh OUT_FILE SETTING [SETTING ...]
# SETTING is "native" (PyTorch's allocator) or a VMMALLOC_CONF string ("" for defaults).
# ROUNDS (default 2) sets the rounds. One line per run: setting, step time (median of the
# slowest rank's steps 4-24), stitches and cross-stream waits per rank, reserved/allocated.
set -uo pipefail
out=${1:?usage: bash bench/multi_gpu_ab.sh OUT_FILE SETTING [SETTING ...]}
shift
settings=("$@")
rounds=${ROUNDS:-2}
one() {
  local setting=$1 env_args
  if [ "$setting" = native ]; then env_args=(VMMALLOC=0); else env_args=(VMMALLOC=1 "VMMALLOC_CONF=$setting"); fi
  env "${env_args[@]}" torchrun --nproc-per-node 2 -m bench.multi_gpu_train --mode fsdp2 --steps 24 \
      --layers 16 --hidden 2048 --dtype bfloat16 --gradient-checkpointing --max-batch 8 --max-seq 2048 \
      --pin-cpus 2>/dev/null > "$tmp"
  SETTING="$setting" python3 - "$tmp" <<'PY' | tee -a "$out"
import json, os, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("RESULT ")]
name = os.environ["SETTING"] or "(defaults)"
if not lines:
    print(f"{name:<40} failed: no RESULT line")
    sys.exit()
ranks = json.loads(lines[-1][len("RESULT "):])["ranks"]
step = max(r["step_time_median"] for r in ranks)
ratio = max(r.get("ratio", float("nan")) for r in ranks)
print(f"{name:<40} step {step:.4f} s  stitches {[r.get('stitches') for r in ranks]}  "
      f"repaired {[r.get('repaired_chunks') for r in ranks]}  waits {[r.get('cross_stream_waits') for r in ranks]}  ratio {ratio:.3f}  allocator ms per step "
      f"{[round(r['host_time_ns'] / 1e6 / len(r['step_times']), 1) if r.get('host_time_ns') else None for r in ranks]}")
PY
}
tmp=$(mktemp)
n=${#settings[@]}
for ((round = 0; round < rounds; round++)); do
  for ((i = 0; i < n; i++)); do one "${settings[$(((i + round) % n))]}"; done
done
