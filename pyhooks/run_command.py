"""`vmmalloc run -- CMD ...`: runs CMD with vmmalloc active, then prints each process's peaks."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmmalloc import _C
from vmmalloc.process_report import REPORT_DIR_ENV, read_all

GiB = float(1 << 30)


def child_environment(conf: str | None, hf_cache: str | None, kv_budget: str | None, history: int,
                      report_dir: Path) -> dict[str, str]:
    """The environment CMD runs in; raises ValueError for a bad option (named)."""
    env = dict(os.environ)
    env["VMMALLOC"] = "1"
    parts = [p for p in (env.get("VMMALLOC_CONF", ""), conf or "") if p.strip()]
    if history:
        parts.append(f"history:{history}")
    merged = ",".join(parts)
    _C.parse_config(merged)  # ValueError naming the key and what is allowed
    if merged:
        env["VMMALLOC_CONF"] = merged
    if hf_cache:
        env["VMMALLOC_HF_CACHE"] = hf_cache
    if kv_budget:
        from vmmalloc.sizes import parse_bytes

        parse_bytes(kv_budget)
        env["VMMALLOC_KV_BUDGET"] = kv_budget
    env[REPORT_DIR_ENV] = str(report_dir)
    return env


def format_reports(reports: list[dict]) -> list[str]:
    """One line per process and device used."""
    lines = [f"{'process':<28} {'dev':>3} {'peak reserved':>14} {'peak allocated':>15} {'ratio':>6} "
             f"{'stitches':>8} {'KV peak':>9} {'OOMs':>5}"]
    for report in reports:
        name = f"{report['pid']} {Path(report['argv'][0]).name if report['argv'] else ''}"[:28]
        for device, s in sorted(report["devices"].items()):
            reserved, allocated = s["reserved_bytes.all.peak"], s["allocated_bytes.all.peak"]
            ratio = f"{reserved / allocated:.2f}" if allocated else "-"
            lines.append(f"{name:<28} {device:>3} {reserved / GiB:>10.2f} GiB {allocated / GiB:>11.2f} GiB "
                         f"{ratio:>6} {s['vmm.stitches']:>8} {s['vmm.kv_mapped_bytes.peak'] / GiB:>5.2f} GiB "
                         f"{s['num_ooms']:>5}")
    return lines


def run(command: list[str], conf: str | None = None, hf_cache: str | None = None, kv_budget: str | None = None,
        history: int = 0, out_dir: Path | None = None) -> int:
    """Runs `command` under vmmalloc; returns its exit status."""
    temporary = out_dir is None
    report_dir = Path(tempfile.mkdtemp(prefix="vmmalloc-run-")) if out_dir is None else out_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        env = child_environment(conf, hf_cache, kv_budget, history, report_dir)
    except ValueError as error:
        raise SystemExit(f"vmmalloc run: {error}") from None
    try:
        status = subprocess.call(command, env=env)
    except FileNotFoundError:
        raise SystemExit(f"vmmalloc run: command not found: {command[0]}") from None
    except KeyboardInterrupt:
        status = 130
    reports = read_all(report_dir)
    print()
    if not reports:
        print("vmmalloc run: no process reported (the command used no CUDA memory through PyTorch, "
              "or it is not a Python program)")
    else:
        print("\n".join(format_reports(reports)))
        plots = _timelines(reports, report_dir) if history else []
        for path in plots:
            print(f"timeline: {path}")
        if history:
            for report in reports:
                if "snapshot" in report:
                    print(f"snapshot (open it at pytorch.org/memory_viz): {report['snapshot']}")
    if temporary and not history:
        shutil.rmtree(report_dir, ignore_errors=True)
    return status


def _timelines(reports: list[dict], report_dir: Path) -> list[Path]:
    from vmmalloc import timeline

    paths = []
    for report in reports:
        if "snapshot" not in report:
            continue
        with open(report["snapshot"], "rb") as f:
            snapshot = pickle.load(f)
        for device in report["devices"]:
            series = timeline.from_snapshot(snapshot, int(device))
            path = report_dir / f"{report['pid']}-cuda{device}-timeline.png"
            paths.append(timeline.plot({"vmmalloc": series}, path,
                                       f"process {report['pid']}, cuda:{device}"))
    return paths
