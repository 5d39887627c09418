"""`vmmalloc demo` (also `python -m vmmalloc.demo`): PyTorch's allocator and vmmalloc on the
same serving workload, side by side, with a timeline plot.

On a GPU, a Llama with random weights answers requests of varying batch and prompt length
through generate(), once under each allocator, each in its own process
(vmmalloc.demo_worker). Without a GPU, the same requests are replayed on the host backend
(vmmalloc.demo_host) and the output says so.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import vmmalloc
from vmmalloc import demo_worker, timeline

GiB = float(1 << 30)
SIDES = ("native", "vmmalloc")


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr, dynamic_ncols=True)


def _gpu_side(system: str, out_dir: Path, quick: bool) -> dict[str, Any]:
    """Runs one side in its own interpreter, following its progress lines."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMMALLOC", "VMMALLOC_CONF", "VMMALLOC_HF_CACHE", "PYTORCH_CUDA_ALLOC_CONF")}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "vmmalloc.demo_worker", system, str(out_dir)] + (["--quick"] if quick else [])
    log_path = out_dir / f"{system}.log"
    result = None
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                                     env=env) as proc:
        bar = None
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            if line.startswith("PROGRESS "):
                done, total = map(int, line.split()[1:3])
                if bar is None:
                    bar = _progress_bar(total, f"{system:>8}")
                bar.update(done - bar.n)
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        if bar is not None:
            bar.close()
    if proc.returncode != 0 or result is None:
        tail = log_path.read_text()[-2500:]
        raise SystemExit(f"vmmalloc demo: the {system} run failed (exit {proc.returncode}); its log, "
                         f"{log_path}, ends with:\n{tail}")
    result["timeline_data"] = timeline.Timeline(**json.loads(Path(result["timeline"]).read_text()))
    return result


def _host_side(system: str, quick: bool, label: str) -> dict[str, Any]:
    from vmmalloc import demo_host

    plan = demo_worker.schedule(quick)
    bar = _progress_bar(len(plan), f"{label:>12}")
    try:
        return demo_host.run_side(system, plan, progress=lambda: bar.update(1))
    finally:
        bar.close()


def format_table(results: dict[str, dict[str, Any]], labels: Mapping[str, str] | None = None) -> list[str]:
    """The side-by-side figures, each side under its label."""
    labels = labels or {side: side for side in SIDES}
    rows = [
        ("peak reserved", lambda r: f"{r['peak_reserved'] / GiB:.2f} GiB"),
        ("peak allocated", lambda r: f"{r['peak_allocated'] / GiB:.2f} GiB"),
        ("reserved / allocated", lambda r: f"{r['peak_reserved'] / max(r['peak_allocated'], 1):.2f}"),
        ("stitches", lambda r: str(r["stitches"]) if r["system"] == "vmmalloc" else "-"),
        ("KV memory held (peak)", lambda r: f"{r['peak_kv'] / GiB:.2f} GiB"),
    ]
    lines = [f"{'':24}" + "".join(f"{labels[s]:>16}" for s in SIDES)]
    for name, cell in rows:
        lines.append(f"{name:24}" + "".join(f"{cell(results[s]):>16}" for s in SIDES))
    return lines


def run_demo(backend: str = "auto", out_dir: Path | str = "vmmalloc-demo", quick: bool = False) -> int:
    """Runs the demo; prints the figures and where the timeline was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if backend == "auto":
        backend = "cuda" if vmmalloc.cuda_available() else "host"
    if backend == "cuda" and not vmmalloc.cuda_available():
        raise SystemExit(f"vmmalloc demo: --backend cuda needs a GPU: {vmmalloc.cuda_unavailable_reason()}; "
                         "use --backend host")
    plan = demo_worker.schedule(quick)
    if backend == "cuda":
        print(f"GPU: a Llama (16 layers, hidden 2048, random weights) answers {len(plan)} generate() requests "
              "of varying batch (1-16) and prompt (512-3072 tokens),\nonce under PyTorch's allocator with "
              "DynamicCache and once under vmmalloc with its KV cache, each in its own process.\n")
        results = {side: _gpu_side(side, out_dir, quick) for side in SIDES}
        labels = {"native": "native", "vmmalloc": "vmmalloc"}
        title = f"{len(plan)} generate() requests on {results['vmmalloc'].get('gpu', 'GPU')}"
    else:
        print("No GPU here: running on the host backend (CPU memory with CUDA's virtual memory semantics).")
        if not vmmalloc.cuda_available():
            print(f"  ({vmmalloc.cuda_unavailable_reason()})")
        print(f"The GPU demo's {len(plan)} requests are replayed as the allocations generate() makes: 'no stitching' "
              "is vmmalloc's allocator caching blocks\nas PyTorch's does, with a KV cache grown by concatenation; "
              "vmmalloc stitches and grows KV in place.\n")
        labels = {"native": "no stitching", "vmmalloc": "vmmalloc"}
        results = {side: _host_side(side, quick, labels[side]) for side in SIDES}
        title = f"{len(plan)} generate() requests replayed on the host backend"
    print("\n".join(format_table(results, labels)))
    plot = timeline.plot({labels[side]: results[side]["timeline_data"] for side in SIDES}, out_dir / "timeline.png",
                         title)
    snapshot = out_dir / "vmmalloc.pickle"
    if backend == "host":
        with open(snapshot, "wb") as f:
            pickle.dump(results["vmmalloc"]["snapshot_data"], f)
    saved = results["native"]["peak_reserved"] - results["vmmalloc"]["peak_reserved"]
    ratio = results["vmmalloc"]["peak_reserved"] / max(results["vmmalloc"]["peak_allocated"], 1)
    print(f"\nvmmalloc's peak reserved memory is {abs(saved) / GiB:.2f} GiB {'lower' if saved >= 0 else 'HIGHER'} "
          f"than the {labels['native']} run's; it reserves {ratio:.2f}x what it allocates at the peak.")
    print(f"timeline: {plot}")
    print(f"snapshot for PyTorch's memory viewer (pytorch.org/memory_viz): {snapshot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmmalloc.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "vmmalloc-demo")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    return run_demo(args.backend, args.out, args.quick)


if __name__ == "__main__":
    sys.exit(main())
