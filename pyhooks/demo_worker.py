"""One side of `vmmalloc demo` on a GPU, in its own process (the CUDA allocator is fixed at
CUDA start-up): a Llama with random weights serves requests of varying batch and prompt
length through generate(), under PyTorch's allocator or under vmmalloc with its KV cache.

    python -m vmmalloc.demo_worker native|vmmalloc OUT_DIR [--quick]

Prints ``PROGRESS i n`` lines while it works and one ``RESULT {json}`` line at the end.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

# Events kept. A full demo run makes about 1.5 million (decoding allocates many small
# tensors per layer and step); fewer would cut the start off the timeline.
HISTORY = 2_000_000


def schedule(quick: bool) -> list[tuple[int, int, int]]:
    """(batch, prompt length, new tokens) per request: a serving mix, the same on both sides."""
    plan = [(4, 1024, 48), (16, 2048, 48), (2, 3072, 48), (8, 512, 48), (16, 3072, 48), (1, 2048, 48)]
    return [(b, p, 16) for b, p, _ in plan[:4]] if quick else plan


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=8192,
                       attn_implementation="sdpa")


def kv_bytes(cache: Any) -> int:
    """GPU bytes the cache holds for K and V (committed pages for vmmalloc's cache)."""
    if hasattr(cache, "committed_bytes"):  # a property of vmmalloc's caches
        return int(cache.committed_bytes)
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


def measure(system: str, out_dir: Path, quick: bool) -> dict[str, Any]:
    import torch

    import vmmalloc

    if system == "vmmalloc":
        vmmalloc.enable_vmm_allocator(history=HISTORY)
    from transformers import LlamaForCausalLM

    if system == "vmmalloc":
        from vmmalloc.integrations import patch_generate

        patch_generate("vmm")
    else:
        torch.cuda.memory._record_memory_history(max_entries=HISTORY, context=None)
    from vmmalloc.integrations.hf_compat import output_cache

    plan = schedule(quick)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(model_config()).to(torch.bfloat16).eval()
    print(f"PROGRESS 0 {len(plan)}", flush=True)
    peak_kv = 0
    generator = torch.Generator(device="cuda").manual_seed(1)
    for i, (batch, prompt, new) in enumerate(plan, 1):
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda", generator=generator)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=0)
        peak_kv = max(peak_kv, kv_bytes(output_cache(out)))
        del out, ids
        print(f"PROGRESS {i} {len(plan)}", flush=True)
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    from vmmalloc import timeline

    snapshot = torch.cuda.memory._snapshot()
    series = timeline.downsample(timeline.from_snapshot(snapshot, torch.cuda.current_device()))
    timeline_path = out_dir / f"{system}_timeline.json"
    timeline_path.write_text(json.dumps(dataclasses.asdict(series)))
    snapshot_path = None
    if system == "vmmalloc":  # PyTorch's viewer has its own allocator's snapshots already
        snapshot_path = out_dir / f"{system}.pickle"
        torch.cuda.memory._dump_snapshot(str(snapshot_path))
    return {
        "system": system,
        "peak_reserved": stats["reserved_bytes.all.peak"],
        "peak_allocated": stats["allocated_bytes.all.peak"],
        "stitches": stats.get("vmm.stitches", 0),
        "peak_kv": peak_kv,
        "device_allocs": stats.get("num_device_alloc", 0),
        "timeline": str(timeline_path),
        "snapshot": str(snapshot_path) if snapshot_path else None,
        "gpu": torch.cuda.get_device_name(),
        "requests": len(plan),
    }


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("native", "vmmalloc"):
        print("usage: python -m vmmalloc.demo_worker native|vmmalloc OUT_DIR [--quick]", file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    result = measure(argv[0], out_dir, "--quick" in argv[2:])
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
