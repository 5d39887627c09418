"""bench/pool_trace.py: a pool's live bytes over a trace, told apart from the default pool's
by the segments the addresses fall in (a synthetic snapshot in PyTorch's format)."""
import pickle

import pytest

from bench.pool_trace import main, pool_timeline

MiB = 1 << 20


def entry(action, addr, size, filename="model.py", line=1, stream=0):
    return {"action": action, "addr": addr, "size": size, "stream": stream, "time_us": addr + size,
            "frames": [{"filename": "/site-packages/torch/nn/modules/module.py", "line": 9, "name": "_call_impl"},
                       {"filename": filename, "line": line, "name": "forward"}]}  # innermost first


def snapshot():
    segments = [
        {"device": 0, "address": 0x1000_0000, "total_size": 64 * MiB, "segment_pool_id": (0, 0)},
        {"device": 0, "address": 0x4000_0000, "total_size": 40 * MiB, "segment_pool_id": (1, 7)},
        {"device": 0, "address": 0, "total_size": 4 * MiB, "segment_pool_id": (0, 0)},  # vmmalloc's free chunks
    ]
    pool, main_arena = 0x4000_0000, 0x1000_0000
    trace = [
        entry("free_requested", 0x9999_0000, 2 * MiB),  # allocated before the history: ignored
        entry("alloc", main_arena, 8 * MiB),
        entry("alloc", pool, 10 * MiB, "attn.py", 3),
        entry("alloc", pool + 10 * MiB, 12 * MiB, "mlp.py", 5),   # the pool's peak: 22 MiB
        entry("free_requested", pool, 10 * MiB),
        entry("free_completed", pool, 10 * MiB),
        entry("alloc", pool + 22 * MiB, 4 * MiB),
        entry("alloc", main_arena + 8 * MiB, 30 * MiB),          # the main arena's peak: 38 MiB
        entry("free_requested", main_arena + 8 * MiB, 30 * MiB),
    ]
    return {"segments": segments, "device_traces": [trace]}


def test_pool_peak_and_what_was_live_then():
    out = pool_timeline(snapshot())
    pool = out["pools"]["1,7"]
    assert pool["peak_live_bytes"] == 22 * MiB and pool["peak_at"] == 3
    assert pool["reserved_bytes_at_end"] == 40 * MiB
    assert [b["size"] for b in pool["largest_live_at_peak"]] == [12 * MiB, 10 * MiB]
    assert pool["largest_live_at_peak"][0]["where"].startswith("mlp.py:5"), "the frame outside torch"
    main_arena = out["pools"]["0,0"]
    assert main_arena["peak_live_bytes"] == 38 * MiB and main_arena["reserved_bytes_at_end"] == 68 * MiB
    assert out["pools_peak_live_bytes"] == 22 * MiB


def test_the_command_reads_a_pickle_and_says_what_is_missing(tmp_path, capsys):
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(snapshot()))
    main([str(path)])
    assert '"1,7"' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no file"):
        main([str(tmp_path / "missing.pickle")])


def test_a_block_in_no_segment_counts_to_the_pool_of_its_stream():
    """vmmalloc's snapshot shows a pool's free chunks at address 0, so a block freed in the
    pool lies in no segment at the end: its stream (5, the graph tree's) names the pool."""
    segments = [
        {"device": 0, "address": 0x1000_0000, "total_size": 64 * MiB, "segment_pool_id": (0, 0)},
        {"device": 0, "address": 0x4000_0000, "total_size": 2 * MiB, "segment_pool_id": (0, 1)},
        {"device": 0, "address": 0, "total_size": 30 * MiB, "segment_pool_id": (0, 1)},
    ]
    trace = [
        entry("alloc", 0x4000_0000, 4096, stream=5),               # in the pool's segment
        entry("alloc", 0x7000_0000, 20 * MiB, stream=5),           # freed in the pool: no segment
        entry("alloc", 0x1000_0000, 8 * MiB),                      # the main arena's
        entry("alloc", 0x7800_0000, 6 * MiB),                      # stream 0's: the main arena's
        entry("free_requested", 0x7000_0000, 20 * MiB, stream=5),
    ]
    out = pool_timeline({"segments": segments, "device_traces": [trace]})
    assert out["pools"]["0,1"]["peak_live_bytes"] == 20 * MiB + 4096
    assert out["pools"]["0,0"]["peak_live_bytes"] == 14 * MiB
