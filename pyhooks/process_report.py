"""Each process's peak figures, written at exit for `vmmalloc run` (VMMALLOC_REPORT_DIR).

A process that armed vmmalloc writes ``<dir>/<pid>.json`` with the statistics of every
device it used, and ``<dir>/<pid>.pickle``, a snapshot in PyTorch's format, when its
allocators kept a history (VMMALLOC_CONF history:N).
"""
from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any

REPORT_DIR_ENV = "VMMALLOC_REPORT_DIR"
KEYS = ("reserved_bytes.all.peak", "allocated_bytes.all.peak", "requested_bytes.all.peak",
        "vmm.stitches", "vmm.stitched_bytes", "vmm.kv_mapped_bytes.peak", "num_alloc_retries", "num_ooms",
        "num_device_alloc", "num_device_free")


def write(directory: Path) -> None:
    """Writes this process's report (and snapshot, when a history was kept) into `directory`."""
    import torch

    from vmmalloc import memory_history

    allocators = memory_history.live_device_allocators(torch)
    devices = {}
    for index, allocator in allocators.items():
        stats = allocator.stats()
        devices[str(index)] = {key: stats.get(key, 0) for key in KEYS}
    directory.mkdir(parents=True, exist_ok=True)
    report = {"pid": os.getpid(), "argv": sys.argv, "devices": devices}
    if any(a.event_capacity for a in allocators.values()):
        snapshot = memory_history.dump(memory_history.snapshot_of(allocators), directory / f"{os.getpid()}.pickle")
        report["snapshot"] = str(snapshot)
    (directory / f"{os.getpid()}.json").write_text(json.dumps(report, indent=1) + "\n")


def arm_from_env() -> None:
    """Registers the exit-time report when VMMALLOC_REPORT_DIR is set."""
    directory = os.environ.get(REPORT_DIR_ENV, "").strip()
    if directory:
        atexit.register(write, Path(directory))


def read_all(directory: Path) -> list[dict[str, Any]]:
    """The reports written into `directory`, oldest process first."""
    reports = []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a process killed while writing: nothing to report for it
    return reports
