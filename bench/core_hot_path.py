"""The allocator core's cached hit path and its stitch path, on one backend.

Peers in the same run: the C library's malloc/free for the hot path (same sizes, same
C++ timing loop), and fresh chunk creation for the stitch path.
Targets (issue: allocator core): under 200 ns per cached pair of mixed sizes; cost growing
no faster than log n in the number of free blocks.
"""
from __future__ import annotations

import math
import time
from typing import Any

import vmmalloc
from bench.common import median_of
from vmmalloc._C import testing

MiB = 1 << 20
CHUNK = vmmalloc.CHUNK_SIZE
# Mixed sizes as a training step allocates them: many small tensors, some large ones.
MIXED_SIZES = [512, 4096, 65536, 512 * 1024, 1 * MiB, 3 * MiB, 8 * MiB, 32 * MiB]
FREE_BLOCK_COUNTS = [16, 256, 4096]


def make_backend(name: str, capacity: int) -> vmmalloc.Backend:
    return vmmalloc.make_backend(name, capacity=capacity)


def hot_path(backend_name: str, rounds: int, repeats: int) -> dict[str, Any]:
    alloc = vmmalloc.Allocator(make_backend(backend_name, 1 << 30))
    mixed = median_of(repeats, lambda: testing.time_alloc_free_pairs(alloc, MIXED_SIZES, rounds))
    per_size = {
        str(size): median_of(repeats, lambda s=size: testing.time_alloc_free_pairs(alloc, [s], rounds))["median"]
        for size in MIXED_SIZES
    }
    malloc = median_of(repeats, lambda: testing.time_malloc_free_pairs(MIXED_SIZES, rounds))
    return {"mixed_ns_per_pair": mixed, "per_size_ns": per_size, "malloc_mixed_ns_per_pair": malloc}


def scaling(backend_name: str, rounds: int, repeats: int) -> dict[str, Any]:
    """ns per cached pair with n free blocks in the index: n ready one-chunk mappings
    (large pool) and n free blocks of distinct sizes (small pool)."""
    out: dict[str, Any] = {"large": {}, "small": {}}
    for n in FREE_BLOCK_COUNTS:
        capacity = (n + 8) * CHUNK
        alloc = vmmalloc.Allocator(make_backend(backend_name, capacity), f"max_cached_mappings:{n + 64}")
        held = [alloc.allocate(CHUNK) for _ in range(n)]
        for ptr in held:
            alloc.deallocate(ptr)
        out["large"][str(n)] = median_of(
            repeats, lambda a=alloc: testing.time_alloc_free_pairs(a, [CHUNK], rounds))["median"]

        # Small pool: blocks of distinct sizes with live separators, so none coalesce.
        alloc = vmmalloc.Allocator(make_backend(backend_name, (n // 64 + 16) * CHUNK))
        pairs = [(alloc.allocate(512 * (1 + i % 32)), alloc.allocate(512)) for i in range(n)]
        for free_me, _ in pairs:
            alloc.deallocate(free_me)
        out["small"][str(n)] = median_of(
            repeats, lambda a=alloc: testing.time_alloc_free_pairs(a, [512 * 7], rounds))["median"]
    lo, hi = str(FREE_BLOCK_COUNTS[0]), str(FREE_BLOCK_COUNTS[-1])
    log_ratio = math.log2(FREE_BLOCK_COUNTS[-1]) / math.log2(FREE_BLOCK_COUNTS[0])
    out["growth"] = {
        "large": out["large"][hi] / out["large"][lo],
        "small": out["small"][hi] / out["small"][lo],
        "log_n_ratio": log_ratio,
    }
    return out


def stitch_path(backend_name: str, repeats: int) -> dict[str, Any]:
    """Microseconds to serve a k-chunk request by stitching k free chunks, against creating
    k fresh chunks, each measured on a fresh allocator."""
    out: dict[str, Any] = {}
    for k in (2, 4, 16, 64):
        def stitched(k: int = k) -> float:
            alloc = vmmalloc.Allocator(make_backend(backend_name, (2 * k + 4) * CHUNK),
                                       f"memory_cap:{(2 * k) * CHUNK}")
            blocks = [alloc.allocate(CHUNK) for _ in range(2 * k)]
            for ptr in blocks[::2]:
                alloc.deallocate(ptr)
            start = time.perf_counter_ns()
            alloc.allocate(k * CHUNK)
            elapsed = time.perf_counter_ns() - start
            assert alloc.stats()["vmm.stitches"] == 1
            return elapsed / 1000

        def fresh(k: int = k) -> float:
            alloc = vmmalloc.Allocator(make_backend(backend_name, (k + 4) * CHUNK))
            start = time.perf_counter_ns()
            alloc.allocate(k * CHUNK)
            return (time.perf_counter_ns() - start) / 1000

        s, f = median_of(repeats, stitched), median_of(repeats, fresh)
        out[str(k)] = {"stitch_us": s["median"], "fresh_us": f["median"],
                       "stitch_us_per_chunk": s["median"] / k, "fresh_us_per_chunk": f["median"] / k}
    return out


def run(backend: str = "host", quick: bool = False) -> dict[str, Any]:
    rounds = 20_000 if quick else 100_000
    repeats = 5 if quick else 9
    hot = hot_path(backend, rounds, repeats)
    scale = scaling(backend, rounds // 4, repeats)
    stitch = stitch_path(backend, 5 if quick else 11)
    vmm_ns = hot["mixed_ns_per_pair"]["median"]
    return {
        "benchmark": f"core_hot_path_{backend}",
        "backend": backend,
        "mixed_sizes": MIXED_SIZES,
        "systems": {
            "vmmalloc": {"mixed_ns_per_pair": vmm_ns, "per_size_ns": hot["per_size_ns"],
                         "scaling_ns": {"large": scale["large"], "small": scale["small"]},
                         "stitch": stitch},
            "libc_malloc": {"mixed_ns_per_pair": hot["malloc_mixed_ns_per_pair"]["median"]},
        },
        "ratios": {
            "vmmalloc_vs_malloc_hot_path": vmm_ns / hot["malloc_mixed_ns_per_pair"]["median"],
            "free_block_growth_large_4096_vs_16": scale["growth"]["large"],
            "free_block_growth_small_4096_vs_16": scale["growth"]["small"],
            "log_n_ratio_4096_vs_16": scale["growth"]["log_n_ratio"],
            "stitch_vs_fresh_64_chunks": stitch["64"]["stitch_us"] / stitch["64"]["fresh_us"],
        },
        "targets": {
            "mixed_ns_per_pair_max": 200,
            "free_block_growth_max": scale["growth"]["log_n_ratio"],
        },
        "met": {
            "hot_path": vmm_ns < 200,
            "log_n_growth": max(scale["growth"]["large"], scale["growth"]["small"]) <= scale["growth"]["log_n_ratio"],
        },
    }


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    r, t = result["ratios"], result["targets"]
    vmm = result["systems"]["vmmalloc"]
    return [
        ("cached pair, mixed sizes", f"{vmm['mixed_ns_per_pair']:.0f} ns", f"< {t['mixed_ns_per_pair_max']} ns"),
        ("  vs libc malloc", f"{r['vmmalloc_vs_malloc_hot_path']:.2f}x", "(peer)"),
        ("growth 16 -> 4096 free blocks (large/small)",
         f"{r['free_block_growth_large_4096_vs_16']:.2f}x / {r['free_block_growth_small_4096_vs_16']:.2f}x",
         f"<= {t['free_block_growth_max']:.1f}x (log n)"),
        ("stitch 64 chunks vs 64 fresh chunks", f"{r['stitch_vs_fresh_64_chunks']:.2f}x",
         f"{vmm['stitch']['64']['stitch_us_per_chunk']:.1f} us/chunk"),
    ]
