"""KV decode in CUDA graphs (integrations/graph_decode.py) against its peers on the
Llama-3-8B shape (random bf16 weights), batch 8, 16K context, 64 new tokens, greedy, each
system in its own process over the same prompts (bench/kv_cache.py's run_one):

- dynamic: transformers' DynamicCache, eager (native allocator);
- static_compiled: StaticCache with transformers' automatic torch.compile of the decode step
  (mode "reduce-overhead": CUDA graphs), native allocator;
- vmm: VirtualKVCache, eager decode (vmmalloc);
- vmm_graphs: VirtualKVCache with its decode steps replayed from a CUDA graph (vmmalloc);
- vmm_graphs_fused: the same with the steps' small kernels fused by inductor
  (patch_generate(graph_fuse=True), Note [Fused small kernels in graph steps]);
- paged: transformers' continuous batching over a PagedAttentionCache (native allocator),
  the PagedAttention peer (bench/paged_peer.py: decode time by difference, no step times).

The repeats run under one patch, as a server holds it: the first call records the graph,
later calls replay it from the kept cache; transformers' compile likewise compiles in the
first call only. Speeds are over the per-step medians of the repeats, so neither one-time
cost counts in them; both are reported on their own (the first timed call's first step,
after a warm-up call at another length). Greedy bf16 tokens on random weights tie often:
the match rate of DynamicCache against StaticCache + compile is reported as the floor.

The bound: one read of the weights and of the KV per step at the HBM bandwidth
(bench/NOTES.md, "KV decode in CUDA graphs": 7.4 ms a step, 1080 tok/s here). Targets
(issue: KV decode in graphs): vmm_graphs >= 60% of the bound and ahead of static_compiled
in tok/s; KV committed <= 1.05x the tokens held; p99 / median step <= 1.10.

    python -m bench.run graph_decode --backend cuda [--quick]
    python -m bench.graph_decode sweep [OUT_DIR] [--systems a,b] [--points 16384,variable]
                                         [--worker-per-point]
                                         # contexts 2K-64K at batch 8, a plot; parts replace theirs
    python -m bench.graph_decode assemble LOG [OUT_DIR]  # the JSON from a run's log, also a cut one
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.kv_cache import GB, kv_bytes, llama3_8b_config
from bench.report import target_met
from bench.workers import WarmWorkers, run_worker

# Ours first: a run cut short by a time limit still says what matters most.
SYSTEMS = {"vmm_graphs": "vmmalloc", "vmm_graphs_fused": "vmmalloc", "vmm": "vmmalloc", "static_compiled": "native",
           "paged": "native", "dynamic": "native"}
TARGETS = {"vmm_graphs_fraction_of_bandwidth_bound": ">= 0.60", "vmm_graphs_tok_s_vs_static_compiled": "> 1.0",
           "vmm_graphs_kv_committed_over_tokens_held": "<= 1.05", "vmm_graphs_p99_over_median_step": "<= 1.10"}


def match_rate(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of new tokens equal position by position (greedy bf16 runs drift apart once
    two near-equal logits swap)."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def kv_page_floor(config, row_tokens: list[int], page_bytes: int = 2 << 20, shared: bool = True) -> float:
    """The least KV mapped over KV held that pages of `page_bytes` allow: a page holds the K
    and V of one row and one layer (Note [Keys and values share pages]; with `shared` False,
    the K or the V, as before that layout) for page_bytes / (KV heads x head dim x 2 B x 2, bf16)
    positions (512 on the 8B shape; 1024 unshared), so each row's last page is partly empty
    whatever the lead (Note [Pages mapped ahead, staggered by layer] adds to it)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_page = page_bytes // (config.num_key_value_heads * head_dim * 2 * (2 if shared else 1))  # bf16
    return sum(-(-t // per_page) * per_page for t in row_tokens) / sum(row_tokens)


RESULT_LINE = "[graph_decode] result "  # one system's whole result, one JSON line, as it finishes


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    if backend != "cuda":
        raise ValueError("graph_decode needs a GPU (--backend cuda)")
    batch, context, new = (8, 4096, 32) if quick else (8, 16384, 64)
    repeats = 3
    systems: dict[str, Any] = {}
    with WarmWorkers("bench.kv_cache", set(SYSTEMS.values())) as workers:
        for cache, allocator in SYSTEMS.items():
            r = workers.run(allocator, {"cache": cache, "points": [[batch, context, new]], "repeats": repeats},
                            timeout=1500)["results"][0]
            systems[cache] = r
            print(f"[graph_decode] {cache}: " + (f"{r['decode_tok_s']:.1f} tok/s" if r["ok"] else r["error"]),
                  flush=True)
            # The whole result as it comes: a run cut short by a time limit still leaves every
            # finished system in its log, and `assemble` makes the JSON from it.
            print(RESULT_LINE + json.dumps({"cache": cache, "batch": batch, "context": context, "new": new,
                                            "repeats": repeats, "result": r}), flush=True)
    return result_for(systems, batch, context, new, repeats)


def result_for(systems: dict[str, Any], batch: int, context: int, new: int, repeats: int) -> dict[str, Any]:
    """The benchmark's result from the systems that finished (a ratio whose systems are
    missing is left out, and its target reads as not measured)."""
    config = llama3_8b_config(context + new)
    ratios: dict[str, Any] = {}
    ours = systems.get("vmm_graphs", {})
    if ours.get("ok"):
        # Tokens held at the end of the longest repeat, against the KV pages mapped then.
        held = kv_bytes(config, 1, ours["tokens_held"])
        ratios.update({
            # the first timed call records the graph (a warm-up call at another length came first)
            "vmm_graphs_first_call_first_step_s": ours["raw_step_times_s"][0][0],
            "vmm_graphs_fraction_of_bandwidth_bound": ours["bandwidth_bound_step_s"] / ours["step_median_s"],
            "vmm_graphs_p99_over_median_step": ours["step_p99_s"] / ours["step_median_s"],
            "vmm_graphs_kv_committed_over_tokens_held": (ours["kv_committed_final"] or 0) / held,
            "vmm_graphs_kv_page_floor": kv_page_floor(config, [ours["tokens_held"] // batch] * batch),
        })
        fused = systems.get("vmm_graphs_fused", {})
        if fused.get("ok"):
            ratios["vmm_graphs_fused_step_over_vmm_graphs"] = fused["step_median_s"] / ours["step_median_s"]
            ratios["vmm_graphs_fused_fraction_of_bandwidth_bound"] = (fused["bandwidth_bound_step_s"]
                                                                     / fused["step_median_s"])
            ratios["vmm_graphs_fused_p99_over_median_step"] = fused["step_p99_s"] / fused["step_median_s"]
        for peer in ("vmm", "static_compiled", "paged", "dynamic"):
            if systems.get(peer, {}).get("ok"):
                ratios[f"vmm_graphs_tok_s_vs_{peer}"] = ours["decode_tok_s"] / systems[peer]["decode_tok_s"]
                ratios[f"vmm_graphs_token_match_vs_{peer}"] = match_rate(ours["tokens"], systems[peer]["tokens"])
                ratios[f"vmm_graphs_peak_reserved_vs_{peer}"] = ours["peak_reserved"] / systems[peer]["peak_reserved"]
    static, dynamic = systems.get("static_compiled", {}), systems.get("dynamic", {})
    if static.get("ok"):
        ratios["static_compiled_fraction_of_bandwidth_bound"] = static["bandwidth_bound_step_s"] / static["step_median_s"]
        ratios["static_compiled_first_call_first_step_s"] = static["raw_step_times_s"][0][0]  # compiles
        if dynamic.get("ok"):
            # The floor of the match rates: transformers' own two paths on the same weights.
            ratios["token_match_dynamic_vs_static_compiled"] = match_rate(dynamic["tokens"], static["tokens"])
    met = {key: None if key not in ratios else target_met(f"{ratios[key]:.6f}", target) for key, target in TARGETS.items()}
    missing = [cache for cache in SYSTEMS if cache not in systems]
    return {"benchmark": "graph_decode",
            "workload": {"model": "Llama-3-8B shape, random bf16 weights", "batch": batch, "context": context,
                         "new_tokens": new, "greedy": True, "repeats": repeats,
                         "bound": "weights + KV at mid-decode, one read per step at 4.3 TB/s"},
            "systems": systems, "ratios": ratios, "targets": TARGETS, "met": met,
            **({"missing_systems": missing} if missing else {})}


def assemble(log: Path) -> dict[str, Any]:
    """The result from a run's log (`python -m bench.run graph_decode ... > log`), also when
    the run was cut short: every system whose RESULT_LINE it printed."""
    systems: dict[str, Any] = {}
    shape = None
    for line in log.read_text().splitlines():
        if line.startswith(RESULT_LINE):
            record = json.loads(line[len(RESULT_LINE):])
            systems[record["cache"]] = record["result"]
            shape = (record["batch"], record["context"], record["new"], record["repeats"])
    if shape is None:
        raise SystemExit(f"graph_decode assemble: {log} holds no '{RESULT_LINE.strip()}' line; "
                         "give the log of a `python -m bench.run graph_decode` run")
    return result_for(systems, *shape)


# (ratio key, what it measures in words, target) for the report's rows.
RATIO_ROWS = (
    ("vmm_graphs_tok_s_vs_static_compiled", "in graphs: decode speed / StaticCache + transformers' compile", "> 1.0"),
    ("vmm_graphs_tok_s_vs_vmm", "in graphs: decode speed / VirtualKVCache eager", ""),
    ("vmm_graphs_fused_step_over_vmm_graphs", "in graphs, small kernels fused: median step / unfused", ""),
    ("vmm_graphs_fused_fraction_of_bandwidth_bound", "in graphs, small kernels fused: the bound's step / median", ""),
    ("vmm_graphs_fused_p99_over_median_step", "in graphs, small kernels fused: p99 step / median step", ""),
    ("vmm_graphs_tok_s_vs_dynamic", "in graphs: decode speed / DynamicCache", ""),
    ("vmm_graphs_tok_s_vs_paged", "in graphs: decode speed / continuous batching's (paged)", ""),
    ("vmm_graphs_peak_reserved_vs_paged", "in graphs: peak reserved / continuous batching's", ""),
    ("vmm_graphs_fraction_of_bandwidth_bound", "in graphs: the HBM bound's step / median step", ">= 0.60"),
    ("vmm_graphs_p99_over_median_step", "in graphs: p99 decode step / median step", "<= 1.10"),
    ("vmm_graphs_kv_committed_over_tokens_held", "in graphs: KV memory mapped / KV of the tokens held", "<= 1.05"),
    ("vmm_graphs_kv_page_floor", "in graphs: the least KV mapped / held 2 MiB pages allow at this length", ""),
    ("vmm_graphs_peak_reserved_vs_static_compiled", "in graphs: peak reserved / StaticCache + compile's", ""),
    ("vmm_graphs_token_match_vs_dynamic", "in graphs: greedy tokens equal to DynamicCache's (bf16)", ""),
    ("vmm_graphs_first_call_first_step_s", "in graphs: the first call's first step (records), s", ""),
    ("static_compiled_first_call_first_step_s", "StaticCache + compile: the first call's first step (compiles), s", ""),
    ("token_match_dynamic_vs_static_compiled", "DynamicCache's tokens equal to StaticCache + compile's (the floor)", ""),
)


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, r in result["systems"].items():
        value = (f"{r['decode_tok_s']:.0f} tok/s, step {r['step_median_s'] * 1e3:.1f} ms, peak reserved "
                 f"{r['peak_reserved'] / GB:.1f} GB") if r["ok"] else r.get("error", "failed")
        rows.append((f"{name}: decode", value, ""))
    ratios = result["ratios"]
    for key, words, target in RATIO_ROWS:
        if key in ratios:
            rows.append((words, f"{ratios[key]:.3f}", target))
    return rows


SWEEP_CONTEXTS = [2048, 8192, 16384, 32768, 65536]  # at batch 8, 32 new tokens
# Prompts longer than this are prefilled in chunks of it, by every system but the paged one
# (which schedules its own): one pass over 8 x 64K tokens needs about 60 GB of activations
# beside 69 GB of KV and 16 GB of weights, more than the H200's 139 GB.
SWEEP_PREFILL_CHUNK = 16384
# A batch of prompts from 2K to 16K (left-padded for generate(), as they are for every
# system but the paged one): where a cache sized for the longest row wastes the most.
VARIABLE_LENGTHS = [2048, 4096, 6144, 8192, 10240, 12288, 14336, 16384]


def steady_tok_s(point: dict[str, Any]) -> float:
    """A sweep point's decode speed past its one-time costs: batch / median step. A sweep
    point is one generate() call of a shape the process has not seen, so its mean step
    (decode_tok_s) carries the graph's recording (0.1-0.5 s) or transformers' compile (up to
    10 s) in its first steps; those are in ttft_s and the step times, not in this."""
    return point["batch"] / point["step_median_s"]


def kv_memory(point: dict[str, Any]) -> float:
    """The KV memory a sweep point's cache held at its last step, in bytes: the pages mapped
    (VirtualKVCache, measured: kv_committed_final), else every row at the longest row's
    length (StaticCache and DynamicCache hold left-padded rows of one length: their
    tensors' size by construction, `kv_bytes`)."""
    measured = point.get("kv_committed_final")
    return float(measured if measured is not None else point["kv_bytes"])


def sweep_series(result: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per system, what the sweep's plot draws: the uniform contexts that ran ("context",
    "tok_s" as batch / median step, "reserved_gb", "kv_gb") and the variable-length point
    ("variable": [longest context, tok/s, reserved GB, KV GB], empty if it did not run)."""
    series = {}
    for cache, data in result["systems"].items():
        ran = [r for r in data["results"] if r.get("ok")]
        uniform = [r for r in ran if not r.get("row_lengths")]
        variable = [r for r in ran if r.get("row_lengths")]
        series[cache] = {
            "context": [r["context"] for r in uniform],
            "tok_s": [steady_tok_s(r) for r in uniform],
            "reserved_gb": [r["peak_reserved"] / GB for r in uniform],
            "kv_gb": [kv_memory(r) / GB for r in uniform],
            "variable": ([variable[0]["context"], steady_tok_s(variable[0]), variable[0]["peak_reserved"] / GB,
                          kv_memory(variable[0]) / GB] if variable else []),
        }
    return series


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """The sweep's plot: steady tok/s, peak reserved and KV memory against context at batch
    8, one line per system; the variable-length batch as a star at its longest prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.kv_cache import context_axis

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    labels = ("decode tokens/s, batch / median step", "peak reserved GB", "KV memory GB at the last step")
    for cache, s in sweep_series(result).items():
        line = None
        for ax, key, at in zip(axes, ("tok_s", "reserved_gb", "kv_gb"), (1, 2, 3)):
            drawn = ax.plot(s["context"], s[key], marker="o", label=cache,
                            color=line.get_color() if line is not None else None)[0]
            line = line or drawn
            if s["variable"]:
                ax.plot([s["variable"][0]], [s["variable"][at]], marker="*", markersize=13, linestyle="none",
                        color=line.get_color())
    for ax, label in zip(axes, labels):
        context_axis(ax, label)
    gpu = result["environment"].get("gpu")
    fig.suptitle(f"Decode in CUDA graphs and its peers on a Llama-3-8B shape, batch 8, {gpu}. Stars: prompts "
                 "of 2K-16K, left-padded. Missing points ran out of memory or have not run yet. KV: pages "
                 "mapped (vmm), rows x longest (static, dynamic)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def not_run(point: list[Any]) -> dict[str, Any]:
    """The result of a sweep point not measured yet (batch, context[, new tokens, rows])."""
    out: dict[str, Any] = {"ok": False, "not_run": True, "batch": point[0], "context": point[1]}
    if len(point) > 3:
        out["row_lengths"] = point[3]
    return out


def sweep_points(new_tokens: int = 32) -> list[list[Any]]:
    """The sweep's points: [batch, context, new tokens] per context, then the variable-length
    batch [batch, longest, new tokens, row lengths]."""
    points: list[list[Any]] = [[8, c, new_tokens] for c in SWEEP_CONTEXTS]
    points.append([len(VARIABLE_LENGTHS), max(VARIABLE_LENGTHS), new_tokens, VARIABLE_LENGTHS])
    return points


def point_indices(names: list[str], points: list[list[Any]]) -> list[int]:
    """The indices of the points named by context ("16384") or "variable" (the batch with
    row lengths); a name that is neither is an error naming the choices."""
    chosen = []
    for name in names:
        found = [i for i, p in enumerate(points)
                 if (name == "variable" and len(p) > 3) or (len(p) == 3 and str(p[1]) == name)]
        if not found:
            choices = ", ".join([str(p[1]) for p in points if len(p) == 3] + ["variable"])
            raise SystemExit(f"graph_decode sweep: unknown point {name!r}; choose from {choices}")
        chosen += found
    return sorted(set(chosen))


def sweep(out_dir: Path, new_tokens: int = 32, caches: list[str] | None = None,
          only_points: list[str] | None = None, per_point: bool = False) -> dict[str, Any]:
    """tok/s and peak reserved against context for every system, one process each, and the
    variable-length batch (its point is the one with row_lengths).

    With `caches`, only those systems run and their results replace theirs in the sweep
    already in `out_dir`, so a sweep longer than one device call is measured in parts; each
    system keeps the environment (commit, date) it was measured with, and the result and the
    plot are written after every system, so a part cut short keeps what finished. With
    `only_points` (contexts or "variable"), only those points run and each replaces the same
    point of the system's stored results, carrying its own environment, since the system's
    other points were measured at another commit. With `per_point`, each point runs in a
    worker of its own and is written as soon as it is measured (as a part of the system's
    sweep), so a call cut short keeps every point that finished; each worker builds the
    model again."""
    from bench.common import environment, write_result

    points = sweep_points(new_tokens)
    chosen = point_indices(only_points, points) if only_points else list(range(len(points)))
    sweepable = [cache for cache in SYSTEMS if cache != "vmm_graphs_fused"]  # the A/B is graph_decode's
    unknown = sorted(set(caches or ()) - set(sweepable))
    if unknown:
        raise SystemExit(f"graph_decode sweep: unknown system(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(sweepable)}")
    path = out_dir / "graph_decode_sweep.json"
    result: dict[str, Any] = {"benchmark": "graph_decode_sweep", "points": points, "systems": {}}
    if (caches or only_points or per_point) and path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("points") == points:  # the same sweep: keep the systems this part does not run
            result["systems"] = earlier["systems"]
    partial = only_points is not None or per_point
    for cache in caches or sweepable:
        stored = result["systems"].get(cache)
        if partial and (stored is None or len(stored["results"]) != len(points)):
            # A system measured in parts (a sweep longer than one device call): the points
            # not run yet stand as such, and plots and tables leave them out.
            stored = {"cache": cache, "results": [not_run(point) for point in points]}
        for group in ([[i] for i in chosen] if per_point else [chosen]):
            measured = run_worker("bench.kv_cache", SYSTEMS[cache],
                                  {"cache": cache, "points": [points[i] for i in group],
                                   "prefill_chunk": SWEEP_PREFILL_CHUNK},
                                  timeout=3600)
            if partial:
                for i, point_result in zip(group, measured["results"]):
                    stored["results"][i] = {**point_result, "environment": environment()}
                stored = {**stored, **measured, "results": stored["results"]}
                result["systems"][cache] = stored
            else:
                result["systems"][cache] = {**measured, "environment": environment()}
            result["environment"] = environment()
            write_result("graph_decode_sweep", result, out_dir)
            plot_sweep(result, out_dir / "graph_decode_sweep.png")
            print(f"[graph_decode sweep] {cache}: " + ", ".join(
                f"{r['context']}: {steady_tok_s(r):.0f} tok/s" if r.get("ok")
                else f"{r['context']}: {'not run' if r.get('not_run') else 'failed'}"
                for r in (result["systems"][cache]["results"][i] for i in group)), flush=True)
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["sweep"]:
    from bench.common import RESULTS_DIR

    sweep_args = sys.argv[2:]
    only = None
    if "--systems" in sweep_args:
        at = sweep_args.index("--systems")
        only = sweep_args[at + 1].split(",") if at + 1 < len(sweep_args) else []
        del sweep_args[at:at + 2]
    only_points = None
    if "--points" in sweep_args:
        at = sweep_args.index("--points")
        only_points = sweep_args[at + 1].split(",") if at + 1 < len(sweep_args) else []
        del sweep_args[at:at + 2]
    per_point = "--worker-per-point" in sweep_args
    if per_point:
        sweep_args.remove("--worker-per-point")
    sweep(Path(sweep_args[0]) if sweep_args else RESULTS_DIR, caches=only, only_points=only_points,
          per_point=per_point)
elif __name__ == "__main__" and sys.argv[1:2] == ["assemble"] and len(sys.argv) in (3, 4):
    from bench.common import RESULTS_DIR, environment, write_result

    assembled = assemble(Path(sys.argv[2]))
    assembled["environment"] = environment()  # run on the machine that measured, or fill in its facts
    print(write_result("graph_decode", assembled, Path(sys.argv[3]) if len(sys.argv) > 3 else RESULTS_DIR))
elif __name__ == "__main__":
    raise SystemExit("usage: python -m bench.graph_decode sweep [OUT_DIR] [--systems a,b] [--points P,Q] "
                     "[--worker-per-point] | assemble LOG [OUT_DIR]")
