"""The offload benchmark's decode ratios (Note [Overlap] in bench/offload.py) on made-up
measurements: the copy figures are means over the steps and are compared with the mean step,
the no-offload step is the median, and a point that ran out of memory gives no ratio."""
from __future__ import annotations

import pytest

from bench.offload import decode_ratios

GB = 1e9


def systems(steps: list[float], busy: float, plain_steps: list[float], peer_ok: bool = True) -> dict:
    ours = {"ok": True, "step_times_s": steps, "decode_tok_s": 4 * len(steps) / sum(steps),
            "bytes_to_device_per_step": 10 * GB, "copy_busy_per_step_s": busy,
            "peak_kv_mapped": 9 * GB, "kv_budget_bytes": 8 * GB, "layer_kv_bytes": GB // 2}
    plain = {"ok": True, "step_times_s": plain_steps, "step_median_s": sorted(plain_steps)[len(plain_steps) // 2],
             "decode_tok_s": 4 * len(plain_steps) / sum(plain_steps)}
    peer = {"ok": peer_ok, "decode_tok_s": 0.5} if peer_ok else {"ok": False}
    return {"offload": {"decode": [ours], "bandwidth": {"h2d_bytes_per_s": 50 * GB}},
            "vmm": {"decode": [plain]}, "transformers_offload": {"decode": [peer]}}


def test_copy_bound_steps_overlap_fully_and_use_the_mean_step():
    # a median of 0.2 s, a mean of 0.22 s: the copies (0.22 s a step) fill the mean step
    ratios = decode_ratios(systems([0.2, 0.2, 0.2, 0.28], busy=0.22, plain_steps=[0.03, 0.03, 1.5]), [32768])
    assert ratios["32k_copy_busy_fraction_of_step"] == pytest.approx(1.0)
    assert ratios["32k_overlap"] == pytest.approx(1.0)
    assert ratios["32k_fraction_of_pcie_limit"] == pytest.approx(0.2 / 0.22)  # 10 GB at 50 GB/s
    assert ratios["32k_peak_kv_over_budget_plus_two_layers"] == pytest.approx(9 / 9)
    assert ratios["32k_tok_s_vs_transformers_offload"] == pytest.approx((16 / 0.88) / 0.5)


def test_exposed_time_is_charged_against_the_median_no_offload_step():
    # 10 ms of each 0.21 s step is not under a copy; the no-offload step is 40 ms (its 1.5 s
    # first step, memory released under pressure, is not compute)
    ratios = decode_ratios(systems([0.21] * 5, busy=0.2, plain_steps=[1.5, 0.04, 0.04, 0.04]), [65536])
    assert ratios["64k_overlap"] == pytest.approx(1 - 0.01 / 0.04)
    none = decode_ratios(systems([0.3] * 5, busy=0.2, plain_steps=[0.04] * 3), [65536])
    assert none["64k_overlap"] == 0.0


def test_points_that_did_not_run_give_no_ratios():
    measured = systems([0.2] * 3, busy=0.2, plain_steps=[0.03] * 3, peer_ok=False)
    measured["vmm"]["decode"][0] = {"ok": False}
    ratios = decode_ratios(measured, [32768])
    assert "32k_overlap" not in ratios and "32k_tok_s_vs_transformers_offload" not in ratios
    assert "32k_fraction_of_pcie_limit" in ratios
    measured["offload"]["decode"][0] = {"ok": False}
    assert decode_ratios(measured, [32768]) == {}
