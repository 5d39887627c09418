"""bench/workers.py: cold and warm worker processes, on the CPU with a scripted worker module.
Warm spares must have done their imports before their arguments come, run each measurement
in a fresh process, report failures with the worker's stderr, pin every thread when asked,
and leave no process behind."""
from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from bench import workers

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import os, sys, threading, time
    STARTED = time.time()
    from bench.workers import worker_main

    def measure(args):
        if args.get("fail"):
            raise RuntimeError("scripted failure " + args["fail"])
        import preloaded_thread
        return {"args": args, "pid": os.getpid(), "started": STARTED,
                "affinity": sorted(os.sched_getaffinity(0)),
                "thread_affinity": sorted(os.sched_getaffinity(preloaded_thread.THREAD_ID)),
                "env_vmmalloc": os.environ.get("VMMALLOC")}

    if __name__ == "__main__":
        worker_main(measure, preload=("preloaded_thread",))
''')
PRELOADED = textwrap.dedent('''
    import os, pathlib, threading, time
    IMPORTED_AT = time.time()
    pathlib.Path(os.environ["MARKER_DIR"], f"preloaded-{os.getpid()}").touch()
    _ready = threading.Event()
    def _idle():
        global THREAD_ID
        THREAD_ID = threading.get_native_id()
        _ready.set()
        threading.Event().wait()
    threading.Thread(target=_idle, daemon=True).start()
    _ready.wait()
''')


@pytest.fixture
def worker_module(tmp_path, monkeypatch):
    (tmp_path / "scripted_worker.py").write_text(WORKER)
    (tmp_path / "preloaded_thread.py").write_text(PRELOADED)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    monkeypatch.setenv("MARKER_DIR", str(tmp_path))
    return "scripted_worker"


def preloaded_pids(directory: Path, count: int, timeout: float = 120.0) -> set[int]:
    """Waits until `count` workers have done their imports (each leaves a marker)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {int(p.name.split("-")[1]) for p in directory.glob("preloaded-*")}
        if len(pids) >= count or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def test_a_warm_worker_was_started_and_had_imported_before_its_arguments_came(worker_module, tmp_path):
    with workers.WarmWorkers(worker_module, ["native"]) as pool:
        ready = preloaded_pids(tmp_path, 1)  # nobody has sent arguments yet
        first = pool.run("native", {"n": 1})
        ready_next = preloaded_pids(tmp_path, 2) - ready  # the spare started by the first run
        second = pool.run("native", {"n": 2})
        spare = pool._spares["native"]
    assert first["args"] == {"n": 1, "system": "native"}
    assert ready == {first["pid"]}, "the first measurement ran in the spare that had imported ahead"
    assert ready_next == {second["pid"]} and second["pid"] != first["pid"]
    assert spare.returncode is not None, "the unused spare is ended on leaving the block"


def test_systems_get_their_environment_and_unknown_ones_are_refused(worker_module):
    with workers.WarmWorkers(worker_module) as pool:
        assert pool.run("vmmalloc", {}, keep_warm=False)["env_vmmalloc"] == "1"
        assert pool.run("native", {}, keep_warm=False)["env_vmmalloc"] is None
        assert pool._spares == {}
        with pytest.raises(ValueError, match="unknown system 'tcmalloc'"):
            pool.run("tcmalloc", {})


def test_a_failing_worker_raises_with_its_stderr_and_the_pool_goes_on(worker_module):
    with workers.WarmWorkers(worker_module, ["native"]) as pool:
        with pytest.raises(RuntimeError, match=r"(?s)scripted_worker worker for native failed \(1\).*scripted failure x"):
            pool.run("native", {"fail": "x"})
        assert pool.run("native", {"n": 3})["args"]["n"] == 3
    with pytest.raises(RuntimeError, match="scripted failure y"):
        workers.run_worker(worker_module, "native", {"fail": "y"})


def test_pinning_moves_every_thread_of_a_warm_worker(worker_module):
    cpu = workers.benchmark_cpu()
    assert cpu in os.sched_getaffinity(0)
    with workers.WarmWorkers(worker_module, ["native"]) as pool:
        r = pool.run("native", {"pin_cpu": cpu})
    assert r["affinity"] == [cpu] and r["thread_affinity"] == [cpu], r


def test_a_cold_worker_reads_its_arguments_from_the_command_line(worker_module):
    r = workers.run_worker(worker_module, "native", {"n": 7})
    assert r["args"] == {"n": 7, "system": "native"}


def test_an_unused_spare_leaves_no_process(worker_module):
    pool = workers.WarmWorkers(worker_module, ["native", "vmmalloc"])
    procs = list(pool._spares.values())
    pool.close()
    assert all(p.returncode is not None for p in procs)


def test_rank_cpus_are_equal_disjoint_shares_of_the_allowed_cpus():
    allowed = {0, 1, 2, 3, 8, 9, 10}  # not contiguous, not a multiple of the ranks
    shares = [workers.rank_cpus(allowed, r, 3) for r in range(3)]
    assert shares == [{0, 1}, {2, 3}, {8, 9}]
    assert workers.rank_cpus({5}, 0, 1) == {5}
    with pytest.raises(ValueError, match="cannot be shared among 4 ranks"):
        workers.rank_cpus({0, 1}, 0, 4)
    with pytest.raises(ValueError, match="outside a local world of 2"):
        workers.rank_cpus({0, 1}, 2, 2)
