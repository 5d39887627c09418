"""What granting a second GPU access to vmmalloc memory costs (Note [Peer access]).

- fresh mapping: a 1 GiB allocation that creates, maps and grants 512 new chunks, with the
  allocator's own device only and with one peer added;
- backfill: add_peer on an allocator with 4 GiB mapped (what the registry does when a
  process starts using a second GPU).

Prediction (docs/FACTS.md: cuMemSetAccess 25-33 us per handle): a peer adds about one more
grant per handle, so a fresh chunk goes from about 35 us to about 60-65 us, and the
backfill costs about 30 us per mapped chunk (about 60 ms for 4 GiB), once per process.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

GiB = 1 << 30
CHUNK = 2 << 20


def fresh_allocation_us(peer: int | None, bytes_: int = GiB, repeats: int = 5) -> list[float]:
    from vmmalloc import _C

    allocator = _C.Allocator(_C.CudaBackend(0))
    if peer is not None and not allocator.add_peer(peer):
        raise RuntimeError(f"GPU {peer} has no peer path to GPU 0; nothing to measure")
    per_chunk = []
    for _ in range(repeats):
        allocator.empty_cache()
        start = time.perf_counter()
        p = allocator.allocate(bytes_)
        per_chunk.append((time.perf_counter() - start) * 1e6 / (bytes_ // CHUNK))
        allocator.deallocate(p)
    allocator.empty_cache()
    return per_chunk


def backfill_ms(peer: int, bytes_: int = 4 * GiB, repeats: int = 5) -> list[float]:
    from vmmalloc import _C

    times = []
    for _ in range(repeats):
        allocator = _C.Allocator(_C.CudaBackend(0))
        p = allocator.allocate(bytes_)
        start = time.perf_counter()
        allocator.add_peer(peer)
        times.append((time.perf_counter() - start) * 1e3)
        allocator.deallocate(p)
        allocator.empty_cache()
    return times


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    import torch

    if torch.cuda.device_count() < 2:
        raise RuntimeError(f"bench.peer_access needs at least 2 GPUs; this machine has {torch.cuda.device_count()}")
    repeats = 3 if quick else 7
    own = fresh_allocation_us(None, repeats=repeats)
    peer = fresh_allocation_us(1, repeats=repeats)
    backfill = backfill_ms(1, repeats=repeats)
    result = {
        "benchmark": "peer_access",
        "systems": {
            "own_device_only": {"fresh_chunk_us": own, "median": statistics.median(own)},
            "one_peer": {"fresh_chunk_us": peer, "median": statistics.median(peer)},
            "backfill_4GiB": {"ms": backfill, "median": statistics.median(backfill),
                              "per_chunk_us": statistics.median(backfill) * 1e3 / (4 * GiB // CHUNK)},
        },
    }
    result["ratios"] = {"fresh_chunk_with_peer_vs_without": result["systems"]["one_peer"]["median"]
                        / result["systems"]["own_device_only"]["median"]}
    print(f"[peer_access] fresh chunk: {statistics.median(own):.1f} us alone, {statistics.median(peer):.1f} us "
          f"with a peer; backfill of 4 GiB: {statistics.median(backfill):.1f} ms", flush=True)
    return result


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    s = result["systems"]
    return [
        ("fresh chunk (create+map+grant), own device", f"{s['own_device_only']['median']:.1f} us", ""),
        ("fresh chunk with one peer granted", f"{s['one_peer']['median']:.1f} us",
         f"{result['ratios']['fresh_chunk_with_peer_vs_without']:.2f}x"),
        ("peer backfill per mapped chunk", f"{s['backfill_4GiB']['per_chunk_us']:.1f} us", "once per process"),
    ]
