"""The allocator's event log, its regions, the export in PyTorch's snapshot format and the
timeline drawn from it: on each backend (host in CI, cuda on a GPU)."""
from __future__ import annotations

import pickle

import pytest

import vmmalloc
from vmmalloc import memory_history, timeline

MiB = 1 << 20


def kinds_of(events):
    return [e[0] for e in events]


def test_recording_is_off_until_asked(kind):
    alloc = kind.allocator(64 * MiB)
    alloc.deallocate(alloc.allocate(4 * MiB))
    assert alloc.event_capacity == 0 and alloc.events() == []


def test_every_kind_of_event_is_recorded_with_the_totals_after_it(kind):
    alloc = kind.allocator(40 * MiB)
    alloc.record_events(1000)
    held = [alloc.allocate(8 * MiB) for _ in range(4)]
    small = alloc.allocate(1000)
    for ptr in held[::2]:
        alloc.deallocate(ptr)
    big = alloc.allocate(16 * MiB)  # from the two 8 MiB holes: a stitch, no growth
    with pytest.raises(vmmalloc.OutOfMemoryError):
        alloc.allocate(64 * MiB)
    vt = vmmalloc._C.VirtualRange(alloc, 8 * MiB)
    vt.commit(1, 0, 0, 3 * MiB)  # two pages
    vt.commit(1, 0, 0, 1 * MiB)  # one given up
    events = alloc.events()
    names = kinds_of(events)
    for expected in ("alloc", "free_requested", "free_completed", "grow", "stitch", "oom", "map", "unmap"):
        assert expected in names, (expected, names)
    stitch = events[names.index("stitch")]
    assert stitch[2] == big and stitch[3] == 16 * MiB and stitch[4] == 0  # no chunk created for it
    oom = events[names.index("oom")]
    assert oom[3] == 64 * MiB
    assert names.count("map") == 2 and names.count("unmap") == 1
    stats = alloc.stats()
    last = events[-1]
    assert last[5] == stats["allocated_bytes.all.current"]
    assert last[6] == stats["reserved_bytes.all.current"]
    times = [e[1] for e in events]
    assert times == sorted(times)
    vt.free()
    for ptr in [small, big, *held[1::2]]:
        alloc.deallocate(ptr)
    alloc.empty_cache()
    assert alloc.events()[-1][0] == "release" and alloc.events()[-1][6] == 0


def test_a_full_log_keeps_the_newest_events_and_counts_the_rest(kind):
    alloc = kind.allocator(64 * MiB)
    alloc.record_events(5)
    ptrs = [alloc.allocate(2 * MiB) for _ in range(4)]  # 4 x (grow, alloc)
    events = alloc.events()
    assert len(events) == 5 and alloc.events_dropped == 3
    assert events[-1][0] == "alloc" and events[-1][2] == ptrs[-1]
    alloc.record_events(0)
    assert alloc.events() == [] and alloc.event_capacity == 0


def test_history_option_records_from_creation(kind):
    alloc = kind.allocator(64 * MiB, conf="history:100")
    alloc.deallocate(alloc.allocate(4 * MiB))
    assert alloc.event_capacity == 100
    assert kinds_of(alloc.events()) == ["grow", "alloc", "free_requested", "free_completed"]


def test_bad_history_option_is_named():
    with pytest.raises(ValueError, match="history"):
        vmmalloc.parse_config("history:-3")


def test_regions_add_up_to_reserved_and_their_active_blocks_to_allocated(kind):
    alloc = kind.allocator(64 * MiB)
    large = [alloc.allocate(6 * MiB) for _ in range(3)]
    small = [alloc.allocate(4096) for _ in range(5)]
    alloc.deallocate(large[1])
    alloc.deallocate(small[2])
    vt = vmmalloc._C.VirtualRange(alloc, 16 * MiB)
    vt.commit(1, 0, 0, 1 * MiB)  # one page: two of large[1]'s chunks stay free
    regions = alloc.segments()
    stats = alloc.stats()
    assert sum(r["total_size"] for r in regions) == stats["reserved_bytes.all.current"]
    active = sum(b["size"] for r in regions for b in r["blocks"] if b["state"] == "active_allocated")
    assert active == stats["allocated_bytes.all.current"]
    for r in regions:  # blocks tile their region
        assert sum(b["size"] for b in r["blocks"]) == r["total_size"]
    by_kind = {r["kind"] for r in regions}
    assert {"large", "small", "pages", "free"} <= by_kind
    vt.free()


def test_the_snapshot_opens_with_pytorchs_tooling(kind, tmp_path):
    from torch.cuda import _memory_viz as memory_viz
    alloc = kind.allocator(64 * MiB)
    memory_history.record_allocator_history(alloc, max_entries=10_000)
    ptrs = [alloc.allocate(size) for size in (3 * MiB, 512, 7 * MiB, 100_000)]
    alloc.deallocate(ptrs[0])
    vt = vmmalloc._C.VirtualRange(alloc, 8 * MiB)
    vt.commit(1, 0, 0, 2 * MiB)
    snapshot = memory_history.snapshot_of({0: alloc})
    path = memory_history.dump(snapshot, tmp_path / "snap.pickle")
    with open(path, "rb") as f:
        loaded = pickle.load(f)
    # segsum checks that blocks account for every reserved byte; trace walks every entry.
    summary = memory_viz.segsum(loaded)
    assert "total_reserved" in summary
    text = memory_viz.trace(loaded)
    assert f"{len(loaded['device_traces'][0])} entries" in text
    assert "<html>" in memory_viz.trace_plot(loaded).lower()
    assert "<html>" in memory_viz.segment_plot(loaded).lower()
    actions = {e["action"] for e in loaded["device_traces"][0]}
    assert {"alloc", "free_requested", "free_completed", "vmm_grow"} <= actions
    assert all(e["frames"] == [] for e in loaded["device_traces"][0])
    vt.free()


def test_timeline_follows_the_allocator_even_after_the_log_wrapped(kind):
    alloc = kind.allocator(128 * MiB)
    alloc.record_events(7)  # far fewer than the events below
    ptrs = [alloc.allocate(4 * MiB) for _ in range(10)]
    for ptr in ptrs[:6]:
        alloc.deallocate(ptr)
    stats = alloc.stats()
    tl = timeline.from_snapshot(memory_history.snapshot_of({0: alloc}))
    assert tl.allocated[-1] == stats["allocated_bytes.all.current"]
    assert tl.reserved[-1] == stats["reserved_bytes.all.current"]
    # The 7 kept events are the last of the 12 free events: 4 frees completed among them,
    # so 4 left + 4 freed = 8 blocks were live before the first kept event.
    assert tl.allocated[0] == 8 * 4 * MiB


def test_timeline_reads_pytorchs_own_snapshot_format():
    # The shape torch.cuda.memory._snapshot() has under the native allocator.
    snapshot = {
        "segments": [{"device": 0, "address": 1 << 30, "total_size": 20 * MiB, "stream": 0,
                      "blocks": [{"address": 1 << 30, "size": 4 * MiB, "state": "active_allocated"},
                                 {"address": (1 << 30) + 4 * MiB, "size": 16 * MiB, "state": "inactive"}]}],
        "device_traces": [[
            {"action": "segment_alloc", "addr": 1 << 30, "size": 20 * MiB, "time_us": 1_000_000},
            {"action": "alloc", "addr": 1 << 30, "size": 4 * MiB, "time_us": 1_000_100},
            {"action": "alloc", "addr": (1 << 30) + 4 * MiB, "size": 8 * MiB, "time_us": 1_500_000},
            {"action": "free_requested", "addr": (1 << 30) + 4 * MiB, "size": 8 * MiB, "time_us": 2_000_000},
            {"action": "free_completed", "addr": (1 << 30) + 4 * MiB, "size": 8 * MiB, "time_us": 2_000_000},
        ]],
    }
    tl = timeline.from_snapshot(snapshot)
    assert tl.reserved == [0, 20 * MiB, 20 * MiB, 20 * MiB, 20 * MiB]
    assert tl.allocated == [0, 0, 4 * MiB, 12 * MiB, 4 * MiB]
    assert tl.seconds[-1] == pytest.approx(1.0)
    assert tl.peak_allocated == 12 * MiB


def test_plot_writes_a_png(tmp_path):
    tl = timeline.Timeline([0.0, 1.0], [0, MiB], [2 * MiB, 2 * MiB], stitches=[0.5])
    path = timeline.plot({"vmmalloc": tl, "native": tl}, tmp_path / "t.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_arguments_are_checked():
    with pytest.raises(ValueError, match="enabled"):
        memory_history._capacity("sometimes", 10)
    with pytest.raises(ValueError, match="max_entries"):
        memory_history._capacity("all", 0)
    assert memory_history._capacity(None, 10) == 0


def test_downsampling_keeps_the_peaks():
    n = 10_000
    tl = timeline.Timeline([i / n for i in range(n)], [i % 97 for i in range(n)], [1000 + (i == 4321) for i in range(n)])
    small = timeline.downsample(tl, 100)
    assert len(small.seconds) <= 102
    assert small.peak_allocated == tl.peak_allocated and small.peak_reserved == 1001
    assert small.allocated[-1] == tl.allocated[-1] and small.seconds[-1] == tl.seconds[-1]
