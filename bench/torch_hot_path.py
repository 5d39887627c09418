"""torch.empty + del of cached blocks over mixed sizes: vmmalloc against PyTorch's native
caching allocator, each in its own process, same sizes, same loop.

Target (issue: drop-in allocator): vmmalloc at most 1.10x native's time per pair. Both
systems run pinned to the same CPU, in alternating order over rounds; the ratio is the
median of the rounds' ratios.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench.workers import benchmark_cpu, run_worker, worker_main

MiB = 1 << 20
SIZES = [512, 4096, 65536, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]


def populate(torch, sizes: list[int]) -> None:
    """One block of each size in the cache, so that the timed pairs are cached ones."""
    for size in sizes:
        torch.empty(size, dtype=torch.uint8, device="cuda")


def pair_times(torch, sizes: list[int], rounds: int, repeats: int) -> list[float]:
    """ns per torch.empty + del pair over `sizes`, `rounds` times: one figure per repeat."""
    empty, uint8 = torch.empty, torch.uint8
    device = torch.device("cuda")
    per_repeat = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(rounds):
            for size in sizes:
                t = empty(size, dtype=uint8, device=device)
                del t
        per_repeat.append((time.perf_counter_ns() - start) / (rounds * len(sizes)))
    return per_repeat


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    populate(torch, SIZES)
    per_repeat = pair_times(torch, SIZES, args["rounds"], args["repeats"])
    import vmmalloc

    return {"ns_per_pair": statistics.median(per_repeat), "repeats_ns": per_repeat,
            "vmmalloc_enabled": vmmalloc.is_enabled()}


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    args = {"rounds": 2000 if quick else 10000, "repeats": 5 if quick else 9, "pin_cpu": benchmark_cpu()}
    # Rounds in alternating order, each system in a fresh process on the same CPU; the ratio
    # is the median of the rounds' ratios (bench/NOTES.md: one process each is not enough).
    rounds = 2 if quick else 4
    per_round: list[dict[str, Any]] = []
    for r in range(rounds):
        order = ("native", "vmmalloc") if r % 2 == 0 else ("vmmalloc", "native")
        per_round.append({name: run_worker("bench.torch_hot_path", name, args) for name in order})
        assert per_round[-1]["vmmalloc"]["vmmalloc_enabled"] and not per_round[-1]["native"]["vmmalloc_enabled"]
    ratios = [r["vmmalloc"]["ns_per_pair"] / r["native"]["ns_per_pair"] for r in per_round]
    ratio = statistics.median(ratios)
    systems = {name: {"ns_per_pair": statistics.median(r[name]["ns_per_pair"] for r in per_round),
                      "rounds_ns": [r[name]["ns_per_pair"] for r in per_round],
                      "repeats_ns": [r[name]["repeats_ns"] for r in per_round],
                      "vmmalloc_enabled": all(r[name]["vmmalloc_enabled"] for r in per_round)}
               for name in ("native", "vmmalloc")}
    return {
        "benchmark": "torch_hot_path",
        "sizes": SIZES,
        "pinned_cpu": args["pin_cpu"],
        "systems": systems,
        "ratios": {"vmmalloc_vs_native_time": ratio, "per_round_vmmalloc_vs_native_time": ratios},
        "targets": {"vmmalloc_vs_native_time_max": 1.10},
        "met": {"hot_path": ratio <= 1.10},
    }


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    s = result["systems"]
    return [("torch.empty+del, native", f"{s['native']['ns_per_pair']:.0f} ns", ""),
            ("torch.empty+del, vmmalloc", f"{s['vmmalloc']['ns_per_pair']:.0f} ns", ""),
            ("torch.empty+del: time vmmalloc / native", f"{result['ratios']['vmmalloc_vs_native_time']:.2f}x",
             "<= 1.10x")]


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(measure)
