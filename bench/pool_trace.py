"""The graph pools' live bytes over time, from a memory snapshot in PyTorch's format
(`torch.cuda.memory._snapshot()` with history recorded; both native and vmmalloc's adapter
write it): where a pool's reserved bytes stand against what it ever held at once.

compile_graphs' train workload reserves more in its graphs' pool than the pool's peak of
allocated bytes (bench/NOTES.md, "compile_graphs"); the pool's own counters give the two
peaks but not when, nor what was live then. This reads the trace instead. An address is in
a pool when it falls in one of the snapshot's segments of that pool (segments outlive the
blocks in them: a caching allocator keeps them, and a pool never gives memory back before
it is released), so the trace's alloc and free_requested entries give each pool's live
bytes at every moment: the peak, when it happened (the trace's index and time), the
largest blocks live then with their innermost Python frame, and the reserved bytes of the
pool's segments at the end. Allocations made before the history started have no alloc
entry and are not counted; their frees are ignored.

vmmalloc's snapshot shows a pool's free chunks as one region at address 0 (Note [Snapshot
segments]), so the addresses of the blocks freed in a pool lie in no segment at the end.
A block whose address is in none is given the pool of its stream: the pool most of the
stream's other blocks lie in (a graph tree allocates into its pool on a stream of its own;
under PyTorch's allocator the stream named the pool of 2775 of 2777 requests of a compiled
training step). Without such a stream it counts to the default pool.

    python -m bench.pool_trace SNAPSHOT.pickle     # a summary per pool, as JSON
"""
from __future__ import annotations

import bisect
import json
import pickle
import sys
from pathlib import Path
from typing import Any

MAIN = (0, 0)


def _where(frames: list[dict[str, Any]]) -> str:
    """The innermost frame outside torch's own files, else the innermost: file:line function."""
    for frame in frames:
        name = str(frame.get("filename", ""))
        if "/torch/" not in name and name:
            return f"{name}:{frame.get('line')} {frame.get('name')}"
    if frames:
        f = frames[0]
        return f"{f.get('filename')}:{f.get('line')} {f.get('name')}"
    return "?"


class _PoolOf:
    """Maps an address to the pool of the segment holding it (None when none does)."""

    def __init__(self, segments: list[dict[str, Any]], device: int):
        spans = sorted((s["address"], s["address"] + s["total_size"], tuple(s["segment_pool_id"]))
                       for s in segments if s.get("device", device) == device and s["total_size"] > 0
                       and s["address"] != 0)  # vmmalloc's free chunks sit at address 0
        self.starts = [a for a, _, _ in spans]
        self.spans = spans

    def __call__(self, addr: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.spans[i][1]:
            return self.spans[i][2]
        return None


def _stream_pools(trace: list[dict[str, Any]], pool_of: _PoolOf) -> dict[int, tuple[int, int]]:
    """Each stream whose blocks that lie in a segment lie mostly in one private pool, and that pool."""
    counts: dict[int, dict[tuple[int, int], int]] = {}
    for entry in trace:
        if entry.get("action") == "alloc" and entry.get("vmm_action") != "map":
            pool = pool_of(entry["addr"])
            if pool is not None:
                per_pool = counts.setdefault(entry.get("stream", 0), {})
                per_pool[pool] = per_pool.get(pool, 0) + 1
    out: dict[int, tuple[int, int]] = {}
    for stream, per_pool in counts.items():
        pool, n = max(per_pool.items(), key=lambda item: item[1])
        if pool != MAIN:
            out[stream] = pool
    return out


def pool_timeline(snapshot: dict[str, Any], device: int = 0, top: int = 8) -> dict[str, Any]:
    """Per pool ("first,second"; "0,0" is the default pool): peak live bytes, the trace index
    and time of the peak, reserved bytes of its segments at the end, and the `top` largest
    blocks live at the peak (size, where allocated); the combined peak of all pools too."""
    segments = snapshot.get("segments", [])
    trace = snapshot["device_traces"][device] if snapshot.get("device_traces") else []
    pool_of = _PoolOf(segments, device)
    by_stream = _stream_pools(trace, pool_of)
    live: dict[int, tuple[int, tuple[int, int], int]] = {}  # addr -> (size, pool, trace index)
    now: dict[tuple[int, int], int] = {}
    peak: dict[tuple[int, int], tuple[int, int]] = {}  # pool -> (bytes, trace index)
    pools_now = pools_peak = pools_peak_at = 0
    peak_blocks: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, entry in enumerate(trace):
        action = entry.get("action")
        if action == "alloc" and entry.get("vmm_action") != "map":
            located = pool_of(entry["addr"])
            pool = located if located is not None else by_stream.get(entry.get("stream", 0), MAIN)
            live[entry["addr"]] = (entry["size"], pool, i)
            now[pool] = now.get(pool, 0) + entry["size"]
            if pool != MAIN:
                pools_now += entry["size"]
                if pools_now > pools_peak:
                    pools_peak, pools_peak_at = pools_now, i
            if now[pool] > peak.get(pool, (0, -1))[0]:
                peak[pool] = (now[pool], i)
                peak_blocks[pool] = [(size, at) for size, p, at in live.values() if p == pool]
        elif action == "free_requested" and entry["addr"] in live and entry.get("vmm_action") != "unmap":
            size, pool, _ = live.pop(entry["addr"])
            now[pool] -= size
            if pool != MAIN:
                pools_now -= size
    reserved: dict[tuple[int, int], int] = {}
    for s in segments:
        if s.get("device", device) == device:
            key = tuple(s["segment_pool_id"])
            reserved[key] = reserved.get(key, 0) + s["total_size"]
    out: dict[str, Any] = {"pools": {}, "entries": len(trace), "pools_peak_live_bytes": pools_peak,
                           "pools_peak_at": pools_peak_at}
    for pool in sorted(set(peak) | set(reserved)):
        bytes_at_peak, at = peak.get(pool, (0, -1))
        blocks = sorted(peak_blocks.get(pool, []), reverse=True)[:top]
        out["pools"][f"{pool[0]},{pool[1]}"] = {
            "peak_live_bytes": bytes_at_peak, "peak_at": at,
            "peak_time_us": trace[at].get("time_us") if at >= 0 else None,
            "reserved_bytes_at_end": reserved.get(pool, 0),
            "largest_live_at_peak": [{"size": size, "where": _where(trace[a].get("frames", []))}
                                     for size, a in blocks],
        }
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m bench.pool_trace SNAPSHOT.pickle")
    path = Path(argv[0])
    if not path.is_file():
        raise SystemExit(f"bench.pool_trace: no file {path}")
    with path.open("rb") as f:
        snapshot = pickle.load(f)
    print(json.dumps(pool_timeline(snapshot), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
