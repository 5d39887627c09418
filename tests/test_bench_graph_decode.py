"""bench/graph_decode's arithmetic on made-up results: token match rates, targets, the
report's rows, and the sweep's plot with points that ran out of memory."""
from __future__ import annotations

import pytest

from bench.graph_decode import RATIO_ROWS, TARGETS, kv_page_floor, match_rate, summary
from bench.kv_cache import llama3_8b_config
from bench.report import target_met


def test_match_rate_counts_equal_tokens_position_by_position():
    assert match_rate([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 0, 6]]) == pytest.approx(4 / 6)


def test_the_page_floor_counts_each_rows_last_page_whole():
    config = llama3_8b_config(32768)  # 8 KV heads of 128 in bf16: 512 positions of K and V a 2 MiB page
    assert kv_page_floor(config, [2048, 2048]) == 1.0
    assert kv_page_floor(config, [16447]) == pytest.approx(33 * 512 / 16447)  # 63 tokens into page 33
    assert kv_page_floor(config, [16447], shared=False) == pytest.approx(17 * 1024 / 16447)
    assert kv_page_floor(config, [1, 511]) == pytest.approx(1024 / 512)


def test_targets_are_checked_as_written():
    assert target_met("0.600000", ">= 0.60") and not target_met("0.590000", ">= 0.60")
    assert target_met("1.010000", "> 1.0") and not target_met("1.000000", "> 1.0")
    assert target_met("1.050000", "<= 1.05") and target_met("no figure", "<= 1.05") is None
    assert set(TARGETS) <= {key for key, _, _ in RATIO_ROWS}, "every target has its row in the report"


def test_summary_rows_name_every_system_and_ratio():
    system = {"ok": True, "decode_tok_s": 100.0, "step_median_s": 0.01, "peak_reserved": 5e10}
    result = {"systems": {"vmm_graphs": system, "paged": system, "dynamic": {"ok": False, "error": "CUDA out of memory"}},
              "ratios": {"vmm_graphs_p99_over_median_step": 1.08, "vmm_graphs_tok_s_vs_paged": 2.0}}
    rows = summary(result)
    assert [r[0] for r in rows[:3]] == ["vmm_graphs: decode", "paged: decode", "dynamic: decode"]
    assert rows[2][1] == "CUDA out of memory", "a failure says what failed"
    assert ("in graphs: p99 decode step / median step", "1.080", "<= 1.10") in rows


def test_left_padding_keeps_each_row_s_own_prompt():
    torch = pytest.importorskip("torch")
    from bench.kv_cache import left_padded, unpadded

    ids = torch.arange(1, 13).view(2, 6)
    padded, mask = left_padded(torch, ids, [6, 3], 0)
    assert mask.tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]] and padded[1, :3].tolist() == [0, 0, 0]
    assert ids[1, 0] == 7, "the prompts themselves are not changed"
    assert unpadded(ids, [6, 3], 0) == [[1, 2, 3, 4, 5, 6], [10, 11, 12]]
    grown, _ = left_padded(torch, ids, [4, 2], 2)  # a repeat two positions longer
    assert (grown[0] != 0).sum() == 6 and (grown[1] != 0).sum() == 4


def test_sweep_plot_draws_what_ran(tmp_path):
    """The sweep's plot takes each point's speed from its median step (a point is one call, so
    its mean step carries the recording or compile); failed points are left out, the
    variable-length point is drawn apart, and KV memory is the pages mapped where measured,
    else the rows at the longest length."""
    pytest.importorskip("matplotlib")
    from bench.graph_decode import plot_sweep, steady_tok_s, sweep_series

    def point(context, ok=True, kv=None):
        return {"ok": ok, "batch": 8, "context": context, "decode_tok_s": 100.0, "step_median_s": 0.01,
                "peak_reserved": 3e10, "kv_bytes": 2e9, "kv_committed_final": kv}

    result = {"environment": {"gpu": "a GPU"},
              "systems": {"vmm_graphs": {"results": [point(2048, kv=1e9), point(8192, kv=3e9),
                                                     point(65536, ok=False),
                                                     {**point(16384, kv=5e9), "row_lengths": [2048, 16384]}]},
                          "static_compiled": {"results": [point(2048), point(16384, ok=False)]}}}
    assert steady_tok_s(point(2048)) == pytest.approx(800.0)
    series = sweep_series(result)
    assert series["vmm_graphs"]["context"] == [2048, 8192]
    assert series["vmm_graphs"]["tok_s"] == pytest.approx([800.0, 800.0])
    assert series["vmm_graphs"]["kv_gb"] == pytest.approx([1.0, 3.0])
    assert series["vmm_graphs"]["variable"] == pytest.approx([16384, 800.0, 30.0, 5.0])
    assert series["static_compiled"]["kv_gb"] == pytest.approx([2.0]) and series["static_compiled"]["variable"] == []
    plot_sweep(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def _system(step_s: float, tokens: list[list[int]]) -> dict:
    return {"ok": True, "decode_tok_s": 8 / step_s, "step_median_s": step_s, "step_p99_s": step_s * 1.05,
            "peak_reserved": 5e10, "tokens": tokens, "raw_step_times_s": [[0.2, step_s]],
            "bandwidth_bound_step_s": 0.008, "kv_committed_final": 2e10, "tokens_held": 147960}


def test_assemble_rebuilds_the_result_of_a_run_cut_short(tmp_path):
    import json

    from bench.graph_decode import RESULT_LINE, SYSTEMS, assemble

    lines = ["[graph_decode] vmm_graphs: 600.0 tok/s", "some other output"]
    for cache, step in (("vmm_graphs", 0.0133), ("vmm", 0.0375)):
        lines.append(RESULT_LINE + json.dumps({"cache": cache, "batch": 8, "context": 16384, "new": 64,
                                               "repeats": 3, "result": _system(step, [[1, 2], [3, 4]])}))
    log = tmp_path / "graph_decode.log"
    log.write_text("\n".join(lines) + "\n")
    result = assemble(log)
    assert set(result["systems"]) == {"vmm_graphs", "vmm"}
    assert result["missing_systems"] == [c for c in SYSTEMS if c not in ("vmm_graphs", "vmm")]
    assert result["ratios"]["vmm_graphs_tok_s_vs_vmm"] == pytest.approx(0.0375 / 0.0133)
    assert result["ratios"]["vmm_graphs_fraction_of_bandwidth_bound"] == pytest.approx(0.008 / 0.0133)
    assert result["met"]["vmm_graphs_tok_s_vs_static_compiled"] is None, "a peer that did not run is not measured"
    assert "static_compiled_fraction_of_bandwidth_bound" not in result["ratios"]


def test_assemble_refuses_a_log_without_results(tmp_path):
    from bench.graph_decode import assemble

    log = tmp_path / "other.log"
    log.write_text("[bench] graph_decode on cuda ...\n")
    with pytest.raises(SystemExit, match="holds no"):
        assemble(log)


def test_a_sweep_part_keeps_the_systems_it_does_not_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import json

    import bench.graph_decode as graph_decode

    def fake_worker(module, allocator, args, timeout):
        results = [{"ok": True, "batch": p[0], "context": p[1], "decode_tok_s": 10.0, "step_median_s": 0.8,
                    "peak_reserved": 1e10, "kv_bytes": 1e9} for p in args["points"]]
        return {"cache": args["cache"], "results": results}

    monkeypatch.setattr(graph_decode, "run_worker", fake_worker)
    graph_decode.sweep(tmp_path, caches=["vmm_graphs"])
    graph_decode.sweep(tmp_path, caches=["dynamic"])
    stored = json.loads((tmp_path / "graph_decode_sweep.json").read_text())
    assert set(stored["systems"]) == {"vmm_graphs", "dynamic"}
    assert "commit" in stored["systems"]["dynamic"]["environment"], "each part says what it measured"
    assert (tmp_path / "graph_decode_sweep.png").exists()
    with pytest.raises(SystemExit, match="unknown system"):
        graph_decode.sweep(tmp_path, caches=["vmm_graphs_fused"])


def test_a_sweep_part_of_some_points_replaces_only_those(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import json

    import bench.graph_decode as graph_decode

    ran = []

    def fake_worker(module, allocator, args, timeout):
        ran.append(args["points"])
        speed = 10.0 if len(ran) == 1 else 20.0
        results = [{"ok": True, "batch": p[0], "context": p[1], "decode_tok_s": speed, "step_median_s": 0.8,
                    "peak_reserved": 1e10, "kv_bytes": 1e9} for p in args["points"]]
        return {"cache": args["cache"], "results": results}

    monkeypatch.setattr(graph_decode, "run_worker", fake_worker)
    graph_decode.sweep(tmp_path, caches=["vmm_graphs"])
    graph_decode.sweep(tmp_path, caches=["vmm_graphs"], only_points=["variable", "2048"])
    points = graph_decode.sweep_points()
    assert ran[1] == [points[0], points[-1]], "only the named points run"
    stored = json.loads((tmp_path / "graph_decode_sweep.json").read_text())["systems"]["vmm_graphs"]["results"]
    assert [r["decode_tok_s"] for r in stored] == [20.0] + [10.0] * (len(points) - 2) + [20.0]
    assert "commit" in stored[-1]["environment"] and "environment" not in stored[1], \
        "a replaced point says what it measured; the others keep their system's"
    with pytest.raises(SystemExit, match="unknown point '3000'"):
        graph_decode.sweep(tmp_path, caches=["vmm_graphs"], only_points=["3000"])


def test_a_system_swept_in_parts_holds_the_points_not_run_yet_as_such(tmp_path, monkeypatch):
    """A sweep longer than one device call (the paged peer's) is measured point by point;
    until every part ran, the points not run stand as such and are not drawn."""
    pytest.importorskip("matplotlib")
    import json

    import bench.graph_decode as graph_decode

    def fake_worker(module, allocator, args, timeout):
        return {"cache": args["cache"], "results": [
            {"ok": True, "batch": p[0], "context": p[1], "decode_tok_s": 5.0, "step_median_s": 1.6,
             "peak_reserved": 1e10, "kv_bytes": 1e9} for p in args["points"]]}

    monkeypatch.setattr(graph_decode, "run_worker", fake_worker)
    graph_decode.sweep(tmp_path, caches=["paged"], only_points=["2048", "8192"])
    points = graph_decode.sweep_points()
    stored = json.loads((tmp_path / "graph_decode_sweep.json").read_text())["systems"]["paged"]["results"]
    assert [r.get("not_run", False) for r in stored] == [False, False] + [True] * (len(points) - 2)
    assert stored[-1]["row_lengths"] == points[-1][3]
    series = graph_decode.sweep_series(json.loads((tmp_path / "graph_decode_sweep.json").read_text()))
    assert series["paged"]["context"] == [2048, 8192] and series["paged"]["variable"] == []
    graph_decode.sweep(tmp_path, caches=["paged"], only_points=["16384", "variable"])
    stored = json.loads((tmp_path / "graph_decode_sweep.json").read_text())["systems"]["paged"]["results"]
    assert [r.get("not_run", False) for r in stored] == [False, False, False, True, True, False]
    assert (tmp_path / "graph_decode_sweep.png").is_file()


def test_a_sweep_with_a_worker_per_point_keeps_the_points_that_finished(tmp_path, monkeypatch):
    """--worker-per-point: a call cut short (here a worker that fails at the third point)
    leaves every point measured before it written."""
    pytest.importorskip("matplotlib")
    import json

    import bench.graph_decode as graph_decode

    calls = []

    def fake_worker(module, allocator, args, timeout):
        calls.append(args["points"])
        if len(calls) == 3:
            raise RuntimeError("the call's limit")
        return {"cache": args["cache"], "results": [
            {"ok": True, "batch": p[0], "context": p[1], "decode_tok_s": 5.0, "step_median_s": 1.6,
             "peak_reserved": 1e10, "kv_bytes": 1e9} for p in args["points"]]}

    monkeypatch.setattr(graph_decode, "run_worker", fake_worker)
    with pytest.raises(RuntimeError, match="limit"):
        graph_decode.sweep(tmp_path, caches=["paged"], per_point=True)
    assert [len(points) for points in calls] == [1, 1, 1], "one worker per point"
    stored = json.loads((tmp_path / "graph_decode_sweep.json").read_text())["systems"]["paged"]["results"]
    assert [r.get("ok") for r in stored[:3]] == [True, True, False]
    assert all(r.get("not_run") for r in stored[2:])
