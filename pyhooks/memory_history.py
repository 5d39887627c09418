"""Memory history and snapshots in PyTorch's format, from vmmalloc's event log.

With the torch adapter (the default), torch's own ``torch.cuda.memory._record_memory_history``
and ``_snapshot`` reach vmmalloc, with stack frames and user metadata (Note [Adapter history]
in allocator/torch_adapter/trace_recorder.h). This module serves the rest: the core's event
log on any backend (host included), vmmalloc's timeline, and, when vmmalloc runs as a plain
CUDAPluggableAllocator (no adapter), replacements of those torch functions, whose calls
do not reach a pluggable allocator. Either way ``torch.cuda.memory._dump_snapshot(...)``
writes a file that PyTorch's memory viewer (pytorch.org/memory_viz,
``python -m torch.cuda._memory_viz``) opens.

What the replacements' snapshots lack or add, and why:
- Allocations carry no stack frames: the C++ core records events without Python.
- Physical memory is 2 MiB chunks, not cudaMalloc segments. Growth and release are the
  trace actions ``vmm_grow`` / ``vmm_release`` and a stitch is ``vmm_stitch``; the viewer
  skips actions it does not know, vmmalloc's timeline (vmmalloc.timeline) draws them. KV
  pages mapped into a virtual tensor are ``alloc`` / ``free_*`` entries with
  ``vmm_action`` ``"map"`` / ``"unmap"``.
- ``segments`` are the regions memory is in now (Note [Snapshot segments] in
  allocator/core/caching_allocator.hpp): their sizes add up to reserved memory, and free
  chunks form one region at address 0.
"""
from __future__ import annotations

import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmmalloc import _C

# Events kept per device when the caller asks for "all of them" (torch's default,
# sys.maxsize): 56 bytes each, so 28 MB per device.
DEFAULT_MAX_ENTRIES = 500_000

# vmmalloc event kind -> PyTorch trace action.
_ACTIONS = {"alloc": "alloc", "free_requested": "free_requested", "free_completed": "free_completed",
            "grow": "vmm_grow", "release": "vmm_release", "stitch": "vmm_stitch", "oom": "oom"}


def _capacity(enabled: Any, max_entries: int) -> int:
    if enabled in (None, False):
        return 0
    if enabled not in (True, "all", "state"):
        raise ValueError(f"enabled must be None, 'state' or 'all' (as in torch), got {enabled!r}")
    if not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
    return DEFAULT_MAX_ENTRIES if max_entries == sys.maxsize else max_entries


def record_allocator_history(allocator: _C.Allocator, enabled: Any = "all",
                             max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
    """Starts (or, with ``enabled=None``, stops) recording `allocator`'s events.

    The last `max_entries` events are kept; turning recording on again forgets earlier
    ones. Works on any backend (host included).
    """
    allocator.record_events(_capacity(enabled, max_entries))


def trace_entries(events: list[tuple]) -> list[dict[str, Any]]:
    """The allocator's events (``Allocator.events()``) as PyTorch trace entries."""
    out: list[dict[str, Any]] = []
    for kind, time_ns, addr, size, aux, allocated, reserved, stream in events:
        entry = {"addr": addr, "size": size, "stream": stream, "time_us": time_ns // 1000,
                 "frames": [], "vmm_allocated": allocated, "vmm_reserved": reserved}
        if kind == "map":
            out.append({**entry, "action": "alloc", "vmm_action": "map"})
        elif kind == "unmap":
            out.append({**entry, "action": "free_requested", "vmm_action": "unmap"})
            out.append({**entry, "action": "free_completed", "vmm_action": "unmap"})
        elif kind == "oom":
            out.append({**entry, "action": "oom", "device_free": aux})
        elif kind == "stitch":
            out.append({**entry, "action": "vmm_stitch", "vmm_new_chunks": aux})
        else:
            out.append({**entry, "action": _ACTIONS[kind]})
    return out


def _segment(device: int, region: dict[str, Any]) -> dict[str, Any]:
    blocks = [{"address": b["address"], "size": b["size"], "requested_size": b["requested_size"],
               "state": b["state"], "frames": []} for b in region["blocks"]]
    return {
        "device": device,
        "address": region["address"],
        "total_size": region["total_size"],
        "allocated_size": sum(b["size"] for b in blocks if b["state"] == "active_allocated"),
        "active_size": sum(b["size"] for b in blocks if b["state"] != "inactive"),
        "requested_size": sum(b["requested_size"] for b in blocks),
        "stream": region["stream"],
        "segment_type": "small" if region["kind"] == "small" else "large",
        "segment_pool_id": tuple(region.get("pool", (0, 0))),
        "is_expandable": region["kind"] in ("pages", "free"),
        "frames": [],
        "blocks": blocks,
        "vmm_kind": region["kind"],
    }


def snapshot_of(allocators: Mapping[int, _C.Allocator]) -> dict[str, Any]:
    """A snapshot, in PyTorch's format, of the allocators by device index."""
    devices = max(allocators, default=-1) + 1
    traces: list[list[dict[str, Any]]] = [[] for _ in range(devices)]
    segments: list[dict[str, Any]] = []
    dropped: dict[int, int] = {}
    for device, allocator in sorted(allocators.items()):
        segments += [_segment(device, region) for region in allocator.segments()]
        traces[device] = trace_entries(allocator.events())
        dropped[device] = allocator.events_dropped
    return {
        "segments": segments,
        "device_traces": traces,
        "allocator_settings": {"allocator": "vmmalloc", "conf": _C.configured()},
        "vmmalloc": {"events_dropped": dropped},
    }


def live_device_allocators(torch) -> dict[int, _C.Allocator]:
    """The allocators of the devices this process has used, by index."""
    return {d: _C.device_allocator(d) for d in range(torch.cuda.device_count())
            if _C.device_allocator_exists(d)}


def install(torch) -> None:
    """Replaces torch.cuda.memory's history and snapshot functions with vmmalloc's."""
    memory = torch.cuda.memory
    from torch.cuda._utils import _get_device_index

    def _record_memory_history(enabled: Any = "all", context: Any = "all", stacks: str = "all",
                               max_entries: int = sys.maxsize, device: Any = None,
                               clear_history: bool = False, *args: Any, **kwargs: Any) -> None:
        torch.cuda.init()
        allocator = _C.device_allocator(_get_device_index(device, optional=True))
        capacity = _capacity(enabled, max_entries)
        if clear_history or capacity != allocator.event_capacity:
            allocator.record_events(capacity)

    def _snapshot(device: Any = None, augment_with_fx_traces: bool = False) -> dict[str, Any]:
        if not torch.cuda.is_initialized():
            return {"segments": [], "device_traces": [], "allocator_settings": {}}
        return snapshot_of(live_device_allocators(torch))

    def memory_snapshot(mempool_id: Any = None, include_traces: bool = True) -> list[dict[str, Any]]:
        segments = _snapshot()["segments"]
        if mempool_id is None:
            return segments
        return [s for s in segments if s["segment_pool_id"] == tuple(mempool_id)]

    replacements = {"_record_memory_history": _record_memory_history, "_snapshot": _snapshot,
                    "memory_snapshot": memory_snapshot}
    for name, function in replacements.items():
        function.__doc__ = (getattr(memory, name).__doc__ or "") + "\n(vmmalloc: see vmmalloc.memory_history.)"
        function.__name__ = name
        setattr(memory, name, function)
        if hasattr(torch.cuda, name):
            setattr(torch.cuda, name, function)


def dump(snapshot: dict[str, Any], path: str | Path) -> Path:
    """Pickles a snapshot where PyTorch's viewer can open it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(snapshot, f)
    return path
