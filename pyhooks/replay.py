"""Replays a workload's allocations against vmmalloc on the host backend, on a CPU.

What vmmalloc's policy does with a workload (stitches, chunks it maps, physical growth,
peak reserved against peak allocated) depends only on the sequence of requests: sizes,
streams, and when each block became reusable. A trace of those, taken once on a GPU,
replays here in seconds under any VMMALLOC_CONF, so a policy change or a setting can be
judged without a GPU, and a run on the GPU then confirms it.

Traces come from memory snapshots in PyTorch's format: ``torch.cuda.memory._dump_snapshot``
under PyTorch's own allocator, or the ``<pid>.pickle`` of ``vmmalloc run --history N``. Only
``alloc`` and ``free_completed`` entries are used (a block is reusable from its
``free_completed`` on); KV pages (``vmm_action`` map/unmap) are left out. A trace is saved
compactly with :func:`save_trace` (``.trace.gz``).

Where a replay and a GPU run of vmmalloc differ: on the host backend every event is
complete when recorded, so mappings evicted under the cache's bounds are unmapped at once
rather than when their stream's work is done; nothing else in the policy looks at time.

CUDA graphs' memory (Note [Private pools]): a trace does not say which pool a request went
to, but a graph tree warms up and records on a stream of its own (torch/_inductor/
cudagraph_trees.py), so ``pool_streams`` routes the requests of those streams to one graph
pool, from the first of them to the end of the trace. On the trace of a compiled training
step the stream matched the pool of 2775 of 2777 requests under PyTorch's allocator. The
route keeps the allocator in capture-safe mode for the rest of the trace, main-arena
requests too, where on a GPU the mode lasts only through warm-up and recording.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from array import array
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmmalloc import _C

MAGIC = b"VMMTRACE1\n"
_RECORD = struct.Struct("<BQQQ")  # op, allocation id, size, stream
ALLOC, FREE = 0, 1

# Driver costs per physical handle from docs/FACTS.md / bench/NOTES.md ("Several GPUs" item 15:
# a grant costs the same for a 2 MiB and a 16 MiB handle): mapping an existing handle into
# a new range (cuMemMap + cuMemSetAccess), and creating one (cuMemCreate, map and grant).
STITCHED_HANDLE_US = 30.0
CREATED_HANDLE_US = 50.0
# Remapping one handle of a mapping in place (Note [Repairing blocked mappings]): cuMemUnmap,
# cuMemMap and cuMemSetAccess.
REPAIRED_HANDLE_US = 50.0
CHUNK = 2 << 20


@dataclass
class Trace:
    """Requests in order: op (ALLOC/FREE), the allocation's id, its size, its stream."""

    ops: array = field(default_factory=lambda: array("B"))
    ids: array = field(default_factory=lambda: array("Q"))
    sizes: array = field(default_factory=lambda: array("Q"))
    streams: array = field(default_factory=lambda: array("Q"))
    # frees of blocks allocated before the trace began (a wrapped or late-started history)
    unmatched_frees: int = 0

    def __len__(self) -> int:
        return len(self.ops)

    def append(self, op: int, ident: int, size: int, stream: int) -> None:
        self.ops.append(op)
        self.ids.append(ident)
        self.sizes.append(size)
        self.streams.append(stream)


def trace_from_entries(entries: Iterable[Mapping[str, Any]]) -> Trace:
    """A Trace from PyTorch trace entries (one device's ``device_traces`` list)."""
    trace = Trace()
    live: dict[int, int] = {}
    next_id = 0
    for entry in entries:
        action = entry.get("action")
        if entry.get("vmm_action") is not None:
            continue  # KV pages are mapped into virtual tensors, not allocated
        if action == "alloc":
            live[entry["addr"]] = next_id
            trace.append(ALLOC, next_id, int(entry["size"]), int(entry.get("stream", 0)))
            next_id += 1
        elif action == "free_completed":
            ident = live.pop(entry["addr"], None)
            if ident is None:
                trace.unmatched_frees += 1
            else:
                trace.append(FREE, ident, int(entry["size"]), int(entry.get("stream", 0)))
    return trace


def load_trace(path: str | Path, device: int | None = None) -> Trace:
    """Reads a ``.trace.gz`` written by :func:`save_trace`, or a snapshot pickle (optionally
    gzipped). A snapshot holding several devices needs `device`."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(len(MAGIC))
        if head == MAGIC:
            return _read_compact(f)
        snapshot = pickle.loads(head + f.read())
    if not isinstance(snapshot, dict) or "device_traces" not in snapshot:
        raise ValueError(f"{path} is neither a vmmalloc trace nor a memory snapshot (no 'device_traces'); "
                         "write one with torch.cuda.memory._dump_snapshot or `vmmalloc run --history N`")
    traces = snapshot["device_traces"]
    used = [i for i, t in enumerate(traces) if t]
    if device is None:
        if len(used) > 1:
            raise ValueError(f"{path} holds traces of devices {used}; choose one with device=")
        device = used[0] if used else 0
    if device >= len(traces) or not traces[device]:
        raise ValueError(f"{path} has no trace for device {device}; devices with one: {used}")
    return trace_from_entries(traces[device])


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Writes `trace` compactly (25 bytes per request before gzip)."""
    path = Path(path)
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", trace.unmatched_frees))
        buf = bytearray()
        for i in range(len(trace)):
            buf += _RECORD.pack(trace.ops[i], trace.ids[i], trace.sizes[i], trace.streams[i])
            if len(buf) > (1 << 20):
                f.write(buf)
                buf.clear()
        f.write(buf)
    return path


def _read_compact(f) -> Trace:
    trace = Trace(unmatched_frees=struct.unpack("<Q", f.read(8))[0])
    data = f.read()
    if len(data) % _RECORD.size:
        raise ValueError("truncated vmmalloc trace: its last record is incomplete")
    for op, ident, size, stream in _RECORD.iter_unpack(data):
        trace.append(op, ident, size, stream)
    return trace


COUNTERS = ("vmm.stitches", "vmm.stitched_bytes", "vmm.stitched_handles", "vmm.fresh_mappings", "vmm.mapping_hits",
            "vmm.misses_no_candidate", "vmm.misses_candidates_busy", "vmm.mapping_evictions",
            "vmm.cross_stream_waits", "vmm.cross_stream_fallbacks", "vmm.prefix_reuses", "vmm.repairs",
            "vmm.repaired_chunks", "vmm.repaired_handles", "num_device_alloc", "num_device_free")


GRAPH_POOL = (0, 1)  # graph_pool_handle()'s first id, a graph tree's (Note [Torch's pools map single chunks])


def replay(trace: Trace, conf: str = "", device_memory: int = 80 << 30,
           pool_streams: Collection[int] = ()) -> dict[str, Any]:
    """Runs `trace` through a fresh allocator on the host backend (`device_memory` plays the
    GPU's memory) with VMMALLOC_CONF `conf`; returns its figures and an estimate of the
    driver time its mappings cost (docs/FACTS.md's per-handle costs). Requests on
    `pool_streams` go to a graph pool (the module's docstring); the figures then include the
    pool's bytes at the end, its peak of allocated bytes and their ratio."""
    backend = _C.HostBackend(device_memory)
    allocator = _C.Allocator(backend, conf)
    live: dict[int, int] = {}
    pooled = frozenset(pool_streams)
    routed = False
    for op, ident, size, stream in zip(trace.ops, trace.ids, trace.sizes, trace.streams):
        if op == ALLOC:
            if stream in pooled and not routed:
                allocator.begin_allocate_to_pool(GRAPH_POOL, streams=sorted(pooled))
                routed = True
            live[ident] = allocator.allocate(size, stream)
        else:
            allocator.deallocate(live.pop(ident))
    stats = allocator.stats()
    out: dict[str, Any] = {key: stats.get(key, 0) for key in COUNTERS}
    peak_allocated = stats.get("allocated_bytes.all.peak", 0)
    peak_reserved = stats.get("reserved_bytes.all.peak", 0)
    stitched_chunks = out["vmm.stitched_bytes"] // CHUNK
    out.update({
        "conf": conf,
        "requests": sum(1 for op in trace.ops if op == ALLOC),
        "peak_allocated": peak_allocated,
        "peak_reserved": peak_reserved,
        "ratio": peak_reserved / peak_allocated if peak_allocated else float("nan"),
        "stitched_chunks": stitched_chunks,
        "driver_ms_estimate": (out["vmm.stitched_handles"] * STITCHED_HANDLE_US
                               + out["vmm.repaired_handles"] * REPAIRED_HANDLE_US
                               + out["num_device_alloc"] * CREATED_HANDLE_US) / 1000.0,
    })
    if routed:
        pool_bytes = stats["vmm.private_pool_bytes"]
        pool_peak = stats["vmm.private_pool_allocated_bytes.peak"]
        out.update({"pool_bytes": pool_bytes, "pool_peak_allocated": pool_peak,
                    "pool_ratio": pool_bytes / pool_peak if pool_peak else float("nan")})
        allocator.end_allocate_to_pool(GRAPH_POOL)
        allocator.release_pool(GRAPH_POOL)
    for ident in list(live):
        allocator.deallocate(live.pop(ident))
    return out
