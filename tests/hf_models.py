"""Tiny random-weight Hugging Face models built from configs (no downloads), for the cache
tests on CPU and GPU."""
from __future__ import annotations

import torch

VOCAB = 128


def tiny_model(kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
               layers: int = 2, max_positions: int = 512, attention: str = "sdpa", hidden: int = 64):
    """``kind``: "llama" (GQA), "qwen2" (a full layer then sliding layers) or "mistral"
    (every layer slides, MQA). Four query heads of ``hidden / 4``: a llama position's K and V
    take ``hidden * 4`` bytes in fp32."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=max_positions, attn_implementation=attention,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if kind == "llama":
        config, cls = LlamaConfig(num_key_value_heads=2, **common), LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                  max_window_layers=1, **{**common, "num_hidden_layers": layers + 1}), Qwen2ForCausalLM
    elif kind == "mistral":
        config, cls = MistralConfig(num_key_value_heads=1, sliding_window=8, **common), MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompt(batch: int = 3, length: int = 12, device: str = "cpu", seed: int = 1, padded: bool = True):
    """Token ids (never special tokens) and an attention mask, left-padded when `padded`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padded and batch > 1:
        for row in range(batch - 1):
            pad = (row * 3 + 2) % (length - 2)
            ids[row, :pad] = 0
            mask[row, :pad] = 0
    return ids.to(device), mask.to(device)
