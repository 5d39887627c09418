"""Where a graph-replayed decode step's time goes (bench/NOTES.md, "KV decode in CUDA graphs":
the step is 2.1x the HBM bound and the split between attention and matrix products is not
known). GPU only, under vmmalloc, in one process:

    VMMALLOC=1 python -m bench.graph_decode_profile [--context 16384] [--batch 8] [--steps 8]

The Llama-3-8B shape with random bf16 weights decodes a prompt twice under the patch: the
first call records the graph, the second replays it; the profiler covers the second call's
decode steps only (a stopping criterion starts it after the prompt's step). Prints one JSON
line: the CUDA time per decode step of each kernel family (attention, matrix products, the
rest), their share, and the ten costliest kernels.
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def kernel_family(name: str) -> str:
    lowered = name.lower()
    if any(mark in lowered for mark in ("flex", "attention", "triton_tem", "flash_fwd")):
        return "attention"
    if any(mark in lowered for mark in ("nvjet", "gemm", "gemv", "matmul", "cutlass", "sm90")):
        return "matrix products"
    return "rest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import StoppingCriteria, StoppingCriteriaList

    import vmmalloc
    from bench.kv_cache import build_model, prompt_ids
    from vmmalloc.integrations import patched_generate

    if not vmmalloc.is_enabled():
        raise SystemExit("run it under VMMALLOC=1, as bench/graph_decode runs the graph path it profiles")
    # Graphs recorded before the profiler first starts are not seen by it (pytorch#100441).
    torch.profiler._utils._init_for_cuda_graphs()
    model = build_model(torch, args.context + args.steps + 128)
    ids = prompt_ids(torch, model.config, args.batch, args.context, args.context)
    kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.steps + 1,
                                  min_new_tokens=args.steps + 1, do_sample=False)
    prof = profile(activities=[ProfilerActivity.CUDA])

    class StartAfterPrompt(StoppingCriteria):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, input_ids, scores, **_: Any):
            torch.cuda.synchronize()
            self.calls += 1
            if self.calls == 1:
                prof.start()  # the prompt's step is done: the decode steps follow
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    with torch.no_grad(), patched_generate("vmm"):
        model.generate(ids, **kwargs)  # records the graph
        model.generate(ids, stopping_criteria=StoppingCriteriaList([StartAfterPrompt()]), **kwargs)
        torch.cuda.synchronize()
        prof.stop()
        from vmmalloc.integrations.generate_patch import _kept

        kept = _kept.get(model)
        decoder = kept[0].graph_decoder if kept else None
        if decoder is None or decoder.replays < 2 * args.steps:
            raise SystemExit(f"the decode steps were not replayed from a graph ({decoder and decoder.failed}): "
                             "this would profile eager decode")
    per_step: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if cuda_us <= 0 or event.key.startswith("cuda") or event.key.startswith("Memcpy"):
            continue
        family = kernel_family(event.key)
        per_step[family] = per_step.get(family, 0.0) + cuda_us / args.steps / 1e3
        kernels.append((cuda_us / args.steps / 1e3, event.key[:120]))
    total = sum(per_step.values())
    print(json.dumps({
        "context": args.context, "batch": args.batch, "steps": args.steps, "gpu": torch.cuda.get_device_name(),
        "ms_per_step": {k: round(v, 3) for k, v in per_step.items()}, "total_ms_per_step": round(total, 3),
        "share": {k: round(v / total, 3) for k, v in per_step.items()} if total else {},
        "top_kernels_ms_per_step": [[round(t, 3), name] for t, name in sorted(kernels, reverse=True)[:10]],
    }))


if __name__ == "__main__":
    main()
