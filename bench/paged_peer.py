"""The PagedAttention peer in the KV benchmarks: transformers' continuous batching
(``generate_batch``: a PagedAttentionCache of fixed-size blocks, attention that gathers K/V
by block index; vLLM's approach, which vAttention measured itself against).

generate_batch has no per-step hook, so decode time is taken as the time of a run of
`new_tokens` tokens minus that of a run of one token (the prompt's step), each the median
over `repeats`; its cache reserves blocks from the free GPU memory when it starts (as vLLM's
gpu_memory_utilization does), so its peak reserved says what it took, not what it needed.
"""
from __future__ import annotations

import statistics
import time
from typing import Any


def run_paged(torch, model, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Decode speed and memory of continuous batching over `prompts` (token id lists, any
    lengths: no padding), greedy, `new_tokens` each."""
    from transformers import GenerationConfig

    def generate(n: int) -> tuple[float, dict[str, Any]]:
        # An end-of-sequence id no token has: every request runs its n tokens, as
        # min_new_tokens makes the other systems do.
        config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=model.config.vocab_size,
                                  pad_token_id=model.config.pad_token_id or 0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    generate(1)  # warm-up: the cache and the kernels of these shapes
    prefill = statistics.median(generate(1)[0] for _ in range(repeats))
    runs = [generate(new_tokens) for _ in range(repeats)]
    total = statistics.median(seconds for seconds, _ in runs)
    out = runs[0][1]
    tokens = [list(out[key].generated_tokens) for key in sorted(out, key=lambda k: int(str(k).split("_")[-1]))]
    decode, steps = total - prefill, new_tokens - 1
    if decode <= 0 or steps <= 0:
        return {"ok": False, "batch": len(prompts), "context": max(len(p) for p in prompts),
                "error": f"decode time not measurable: {new_tokens} tokens took {total:.4f} s, one {prefill:.4f} s"}
    return {
        "ok": True, "batch": len(prompts), "context": max(len(p) for p in prompts), "new_tokens": new_tokens,
        "repeats": repeats, "contexts": [len(p) for p in prompts],
        "ttft_s": prefill, "decode_tok_s": len(prompts) * steps / decode, "step_median_s": decode / steps,
        "step_p99_s": None, "tokens": tokens, "full_length": all(len(t) == new_tokens for t in tokens),
        "peak_reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0,
        "peak_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }
