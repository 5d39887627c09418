"""Where the copy engine waits during offloaded decode (a diagnosis, not a benchmark).

Runs a few decode steps of OffloadedKVCache (Llama-3-8B shape, random weights) under the
PyTorch profiler and reads the trace: every idle gap of the host-to-device copy stream
between two layer fetches, with what held the next fetch back:
- "queued late": the CPU issued it after the previous copy had ended, so the CPU is the
  bottleneck there (the trace says which blocking CUDA calls the CPU made in the gap);
- "waited": issued in time, the copy waited on an event (a slot's release or a copy to the
  host: Note [The ring and its events]).

    VMMALLOC=1 python -m bench.offload_timeline [--context 32768] [--batch 4] [--steps 4] [--out DIR]

Writes DIR/offload_timeline.json (the gaps and totals) and DIR/offload_trace.json (the
trace, for chrome://tracing or Perfetto).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STEP_MARK = "vmmalloc.decode_step_end"
# CUDA runtime calls that block the calling thread until the GPU reaches a point
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
                  "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize")
MIN_FETCH_BYTES = 1 << 20  # a layer fetch, not a token's copy
MIN_GAP_US = 100.0


def _events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]


def copy_gaps(trace: dict[str, Any], skip_steps: int = 0, min_gap_us: float = MIN_GAP_US) -> dict[str, Any]:
    """The idle gaps of the host-to-device layer fetches between step mark `skip_steps` and
    the last step mark of `trace` (a Chrome trace from torch.profiler), each classified
    (module doc)."""
    events = _events(trace)
    marks = sorted(e["ts"] for e in events if e.get("name") == STEP_MARK)
    if len(marks) < skip_steps + 2:
        raise ValueError(f"the trace has {len(marks)} '{STEP_MARK}' marks; {skip_steps + 2} are needed "
                         f"(skipping {skip_steps} step(s), then at least one)")
    marks = marks[skip_steps:]
    lo, hi = marks[0], marks[-1]
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    fetches = sorted((e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
                      and e.get("args", {}).get("bytes", MIN_FETCH_BYTES) >= MIN_FETCH_BYTES
                      and lo <= e["ts"] <= hi), key=lambda e: e["ts"])
    blocking = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and e.get("name") in BLOCKING_CALLS]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    gaps = []
    for before, after in zip(fetches, fetches[1:]):
        start, end = before["ts"] + before["dur"], after["ts"]
        if end - start < min_gap_us:
            continue
        launched = launches.get(after.get("args", {}).get("correlation"))
        cause = "unknown" if launched is None else ("queued late" if launched >= start else "waited")
        held = [{"call": e["name"], "ms": _overlap(e, start, end) / 1e3} for e in blocking if _overlap(e, start, end) > 0]
        busy = {}
        for k in kernels:
            overlap = _overlap(k, start, end)
            if overlap > 0:
                busy[k["name"][:80]] = busy.get(k["name"][:80], 0.0) + overlap / 1e3
        gaps.append({"at_ms": (start - lo) / 1e3, "ms": (end - start) / 1e3, "cause": cause,
                     "launched_after_previous_end_ms": None if launched is None else (launched - start) / 1e3,
                     "blocking_calls": held,
                     "kernels_ms": dict(sorted(busy.items(), key=lambda kv: -kv[1])[:5])})
    window_ms = (hi - lo) / 1e3
    busy_ms = sum(min(e["ts"] + e["dur"], hi) - e["ts"] for e in fetches) / 1e3
    by_cause: dict[str, float] = {}
    for g in gaps:
        by_cause[g["cause"]] = by_cause.get(g["cause"], 0.0) + g["ms"]
    return {"steps": len(marks) - 1, "window_ms": window_ms, "fetches": len(fetches), "copy_busy_ms": busy_ms,
            "idle_ms": window_ms - busy_ms, "gap_ms_by_cause": by_cause, "gaps": gaps}


def _overlap(event: dict[str, Any], start: float, end: float) -> float:
    return max(0.0, min(event["ts"] + event.get("dur", 0), end) - max(event["ts"], start))


def profile(context: int, batch: int, steps: int, out_dir: Path) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile
    from transformers import StoppingCriteria

    import vmmalloc
    from bench.kv_cache import build_model, kv_bytes
    from bench.offload import BUDGET_FRACTION, _generate

    if not vmmalloc.is_enabled():
        raise SystemExit("run under VMMALLOC=1: the offloading cache's ring lives in vmmalloc memory")
    model = build_model(torch, context + steps + 256)
    budget = int(BUDGET_FRACTION * kv_bytes(model.config, batch, context + steps + 2))

    class StepMark(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            with record_function(STEP_MARK):
                pass
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    g = torch.Generator(device="cuda").manual_seed(context)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device="cuda", generator=g)
    new_tokens = steps + 2  # a mark after the prompt's token and after each step; one warm step
    # the benchmark's own generate() call, so the trace shows what the benchmark measured
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, cache = _generate(torch, model, "offload", ids, new_tokens, budget, StepMark())
    out_dir.mkdir(parents=True, exist_ok=True)
    trace_path = out_dir / "offload_trace.json"
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    result = {"context": context, "batch": batch, "offloaded_layers": len(cache.offloaded_layers),
              **copy_gaps(trace, skip_steps=1)}  # the first mark ends the prompt; one warm step
    cache.free()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.offload_timeline", description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="decode steps inside the profiled window")
    parser.add_argument("--out", type=Path, default=Path("offload-timeline"))
    args = parser.parse_args(argv)
    for name in ("context", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    result = profile(args.context, args.batch, args.steps, args.out)
    (args.out / "offload_timeline.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['steps']} steps, {result['window_ms']:.1f} ms: copy engine busy {result['copy_busy_ms']:.1f} ms, "
          f"idle {result['idle_ms']:.1f} ms; gaps by cause (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["gap_ms_by_cause"].items()))
    for g in sorted(result["gaps"], key=lambda g: -g["ms"])[:12]:
        print(f"  {g['at_ms']:9.1f} ms: {g['ms']:6.2f} ms idle, {g['cause']}, blocking calls "
              f"{[c['call'] for c in g['blocking_calls']]}, kernels {list(g['kernels_ms'])[:2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
