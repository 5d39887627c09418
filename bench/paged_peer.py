"""The PagedAttention peer in the KV benchmarks: transformers' continuous batching
(``generate_batch``: a PagedAttentionCache of fixed-size blocks, attention that gathers K/V
by block index; vLLM's approach, which vAttention measured itself against).

generate_batch has no per-step hook, so a repeat's decode time is the time of a run of
`new_tokens` tokens minus that of a run of one token (the prompt's step) on the same prompts,
and the median over the repeats is taken; each repeat's prompts run once untimed first (the
warm-up is the first repeat's), since a long prompt's prefill is most of a point's time
(8 x 64K tokens); its cache reserves blocks from the free GPU memory when it starts (as vLLM's
gpu_memory_utilization does), so its peak reserved says what it took, not what it needed.
Its attention is transformers' paged SDPA without CUDA graphs: a stand-in for vLLM's
approach, not vLLM's kernels.
"""
from __future__ import annotations

import statistics
import time
from typing import Any


def run_paged(torch, model, prompts_per_repeat: list[list[list[int]]], new_tokens: int,
              cache_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode speed and memory of continuous batching, greedy, `new_tokens` a request: one
    batch of prompts (token id lists, any lengths: no padding) per repeat, the same prompts
    the other systems get in that repeat. `cache_options` (ContinuousBatchingConfig's fields,
    e.g. num_blocks, max_batch_tokens) size its cache; by default it sizes itself from the
    free memory of the model's device."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    batching = {"continuous_batching_config": ContinuousBatchingConfig(**cache_options)} if cache_options else {}

    def generate(n: int, prompts: list[list[int]]) -> tuple[float, dict[str, Any]]:
        # An end-of-sequence id no token has: every request runs its n tokens, as
        # min_new_tokens makes the other systems do.
        config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=model.config.vocab_size,
                                  pad_token_id=model.config.pad_token_id or 0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False, **batching)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    first = prompts_per_repeat[0]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    generate(2, first)  # warm-up: the cache, the prompt's kernels and the decode step's
    prefills, decodes, outputs = [], [], []
    for prompts in prompts_per_repeat:
        if prompts is not first:  # the warm-up ran the first repeat's prompts already
            generate(1, prompts)  # this repeat's new prompt shapes: their first use is not timed
        prefill = generate(1, prompts)[0]
        total, out = generate(new_tokens, prompts)
        prefills.append(prefill)
        decodes.append(total - prefill)
        outputs.append(out)
    decode, steps = statistics.median(decodes), new_tokens - 1
    batch, context = len(first), max(len(p) for p in first)
    if decode <= 0 or steps <= 0:
        return {"ok": False, "batch": batch, "context": context,
                "error": f"decode time not measurable: {new_tokens} tokens took {decode:.4f} s more than one"}
    out = outputs[0]
    tokens = [list(out[key].generated_tokens) for key in sorted(out, key=lambda k: int(str(k).split("_")[-1]))]
    return {
        "ok": True, "batch": batch, "context": context, "new_tokens": new_tokens,
        "repeats": len(prompts_per_repeat), "contexts": [max(len(p) for p in ps) for ps in prompts_per_repeat],
        "ttft_s": statistics.median(prefills), "decode_tok_s": batch * steps / decode, "step_median_s": decode / steps,
        "step_p99_s": None, "tokens": tokens, "full_length": all(len(t) == new_tokens for t in tokens),
        "peak_reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0,
        "peak_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }
