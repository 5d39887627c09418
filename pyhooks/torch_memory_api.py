"""torch.cuda memory statistics under vmmalloc.

With the torch adapter, torch's own functions reach vmmalloc (getDeviceStats, resetPeakStats,
...), from Python and C++ alike; only vmmalloc's own figures, under ``vmm.``, are added to
``torch.cuda.memory_stats()`` here. With the plain pluggable allocator (no adapter),
torch.cuda.memory_stats and everything built on it (memory_allocated, max_memory_reserved,
memory_summary, ...) fail, and so do the peak/accumulated resets and
get_per_process_memory_fraction: these replacements read vmmalloc's per-device allocators,
which use PyTorch's stat names, so the functions built on them in torch.cuda.memory work
unchanged.
"""
from __future__ import annotations

from typing import Any

from vmmalloc import _C


def _device_index(torch, device) -> int:
    from torch.cuda._utils import _get_device_index

    return _get_device_index(device, optional=True)


def nested(flat: dict[str, int]) -> dict[str, Any]:
    """{"a.b.c": 1} -> {"a": {"b": {"c": 1}}}, the shape torch's memory_stats flattens."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def install(torch, adapter: bool) -> None:
    """Routes torch.cuda.memory's statistics to vmmalloc: with the adapter only the ``vmm.``
    figures are added; without it the functions a pluggable allocator breaks are replaced."""
    memory = torch.cuda.memory
    if adapter:
        native = memory.memory_stats_as_nested_dict

        def with_vmm_figures(device=None) -> dict[str, Any]:
            stats = native(device)
            if torch.cuda.is_initialized():
                flat = _C.device_allocator(_device_index(torch, device)).stats()
                stats.update(nested({k: v for k, v in flat.items() if k.startswith("vmm.")}))
            return stats

        with_vmm_figures.__doc__ = native.__doc__
        with_vmm_figures.__name__ = "memory_stats_as_nested_dict"
        memory.memory_stats_as_nested_dict = with_vmm_figures
        return

    def memory_stats_as_nested_dict(device=None) -> dict[str, Any]:
        if not torch.cuda.is_initialized():
            return {}
        return nested(_C.device_allocator(_device_index(torch, device)).stats())

    def reset_peak_memory_stats(device=None) -> None:
        _C.device_allocator(_device_index(torch, device)).reset_peak_stats()

    def reset_accumulated_memory_stats(device=None) -> None:
        _C.device_allocator(_device_index(torch, device)).reset_accumulated_stats()

    def get_per_process_memory_fraction(device=None) -> float:
        torch.cuda.init()
        index = _device_index(torch, device)
        return _C.device_allocator(index).memory_fraction

    replacements = {
        "memory_stats_as_nested_dict": memory_stats_as_nested_dict,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "reset_accumulated_memory_stats": reset_accumulated_memory_stats,
        "get_per_process_memory_fraction": get_per_process_memory_fraction,
    }
    for name, function in replacements.items():
        function.__doc__ = getattr(memory, name).__doc__
        function.__name__ = name
        setattr(memory, name, function)
        if hasattr(torch.cuda, name):
            setattr(torch.cuda, name, function)
