"""Reserved and allocated memory over time, from a snapshot in PyTorch's format.

The same code reads PyTorch's own snapshots (``torch.cuda.memory._snapshot()`` under the
native allocator) and vmmalloc's (vmmalloc.memory_history), so one workload under both
can be drawn on one plot.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Trace action -> (change of allocated bytes, change of reserved bytes), per byte of size.
_DELTAS = {
    "alloc": (1, 0),
    "free_completed": (-1, 0),
    "segment_alloc": (0, 1),
    "segment_map": (0, 1),
    "vmm_grow": (0, 1),
    "segment_free": (0, -1),
    "segment_unmap": (0, -1),
    "vmm_release": (0, -1),
}


@dataclass
class Timeline:
    """Bytes after each event that changed them; times in seconds from the first event."""

    seconds: list[float] = field(default_factory=list)
    allocated: list[int] = field(default_factory=list)
    reserved: list[int] = field(default_factory=list)
    stitches: list[float] = field(default_factory=list)  # times of vmm_stitch events
    ooms: list[float] = field(default_factory=list)

    @property
    def peak_allocated(self) -> int:
        return max(self.allocated, default=0)

    @property
    def peak_reserved(self) -> int:
        return max(self.reserved, default=0)


def from_snapshot(snapshot: Mapping[str, Any], device: int = 0) -> Timeline:
    """The timeline of `device` in a snapshot.

    The trace may have lost its oldest events (a bounded history): the totals before its
    first kept event are found from the snapshot's final state (its segments) less the
    changes the trace records, so the curve is exact from there on.
    """
    traces = snapshot.get("device_traces") or []
    trace = traces[device] if device < len(traces) else []
    segments = [s for s in snapshot.get("segments", []) if s.get("device", 0) == device]
    final_reserved = sum(s["total_size"] for s in segments)
    final_allocated = sum(b["size"] for s in segments for b in s["blocks"] if b["state"] != "inactive")
    changes = [(e, _DELTAS.get(e["action"])) for e in trace]
    allocated = final_allocated - sum(d[0] * e["size"] for e, d in changes if d)
    reserved = final_reserved - sum(d[1] * e["size"] for e, d in changes if d)
    timeline = Timeline()
    if not trace:
        return timeline
    start = trace[0]["time_us"]
    timeline.seconds.append(0.0)
    timeline.allocated.append(allocated)
    timeline.reserved.append(reserved)
    for event, delta in changes:
        t = (event["time_us"] - start) / 1e6
        if event["action"] == "vmm_stitch":
            timeline.stitches.append(t)
        elif event["action"] == "oom":
            timeline.ooms.append(t)
        if not delta:
            continue
        allocated += delta[0] * event["size"]
        reserved += delta[1] * event["size"]
        timeline.seconds.append(t)
        timeline.allocated.append(allocated)
        timeline.reserved.append(reserved)
    return timeline


def downsample(tl: Timeline, max_points: int = 4000) -> Timeline:
    """At most about `max_points` points, each the maximum of the events it stands for, so
    peaks survive (a plot cannot show more points than that anyway)."""
    n = len(tl.seconds)
    if n <= max_points:
        return tl
    step = -(-n // max_points)
    out = Timeline(stitches=tl.stitches[:max_points], ooms=list(tl.ooms))
    for i in range(0, n, step):
        out.seconds.append(tl.seconds[i])
        out.allocated.append(max(tl.allocated[i:i + step]))
        out.reserved.append(max(tl.reserved[i:i + step]))
    out.seconds.append(tl.seconds[-1])
    out.allocated.append(tl.allocated[-1])
    out.reserved.append(tl.reserved[-1])
    return out


def plot(timelines: Mapping[str, Timeline], path: str | Path, title: str) -> Path:
    """Draws reserved (solid) and allocated (dashed) bytes of each run on one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    GiB = float(1 << 30)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, tl), color in zip(timelines.items(), colors):
        ax.step(tl.seconds, [r / GiB for r in tl.reserved], where="post", color=color,
                label=f"{name}: reserved (peak {tl.peak_reserved / GiB:.2f} GiB)")
        ax.step(tl.seconds, [a / GiB for a in tl.allocated], where="post", color=color, linestyle="--",
                label=f"{name}: allocated (peak {tl.peak_allocated / GiB:.2f} GiB)")
        if tl.stitches:
            ax.plot(tl.stitches, [0] * len(tl.stitches), "|", color=color, markersize=10,
                    label=f"{name}: stitches ({len(tl.stitches)})")
        if tl.ooms:
            ax.plot(tl.ooms, [0] * len(tl.ooms), "x", color="red", label=f"{name}: out of memory")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
