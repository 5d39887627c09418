"""Runs benchmarks and writes bench/results/<name>.json; prints a table of ratios last.

    python -m bench.run [NAMES ...] [--backend host|cuda] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench.common import RESULTS_DIR, environment, write_result

BENCHMARKS = {
    "core_hot_path": "bench.core_hot_path",
    "torch_hot_path": "bench.torch_hot_path",
    "fragmentation": "bench.fragmentation",
    "kv_cache": "bench.kv_cache",
    "multi_gpu": "bench.multi_gpu",
    "peer_access": "bench.peer_access",
    "offload": "bench.offload",
    "compile_graphs": "bench.compile_graphs",
    "history_cost": "bench.history_cost",
    "sleep_wake": "bench.sleep_wake",
}
GPU_ONLY = {"torch_hot_path", "fragmentation", "kv_cache", "multi_gpu", "peer_access", "offload", "compile_graphs", "history_cost", "sleep_wake"}
MULTI_GPU = {"multi_gpu", "peer_access"}  # in the default set only where at least 2 GPUs are visible


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def default_names(backend: str) -> list[str]:
    """The benchmarks this machine can run on `backend`."""
    return [n for n in BENCHMARKS if (backend == "cuda" or n not in GPU_ONLY)
            and (n not in MULTI_GPU or _gpu_count() >= 2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--backend", choices=["host", "cuda"], default="host")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON results go")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    rows = []
    names = args.names or default_names(args.backend)
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"[bench] {name} on {args.backend} ...", flush=True)
        result = module.run(backend=args.backend, quick=args.quick)
        result["environment"] = environment()
        path = write_result(result["benchmark"], result, args.out)
        print(f"[bench] wrote {path}", flush=True)
        if hasattr(module, "plot_result"):  # a picture beside the JSON
            module.plot_result(result, path.with_suffix(".png"))
            print(f"[bench] wrote {path.with_suffix('.png')}", flush=True)
        rows += [(name, *row) for row in module.summary(result)]
    if not rows:
        return 0
    width = max(len(r[1]) for r in rows)
    print(f"\n{'benchmark':<16} {'measure':<{width}}  {'value':>18}  target")
    for bench, measure, value, target in rows:
        print(f"{bench:<16} {measure:<{width}}  {value:>18}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
