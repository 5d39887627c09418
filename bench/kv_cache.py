"""Decode speed and memory of KV caches on a Llama-3-8B-shaped model (random bf16 weights):
VirtualKVCache under vmmalloc against transformers' DynamicCache and StaticCache under
PyTorch's allocator, each in its own process, same prompts, greedy, no torch.compile.

Measured on an H200 (docs/FACTS.md): DynamicCache 136.5 decode tok/s at 56.3 GB peak reserved,
StaticCache 11.1 tok/s at 67.3 GB, with ~16 GB of weights and 17.2 GB of KV (16K context,
batch 8, 64 new tokens). Targets: at least 2x DynamicCache's tok/s; peak reserved at most
weights + 1.15 x KV + activations; p99 decode step at most 1.10x the median. The bound is
one read of weights and KV per step at 4.3 TB/s (docs/FACTS.md).

    python -m bench.run kv_cache --backend cuda          # the 16K x 8 comparison
    python -m bench.kv_cache sweep                       # context and batch sweep + plot
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workers import HF_PRELOAD, WarmWorkers, run_worker, worker_main

GB = 1e9
COPY_BANDWIDTH = 4.3e12  # bytes/s read + written, H200 device-to-device (docs/FACTS.md)
CACHES = {"dynamic": "native", "static": "native", "vmm": "vmmalloc"}  # cache -> allocator
# The same cache with pages mapped only when a token needs them: shows what the lookahead
# of Note [Pages mapped ahead, staggered by layer] removes.
ABLATION = {"vmm_no_lookahead": "vmmalloc"}
TARGETS = {"tok_s_vs_dynamic": ">= 2.0", "peak_reserved": "<= weights + 1.15 x KV + activations",
           "p99_over_median_step": "<= 1.10", "page_mapping_step_over_plain_step": "<= 1.10"}


def llama3_8b_config(max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max_positions,
                       rope_theta=500000.0, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)


def build_model(torch, max_positions: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama3_8b_config(max_positions))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def page_tokens(config) -> int:
    """Positions of one row that a 2 MiB page holds."""
    head_dim = config.hidden_size // config.num_attention_heads
    return max(1, (2 << 20) // (config.num_key_value_heads * head_dim * 2))


def kv_bytes(config, batch: int, tokens: int) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * tokens * config.num_key_value_heads * head_dim * 2


def left_padded(torch, ids, row_lengths: list[int] | None, grown: int):
    """`ids` and their attention mask, row b left-padded (pad id 0, mask 0) before its prompt
    of row_lengths[b] + grown positions; without row_lengths, `ids` and a mask of ones."""
    mask = torch.ones_like(ids)
    if not row_lengths:
        return ids, mask
    ids = ids.clone()
    for row, length in enumerate(row_lengths):
        pad = ids.shape[1] - (length + grown)
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def prompt_ids(torch, config, batch: int, context: int, longest: int):
    """The prompts of a point, ``[batch, longest]`` on the GPU, the same for every system (the
    first `context` positions are the first repeat's prompt)."""
    g = torch.Generator(device="cuda").manual_seed(context + batch)
    return torch.randint(3, config.vocab_size, (batch, longest), device="cuda", generator=g)


def run_one(torch, model, cache: str, batch: int, context: int, new_tokens: int,
            repeats: int = 1, row_lengths: list[int] | None = None,
            prefill_chunk: int | None = None) -> dict[str, Any]:
    """`repeats` generate() calls: time to first token, decode step times, peak memory.

    With `row_lengths` (at most `context` each) row b's prompt is its last row_lengths[b]
    positions, left-padded as generate() batches prompts of different lengths.

    Repeat r's prompt is r pages' worth of tokens longer (1024 tokens on this shape), so that
    every call sees shapes it has not seen (as a server does: cuDNN's attention caches an
    execution plan per shape, and identical repeats would hide its cost) while page
    boundaries fall at the same decode steps. A spike that a page boundary causes then comes
    back at the same step in every repeat, and the machine's noise does not: the step times
    reported are the per-step medians over the repeats, and p99 is taken over those (raw
    times are kept too).

    With `prefill_chunk`, generate() prefills prompts longer than that in chunks of it
    (transformers' prefill_chunk_size): a one-pass prefill of 8 x 64K tokens would not fit
    beside its KV on one GPU."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    import vmmalloc
    from vmmalloc.integrations import patched_generate
    from vmmalloc.virtual_tensor import allocator_for

    pages = allocator_for(torch.device("cuda")) if vmmalloc.is_enabled() else None

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []
            self.kv_mapped: list[int] = []  # KV bytes mapped after each step (vmmalloc only)
            self.allocated_after_prefill = 0
            self.kv_now = 0  # KV bytes mapped at the last step (vmmalloc only)

        def __call__(self, input_ids, scores, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            if len(self.times) == 1:
                self.allocated_after_prefill = torch.cuda.max_memory_allocated()
            if pages is not None:  # read after the clock: its cost lands on every step alike
                stats = pages.stats()
                self.kv_mapped.append(stats["vmm.kv_mapped_bytes.allocated"])  # ever mapped: grows when a step maps
                self.kv_now = stats["vmm.kv_mapped_bytes.current"]
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    page = page_tokens(model.config)
    all_ids = prompt_ids(torch, model.config, batch, context, context + (repeats - 1) * page)
    # Only the two systems that compile by design may: transformers' StaticCache path and
    # vmmalloc's graph decoder (which disable_compile turns off too).
    graphs = cache in ("vmm_graphs", "vmm_graphs_fused")
    compiled = cache == "static_compiled" or graphs
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, disable_compile=not compiled)
    if prefill_chunk is not None and context > prefill_chunk:
        kwargs["prefill_chunk_size"] = prefill_chunk
    runs, ttfts, peaks_reserved, peaks_allocated, after_prefill, mapping_steps = [], [], [], [], [], []
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    # One patch over every repeat, as a server would hold it: decoding in graphs, the patch
    # keeps the emptied cache between calls, so only the first call records its graph.
    patch = (patched_generate("vmm", lookahead=cache != "vmm_no_lookahead", graphs=graphs,
                              graph_fuse=cache == "vmm_graphs_fused")
             if cache.startswith("vmm") else contextlib.nullcontext())
    held = contextlib.ExitStack()
    held.enter_context(patch)
    try:
        for r in range(repeats):
            ids = all_ids[:, :context + r * page]
            ids, kwargs["attention_mask"] = left_padded(torch, ids, row_lengths, r * page)
            if cache in ("static", "static_compiled"):
                kwargs["cache_implementation"] = "static"
            elif cache == "dynamic":
                from transformers import DynamicCache

                from vmmalloc.integrations.hf_compat import generate_cache_kwarg

                kwargs[generate_cache_kwarg()] = DynamicCache(config=model.config)
            clock = StepClock()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
            if r == 0:
                first_tokens = out[:, -new_tokens:].tolist()
            del out
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            runs.append([b - a for a, b in zip(clock.times, clock.times[1:])])
            mapping_steps.append([i for i, (a, b) in enumerate(zip(clock.kv_mapped, clock.kv_mapped[1:])) if b > a])
            ttfts.append(clock.times[0] - start)
            peaks_reserved.append(torch.cuda.max_memory_reserved())
            peaks_allocated.append(torch.cuda.max_memory_allocated())
            after_prefill.append(clock.allocated_after_prefill)
            kv_now = clock.kv_now
        graph_kernels = {}
        if graphs:  # which attention kernel the replayed steps ran (the patch's kept decoder)
            from vmmalloc.integrations.generate_patch import _kept

            kept = _kept.get(model)
            decoder = kept[0].graph_decoder if kept else None
            graph_kernels = dict(decoder.kernels) if decoder is not None else {}
    except torch.OutOfMemoryError as error:
        ids = all_ids = None
        kwargs.clear()
        torch.cuda.empty_cache()
        return {"ok": False, "batch": batch, "context": context, "error": str(error).splitlines()[0][:300]}
    finally:
        held.close()
    ids = all_ids = None
    kwargs.clear()
    steps = [statistics.median(run[i] for run in runs) for i in range(len(runs[0]))]
    longest = context + (repeats - 1) * page  # peaks are the longest repeat's
    kv_final = kv_bytes(model.config, batch, longest + new_tokens)
    kv_prefill = kv_bytes(model.config, batch, longest)
    mean_context = context + (repeats - 1) * page // 2
    median = statistics.median(steps)
    # Steps that mapped KV pages against those that did not, over the raw times (vmmalloc).
    mapped = [t for run, idx in zip(runs, mapping_steps) for i, t in enumerate(run) if i in idx]
    plain = [t for run, idx in zip(runs, mapping_steps) for i, t in enumerate(run) if i not in idx]
    return {
        "ok": True,
        "batch": batch, "context": context, "new_tokens": new_tokens, "repeats": repeats,
        "contexts": [context + r * page for r in range(repeats)],
        "ttft_s": statistics.median(ttfts),
        "graph_kernels": graph_kernels,
        "decode_tok_s": batch * len(steps) / sum(steps),
        "step_median_s": median,
        "step_p99_s": float(sorted(steps)[min(len(steps) - 1, round(0.99 * (len(steps) - 1)))]),
        "step_times_s": steps,
        "raw_step_times_s": runs,
        "raw_p99_over_median": max(float(sorted(r)[round(0.99 * (len(r) - 1))]) / statistics.median(r) for r in runs),
        "mapping_steps": mapping_steps,
        "mapping_step_over_plain_step": statistics.median(mapped) / statistics.median(plain) if mapped and plain else None,
        "weights_bytes": weights,
        "tokens": first_tokens,  # the first repeat's new tokens (greedy), for match rates
        "kv_committed_final": kv_now if pages is not None else None,  # the last repeat's, at its last step
        # positions holding real tokens (no padding) at that step, over all rows
        "tokens_held": (sum(length + (repeats - 1) * page + new_tokens - 1 for length in row_lengths) if row_lengths
                        else batch * (longest + new_tokens - 1)),
        "row_lengths": row_lengths,
        "kv_bytes": kv_final,
        # prefill's transient tensors: its peak minus weights and the prompt's KV (exact for
        # DynamicCache; under VirtualKVCache it also holds the pages mapped ahead)
        "activations_bytes": max(0, max(after_prefill) - weights - kv_prefill),
        "peak_reserved": max(peaks_reserved),
        "peak_allocated": max(peaks_allocated),
        # one read of the weights and of the KV at mid-decode, at the device's bandwidth
        "bandwidth_bound_step_s": (weights + kv_bytes(model.config, batch, mean_context + new_tokens // 2))
        / COPY_BANDWIDTH,
    }


def unpadded(ids, row_lengths: list[int] | None, grown: int) -> list[list[int]]:
    """The prompts of `ids` as token lists, row b its last row_lengths[b] + grown positions
    (what left_padded keeps), for a system that takes prompts of any length."""
    rows = ids.tolist()
    if row_lengths is None:
        return rows
    return [row[len(row) - (length + grown):] for row, length in zip(rows, row_lengths)]


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    import vmmalloc

    cache = args["cache"]
    if cache.startswith("vmm") != vmmalloc.is_enabled():
        raise RuntimeError(f"cache {cache} ran with vmmalloc enabled={vmmalloc.is_enabled()}")
    # A point: [batch, context, new tokens] or, for prompts of different lengths,
    # [batch, context, new tokens, row lengths] (context: the longest).
    points = [(p[0], p[1], p[2], p[3] if len(p) > 3 else None) for p in args["points"]]
    for batch, context, _, lengths in points:
        if lengths is not None and (len(lengths) != batch or max(lengths) > context):
            raise ValueError(f"row lengths {lengths} must be {batch} lengths of at most {context}")
    repeats = args.get("repeats", 1)
    model = build_model(torch, max(c + n for _, c, n, _ in points) + repeats * 1024 + 64)
    if cache == "paged":  # the PagedAttention peer (bench/paged_peer.py), on each repeat's prompts
        from bench.paged_peer import run_paged

        page = page_tokens(model.config)
        results = []
        for b, c, n, lengths in points:
            ids = prompt_ids(torch, model.config, b, c, c + (repeats - 1) * page)
            try:
                result = run_paged(torch, model, [unpadded(ids[:, :c + r * page], lengths, r * page)
                                                  for r in range(repeats)], n)
            except torch.OutOfMemoryError as error:
                torch.cuda.empty_cache()
                result = {"ok": False, "batch": b, "context": c, "error": str(error).splitlines()[0][:300]}
            results.append({**result, "row_lengths": lengths})
        return {"cache": cache, "vmmalloc_enabled": vmmalloc.is_enabled(), "results": results}
    for batch in sorted({b for b, _, _, _ in points}):  # warm-up: kernels of each batch loaded
        run_one(torch, model, cache, batch, 256, 4)
    chunk = args.get("prefill_chunk")
    results = [run_one(torch, model, cache, b, c, n, repeats, lengths, chunk) for b, c, n, lengths in points]
    return {"cache": cache, "vmmalloc_enabled": vmmalloc.is_enabled(), "results": results}


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    batch, context, new = (8, 4096, 32) if quick else (8, 16384, 64)
    repeats = 2 if quick else 5
    systems = {}
    # the no-lookahead ablation is a diagnosis, not a target: full runs only (a process less)
    caches = {**CACHES} if quick else {**CACHES, **ABLATION}
    with WarmWorkers("bench.kv_cache", set(caches.values())) as workers:
        for cache, allocator in caches.items():
            systems[cache] = workers.run(allocator, {"cache": cache, "points": [[batch, context, new]],
                                                     "repeats": repeats}, timeout=1200)["results"][0]
            r = systems[cache]
            print(f"[kv_cache] {cache}: " + (f"{r['decode_tok_s']:.1f} tok/s, peak reserved "
                                             f"{r['peak_reserved'] / GB:.1f} GB" if r["ok"] else r["error"]), flush=True)
    ours, dyn = systems["vmm"], systems["dynamic"]
    ratios: dict[str, Any] = {}
    if ours["ok"]:
        # Activations are the model's, whatever the cache: taken from DynamicCache's prefill,
        # where the KV is exactly the prompt's (ours would count the pages mapped ahead).
        activations = (dyn if dyn["ok"] else ours)["activations_bytes"]
        budget = ours["weights_bytes"] + 1.15 * ours["kv_bytes"] + activations
        ratios.update({
            "vmm_p99_over_median_step": ours["step_p99_s"] / ours["step_median_s"],
            "vmm_peak_reserved_over_budget": ours["peak_reserved"] / budget,
            "vmm_fraction_of_bandwidth_bound": ours["bandwidth_bound_step_s"] / ours["step_median_s"],
        })
        for peer in ("dynamic", "static"):
            if systems[peer]["ok"]:
                ratios[f"vmm_tok_s_vs_{peer}"] = ours["decode_tok_s"] / systems[peer]["decode_tok_s"]
                ratios[f"vmm_peak_reserved_vs_{peer}"] = ours["peak_reserved"] / systems[peer]["peak_reserved"]
    for name in ("vmm", "vmm_no_lookahead"):
        r = systems.get(name)
        if r and r["ok"]:
            ratios[f"{name}_p99_over_median_step"] = r["step_p99_s"] / r["step_median_s"]
            ratios[f"{name}_page_mapping_step_over_plain_step"] = r["mapping_step_over_plain_step"]
    if dyn["ok"]:
        ratios["dynamic_fraction_of_bandwidth_bound"] = dyn["bandwidth_bound_step_s"] / dyn["step_median_s"]
    return {"benchmark": "kv_cache", "workload": {"model": "Llama-3-8B shape, random bf16 weights, sdpa",
                                                  "batch": batch, "context": context, "new_tokens": new,
                                                  "greedy": True, "torch_compile": False, "repeats": repeats},
            "systems": systems, "ratios": ratios, "targets": TARGETS}


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, r in result["systems"].items():
        value = f"{r['decode_tok_s']:.1f} tok/s, {r['peak_reserved'] / GB:.1f} GB" if r["ok"] else r["error"]
        rows.append((f"{name}: decode, peak reserved", value, ""))
    ratios = result["ratios"]
    for key, words, target in RATIO_ROWS:
        if key in ratios:
            value = ratios[key]
            rows.append((words, "no step mapped" if value is None else f"{value:.2f}x", target))
    return rows


# (ratio key, what it measures in words, target) for the report's rows.
RATIO_ROWS = (
    ("vmm_tok_s_vs_dynamic", "VirtualKVCache decode speed / DynamicCache's", ">= 2.0x"),
    ("vmm_tok_s_vs_static", "VirtualKVCache decode speed / StaticCache's", "(peer)"),
    ("vmm_peak_reserved_over_budget", "VirtualKVCache peak reserved / its KV budget", "<= 1.0"),
    ("vmm_p99_over_median_step", "VirtualKVCache p99 decode step / median step", "<= 1.10"),
    ("vmm_page_mapping_step_over_plain_step", "VirtualKVCache step that maps pages / a plain step", "<= 1.10"),
    ("vmm_no_lookahead_p99_over_median_step", "without pages mapped ahead: p99 step / median", "(ablation)"),
    ("vmm_no_lookahead_page_mapping_step_over_plain_step", "without pages mapped ahead: mapping step / plain",
     "(ablation)"),
    ("vmm_fraction_of_bandwidth_bound", "VirtualKVCache decode speed / the HBM bound", "(1.0 = HBM bound)"),
    ("dynamic_fraction_of_bandwidth_bound", "DynamicCache decode speed / the HBM bound", "(peer)"),
)


SWEEP_CONTEXTS = [2048, 8192, 16384, 32768, 65536]  # at batch 4
SWEEP_BATCHES = [1, 8, 16]  # at 16K


def sweep(out_dir: Path, new_tokens: int = 16) -> dict[str, Any]:
    """tok/s and peak reserved against context (batch 4) and batch (16K) for the three caches."""
    from bench.common import environment, write_result

    points = [[4, c, new_tokens] for c in SWEEP_CONTEXTS] + [[b, 16384, new_tokens] for b in SWEEP_BATCHES]
    systems = {cache: run_worker("bench.kv_cache", allocator, {"cache": cache, "points": points}, timeout=1800)
               for cache, allocator in CACHES.items()}
    result = {"benchmark": "kv_cache_sweep", "points": points, "systems": systems, "environment": environment()}
    write_result("kv_cache_sweep", result, out_dir)
    plot(result, out_dir / "kv_cache_sweep.png")
    return result


def context_axis(ax: Any, label: str) -> None:
    """A plot's axis with context (tokens, log 2) across and `label` up, a grid and a legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend()


def plot(result: dict[str, Any], path: Path, batch: int = 4, title: str = "KV caches",
         tok_s: Callable[[dict[str, Any]], float] | None = None, tok_s_label: str = "decode tokens/s") -> None:
    """tok/s and peak reserved against context, one line per system, at `batch`; `tok_s`
    reads a point's speed (default: its decode_tok_s, the mean over its steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for cache, data in result["systems"].items():
        rows = [r for r in data["results"] if r.get("ok") and r["batch"] == batch and not r.get("row_lengths")]
        xs = [r["context"] for r in rows]
        axes[0].plot(xs, [tok_s(r) if tok_s else r["decode_tok_s"] for r in rows], marker="o", label=cache)
        axes[1].plot(xs, [r["peak_reserved"] / GB for r in rows], marker="o", label=cache)
    for ax, label in zip(axes, (f"{tok_s_label} (batch {batch})", f"peak reserved GB (batch {batch})")):
        context_axis(ax, label)
    gpu = result["environment"].get("gpu")
    fig.suptitle(f"{title} on a Llama-3-8B shape, {gpu}; missing points ran out of memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(measure, preload=HF_PRELOAD)
    elif sys.argv[1:2] == ["sweep"]:
        from bench.common import RESULTS_DIR

        sweep(Path(sys.argv[2]) if len(sys.argv) > 2 else RESULTS_DIR)
