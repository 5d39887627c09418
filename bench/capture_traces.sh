#!/usr/bin/env bash
# Records the allocation traces of the training benchmarks under vmmalloc on a GPU machine,
# for `vmmalloc replay` on any CPU (bench/NOTES.md, "Replaying traces"):
#   fragmentation.trace.gz  the single-GPU loop of bench.fragmentation (24 steps)
#   fsdp2_*.trace.gz         bench.multi_gpu_train's FSDP2 run on 2 GPUs (when there are 2)
# Usage: bash bench/capture_traces.sh OUT_DIR   (logs and per-step counters beside them)
set -euo pipefail
out=${1:?usage: bash bench/capture_traces.sh OUT_DIR}
mkdir -p "$out"
tmp=$(mktemp -d)
history=4000000  # events per device; the 24-step runs need well under this
convert() {  # snapshot pickles of $1 -> $out/$2<n>.trace.gz
  local n=0
  for snap in "$1"/*.pickle; do
    python3 -m vmmalloc replay "$snap" --save "$out/$2$n.trace.gz" | tee -a "$out/capture.log"
    n=$((n + 1))
  done
}
export PYTHONUNBUFFERED=1
vmmalloc run --history $history --out "$tmp/frag" -- \
  python3 -m bench.fragmentation --worker '{"layers": 16, "steps": 24}' 2>&1 | tee -a "$out/capture.log"
convert "$tmp/frag" fragmentation
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  vmmalloc run --history $history --out "$tmp/fsdp2" -- \
    torchrun --nproc-per-node 2 -m bench.multi_gpu_train --mode fsdp2 --steps 24 --layers 16 \
      --hidden 2048 --dtype bfloat16 --gradient-checkpointing --max-batch 8 --max-seq 2048 \
      --vmm-counters --pin-cpus 2>&1 | tee -a "$out/capture.log"
  convert "$tmp/fsdp2" fsdp2_
fi
rm -rf "$tmp"
