"""An attention function that reads the virtual K/V buffers in place.

K/V from the virtual caches are strided views of ``[batch, max_length, kv_heads,
head_dim]`` memory. PyTorch SDPA reads such views directly (only the last dimension must be
contiguous: docs/FACTS.md). Decode steps never copy K/V: for one-token steps the query heads of
a group are folded into the query length (one K/V read per group, any mask) instead of
transformers' ``repeat_kv``, which copies K/V once per query head group. Prompts use
``enable_gqa`` when there is no mask; with a mask (padding) K/V are expanded once, as
transformers does, because no fused kernel takes ``enable_gqa`` with a mask.

Registered under :data:`NAME` in transformers' AttentionInterface, with transformers' own
SDPA mask builder, so padding and sliding windows are masked exactly as for ``"sdpa"``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "vmm_sdpa"
# Note [No cuDNN attention while decoding]
# torch's cuDNN SDPA backend builds an execution
# plan per shape, and the key length changes every decode step: profiled on an H200 (torch
# 2.11), each call cost ~1.2 ms of CPU for ~45 us of GPU work, 60% of an 8B model's decode
# step. Flash and memory-efficient attention take any length at no setup cost. Prompts
# (one call per layer) keep torch's own choice, cuDNN included.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def virtual_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query ``[B, Hq, q, D]``, key/value
    ``[B, Hkv, kv, D]`` (any strides with a contiguous last dimension); returns
    ``([B, q, Hq, D], None)``."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot share {kv_heads} key/value heads evenly")
    groups = q_heads // kv_heads
    if attention_mask is not None and attention_mask.shape[-1] != kv_len:
        attention_mask = attention_mask[..., :kv_len]
    if q_len == 1 and groups > 1:
        # One query per head: a group's heads become the query length of its K/V head.
        packed = query.reshape(batch, kv_heads, groups, query.shape[-1])
        with sdpa_kernel(_DECODE_BACKENDS):
            out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                 scale=scaling)
        return out.reshape(batch, q_heads, 1, value.shape[-1]).transpose(1, 2), None
    causal = q_len > 1 and attention_mask is None and (is_causal if is_causal is not None
                                                        else getattr(module, "is_causal", True))
    if causal and kv_len != q_len:
        # SDPA's is_causal aligns the top-left corner; new tokens after a cached prefix need
        # the bottom-right one.
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        causal = False
    short = q_len <= groups  # a few tokens (speculative candidates): kernels as for decode
    if attention_mask is not None and groups > 1:
        # No flash or memory-efficient kernel takes enable_gqa with a mask, and the math
        # fallback's memory is quadratic in the length: expand K/V once, as transformers does.
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        groups = 1
    if short:
        with sdpa_kernel(_DECODE_BACKENDS):
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                 scale=scaling, is_causal=causal, enable_gqa=groups > 1)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, is_causal=causal, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Registers :func:`virtual_sdpa_attention` (and SDPA's masks) under :data:`NAME`;
    idempotent. Select it with ``model.set_attn_implementation(NAME)``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, virtual_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
