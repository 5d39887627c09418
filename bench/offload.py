"""Layer-by-layer KV offloading (OffloadedKVCache) on a Llama-3-8B-shaped model (random bf16
weights) against transformers' own offloading (DynamicCache(offloading=True)) and, where it
fits, VirtualKVCache with no offloading; each system in its own process, same prompts, greedy.

First the limit: pinned host-to-device and device-to-host bandwidth (1 GiB copies). Then
decode at 32K and 64K context, batch 4, with a KV budget of 25% of the full KV. Measured on
an H200 (docs/FACTS.md): transformers' offloading reaches 2.09 tok/s at 32K, batch 4. Targets: at
least 70% of the PCIe limit for the bytes that must move (>= 4x transformers there); at least
80% of the time that could overlap does (Note [Overlap] below); peak GPU KV at most the budget
plus two layers. Last, time to first token of long prompts (batch 1) under a memory cap below
the prompt's full KV, with a plot.

    python -m bench.run offload --backend cuda

Note [Overlap]
A step with offloading does the no-offload step's work (t_compute, measured with
VirtualKVCache) and keeps the copy engine busy for t_busy (timing events around each fetch,
OffloadedKVCache.copy_times). Perfect overlap makes the step max(t_compute, t_busy); none
makes it the sum. Decode is transfer bound on this shape (t_busy >> t_compute), so the
question is how much of the compute runs under the copies: overlap = 1 - (t_step -
t_busy) / t_compute, clamped to [0, 1], with t_step and t_busy means over the same steps
(t_busy is per fetch times the offloaded layers: the prompt fetches nothing and the last
step prefetches for a step that never comes). (A first version compared the step with the probe's
bandwidth instead of the busy time; a copy rate a few percent below the probe's, in the
loop, then reads as no overlap at all, because t_compute is 5% of the step.)
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.kv_cache import build_model, kv_bytes
from bench.workers import HF_PRELOAD, WarmWorkers, worker_main

GB = 1e9
GIB = 1 << 30
# system -> allocator it runs under
SYSTEMS = {"offload": "vmmalloc", "transformers_offload": "native", "vmm": "vmmalloc"}
BUDGET_FRACTION = 0.25
TTFT_SYSTEMS = {"offload": "vmmalloc", "transformers_offload": "native", "vmm": "vmmalloc", "dynamic": "native"}
TTFT_HEADROOM = 10 * GIB  # GPU memory beyond the weights in the time-to-first-token runs
TTFT_BUDGET = 2 * GIB
TARGETS = {"fraction_of_pcie_limit": ">= 0.70", "tok_s_vs_transformers_offload": ">= 4.0",
           "overlap": ">= 0.80", "peak_kv_over_budget_plus_two_layers": "<= 1.0"}


def measure_bandwidth(torch) -> dict[str, float]:
    """Pinned host<->device copy rates (bytes/s, median of 5 copies of 1 GiB each way) and
    the rate of pinning host memory in place."""
    from vmmalloc.integrations.pinned_host import HostBuffer

    start = time.perf_counter()
    host = HostBuffer(GIB, torch.device("cuda"), "the bandwidth probe")
    pin_s = time.perf_counter() - start
    if not host.pinned:
        raise RuntimeError("the bandwidth probe could not pin host memory")
    device = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    rates = {}
    for name, dst, src in (("h2d", device, host.tensor), ("d2h", host.tensor, device)):
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rates[f"{name}_bytes_per_s"] = GIB / statistics.median(times[1:])
    rates["pin_bytes_per_s"] = GIB / pin_s
    host.close()
    return rates


def _generate(torch, model, system: str, ids, new_tokens: int, budget: int | None, clock=None):
    """One greedy generate() with the system's cache; returns (output, cache)."""
    from transformers import DynamicCache, StoppingCriteriaList

    from vmmalloc.integrations import patched_generate

    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, disable_compile=True, return_dict_in_generate=True)
    if clock is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([clock])
    from vmmalloc.integrations.hf_compat import cache_kwargs, output_cache

    with torch.no_grad():
        if system == "offload":
            from vmmalloc.integrations import OffloadedKVCache

            cache = OffloadedKVCache(model.config, kv_budget=budget, max_length=ids.shape[1] + new_tokens + 64)
            cache.copy_times = [] if clock is not None else None
            with patched_generate("offload", kv_budget=budget):  # for the attention function
                out = model.generate(ids, **cache_kwargs(cache), **kwargs)
        elif system == "vmm":
            with patched_generate("vmm"):
                out = model.generate(ids, **kwargs)
        else:
            cache = DynamicCache(config=model.config, offloading=system == "transformers_offload")
            out = model.generate(ids, **cache_kwargs(cache), **kwargs)
    return out.sequences, output_cache(out)


def decode_point(torch, model, system: str, batch: int, context: int, new_tokens: int) -> dict[str, Any]:
    from transformers import StoppingCriteria

    import vmmalloc
    from vmmalloc.virtual_tensor import allocator_for

    pages = allocator_for(torch.device("cuda")) if vmmalloc.is_enabled() else None

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            # The compute stream only, as generate()'s own end-of-step check waits: a device-wide
            # synchronize would also wait for the next step's prefetches and idle the copy engine
            # at every step boundary (bench/NOTES.md, offloading, 9).
            torch.cuda.current_stream().synchronize()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    full_kv = kv_bytes(model.config, batch, context + new_tokens)
    budget = int(BUDGET_FRACTION * full_kv)
    g = torch.Generator(device="cuda").manual_seed(context + batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kv_base = pages.stats()["vmm.kv_mapped_bytes.current"] if pages else 0
    if pages:
        pages.reset_peak_stats()
    from vmmalloc.integrations.pinned_host import pinning_totals

    pinned = pinning_totals()
    clock = StepClock()
    start = time.perf_counter()
    try:
        out, cache = _generate(torch, model, system, ids, new_tokens, budget, clock)
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return {"ok": False, "batch": batch, "context": context, "error": str(error).splitlines()[0][:300]}
    # The last step queued prefetches for a step that never comes; their timing events are
    # read below. The clock's times are taken already.
    torch.cuda.synchronize()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    result = {
        "ok": True, "batch": batch, "context": context, "new_tokens": new_tokens,
        "ttft_s": clock.times[0] - start,
        "decode_tok_s": batch * len(steps) / sum(steps),
        "step_median_s": statistics.median(steps),
        "step_times_s": steps,
        "weights_bytes": weights,
        "kv_bytes": full_kv,
        "kv_budget_bytes": budget,
        "layer_kv_bytes": full_kv // model.config.num_hidden_layers,
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
    }
    if pages:
        result["peak_kv_mapped"] = pages.stats()["vmm.kv_mapped_bytes.peak"] - kv_base
    if system == "offload":
        # Every decode step fetches each offloaded layer once; the prompt fetches none and the
        # last step prefetches the first layers of a step that never comes, so per-step
        # figures are per fetch times the offloaded layers (not totals over new_tokens).
        fetches, offloaded = len(cache.copy_times), len(cache.offloaded_layers)
        if not fetches:
            raise RuntimeError(f"no layer was fetched at context {context}: the budget {budget} holds every layer")
        busy_s = sum(a.elapsed_time(b) for a, b in cache.copy_times) / 1e3
        result.update(offloaded_layers=offloaded, resident_layers=len(cache.resident_layers), fetches=fetches,
                      bytes_to_device_per_step=cache.bytes_to_device / fetches * offloaded,
                      bytes_to_host=cache.bytes_to_host,
                      host_pinned=all(cache.layers[i].host.pinned for i in cache.offloaded_layers),
                      pin_seconds=pinning_totals()["seconds"] - pinned["seconds"],
                      # the copy engine's busy time per step (timing events around each fetch)
                      copy_busy_per_step_s=busy_s / fetches * offloaded,
                      in_loop_h2d_bytes_per_s=cache.bytes_to_device / busy_s)
        cache.free()
    del out, cache
    return result


def ttft_point(torch, model, system: str, context: int) -> dict[str, Any]:
    from vmmalloc.integrations.pinned_host import pinning_totals

    g = torch.Generator(device="cuda").manual_seed(context)
    ids = torch.randint(3, model.config.vocab_size, (1, context), device="cuda", generator=g)
    torch.cuda.synchronize()
    pinned = pinning_totals()
    start = time.perf_counter()
    try:
        out, cache = _generate(torch, model, system, ids, 1, TTFT_BUDGET)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as error:
        ids = None
        torch.cuda.empty_cache()
        return {"ok": False, "context": context, "error": str(error).splitlines()[0][:200]}
    elapsed = time.perf_counter() - start
    if hasattr(cache, "free"):
        cache.free()
    del out, cache
    torch.cuda.empty_cache()
    pinned_after = pinning_totals()
    return {"ok": True, "context": context, "ttft_s": elapsed, "peak_reserved": torch.cuda.max_memory_reserved(),
            "pinned_bytes": pinned_after["bytes"] - pinned["bytes"],
            "pin_seconds": pinned_after["seconds"] - pinned["seconds"]}


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    import vmmalloc

    system = args["cache"]
    if (SYSTEMS.get(system) or TTFT_SYSTEMS[system]) == "vmmalloc" and not vmmalloc.is_enabled():
        raise RuntimeError(f"{system} must run with vmmalloc enabled")
    points = args.get("points", [])
    contexts = args.get("ttft_contexts", [])
    model = build_model(torch, max([c + n for _, c, n in points] + contexts) + 256)
    result: dict[str, Any] = {"cache": system}
    if args.get("bandwidth"):
        result["bandwidth"] = measure_bandwidth(torch)
    decode_point(torch, model, system, points[0][0] if points else 1, 512, 4)  # warm-up: kernels loaded
    result["decode"] = [decode_point(torch, model, system, b, c, n) for b, c, n in points]
    if contexts:
        weights = torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((weights + TTFT_HEADROOM) / total)
        result["ttft_cap_bytes"] = weights + TTFT_HEADROOM
        result["ttft"] = [ttft_point(torch, model, system, c) for c in contexts]
    return result


def decode_ratios(systems: dict[str, Any], contexts: list[int]) -> dict[str, float]:
    """The decode ratios of Note [Overlap] from the systems' measurements. The copy figures
    per step are means over the steps (per fetch times the offloaded layers), so they are
    compared with the mean step; the no-offload step is the median (its first step can wait
    on memory released under pressure, which is not compute)."""
    bandwidth = systems["offload"]["bandwidth"]
    ratios: dict[str, float] = {}
    for i, context in enumerate(contexts):
        ours = systems["offload"]["decode"][i]
        if not ours["ok"]:
            continue
        step = statistics.mean(ours["step_times_s"])
        t_transfer = ours["bytes_to_device_per_step"] / bandwidth["h2d_bytes_per_s"]
        key = f"{context // 1024}k"
        ratios[f"{key}_fraction_of_pcie_limit"] = t_transfer / step
        ratios[f"{key}_peak_kv_over_budget_plus_two_layers"] = ours["peak_kv_mapped"] / (
            ours["kv_budget_bytes"] + 2 * ours["layer_kv_bytes"])
        peer = systems["transformers_offload"]["decode"][i]
        if peer["ok"]:
            ratios[f"{key}_tok_s_vs_transformers_offload"] = ours["decode_tok_s"] / peer["decode_tok_s"]
        ratios[f"{key}_copy_busy_fraction_of_step"] = ours["copy_busy_per_step_s"] / step
        plain = systems["vmm"]["decode"][i]
        if plain["ok"]:
            t_compute = plain["step_median_s"]
            exposed = max(0.0, step - ours["copy_busy_per_step_s"])
            ratios[f"{key}_overlap"] = max(0.0, 1.0 - exposed / t_compute)
            ratios[f"{key}_tok_s_vs_vmm_no_offload"] = ours["decode_tok_s"] / plain["decode_tok_s"]
    return ratios


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    if backend != "cuda":
        raise ValueError("the offload benchmark needs a GPU (--backend cuda)")
    new = {"offload": 16, "vmm": 16, "transformers_offload": 6}
    contexts = [8192] if quick else [32768, 65536]
    ttft_contexts = [8192, 16384] if quick else [16384, 32768, 49152, 65536]
    systems: dict[str, Any] = {}
    with WarmWorkers("bench.offload", set(TTFT_SYSTEMS.values())) as workers:
        for cache in TTFT_SYSTEMS:
            points = [[4, c, new[cache]] for c in contexts] if cache in SYSTEMS else []
            if cache == "transformers_offload":
                # Its host copies are new unpinned tensors each step; at 64K, batch 4 (34 GB of KV)
                # the kernel killed it for host memory on a 128 GB machine. So each of its points
                # runs alone, and a killed one is recorded as such (quick's 8K fits: one process).
                systems[cache] = {"cache": cache, "decode": [], "ttft": []}
                parts = ([{"points": points, "ttft_contexts": ttft_contexts}] if quick else
                         [{"points": [p]} for p in points] + [{"points": [], "ttft_contexts": ttft_contexts}])
                for args in parts:
                    try:
                        part = workers.run("native", {"cache": cache, **args}, timeout=900)
                    except RuntimeError as error:
                        reason = str(error).splitlines()[0]
                        part = {"decode": [{"ok": False, "context": p[1], "error": reason} for p in args["points"]],
                                "ttft": [{"ok": False, "context": c, "error": reason}
                                         for c in args.get("ttft_contexts", [])]}
                    systems[cache]["decode"] += part["decode"]
                    systems[cache]["ttft"] += part.get("ttft", [])
                    systems[cache].setdefault("ttft_cap_bytes", part.get("ttft_cap_bytes"))
            else:
                systems[cache] = workers.run(TTFT_SYSTEMS[cache],
                                             {"cache": cache, "points": points, "ttft_contexts": ttft_contexts,
                                              "bandwidth": cache == "offload"}, timeout=1500)
            for r in systems[cache]["decode"]:
                print(f"[offload] {cache} {r['context']}: " + (f"{r['decode_tok_s']:.2f} tok/s" if r["ok"] else "OOM"),
                      flush=True)
    ratios = decode_ratios(systems, contexts)
    result = {"benchmark": "offload",
              "workload": {"model": "Llama-3-8B shape, random bf16 weights, sdpa", "batch": 4, "contexts": contexts,
                           "new_tokens": new, "kv_budget": f"{BUDGET_FRACTION:.0%} of the full KV", "greedy": True,
                           "ttft": {"batch": 1, "contexts": ttft_contexts, "memory_beyond_weights": TTFT_HEADROOM,
                                    "offload_kv_budget": TTFT_BUDGET}},
              "bandwidth": systems["offload"]["bandwidth"], "systems": systems, "ratios": ratios, "targets": TARGETS}
    return result


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [("pinned h2d / d2h GB/s", "{:.1f} / {:.1f}".format(result["bandwidth"]["h2d_bytes_per_s"] / GB,
                                                               result["bandwidth"]["d2h_bytes_per_s"] / GB), "")]
    for name, data in result["systems"].items():
        for r in data["decode"]:
            rows.append((f"{name} {r['context'] // 1024}k decode", f"{r['decode_tok_s']:.2f} tok/s" if r["ok"] else "OOM",
                         ""))
    for key, value in result["ratios"].items():
        target = next((t for name, t in TARGETS.items() if key.endswith(name)), "")
        context, _, name = key.partition("_")
        words = RATIO_WORDS.get(name, name.replace("_", " "))
        rows.append((f"{context} context: {words}", f"{value:.2f}", target))
    return rows


# What each ratio of Note [Overlap] measures, in words, for the report's rows.
RATIO_WORDS = {
    "fraction_of_pcie_limit": "copy rate in the decode loop / the pinned PCIe limit",
    "peak_kv_over_budget_plus_two_layers": "peak KV memory / (budget + the two ring layers)",
    "tok_s_vs_transformers_offload": "decode speed / transformers' offloaded cache",
    "copy_busy_fraction_of_step": "copy stream busy / step time",
    "overlap": "copy hidden under compute (1 = all of it)",
    "tok_s_vs_vmm_no_offload": "decode speed / VirtualKVCache without offloading",
}


def plot_result(result: dict[str, Any], path: Path) -> None:
    """Time to first token against prompt length under the memory cap, per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, data in result["systems"].items():
        rows = data.get("ttft", [])
        ok = [r for r in rows if r["ok"]]
        line, = ax.plot([r["context"] // 1024 for r in ok], [r["ttft_s"] for r in ok], marker="o", label=name)
        failed = [r["context"] // 1024 for r in rows if not r["ok"]]
        if failed:
            ax.scatter(failed, [0] * len(failed), marker="x", color=line.get_color(), s=60)
    ax.set_xlabel("prompt length (K tokens), batch 1")
    ax.set_ylabel("time to first token (s)")
    cap = result["systems"]["offload"].get("ttft_cap_bytes", 0) / GB
    ax.set_title(f"GPU memory capped at {cap:.1f} GB (weights + 10 GiB); x: out of memory", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.suptitle(f"Long prompts under a memory cap, Llama-3-8B shape, {result['environment'].get('gpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(measure, preload=HF_PRELOAD)
