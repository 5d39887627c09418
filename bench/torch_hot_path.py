"""torch.empty + del of cached blocks over mixed sizes: vmmalloc against PyTorch's native
caching allocator, each in its own process, same sizes, same loop.

Target (issue: drop-in allocator): vmmalloc at most 1.10x native's time per pair.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench.workers import run_worker, worker_main

MiB = 1 << 20
SIZES = [512, 4096, 65536, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    rounds, repeats = args["rounds"], args["repeats"]
    empty, uint8 = torch.empty, torch.uint8
    device = torch.device("cuda")
    for size in SIZES:  # populate the cache
        empty(size, dtype=uint8, device=device)
    per_repeat = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(rounds):
            for size in SIZES:
                t = empty(size, dtype=uint8, device=device)
                del t
        per_repeat.append((time.perf_counter_ns() - start) / (rounds * len(SIZES)))
    import vmmalloc

    return {"ns_per_pair": statistics.median(per_repeat), "repeats_ns": per_repeat,
            "vmmalloc_enabled": vmmalloc.is_enabled()}


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    args = {"rounds": 2000 if quick else 10000, "repeats": 5 if quick else 9}
    systems = {name: run_worker("bench.torch_hot_path", name, args) for name in ("native", "vmmalloc")}
    assert systems["vmmalloc"]["vmmalloc_enabled"] and not systems["native"]["vmmalloc_enabled"]
    ratio = systems["vmmalloc"]["ns_per_pair"] / systems["native"]["ns_per_pair"]
    return {
        "benchmark": "torch_hot_path",
        "sizes": SIZES,
        "systems": systems,
        "ratios": {"vmmalloc_vs_native_time": ratio},
        "targets": {"vmmalloc_vs_native_time_max": 1.10},
        "met": {"hot_path": ratio <= 1.10},
    }


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    s = result["systems"]
    return [("torch.empty+del, native", f"{s['native']['ns_per_pair']:.0f} ns", ""),
            ("torch.empty+del, vmmalloc", f"{s['vmmalloc']['ns_per_pair']:.0f} ns", ""),
            ("  vmmalloc / native", f"{result['ratios']['vmmalloc_vs_native_time']:.2f}x", "<= 1.10x")]


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(measure)
