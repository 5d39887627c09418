"""What every benchmark records: the machine and software it ran on, medians, JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: recorded as absent
        return None


def _gpu_facts() -> dict[str, Any]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"gpu": None, "driver": None}
    name, driver, memory = (field.strip() for field in out[0].split(","))
    return {"gpu": name, "gpu_count": len(out), "driver": driver, "gpu_memory": memory}


def _commit() -> str | None:
    """VMMALLOC_COMMIT when set (a copied tree whose .git is not its own), else the
    checkout's commit, with "+dirty" when tracked files differ from it."""
    if os.environ.get("VMMALLOC_COMMIT"):
        return os.environ["VMMALLOC_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """The GPU, driver, CPU and software versions a result was taken with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        **_gpu_facts(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "vmmalloc": _version("vmmalloc"),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def median_of(repeats: int, measure: Callable[[], float]) -> dict[str, float]:
    """Median, min and max of `repeats` calls of `measure`."""
    values = [measure() for _ in range(repeats)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": repeats}


def write_result(name: str, result: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path
