"""bench/offload_timeline.py's trace reading, on a scripted Chrome trace: the idle gaps of
the layer fetches between step marks, each told apart as queued late by the CPU or waiting
on an event, with the blocking calls and kernels inside it."""
from __future__ import annotations

import pytest

from bench.offload_timeline import STEP_MARK, copy_gaps


def x(name, cat, ts, dur, **args):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args}


def scripted_trace():
    mb = 512 << 20
    return {"traceEvents": [
        x(STEP_MARK, "user_annotation", 0, 1),
        # fetch 1: launched at 50, runs 100-1100
        x("cudaMemcpyAsync", "cuda_runtime", 50, 5, correlation=1),
        x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 100, 1000, correlation=1, bytes=mb, stream=7),
        # fetch 2: launched at 500 (in time), starts at 1600: waited on an event for 500 us
        x("cudaMemcpyAsync", "cuda_runtime", 500, 5, correlation=2),
        x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 1600, 1000, correlation=2, bytes=mb, stream=7),
        x("flash_attn_kernel", "kernel", 1000, 900, stream=3),
        # fetch 3: the CPU was blocked until 3400, launched then: queued late by 800 us
        x("cudaStreamSynchronize", "cuda_runtime", 2500, 900),
        x("cudaMemcpyAsync", "cuda_runtime", 3400, 5, correlation=3),
        x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 3420, 1000, correlation=3, bytes=mb, stream=7),
        # a token's copy to the device: too small to be a fetch, ignored
        x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 4430, 2, correlation=4, bytes=16384, stream=7),
        # fetch 4 follows at once: no gap
        x("cudaMemcpyAsync", "cuda_runtime", 3500, 5, correlation=5),
        x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 4450, 1000, correlation=5, bytes=mb, stream=7),
        x(STEP_MARK, "user_annotation", 5500, 1),
        # after the last mark: outside the window
        x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 7000, 1000, correlation=6, bytes=mb, stream=7),
    ]}


def test_gaps_are_found_and_told_apart():
    r = copy_gaps(scripted_trace())
    assert r["steps"] == 1 and r["fetches"] == 4 and r["window_ms"] == pytest.approx(5.5)
    assert r["copy_busy_ms"] == pytest.approx(4.0)
    assert [g["cause"] for g in r["gaps"]] == ["waited", "queued late"]
    waited, late = r["gaps"]
    assert waited["ms"] == pytest.approx(0.5) and waited["kernels_ms"] == {"flash_attn_kernel": pytest.approx(0.5)}
    assert late["ms"] == pytest.approx(0.82) and late["launched_after_previous_end_ms"] == pytest.approx(0.8)
    assert late["blocking_calls"] == [{"call": "cudaStreamSynchronize", "ms": pytest.approx(0.8)}]
    assert r["gap_ms_by_cause"] == {"waited": pytest.approx(0.5), "queued late": pytest.approx(0.82)}


def test_skipping_steps_and_too_few_marks():
    with pytest.raises(ValueError, match="marks; 3 are needed"):
        copy_gaps(scripted_trace(), skip_steps=1)
    trace = scripted_trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e["name"] != STEP_MARK]
    with pytest.raises(ValueError, match="has 0"):
        copy_gaps(trace)
