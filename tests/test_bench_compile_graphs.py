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
