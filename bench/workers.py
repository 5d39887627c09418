"""Runs one measurement in a fresh interpreter under a chosen allocator, because the CUDA
allocator is fixed at CUDA start-up: each compared system gets its own process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

# How each system is switched on in its process.
SYSTEM_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "expandable_segments": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "vmmalloc": {"VMMALLOC": "1"},
}


def run_worker(module: str, system: str, args: dict[str, Any], timeout: int = 900) -> dict[str, Any]:
    """Runs `python -m <module> --worker '<json args>'` under `system`; returns its RESULT."""
    env = {k: v for k, v in os.environ.items() if k not in ("VMMALLOC", "VMMALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env.update(SYSTEM_ENV[system])
    env["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps({**args, "system": system})],
                          capture_output=True, text=True, env=env, timeout=timeout)
    # where a benchmark's time goes, in its log (process start-up and model build included)
    print(f"[worker] {module} under {system}: {time.perf_counter() - start:.1f} s", flush=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} worker for {system} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def benchmark_cpu() -> int:
    """The one CPU that latency benchmarks pin their workers to: the last this process may use,
    so that every compared system runs on the same core (bench/NOTES.md: a process's speed
    depends on where it lands by up to 1.8x on the lent machines)."""
    return max(os.sched_getaffinity(0))


def worker_main(measure) -> None:
    """Entry point of a worker process: parses the JSON args, pins the process to
    args["pin_cpu"] when given (before torch starts its threads), prints the RESULT line."""
    args = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    if args.get("pin_cpu") is not None:
        os.sched_setaffinity(0, {int(args["pin_cpu"])})
    print("RESULT " + json.dumps(measure(args)), flush=True)
