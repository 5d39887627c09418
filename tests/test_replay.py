"""vmmalloc replay: a workload's allocations, recorded on any backend, replayed through a
fresh allocator on the host backend make the same choices (stitches, chunks created,
cross-stream waits, peaks) as the recorded run."""
from __future__ import annotations

import gzip
import pickle
import random
from pathlib import Path

import pytest
from conftest import MiB

import vmmalloc
from vmmalloc import memory_history, replay

SIZES = [512, 4096, 700_000, 3 * MiB, 9 * MiB, 17 * MiB, 40 * MiB]


def drive(alloc, seed: int, ops: int = 1500) -> None:
    """Random allocations and frees on three streams; everything freed at the end."""
    rng = random.Random(seed)
    live = []
    for _ in range(ops):
        if live and rng.random() < 0.5:
            alloc.deallocate(live.pop(rng.randrange(len(live))))
        else:
            live.append(alloc.allocate(rng.choice(SIZES), stream=rng.choice([0, 1, 2])))
    for ptr in live:
        alloc.deallocate(ptr)


@pytest.mark.parametrize("policy", ["", "cross_stream_reuse:always,growth_slack:0.2,"])
def test_a_replay_makes_the_recorded_runs_choices(kind, policy):
    # The bound on cached mappings' virtual bytes defaults to 4x the device's memory, which
    # differs between a GPU and the replay's host backend: fixed here.
    conf = policy + "max_mapped_bytes:64GiB"
    alloc = kind.allocator(512 * MiB, conf=conf + ",history:100000")
    drive(alloc, seed=3)
    recorded = alloc.stats()
    trace = replay.trace_from_entries(memory_history.snapshot_of({0: alloc})["device_traces"][0])
    assert trace.unmatched_frees == 0

    replayed = replay.replay(trace, conf=conf, device_memory=512 * MiB)

    assert recorded["vmm.stitches"] > 0, "the workload should make the allocator stitch"
    for key in ("vmm.stitches", "vmm.stitched_bytes", "vmm.cross_stream_waits", "num_device_alloc",
                "vmm.mapping_hits"):
        assert replayed[key] == recorded[key], key
    assert replayed["peak_reserved"] == recorded["reserved_bytes.all.peak"]
    assert replayed["peak_allocated"] == recorded["allocated_bytes.all.peak"]


def test_a_saved_trace_loads_back_the_same(tmp_path):
    alloc = vmmalloc.Allocator(vmmalloc.HostBackend(512 * MiB), "history:100000")
    drive(alloc, seed=5, ops=400)
    snapshot = memory_history.snapshot_of({0: alloc})
    trace = replay.trace_from_entries(snapshot["device_traces"][0])
    path = replay.save_trace(trace, tmp_path / "t.trace.gz")
    loaded = replay.load_trace(path)
    assert (loaded.ops, loaded.ids, loaded.sizes, loaded.streams) == (trace.ops, trace.ids, trace.sizes, trace.streams)
    # a snapshot pickle, plain or gzipped, loads to the same requests
    (tmp_path / "s.pickle").write_bytes(pickle.dumps(snapshot))
    with gzip.open(tmp_path / "s.pickle.gz", "wb") as f:
        f.write(pickle.dumps(snapshot))
    for name in ("s.pickle", "s.pickle.gz"):
        assert replay.load_trace(tmp_path / name).sizes == trace.sizes


def test_pytorch_style_entries_are_read_and_pages_and_segments_left_out():
    entries = [
        {"action": "segment_alloc", "addr": 0x1000, "size": 20 * MiB, "stream": 0},
        {"action": "alloc", "addr": 0x1000, "size": 3 * MiB, "stream": 7},
        {"action": "alloc", "addr": 0x9000, "size": 2 * MiB, "stream": 0, "vmm_action": "map"},
        {"action": "free_requested", "addr": 0x1000, "size": 3 * MiB, "stream": 7},
        {"action": "free_completed", "addr": 0x1000, "size": 3 * MiB, "stream": 7},
        {"action": "free_completed", "addr": 0x5000, "size": 512, "stream": 0},  # before the trace
    ]
    trace = replay.trace_from_entries(entries)
    assert list(trace.ops) == [replay.ALLOC, replay.FREE]
    assert list(trace.streams) == [7, 7]
    assert trace.unmatched_frees == 1
    assert replay.replay(trace)["peak_allocated"] == 4 * MiB  # 3 MiB in 2 MiB chunks


def test_files_that_are_not_traces_are_refused_with_what_to_do(tmp_path):
    bad = tmp_path / "x.pickle"
    bad.write_bytes(pickle.dumps({"segments": []}))
    with pytest.raises(ValueError, match="_dump_snapshot"):
        replay.load_trace(bad)
    two = tmp_path / "two.pickle"
    entry = {"action": "alloc", "addr": 1, "size": 512, "stream": 0}
    two.write_bytes(pickle.dumps({"device_traces": [[entry], [entry]]}))
    with pytest.raises(ValueError, match="device="):
        replay.load_trace(two)
    assert len(replay.load_trace(two, device=1)) == 1


def test_the_cli_replays_under_each_conf(tmp_path, capsys):
    from vmmalloc import cli

    alloc = vmmalloc.Allocator(vmmalloc.HostBackend(512 * MiB), "history:100000")
    drive(alloc, seed=9, ops=300)
    path = memory_history.dump(memory_history.snapshot_of({0: alloc}), tmp_path / "snap.pickle")
    assert cli.main(["replay", str(path), "--conf", "", "--conf", "growth_slack:0.5",
                     "--save", str(tmp_path / "t.trace.gz"), "--device-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "(defaults)" in out and "growth_slack:0.5" in out
    assert (tmp_path / "t.trace.gz").is_file()


GRAPH_TREE_TRACE = Path(__file__).resolve().parent.parent / "bench" / "traces" / "compile_train_graph_tree.trace.gz"


def test_a_graph_trees_pool_holds_little_more_than_its_peak_on_the_recorded_training_step():
    """The trace of torch.compile(mode="reduce-overhead")'s training step (bench/NOTES.md,
    "compile_graphs: the pool's live bytes"): stream 1 is the graph tree's, whose requests
    go to its pool. Note [Torch's pools map single chunks]: the pool held 1.47x its peak of
    allocated bytes with large handles; what PyTorch's allocator held for it on the GPU was
    1.53x."""
    trace = replay.load_trace(GRAPH_TREE_TRACE)
    assert set(trace.streams) == {0, 1}
    pooled = replay.replay(trace, pool_streams=[1])
    assert pooled["pool_peak_allocated"] > 1 << 30
    assert pooled["pool_ratio"] <= 1.02
    alone = replay.replay(trace)  # the same requests, all in the main arena
    assert alone["peak_allocated"] == pooled["peak_allocated"]


def test_the_cli_names_a_pool_stream_the_trace_does_not_have(capsys):
    from vmmalloc import cli

    with pytest.raises(SystemExit, match="--pool-stream 7 is not a stream of .*its streams: 0, 1"):
        cli.main(["replay", str(GRAPH_TREE_TRACE), "--pool-stream", "7"])
    assert cli.main(["replay", str(GRAPH_TREE_TRACE), "--pool-stream", "1"]) == 0
    assert "graph pool:" in capsys.readouterr().out
