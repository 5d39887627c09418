"""Runs one measurement in a fresh interpreter under a chosen allocator, because the CUDA
allocator is fixed at CUDA start-up: each compared system gets its own process.

Two ways to run one:
- `run_worker`: a cold process for one measurement.
- `WarmWorkers`: spare processes started ahead of need, one per system, that import torch and
  transformers and then wait for their arguments on stdin (bench/NOTES.md: the imports are
  6-8 s of every worker and touch no GPU, so they overlap the previous measurement).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

# How each system is switched on in its process.
SYSTEM_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "expandable_segments": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "vmmalloc": {"VMMALLOC": "1"},
}
# Read by a worker started with `--worker -` once its imports are done.
ARGS_FROM_STDIN = "-"
# What a spare worker of a Hugging Face benchmark imports before its arguments come.
HF_PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama")


def _system_env(system: str) -> dict[str, str]:
    if system not in SYSTEM_ENV:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEM_ENV)}")
    env = {k: v for k, v in os.environ.items() if k not in ("VMMALLOC", "VMMALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env.update(SYSTEM_ENV[system])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(module: str, system: str, args_arg: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, "--worker", args_arg], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_system_env(system))


def _finish(proc: subprocess.Popen, module: str, system: str, stdin_text: str, timeout: int,
            how: str) -> dict[str, Any]:
    """Sends `stdin_text`, waits for the worker, returns its RESULT (or raises with its stderr)."""
    start = time.perf_counter()
    try:
        out, err = proc.communicate(stdin_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{module} worker for {system} ran past {timeout} s:\n{err[-3000:]}") from None
    # where a benchmark's time goes, in its log (a cold start includes the imports)
    print(f"[worker] {module} under {system} ({how}): {time.perf_counter() - start:.1f} s", flush=True)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} worker for {system} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_worker(module: str, system: str, args: dict[str, Any], timeout: int = 900) -> dict[str, Any]:
    """Runs `python -m <module> --worker '<json args>'` under `system`; returns its RESULT."""
    proc = _start(module, system, json.dumps({**args, "system": system}))
    return _finish(proc, module, system, "", timeout, "cold")


class WarmWorkers:
    """Spare worker processes of one benchmark module, one per system, kept one step ahead.

    Invariant: at most one spare per system exists, and a spare has done nothing but its
    imports (no CUDA context, no GPU memory) until it receives arguments; so spares cannot
    change what another process measures on the GPU. Use as a context manager: spares left
    at the end are ended."""

    def __init__(self, module: str, systems: Iterable[str] = ()) -> None:
        self.module = module
        self._spares: dict[str, subprocess.Popen] = {}
        for system in systems:
            self._spare(system)

    def _spare(self, system: str) -> None:
        if system not in self._spares:
            self._spares[system] = _start(self.module, system, ARGS_FROM_STDIN)

    def run(self, system: str, args: dict[str, Any], timeout: int = 900, keep_warm: bool = True) -> dict[str, Any]:
        """Runs one measurement under `system` in its spare (started now if none waits) and,
        unless `keep_warm` is False, starts the next spare of `system` while it measures."""
        self._spare(system)
        proc = self._spares.pop(system)
        warm = proc.poll() is None  # a spare that already died reports its error below
        if keep_warm:
            self._spare(system)
        return _finish(proc, self.module, system, json.dumps({**args, "system": system}) + "\n", timeout,
                       "warm" if warm else "spare exited early")

    def close(self) -> None:
        """Ends the spares nobody used: they hold nothing but imports, so a kill is safe and
        does not wait for an import to finish."""
        for proc in self._spares.values():
            proc.kill()
            proc.communicate()
        self._spares.clear()

    def __enter__(self) -> WarmWorkers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def benchmark_cpu() -> int:
    """The one CPU that latency benchmarks pin their workers to: the last this process may use,
    so that every compared system runs on the same core (bench/NOTES.md: a process's speed
    depends on where it lands by up to 1.8x on the lent machines)."""
    return max(os.sched_getaffinity(0))


def pin_process(cpus: set[int]) -> None:
    """Every thread of this process onto `cpus` (threads started by imports included;
    threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def rank_cpus(available: set[int], local_rank: int, local_world: int) -> set[int]:
    """This rank's share of the CPUs the launcher allows: equal, disjoint, contiguous runs of
    the sorted CPU list (the leftover CPUs, if any, go to no rank), so that ranks do not
    migrate onto each other's cores between runs."""
    if not 0 <= local_rank < local_world:
        raise ValueError(f"local rank {local_rank} is outside a local world of {local_world}")
    cpus = sorted(available)
    share = len(cpus) // local_world
    if share == 0:
        raise ValueError(f"{len(cpus)} CPUs cannot be shared among {local_world} ranks; drop --pin-cpus")
    return set(cpus[local_rank * share:(local_rank + 1) * share])


def worker_main(measure, preload: tuple[str, ...] = ("torch",)) -> None:
    """Entry point of a worker process: `--worker '<json>'` measures at once; `--worker -`
    imports `preload` first, then reads the JSON arguments from stdin (an empty line: exit
    without measuring). Pins the process to args["pin_cpu"] when given; prints the RESULT."""
    text = sys.argv[sys.argv.index("--worker") + 1]
    if text == ARGS_FROM_STDIN:
        for name in preload:
            importlib.import_module(name)
        text = sys.stdin.readline()
        if not text.strip():
            return
    args = json.loads(text)
    if args.get("pin_cpu") is not None:
        pin_process({int(args["pin_cpu"])})
    print("RESULT " + json.dumps(measure(args)), flush=True)
