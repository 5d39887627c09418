"""`vmmalloc demo` without a GPU: the demo's serving workload replayed on the host backend.

The GPU demo's requests (vmmalloc.demo_worker.schedule) are replayed as the allocations
generate() makes, scaled down to CPU memory: weights once; per request, prefill
temporaries, then a KV cache per layer that grows every step. "no stitching" (the side
named "native" in the results) is vmmalloc's allocator with stitching off, which caches
blocks as PyTorch's allocator does, and a KV cache grown by concatenation (allocate the
longer tensor, copy, free the shorter one), as
DynamicCache does with torch.cat. "vmmalloc" stitches, and keeps KV in virtual ranges
whose pages are mapped as the tokens arrive (VirtualKVCache). Both record their events,
so the same timeline is drawn.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import vmmalloc
from vmmalloc import memory_history, timeline

MiB = 1 << 20
LAYERS = 8
KV_TOKEN_BYTES = 8 * 64 * 2     # one of K or V, one layer: kv heads x head dim x bf16
HIDDEN_TOKEN_BYTES = 1024 * 2   # hidden size x bf16
WEIGHT_BYTES = 256 * MiB
CAPACITY = 16 << 30             # memfd size; pages are never touched, so nothing is resident


def _replay(alloc: Any, plan: list[tuple[int, int, int]], virtual_kv: bool,
            progress: Callable[[], None]) -> int:
    """Runs the plan on `alloc`; returns the peak KV bytes held."""
    weights = alloc.allocate(WEIGHT_BYTES)
    peak_kv = 0
    for batch, prompt, new in plan:
        # Prefill temporaries: hidden states and the MLP's wider intermediate.
        temps = [alloc.allocate(batch * prompt * HIDDEN_TOKEN_BYTES * k) for k in (1, 3, 3, 1)]
        ranges: list[Any] = []
        tensors: list[Any] = []
        if virtual_kv:
            ranges = [vmmalloc._C.VirtualRange(alloc, batch * (prompt + new) * KV_TOKEN_BYTES)
                      for _ in range(2 * LAYERS)]
        for step in range(new + 1):
            length = prompt + step
            kv_bytes = batch * length * KV_TOKEN_BYTES
            if virtual_kv:
                for r in ranges:
                    r.commit(1, 0, 0, kv_bytes)
                held = sum(r.live_bytes for r in ranges)
            else:  # torch.cat: the longer tensor exists before the shorter one is freed
                grown = [alloc.allocate(kv_bytes) for _ in range(2 * LAYERS)]
                for ptr in tensors:
                    alloc.deallocate(ptr)
                tensors = grown
                held = len(tensors) * kv_bytes
            peak_kv = max(peak_kv, held)
            logits = alloc.allocate(batch * 32000 * 4)
            alloc.deallocate(logits)
            if step == 0:
                for ptr in temps:
                    alloc.deallocate(ptr)
        for r in ranges:
            r.free()
        for ptr in tensors:
            alloc.deallocate(ptr)
        progress()
    alloc.deallocate(weights)
    return peak_kv


def run_side(system: str, plan: list[tuple[int, int, int]], progress: Callable[[], None]) -> dict[str, Any]:
    """One side of the host demo; returns the figures and the snapshot."""
    backend = vmmalloc.make_backend("host", capacity=CAPACITY)
    stitching = system == "vmmalloc"
    alloc = vmmalloc.Allocator(backend, f"stitching:{str(stitching).lower()}")
    memory_history.record_allocator_history(alloc, max_entries=200_000)
    peak_kv = _replay(alloc, plan, virtual_kv=stitching, progress=progress)
    stats = alloc.stats()
    snapshot = memory_history.snapshot_of({0: alloc})
    return {
        "timeline_data": timeline.from_snapshot(snapshot),
        "system": system,
        "peak_reserved": stats["reserved_bytes.all.peak"],
        "peak_allocated": stats["allocated_bytes.all.peak"],
        "stitches": stats["vmm.stitches"],
        "peak_kv": peak_kv,
        "device_allocs": stats["num_device_alloc"],
        "snapshot_data": snapshot,
        "requests": len(plan),
    }
