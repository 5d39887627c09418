"""torch.compile(mode="reduce-overhead") workloads, whose CUDA graphs live in private pools
(Note [Private pools]): native, expandable_segments and vmmalloc, each in its own process,
in rotating order over rounds.

- train: a fixed-shape training step of the ~1B Llama of bench/fragmentation.py (16
  layers, batch 4 x 1024 tokens, AdamW), the model compiled with mode="reduce-overhead";
  median step time over the steps after the graphs were recorded.
- decode: static-cache generate() on the Llama-3-8B shape (random bf16 weights), batch 8,
  a 1024-token prompt, 128 new tokens; transformers compiles the decode step with
  mode="reduce-overhead" by itself. Decode tok/s of the second call (the first compiles).

Per system: step time or tok/s, peak reserved / peak allocated, the memory the graphs'
pools hold (native: the snapshot's segments of a private pool; vmmalloc: vmm.private_pool_bytes),
and where the reserved bytes are at the end (reserved_breakdown: allocated and free, in the
default pool and in the graphs' pools), to tell the graph pools' own slack, which replays
need, from a caching allocator's.
Targets (issue: drop-in beyond eager PyTorch): step time and tok/s >= 0.98x native,
reserved/allocated <= 1.05.

    python -m bench.run compile_graphs --backend cuda [--quick]     # both workloads
    python -m bench.compile_graphs {train,decode} [--rounds N]      # one, merged into the result
    python -m bench.compile_graphs train --history 2 [--out DIR]    # the graph pools' live bytes
                                                                    # over warm-up and recording
    python -m bench.compile_graphs train --from-log LOG             # a run cut before it wrote
    python -m bench.compile_graphs decode --rounds 1 --add-rounds   # one round a device call

The whole run is 18 processes that each compile (about 15 minutes on an H200): more than
one 10-minute device call, so one workload can run on its own and replace its entry in
bench/results/compile_graphs.json; each workload keeps the environment (commit, date) it
was measured in.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.workers import run_worker, worker_main

GiB = 1 << 30


def reserved_breakdown(torch) -> dict[str, Any]:
    """Where the reserved bytes are now, from torch's memory snapshot (both allocators serve
    it): allocated and free in the default pool, and in private (graph) pools. A caching
    allocator gives nothing back unprompted, so at the end of a loop this is the peak's."""
    out: dict[str, Any] = {"default_allocated": 0, "default_free": 0, "pools_allocated": 0, "pools_free": 0,
                           "pools_by_stream": {}, "pools_by_kind": {}}
    for segment in torch.cuda.memory_snapshot():
        where = "default" if tuple(segment["segment_pool_id"]) == (0, 0) else "pools"
        out[f"{where}_allocated"] += segment["allocated_size"]
        out[f"{where}_free"] += segment["total_size"] - segment["allocated_size"]
        if where == "pools":  # whether the graphs' pool holds memory of more than one stream
            stream = str(segment.get("stream", "?"))
            out["pools_by_stream"][stream] = out["pools_by_stream"].get(stream, 0) + segment["total_size"]
            kind = str(segment.get("vmm_kind", segment.get("segment_type", "?")))  # vmmalloc: its free chunks too
            out["pools_by_kind"][kind] = out["pools_by_kind"].get(kind, 0) + segment["total_size"]
    return out


def memory_now(torch) -> dict[str, int]:
    """Reserved and allocated now, and the graph pools' share of each (native: the snapshot's
    segments of private pools; vmmalloc: its pool counters). After each step, in which step a
    pool grows tells warm-up, recording and replay apart."""
    import vmmalloc

    out = {"reserved": torch.cuda.memory_reserved(), "allocated": torch.cuda.memory_allocated()}
    if vmmalloc.is_enabled():
        stats = torch.cuda.memory_stats()
        out.update(pools_reserved=int(stats["vmm.private_pool_bytes"]),
                   pools_allocated=int(stats["vmm.private_pool_allocated_bytes.current"]),
                   pending_frees=int(stats["vmm.pending_frees"]), stitches=int(stats["vmm.stitches"]))
    else:
        segments = [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) != (0, 0)]
        out.update(pools_reserved=sum(s["total_size"] for s in segments),
                   pools_allocated=sum(s["allocated_size"] for s in segments))
    return out


def measure_train(torch, args: dict[str, Any]) -> dict[str, Any]:
    from bench.fragmentation import build

    model, optimizer = build(torch, args["layers"])
    compiled = torch.compile(model, mode="reduce-overhead")
    batch, seq = args["batch"], args["seq"]
    times, losses, trajectory = [], [], []
    history_steps, pools = int(args.get("history_steps", 0)), None
    if history_steps:  # the warm-up's and recording's trace, for bench/pool_trace.py
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    for step in range(args["warmup"] + args["steps"]):
        g = torch.Generator(device="cuda").manual_seed(step)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda", generator=g)
        torch.compiler.cudagraph_mark_step_begin()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        end.synchronize()
        losses.append(float(loss))
        trajectory.append(memory_now(torch))
        if history_steps and step == history_steps - 1:
            pools = pool_history(torch, args.get("history_out"))
        if step >= args["warmup"]:
            times.append(start.elapsed_time(end) / 1000)
    out = {"step_s": statistics.median(times), "steps_s": times, "losses": losses, "trajectory": trajectory}
    return {**out, "pool_history": pools} if pools is not None else out


def pool_history(torch, path: str | None) -> dict[str, Any]:
    """Stops the history and reads the pools' live bytes over it (bench/pool_trace.py); the
    snapshot itself goes to `path` when given (for torch's memory viewer)."""
    import pickle

    from bench.pool_trace import pool_timeline

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    if path:
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)
    return pool_timeline(snapshot, device=torch.cuda.current_device())


def measure_decode(torch, args: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args["batch"], args["prompt"]), generator=g).cuda()
    kwargs = dict(max_new_tokens=args["new_tokens"], min_new_tokens=args["new_tokens"], do_sample=False,
                  cache_implementation="static")
    with torch.no_grad():
        first = model.generate(ids, **kwargs)  # compiles and records the graphs
        torch.cuda.synchronize()
        start = time.perf_counter()
        second = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"tok_s": args["batch"] * args["new_tokens"] / seconds, "seconds": seconds,
            "same_tokens": bool((first == second).all())}


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    import vmmalloc

    out = measure_train(torch, args) if args["workload"] == "train" else measure_decode(torch, args)
    out.update(peak_reserved=torch.cuda.max_memory_reserved(), peak_allocated=torch.cuda.max_memory_allocated(),
               pool_bytes=memory_now(torch)["pools_reserved"], vmmalloc_enabled=vmmalloc.is_enabled(),
               reserved_breakdown=reserved_breakdown(torch))
    out["reserved_over_allocated"] = out["peak_reserved"] / max(1, out["peak_allocated"])
    if vmmalloc.is_enabled():
        out.update(pool_semantics_floor(torch.cuda.memory_stats(), out["peak_allocated"]))
    return out


def pool_semantics_floor(stats: dict[str, int], peak_allocated: int) -> dict[str, Any]:
    """The least reserved / allocated any allocator with PyTorch's pool semantics can reach on
    this run: memory freed in a graph pool serves only that pool, and the main arena's only
    eager code, so at least the main arena's peak plus the pools' peak stays reserved
    (vmm.main_allocated_bytes, vmm.private_pool_allocated_bytes), however each is packed."""
    main_peak = int(stats["vmm.main_allocated_bytes.peak"])
    pools_peak = int(stats["vmm.private_pool_allocated_bytes.peak"])
    return {"main_allocated_peak": main_peak, "pools_allocated_peak": pools_peak,
            "pool_semantics_floor": (main_peak + pools_peak) / max(1, peak_allocated)}


SYSTEMS = ("native", "expandable_segments", "vmmalloc")


def workload_args(quick: bool) -> dict[str, dict[str, Any]]:
    return {
        "train": {"workload": "train", "layers": 8 if quick else 16, "batch": 4, "seq": 1024,
                  "warmup": 4, "steps": 6 if quick else 20},
        "decode": {"workload": "decode", "batch": 8, "prompt": 1024, "new_tokens": 32 if quick else 128},
    }


def run(backend: str = "cuda", quick: bool = False, names: tuple[str, ...] = ("train", "decode"),
        rounds: int | None = None, first_round: int = 0) -> dict[str, Any]:
    if backend != "cuda":
        raise ValueError("compile_graphs needs a GPU (--backend cuda)")
    from bench.common import environment

    workloads = {name: args for name, args in workload_args(quick).items() if name in names}
    rounds = rounds or (1 if quick else 3)
    measured_in = environment()
    # The environment first, then each system's figures as they come: a run cut short (or a
    # summary that fails) leaves in its log all that `from_log` needs to summarize it.
    print(f"[compile_graphs] environment: {json.dumps(measured_in)}", flush=True)
    results: dict[str, Any] = {}
    for name, args in workloads.items():
        print(f"[compile_graphs] {name} args: {json.dumps(args)}", flush=True)
        per_round = []
        for r in range(first_round, first_round + rounds):
            order = SYSTEMS[r % 3:] + SYSTEMS[:r % 3]
            results_of_round = {}
            for system in order:
                results_of_round[system] = run_worker("bench.compile_graphs", system, args, timeout=1800)
                figures = {k: v for k, v in results_of_round[system].items() if k not in ("steps_s", "losses", "trajectory")}
                print(f"[compile_graphs] {name} round {r} {system}: {json.dumps(figures)}", flush=True)
                for step, m in enumerate(results_of_round[system].get("trajectory", [])):
                    print(f"[compile_graphs]   step {step}: " + ", ".join(
                        f"{k} {v / GiB:.3f} GiB" if k.endswith(("reserved", "allocated")) else f"{k} {v}"
                        for k, v in m.items()), flush=True)
            per_round.append(results_of_round)
        results[name] = summarize(name, args, per_round, measured_in)
    return with_targets({"benchmark": "compile_graphs", "workloads": results})


def summarize(name: str, args: dict[str, Any], per_round: list[dict[str, dict[str, Any]]],
              measured_in: dict[str, Any]) -> dict[str, Any]:
    """A workload's entry from its rounds (each system's figures per round): per system the
    median over the rounds, and each system's speed against native's in the same round."""
    speed = "step_s" if name == "train" else "tok_s"
    ratios: dict[str, Any] = {}
    for system in ("expandable_segments", "vmmalloc"):
        # speed relative to native: >1 is faster
        per = [(r["native"][speed] / r[system][speed]) if speed == "step_s" else (r[system][speed] / r["native"][speed])
               for r in per_round]
        ratios[f"{system}_speed_vs_native"] = statistics.median(per)
        ratios[f"{system}_speed_vs_native_per_round"] = per
    keys = (speed, "peak_reserved", "peak_allocated", "pool_bytes", "reserved_over_allocated",
            "pool_semantics_floor")
    systems = {s: {key: statistics.median(one[s][key] for one in per_round)
                   for key in keys if key in per_round[0][s]}
               for s in SYSTEMS}
    return {"args": args, "systems": systems, "ratios": ratios, "rounds": per_round,
            "environment": measured_in}


def add_rounds(stored: dict[str, Any] | None, name: str, quick: bool, rounds: int) -> dict[str, Any]:
    """The `name` workload's entry with `rounds` more rounds run now beside the stored entry's
    (a workload whose rounds outlast one device call: the decode workload's nine processes
    each load the 8B shape and compile). The stored rounds count only if they were measured
    with the same arguments at the same commit; the rotation of the systems' order goes on
    from them."""
    from bench.common import environment

    entry = (stored or {}).get("workloads", {}).get(name)
    args, commit = workload_args(quick)[name], environment()["commit"]
    if entry and entry.get("args") == args and entry.get("environment", {}).get("commit") == commit:
        earlier = entry["rounds"]
    else:
        earlier = []
        print(f"[compile_graphs] {name}: no stored rounds of these arguments at commit {commit}; starting anew",
              flush=True)
    new = run("cuda", quick, (name,), rounds, first_round=len(earlier))["workloads"][name]
    return summarize(name, args, earlier + new["rounds"], new["environment"])


def from_log(text: str, name: str) -> dict[str, Any]:
    """The `name` workload's entry, summarized from the log of a run that did not write its
    result (cut by a device call's limit after its last worker): the environment, args and
    per-round figures it printed, without the per-step times, losses and trajectory (the
    log holds those only rounded, or not at all). Every round must be whole."""
    measured_in: dict[str, Any] | None = None
    args: dict[str, Any] | None = None
    rounds: dict[int, dict[str, dict[str, Any]]] = {}
    for line in text.splitlines():
        if line.startswith("[compile_graphs] environment: "):
            measured_in = json.loads(line.split(": ", 1)[1])
        elif line.startswith(f"[compile_graphs] {name} args: "):
            args = json.loads(line.split(": ", 1)[1])
        elif line.startswith(f"[compile_graphs] {name} round "):
            head, figures = line.split(": ", 1)
            r, system = head.split()[3:5]
            rounds.setdefault(int(r), {})[system] = json.loads(figures)
    if measured_in is None or args is None:
        raise SystemExit(f"compile_graphs --from-log: the log has no environment or {name} args line "
                         "(it predates them, or is not a compile_graphs log)")
    whole = [rounds[r] for r in sorted(rounds) if set(rounds[r]) == set(SYSTEMS)]
    if not whole or len(whole) != len(rounds):
        raise SystemExit(f"compile_graphs --from-log: {len(rounds)} {name} rounds in the log, "
                         f"{len(whole)} of them with all of {', '.join(SYSTEMS)}; every round must be whole")
    entry = summarize(name, args, whole, measured_in)
    return {**entry, "note": "summarized from the run's log (python -m bench.compile_graphs --from-log): the "
                             "run was cut before it wrote its result; per-step times, losses and trajectories "
                             "are not in the log"}


def trace_pools(quick: bool, steps: int, out_dir: Path) -> dict[str, Any]:
    """The train workload's first `steps` steps under native and vmmalloc with memory history
    on: each system's graph pools' peak live bytes, when, what was live then, against their
    reserved bytes (bench/pool_trace.py), and its snapshot in `out_dir` (not timed: the
    history costs every allocation)."""
    from bench.common import environment

    args = {**workload_args(quick)["train"], "history_steps": steps, "warmup": steps, "steps": 1}
    systems = {}
    for system in ("native", "vmmalloc"):
        measured = run_worker("bench.compile_graphs", system,
                              {**args, "history_out": str(out_dir / f"compile_train_{system}.pickle")}, timeout=1800)
        systems[system] = {k: measured[k] for k in ("pool_history", "trajectory", "peak_reserved", "peak_allocated",
                                                    "reserved_breakdown") if k in measured}
        print(f"[compile_graphs] history {system}: {json.dumps(measured.get('pool_history'))[:4000]}", flush=True)
    return {"benchmark": "compile_graphs_pool_history", "args": args, "systems": systems,
            "environment": environment()}


def with_targets(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with its targets and which of them its workloads meet."""
    met = {}
    for name, w in result["workloads"].items():
        met[f"{name}_speed"] = w["ratios"]["vmmalloc_speed_vs_native"] >= 0.98
        met[f"{name}_reserved_over_allocated"] = w["systems"]["vmmalloc"]["reserved_over_allocated"] <= 1.05
    return {**result, "targets": {"speed_vs_native_min": 0.98, "reserved_over_allocated_max": 1.05}, "met": met}


def merge(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`previous` with the workloads of `new` in place of its own (each keeps the environment
    it was measured in)."""
    workloads = dict(previous["workloads"]) if previous else {}
    for w in workloads.values():  # a whole run's entries carry its environment and note, not their own
        for key in ("environment", "note"):
            if previous and key in previous:
                w.setdefault(key, previous[key])
    workloads.update(new["workloads"])
    return with_targets({"benchmark": "compile_graphs", "workloads": workloads})


def main() -> None:
    parser = argparse.ArgumentParser(description="one workload of the compile_graphs benchmark, merged into "
                                     "bench/results/compile_graphs.json")
    parser.add_argument("workload", choices=["train", "decode"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--add-rounds", action="store_true",
                        help="add --rounds rounds to the stored entry's (same arguments and commit) instead of "
                             "replacing it: a workload measured over several device calls")
    parser.add_argument("--from-log", type=Path, default=None, metavar="LOG",
                        help="summarize the workload from the log of a run cut before it wrote its result, "
                             "and merge it into the result in --out")
    parser.add_argument("--history", type=int, default=0, metavar="STEPS",
                        help="train: record the first STEPS steps' memory history (one round), read the graph "
                             "pools' live bytes over it (bench/pool_trace.py) and save each system's snapshot")
    args = parser.parse_args()
    from bench.common import RESULTS_DIR, environment, write_result

    out_dir = args.out or RESULTS_DIR
    path = out_dir / "compile_graphs.json"
    previous = json.loads(path.read_text()) if path.exists() else None
    if args.history:
        if args.workload != "train":
            raise SystemExit("compile_graphs: --history reads the train workload's graph pools; use it with train")
        histories = trace_pools(args.quick, args.history, out_dir)
        print(f"wrote {write_result('compile_graphs_pool_history', histories, out_dir)}")
        return
    if args.from_log:
        entry = from_log(args.from_log.read_text(), args.workload)
        result = merge(previous, {"workloads": {args.workload: entry}})
        result["environment"] = entry["environment"]
    elif args.add_rounds:
        entry = add_rounds(previous, args.workload, args.quick, args.rounds)
        result = merge(previous, {"workloads": {args.workload: entry}})
        result["environment"] = entry["environment"]
    else:
        result = merge(previous, run("cuda", args.quick, (args.workload,), args.rounds))
        result["environment"] = environment()  # the latest workload's; each workload holds its own
    print(f"wrote {write_result('compile_graphs', result, out_dir)}")


def measured_apart(result: dict[str, Any], workload: dict[str, Any]) -> str:
    """What a workload measured in another run than the result's latest says beside its rows
    (the report dates each row by the result's environment): its commit and day."""
    env, latest = workload.get("environment") or {}, result.get("environment") or {}
    if env and env.get("commit") != latest.get("commit"):
        return f" [measured at {env.get('commit')}, {str(env.get('date', ''))[:10]}]"
    return ""


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, w in result["workloads"].items():
        v = w["systems"]["vmmalloc"]
        name = name + measured_apart(result, w)
        rows.append((f"{name}: vmmalloc speed vs native", f"{w['ratios']['vmmalloc_speed_vs_native']:.3f}x", ">= 0.98x"))
        rows.append((f"{name}: reserved/allocated (native {w['systems']['native']['reserved_over_allocated']:.3f})",
                     f"{v['reserved_over_allocated']:.3f}", "<= 1.05"))
        if "pool_semantics_floor" in v:
            rows.append((f"{name}: reserved/allocated floor of pool semantics (main + pools peaks)",
                         f"{v['pool_semantics_floor']:.3f}", ""))
        rows.append((f"{name}: graph pools, vmmalloc / native",
                     f"{v['pool_bytes'] / GiB:.2f} / {w['systems']['native']['pool_bytes'] / GiB:.2f} GiB", ""))
    return rows


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(measure)
elif __name__ == "__main__":
    main()
