"""Hugging Face integrations on vmmalloc's memory: a KV cache that grows in place in
virtual memory, one that offloads layers to host memory within a GPU budget, an attention
function that reads it with no copy, and a patched ``generate()`` that uses them.

Importing this package needs no transformers; its members import it on first use.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "VirtualKVCache": "vmmalloc.integrations.kv_cache",
    "VirtualKVLayer": "vmmalloc.integrations.kv_cache",
    "OffloadedKVCache": "vmmalloc.integrations.offload_cache",
    "OffloadedKVLayer": "vmmalloc.integrations.offload_cache",
    "virtual_sdpa_attention": "vmmalloc.integrations.attention",
    "register_attention": "vmmalloc.integrations.attention",
    "patch_generate": "vmmalloc.integrations.generate_patch",
    "unpatch_generate": "vmmalloc.integrations.generate_patch",
    "patched_generate": "vmmalloc.integrations.generate_patch",
    "is_patched": "vmmalloc.integrations.generate_patch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmmalloc.integrations' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
