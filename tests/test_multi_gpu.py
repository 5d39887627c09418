"""vmmalloc under torch.distributed on a 2-GPU machine: DDP and FSDP2 training launched by
torchrun, with vmmalloc turned on by VMMALLOC=1 or inside the script, against the native
allocator's run. The worker is bench/multi_gpu_train.py (also the multi-GPU example); its
gloo mode runs in CI, so the script itself is exercised without GPUs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vmmalloc

ROOT = Path(__file__).resolve().parents[1]


def _gpu_count() -> int:
    if not vmmalloc.cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


SMALL = ["--steps", "6", "--layers", "2", "--hidden", "256", "--max-batch", "4", "--max-seq", "512",
         "--deterministic"]


def launch(mode: str, system: str, extra: list[str] | None = None, timeout: int = 600) -> dict:
    """Runs the training script under torchrun with 2 ranks; returns rank 0's RESULT."""
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k not in ("VMMALLOC", "VMMALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    if system == "vmmalloc":
        env["VMMALLOC"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "bench.multi_gpu_train", "--mode", mode, *SMALL, *(extra or [])]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def assert_each_rank_on_its_own_vmmalloc_device(result: dict) -> None:
    assert result["world_size"] == 2
    for r in result["ranks"]:
        assert r["vmmalloc_enabled"] is True, r
        assert r["device"] == r["local_rank"] == r["rank"], r
        assert r["owned_by_own_device"] is True, r
        assert r["collectives_ok"] is True, r
        # torch's figures are vmmalloc's figures, per rank
        assert r["allocated_now"] == r["stats_allocated_now"] > 0, r
        assert 0 < r["peak_allocated"] <= r["peak_reserved"], r
        assert r["peer_devices"] == 0, r  # a rank uses one GPU: no peer grants (Note [Peers are the devices in use])


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_the_training_script_runs_on_cpu_with_gloo(mode):
    # 10-40 s on a 2-core machine; a rank that hangs at teardown fails here, not after 10 min
    result = launch(mode, "native", ["--device", "cpu", "--hidden", "64", "--max-seq", "64", "--steps", "3"],
                    timeout=240)
    assert result["world_size"] == 2 and result["device"] == "cpu"
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["collectives_ok"] and len(r["losses"]) == 3 for r in ranks), ranks
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trains on its own data
    assert all(r["cpus"] is None for r in ranks)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to give each rank its own")
def test_pinned_ranks_run_on_disjoint_cpus():
    result = launch("fsdp2", "native", ["--device", "cpu", "--hidden", "64", "--max-seq", "64", "--steps", "2",
                                        "--pin-cpus"], timeout=240)
    first, second = (set(r["cpus"]) for r in result["ranks"])
    assert first and second and not first & second, result["ranks"]
    assert first | second <= os.sched_getaffinity(0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 GPUs (run on a 2-GPU machine)")
def test_training_under_torchrun_matches_the_native_allocator(mode):
    native = launch(mode, "native")
    ours = launch(mode, "vmmalloc")
    assert all(r["vmmalloc_enabled"] is False and r["collectives_ok"] for r in native["ranks"])
    assert_each_rank_on_its_own_vmmalloc_device(ours)
    for a, b in zip(native["ranks"], ours["ranks"]):
        assert b["losses"] == a["losses"], (mode, a["rank"], a["losses"], b["losses"])
    # data parallel: ranks see different data, so their losses differ (the check is not vacuous)
    assert ours["ranks"][0]["losses"] != ours["ranks"][1]["losses"]


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 GPUs (run on a 2-GPU machine)")
def test_enable_vmm_allocator_inside_a_torchrun_script():
    ours = launch("fsdp2", "native", ["--enable-in-script"])
    assert_each_rank_on_its_own_vmmalloc_device(ours)


def test_the_benchmark_rotates_systems_and_compares_speed_within_rounds(monkeypatch):
    """bench.multi_gpu on made-up runs: the order rotates each round, and the speed is the
    median of per-round ratios (robust to a machine that drifts between rounds)."""
    from bench import multi_gpu

    times = {"native": [1.0, 2.0, 1.0], "expandable_segments": [1.0, 2.0, 1.0], "vmmalloc": [0.5, 2.0, 2.0]}
    calls: list[str] = []

    def fake_launch(system, world, train_args):
        calls.append(system)
        t = times[system][sum(c == system for c in calls) - 1]
        rank = {"vmmalloc_enabled": system == "vmmalloc", "collectives_ok": True, "peak_allocated": 10,
                "peak_reserved": 10 if system == "vmmalloc" else 14, "step_times": [t] * 8}
        return {"ranks": [{**rank, "ratio": rank["peak_reserved"] / 10, "rank": i} for i in range(world)]}

    monkeypatch.setattr(multi_gpu, "gpu_count", lambda: 2)
    monkeypatch.setattr(multi_gpu, "launch", fake_launch)
    result = multi_gpu.run()
    assert calls == ["native", "expandable_segments", "vmmalloc", "expandable_segments", "vmmalloc", "native",
                     "vmmalloc", "native", "expandable_segments"]
    assert result["rounds"] == 3 and result["world_size"] == 2
    assert result["ratios"]["vmmalloc_speed_vs_native_per_round"] == [2.0, 1.0, 0.5]
    assert result["ratios"]["vmmalloc_speed_vs_native"] == 1.0  # the medians alone would say 0.5
    assert result["ratios"]["reserved_over_allocated_per_rank"]["native"] == [1.4, 1.4]
    assert result["met"] == {"fragmentation": True, "step_time": True}
    assert multi_gpu.summary(result)[-2][1] == "1.000x"
