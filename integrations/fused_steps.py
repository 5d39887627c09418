"""Small kernels of a decode step fused for the graph decoder (integrations/graph_decode.py).

Note [Fused small kernels in graph steps]
A replayed decode step of the Llama-3-8B shape spends 2.9 ms of its 12.5 ms of GPU time in
small kernels (bench/NOTES.md, "KV decode in CUDA graphs": RMSNorm alone launches eight per
call, 65 calls a step). Inside the decoder's graph mode the RMSNorm modules, and the SiLU gate
of the gated MLPs, run as functions compiled by inductor: one compile per shape for all
layers (weights are arguments, not guards), kernels the graph then records like any other.
Attention and the cache stay outside the compiled code (their views alias one reservation,
which AOT autograd's alias replay does not take). Only the classes whose forward is known
to be exactly the function below are swapped (FUSED_NORMS), so a model with another norm
(Gemma's 1 + weight) keeps its own. Numerics: the same operations in the same precision;
inductor may order the fp32 reduction differently, within rounding. Where the fused
functions fail (inductor without a compiler, triton missing), the decoder says so once and its
graphs run the small kernels unfused (GraphDecoder.fuse_failed), never eagerly.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

# transformers' RMSNorm classes whose forward is _rms_norm's arithmetic (fp32 inside, the
# weight applied in the input's dtype).
FUSED_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
FUSED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def _rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@functools.cache
def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(fn, dynamic=False)


def fusable_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` the fused functions can stand in for."""
    out = []
    for module in model.modules():
        name = type(module).__name__
        if name in FUSED_NORMS and hasattr(module, "variance_epsilon"):
            out.append(module)
        elif name in FUSED_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
            out.append(module)
    return out


def _norm_forward(module: Any, norm: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return norm(hidden_states, module.weight, module.variance_epsilon)
    return forward


def _mlp_forward(module: Any, gate: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(gate(module.gate_proj(x), module.up_proj(x)))
    return forward


@contextlib.contextmanager
def fused_small_kernels(model: torch.nn.Module) -> Iterator[int]:
    """In this block the fusable modules of `model` run the compiled functions (Note [Fused
    small kernels in graph steps]); yields how many were swapped. Their own forwards come
    back on exit, also after an error."""
    norm, gate = _compiled(_rms_norm), _compiled(_silu_gate)
    swapped: list[tuple[torch.nn.Module, Any]] = []
    try:
        for module in fusable_modules(model):
            had = module.__dict__.get("forward")
            module.forward = _norm_forward(module, norm) if type(module).__name__ in FUSED_NORMS else \
                _mlp_forward(module, gate)
            swapped.append((module, had))
        yield len(swapped)
    finally:
        for module, had in swapped:
            if had is None:
                del module.forward
            else:
                module.forward = had
