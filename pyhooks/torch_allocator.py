"""vmmalloc as PyTorch's CUDA allocator: enable_vmm_allocator() and the torch.cuda memory
APIs that a plain pluggable allocator breaks (docs/FACTS.md), routed to vmmalloc's figures."""
from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Any

from vmmalloc import _C

_lock = threading.Lock()
_enabled_conf: str | None = None
_adapter_active = False  # enabled through the torch adapter, not the plain pluggable allocator
_pluggable = None  # keeps torch's wrapper object alive

# enable_vmm_allocator's keywords are the VMMALLOC_CONF keys, from the core's one table
# (allocator/core/config.hpp, config_key_table).
OPTION_KEYS = tuple(name for name, _, _ in _C.config_key_table())


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_conf(options: dict[str, Any], env_conf: str = "") -> str:
    """Merges keyword options over a VMMALLOC_CONF string; the result is validated."""
    items: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in env_conf.split(","))):
        key, _, value = item.partition(":")
        if key.strip() in items:  # as parse_config says for a string it is given
            raise ValueError(f"VMMALLOC_CONF: key '{key.strip()}' is given twice")
        items[key.strip()] = value.strip()
    for key, value in options.items():
        if key not in OPTION_KEYS:
            raise ValueError(f"enable_vmm_allocator: unknown option {key!r}; allowed: {', '.join(OPTION_KEYS)}")
        if key in ("memory_cap", "memory_fraction"):
            items.pop("memory_fraction" if key == "memory_cap" else "memory_cap", None)
        items[key] = _format_value(value)
    conf = ",".join(f"{k}:{v}" for k, v in items.items())
    _C.parse_config(conf)  # raises ValueError naming the key and the allowed values
    return conf


def is_enabled() -> bool:
    """Whether vmmalloc serves this process's CUDA allocations."""
    return _enabled_conf is not None


def adapter_active() -> bool:
    """Whether vmmalloc serves them through its torch adapter (graphs, MemPool, IPC, ...)."""
    return _adapter_active


def enable_vmm_allocator(**options: Any) -> None:
    """Make vmmalloc PyTorch's CUDA allocator for this process.

    Call it once, before any CUDA tensor exists (or set ``VMMALLOC=1`` and change no
    code). Options, the ``VMMALLOC_CONF`` keys, override ``VMMALLOC_CONF`` (the list
    below comes from the core's table). Calling it again with the same options does
    nothing.

    Options:
{options}

    Raises:
        ValueError: an unknown option or a bad value (the message names it).
        RuntimeError: CUDA was already initialized by PyTorch's native allocator, or
            vmmalloc is already enabled with other options.
    """
    global _enabled_conf, _adapter_active
    import torch

    conf = build_conf(options, os.environ.get("VMMALLOC_CONF", ""))
    with _lock:
        if _enabled_conf is not None:
            if conf != _enabled_conf:
                raise RuntimeError(
                    f"vmmalloc is already enabled with options {_enabled_conf!r}; it cannot be "
                    f"re-enabled with {conf!r} in the same process.")
            return
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "vmmalloc.enable_vmm_allocator() was called after CUDA was initialized by "
                "PyTorch's native allocator, which cannot be swapped out any more. Either call "
                "enable_vmm_allocator() earlier, before the first CUDA tensor or torch.cuda call, "
                "or run the program with VMMALLOC=1 (no code change needed).")
        # The library only: CUDA stays uninitialized until torch starts it (Note [Lazy driver start]).
        reason = _C.cuda_library_reason()
        if reason:
            raise RuntimeError(f"vmmalloc cannot replace the CUDA allocator: {reason}")
        _C.configure(conf)
        from vmmalloc import memory_history, torch_adapter, torch_memory_api

        fallback = None
        if torch_adapter.wanted():
            try:
                torch_adapter.install(torch)
            except torch_adapter.AdapterUnavailable as error:
                fallback = str(error)
            except RuntimeError as error:
                raise RuntimeError(
                    "vmmalloc could not replace PyTorch's CUDA allocator because it was already "
                    "initialized. Call enable_vmm_allocator() before any CUDA work, or run with "
                    f"VMMALLOC=1. ({error})") from error
        else:
            fallback = f"{torch_adapter.DISABLE_VARIABLE}=0"
        if fallback is not None:
            warnings.warn(
                "vmmalloc runs as a plain CUDAPluggableAllocator, without its torch adapter "
                f"({fallback}): CUDA graph capture, torch.compile(mode='reduce-overhead'), "
                "torch.cuda.MemPool, OOM observers and CUDA tensors shared between processes are "
                "refused, and out of memory raises RuntimeError instead of torch.OutOfMemoryError. "
                "Install a C++ compiler "
                "(and set CXX if it is not 'c++') to get them.", RuntimeWarning, stacklevel=2)
            _install_pluggable(torch)
        torch_memory_api.install(torch, adapter=fallback is None)
        if fallback is None:
            from vmmalloc import ipc

            ipc.install()
        if fallback is not None:
            # With the adapter, torch's own history and snapshot functions reach vmmalloc
            # (Note [Adapter history] in allocator/torch_adapter/trace_recorder.h).
            memory_history.install(torch)
        _adapter_active = fallback is None
        _enabled_conf = conf



enable_vmm_allocator.__doc__ = (enable_vmm_allocator.__doc__ or "").format(options="\n".join(
    f"        ``{name}``: {allowed} (default {default!r})" for name, allowed, default in _C.config_key_table()))

def _install_pluggable(torch) -> None:
    """vmmalloc through torch's CUDAPluggableAllocator and its five C hooks alone."""
    global _pluggable
    pluggable = torch.cuda.memory.CUDAPluggableAllocator(_C.__file__, "vmm_malloc", "vmm_free")
    library = ctypes.CDLL(_C.__file__)
    raw = pluggable.allocator()

    def address(name: str) -> int:
        value = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
        assert value is not None, name  # an exported function has an address
        return value

    raw.set_init_fn(address("vmm_init"))
    raw.set_reset_fn(address("vmm_empty_cache"))
    raw.set_memory_fraction_fn(address("vmm_set_memory_fraction"))
    raw.set_record_stream_fn(address("vmm_record_stream"))
    raw.set_base_alloc_fn(address("vmm_base_alloc"))
    try:
        torch.cuda.memory.change_current_allocator(pluggable)
    except RuntimeError as error:
        raise RuntimeError(
            "vmmalloc could not replace PyTorch's CUDA allocator because it was already "
            "initialized. Call enable_vmm_allocator() before any CUDA work, or run with "
            f"VMMALLOC=1. ({error})") from error
    _pluggable = pluggable
