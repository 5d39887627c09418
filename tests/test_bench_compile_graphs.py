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


def test_a_runs_log_summarizes_to_the_entry_the_run_returned(monkeypatch, capsys):
    """A run cut by a device call's limit after its last worker leaves only its log: the
    environment, args and per-round figures printed there give the same medians and ratios
    the run would have written (without the per-step times it does not print)."""
    import pytest

    import bench.compile_graphs as cg

    steps = iter([0.030, 0.031, 0.0305, 0.029, 0.032, 0.0300])

    def fake_worker(module, system, args, timeout):
        return {"step_s": next(steps), "steps_s": [1.0], "peak_reserved": 120, "peak_allocated": 100,
                "pool_bytes": 10, "reserved_over_allocated": 1.2 if system != "vmmalloc" else 1.04,
                "trajectory": [{"reserved": 1 << 30}]}

    monkeypatch.setattr(cg, "run_worker", fake_worker)
    ran = cg.run("cuda", quick=True, names=("train",), rounds=2)["workloads"]["train"]
    log = capsys.readouterr().out
    summarized = cg.from_log(log, "train")
    assert summarized["systems"] == ran["systems"] and summarized["ratios"] == ran["ratios"]
    assert summarized["environment"] == ran["environment"] and summarized["args"] == ran["args"]
    assert "cut" in summarized["note"]
    assert "steps_s" not in summarized["rounds"][0]["vmmalloc"], "the log has no per-step times"

    first_of_round_1 = log.index("[compile_graphs] train round 1")
    cut_mid_round = log[:first_of_round_1] + log[first_of_round_1:].split("\n", 1)[0] + "\n"
    with pytest.raises(SystemExit, match="every round must be whole"):
        cg.from_log(cut_mid_round, "train")
    with pytest.raises(SystemExit, match="no environment"):
        cg.from_log("[compile_graphs] train round 0 native: {}\n", "train")


def test_rounds_added_in_later_calls_count_only_at_the_same_commit_and_go_on_rotating(monkeypatch):
    """A workload measured one round a device call: the stored rounds and the new one are
    summarized together when arguments and commit match, the systems' order goes on rotating
    from the rounds already held, and rounds of another commit are not mixed in."""
    import bench.common
    import bench.compile_graphs as cg

    order = []

    def fake_worker(module, system, args, timeout):
        order.append(system)
        return {"tok_s": {"native": 100.0, "expandable_segments": 95.0, "vmmalloc": 99.0}[system],
                "peak_reserved": 10, "peak_allocated": 10, "pool_bytes": 0, "reserved_over_allocated": 1.0}

    monkeypatch.setattr(cg, "run_worker", fake_worker)
    monkeypatch.setattr(bench.common, "_commit", lambda: "abc1234")
    first = cg.merge(None, {"workloads": {"decode": cg.add_rounds(None, "decode", True, 1)}})
    assert order == list(cg.SYSTEMS)
    order.clear()
    second = cg.add_rounds(first, "decode", True, 1)
    assert order == list(cg.SYSTEMS[1:] + cg.SYSTEMS[:1]), "the second round starts where the rotation is"
    assert len(second["rounds"]) == 2 and second["ratios"]["vmmalloc_speed_vs_native_per_round"] == [0.99, 0.99]

    monkeypatch.setattr(bench.common, "_commit", lambda: "def5678")
    order.clear()
    other = cg.add_rounds(cg.merge(None, {"workloads": {"decode": second}}), "decode", True, 1)
    assert len(other["rounds"]) == 1 and order == list(cg.SYSTEMS), "another commit's rounds are not mixed in"


def test_a_workload_from_another_run_says_when_it_was_measured_in_the_summary():
    """The report dates a result's rows by its latest environment: a workload kept from an
    earlier run names its own commit and day in its rows."""
    from bench.compile_graphs import summary

    def entry(commit: str, date: str) -> dict:
        systems = {s: {"reserved_over_allocated": 1.0, "pool_bytes": 0} for s in ("native", "vmmalloc")}
        return {"systems": systems, "ratios": {"vmmalloc_speed_vs_native": 1.0},
                "environment": {"commit": commit, "date": date}}

    result = {"environment": {"commit": "new", "date": "2026-12-04 04:46 UTC"},
              "workloads": {"train": entry("new", "2026-12-04 04:46 UTC"), "decode": entry("old", "2026-12-01 23:28 UTC")}}
    measures = [m for m, _, _ in summary(result)]
    assert all("measured at" not in m for m in measures if m.startswith("train"))
    assert all("[measured at old, 2026-12-01]" in m for m in measures if m.startswith("decode"))
