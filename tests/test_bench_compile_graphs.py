"""bench/compile_graphs.py's merge of one workload's run into the stored result (the whole
benchmark outlasts one device call): the other workload and its environment are kept, the
targets are checked again for every workload held."""
from __future__ import annotations

from bench.compile_graphs import merge


def workload(speed: float, reserved_over_allocated: float, commit: str | None = None) -> dict:
    w = {"ratios": {"vmmalloc_speed_vs_native": speed},
         "systems": {"vmmalloc": {"reserved_over_allocated": reserved_over_allocated}}}
    if commit:
        w["environment"] = {"commit": commit}
    return w


def test_one_workload_replaces_its_entry_and_the_other_keeps_its_environment():
    previous = {"benchmark": "compile_graphs", "environment": {"commit": "old"}, "note": "one round",
                "workloads": {"train": workload(0.99, 1.17), "decode": workload(0.96, 1.02)},
                "met": {"train_speed": True}}
    merged = merge(previous, {"workloads": {"decode": workload(0.99, 1.01, commit="new")}})
    assert merged["workloads"]["train"]["environment"] == {"commit": "old"}
    assert merged["workloads"]["train"]["note"] == "one round"
    assert merged["workloads"]["decode"]["environment"] == {"commit": "new"}
    assert "note" not in merged["workloads"]["decode"], "the old run's note does not describe the new one"
    assert merged["met"] == {"train_speed": True, "train_reserved_over_allocated": False,
                             "decode_speed": True, "decode_reserved_over_allocated": True}


def test_a_first_run_of_one_workload_stands_alone():
    merged = merge(None, {"workloads": {"train": workload(0.97, 1.0, commit="c")}})
    assert list(merged["workloads"]) == ["train"]
    assert merged["met"] == {"train_speed": False, "train_reserved_over_allocated": True}


def test_the_pool_semantics_floor_adds_the_two_peaks_from_the_cores_stats():
    """A pool that peaks while eager memory is low and an eager peak while the pool is
    small: reserved can never be less than the two peaks together, so the floor exceeds 1."""
    import vmmalloc
    from bench.compile_graphs import pool_semantics_floor

    MiB = 1 << 20
    alloc = vmmalloc.Allocator(vmmalloc.HostBackend(256 * MiB), "")
    alloc.begin_allocate_to_pool((1, 7), streams=[5])
    graph = alloc.allocate(40 * MiB, stream=5)
    alloc.end_allocate_to_pool((1, 7))
    alloc.deallocate(graph)  # freed inside the pool: only the pool may reuse it
    eager = alloc.allocate(60 * MiB, stream=0)
    stats = alloc.stats()
    floor = pool_semantics_floor(stats, stats["allocated_bytes.all.peak"])
    assert floor["main_allocated_peak"] == 60 * MiB and floor["pools_allocated_peak"] == 40 * MiB
    assert floor["pool_semantics_floor"] == 100 / 60
    alloc.deallocate(eager)
    alloc.release_pool((1, 7))


def test_rounds_are_summarised_per_system_with_the_floor_where_it_was_measured(monkeypatch):
    """run()'s medians over rounds, from made-up worker results (the GPU is not needed for the
    arithmetic): the floor only vmmalloc can report is kept for vmmalloc alone."""
    import bench.compile_graphs as cg

    def fake_worker(module, system, args, timeout):
        step = {"native": 0.030, "expandable_segments": 0.031, "vmmalloc": 0.0305}[system]
        out = {"step_s": step, "peak_reserved": 120, "peak_allocated": 100, "pool_bytes": 10,
               "reserved_over_allocated": 1.2}
        if system == "vmmalloc":
            out["pool_semantics_floor"] = 1.1
        return out

    monkeypatch.setattr(cg, "run_worker", fake_worker)
    result = cg.run("cuda", quick=True, names=("train",), rounds=2)
    systems = result["workloads"]["train"]["systems"]
    assert systems["vmmalloc"]["pool_semantics_floor"] == 1.1
    assert "pool_semantics_floor" not in systems["native"]
    assert result["workloads"]["train"]["ratios"]["vmmalloc_speed_vs_native"] == 0.030 / 0.0305


def test_the_reserved_breakdown_splits_pools_by_stream_and_kind():
    from types import SimpleNamespace

    from bench.compile_graphs import reserved_breakdown

    segments = [
        {"segment_pool_id": (0, 0), "total_size": 8, "allocated_size": 6, "stream": 0, "vmm_kind": "large"},
        {"segment_pool_id": (1, 2), "total_size": 4, "allocated_size": 4, "stream": 7, "vmm_kind": "large"},
        {"segment_pool_id": (1, 2), "total_size": 2, "allocated_size": 0, "stream": 9, "segment_type": "small"},
    ]
    fake_torch = SimpleNamespace(cuda=SimpleNamespace(memory_snapshot=lambda: segments))
    out = reserved_breakdown(fake_torch)
    assert (out["default_allocated"], out["default_free"], out["pools_allocated"], out["pools_free"]) == (6, 2, 4, 2)
    assert out["pools_by_stream"] == {"7": 4, "9": 2} and out["pools_by_kind"] == {"large": 4, "small": 2}


def test_the_history_run_traces_the_warm_up_and_recording_of_both_allocators(tmp_path, monkeypatch):
    import bench.compile_graphs as compile_graphs

    calls = []

    def fake_worker(module, system, args, timeout):
        calls.append((system, args))
        return {"pool_history": {"pools": {}}, "trajectory": [], "peak_reserved": 2, "peak_allocated": 1,
                "step_s": 0.1}

    monkeypatch.setattr(compile_graphs, "run_worker", fake_worker)
    out = compile_graphs.trace_pools(quick=True, steps=2, out_dir=tmp_path)
    assert [system for system, _ in calls] == ["native", "vmmalloc"]
    for system, args in calls:
        assert args["history_steps"] == 2 and args["warmup"] == 2 and args["steps"] == 1
        assert args["history_out"] == str(tmp_path / f"compile_train_{system}.pickle")
    assert set(out["systems"]["vmmalloc"]) == {"pool_history", "trajectory", "peak_reserved", "peak_allocated"}
    assert "commit" in out["environment"]
