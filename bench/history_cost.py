"""What torch.cuda.memory._record_memory_history costs per allocation + free pair: vmmalloc
(the torch adapter, Note [Adapter history]) against PyTorch's native allocator, each system
and mode in its own process, same loop as bench/torch_hot_path.py (torch.empty + del of
cached blocks over mixed sizes).

Modes: off; "trace" (enabled="all", context=None: the trace without stacks); "python"
(stacks="python"); "all" (stacks="all": Python and C++ frames, torch's default).
Expectations (issue: introspection): off costs vmmalloc nothing beyond one relaxed load
(within noise of torch_hot_path); with stacks both systems pay torch's context recorder, so
the per-event cost is within 1.2x of native's.
"""
from __future__ import annotations

import statistics
import sys
from typing import Any

from bench.workers import benchmark_cpu, run_worker, worker_main

MiB = 1 << 20
SIZES = [512, 4096, 65536, 1 * MiB, 4 * MiB, 16 * MiB]
MODES = ("off", "trace", "python", "all")


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    import vmmalloc
    from bench.torch_hot_path import pair_times, populate

    mode, pairs, repeats = args["mode"], args["pairs"][args["mode"]], args["repeats"]
    populate(torch, SIZES)
    if mode == "trace":
        torch.cuda.memory._record_memory_history(enabled="all", context=None, max_entries=100_000)
    elif mode in ("python", "all"):
        torch.cuda.memory._record_memory_history(enabled="all", stacks=mode, max_entries=100_000)
    per_repeat = pair_times(torch, SIZES, max(1, pairs // len(SIZES)), repeats)
    entries = 0
    if mode != "off":
        entries = len(torch.cuda.memory._snapshot()["device_traces"][0])
        torch.cuda.memory._record_memory_history(enabled=None)
    return {"ns_per_pair": statistics.median(per_repeat), "repeats_ns": per_repeat, "trace_entries": entries,
            "vmmalloc_enabled": vmmalloc.is_enabled()}


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    if backend != "cuda":
        raise ValueError("history_cost needs a GPU (--backend cuda)")
    pairs = {"off": 60_000, "trace": 60_000, "python": 6_000, "all": 3_000}
    if quick:
        pairs = {k: v // 3 for k, v in pairs.items()}
    args = {"pairs": pairs, "repeats": 5, "pin_cpu": benchmark_cpu()}
    rounds = 1 if quick else 2
    results: dict[str, Any] = {}
    for mode in MODES:
        per_round = []
        for r in range(rounds):
            order = ("native", "vmmalloc") if r % 2 == 0 else ("vmmalloc", "native")
            per_round.append({s: run_worker("bench.history_cost", s, {**args, "mode": mode}) for s in order})
        ratios = [x["vmmalloc"]["ns_per_pair"] / x["native"]["ns_per_pair"] for x in per_round]
        results[mode] = {
            "native_ns": statistics.median(x["native"]["ns_per_pair"] for x in per_round),
            "vmmalloc_ns": statistics.median(x["vmmalloc"]["ns_per_pair"] for x in per_round),
            "vmmalloc_vs_native_time": statistics.median(ratios), "per_round": per_round,
        }
    for mode in MODES[1:]:  # what recording adds to a pair (two trace events, three for a free)
        for system in ("native", "vmmalloc"):
            results[mode][f"{system}_added_ns"] = results[mode][f"{system}_ns"] - results["off"][f"{system}_ns"]
    met = {"stacks_within_1.2x_native": all(results[m]["vmmalloc_vs_native_time"] <= 1.2 for m in ("python", "all"))}
    return {"benchmark": "history_cost", "sizes": SIZES, "modes": results, "pinned_cpu": args["pin_cpu"],
            "targets": {"stacks_vmmalloc_vs_native_time_max": 1.2}, "met": met}


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for mode, r in result["modes"].items():
        rows.append((f"history {mode}: pair time vmmalloc / native ({r['vmmalloc_ns']:.0f} / {r['native_ns']:.0f} ns)",
                     f"{r['vmmalloc_vs_native_time']:.2f}x", "<= 1.2x" if mode in ("python", "all") else ""))
    return rows


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(measure)
