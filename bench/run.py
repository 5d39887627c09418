"""The benchmark runner, behind both `python -m bench.run` and `vmmalloc bench`: writes
bench/results/<name>.json (and a plot where the benchmark draws one), then one table of
every result with its targets.

    python -m bench.run [NAMES ...] [--backend auto|host|cuda] [--quick] [--out DIR]

One benchmark runs in this process. Several run each in a process of its own (a crash or a
leak in one cannot touch the next; each compared system inside a benchmark has its own
process too: bench/workers.py), with a progress bar and a log per benchmark under
<out>/logs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
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
    "ipc": "bench.ipc",
    "graph_decode": "bench.graph_decode",
}
GPU_ONLY = {"torch_hot_path", "fragmentation", "kv_cache", "multi_gpu", "peer_access", "offload", "compile_graphs",
            "history_cost", "sleep_wake", "ipc", "graph_decode"}
MULTI_GPU = {"multi_gpu", "peer_access"}  # in the default set only where at least 2 GPUs are visible


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def default_names(backend: str) -> list[str]:
    """The benchmarks this machine can run on `backend`."""
    return [n for n in BENCHMARKS if (backend == "cuda" or n not in GPU_ONLY)
            and (n not in MULTI_GPU or _gpu_count() >= 2)]


def resolve_backend(backend: str) -> str:
    """"auto": cuda where a GPU is usable, else host. Exits with the reason for cuda without one."""
    import vmmalloc

    if backend == "auto":
        return "cuda" if vmmalloc.cuda_available() else "host"
    if backend == "cuda" and not vmmalloc.cuda_available():
        raise SystemExit(f"bench: --backend cuda needs a GPU: {vmmalloc.cuda_unavailable_reason()}")
    return backend


def run_in_process(name: str, backend: str, quick: bool, out_dir: Path) -> Path:
    """Runs one benchmark here; returns the path of its JSON result."""
    module = importlib.import_module(BENCHMARKS[name])
    print(f"[bench] {name} on {backend} ...", flush=True)
    result = module.run(backend=backend, quick=quick)
    result["environment"] = environment()
    path = write_result(result["benchmark"], result, out_dir)
    print(f"[bench] wrote {path}", flush=True)
    if hasattr(module, "plot_result"):  # a picture beside the JSON
        module.plot_result(result, path.with_suffix(".png"))
        print(f"[bench] wrote {path.with_suffix('.png')}", flush=True)
    return path


def run_each(names: list[str], backend: str, quick: bool, out_dir: Path) -> tuple[list[str], dict[str, float]]:
    """Runs each benchmark in a process of its own; returns (failed names, seconds per name)."""
    from tqdm import tqdm

    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    failed: list[str] = []
    timings: dict[str, float] = {}
    bar = tqdm(names, desc="benchmarks", unit="bench", file=sys.stderr, dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        command = [sys.executable, "-m", "bench.run", name, "--backend", backend, "--out", str(out_dir)]
        start = time.perf_counter()
        with open(logs / f"{name}.log", "w") as log:
            status = subprocess.call(command + (["--quick"] if quick else []), stdout=log,
                                     stderr=subprocess.STDOUT, cwd=root)
        timings[name] = time.perf_counter() - start
        if status != 0:
            failed.append(name)
            bar.write(f"{name} failed (exit {status}); see {logs / (name + '.log')}")
        # after every benchmark, so a run that is cut off still says where its time went
        (logs / "suite.json").write_text(json.dumps(
            {"backend": backend, "quick": quick, "seconds": timings, "failed": failed}, indent=1) + "\n")
    bar.close()
    return failed, timings


def print_table(names: list[str], backend: str, out_dir: Path, timings: dict[str, float] | None = None) -> None:
    """Every named benchmark's rows from its stored result, targets marked met or missed."""
    from bench import report

    print(f"\n{'benchmark':<16} {'measure':<52} {'value':>22}  target")
    for name in names:
        path = out_dir / f"{report.result_stem(name, backend)}.json"
        rows = report.rows_for(json.loads(path.read_text())) if path.exists() else None
        for measure, value, target, met in rows or [("(no result)", "-", "", None)]:
            mark = {True: " ok", False: " MISSED", None: ""}[met]
            print(f"{name:<16} {measure[:52]:<52} {value:>22}  {target}{mark}")
    if timings:
        print(f"\n{len(timings)} benchmarks in {sum(timings.values()) / 60:.1f} min: "
              + ", ".join(f"{n} {t:.0f} s" for n, t in timings.items()))


def run_benchmarks(names: list[str], backend: str = "auto", quick: bool = False,
                   out_dir: Path = RESULTS_DIR) -> int:
    """Runs `names` (default: what this machine can run); 0 when every one wrote its result."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"bench: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    backend = resolve_backend(backend)
    names = names or default_names(backend)
    out_dir = Path(out_dir).resolve()  # the children run from the checkout's root
    if len(names) == 1:
        run_in_process(names[0], backend, quick, out_dir)
        print_table(names, backend, out_dir)
        return 0
    failed, timings = run_each(names, backend, quick, out_dir)
    print_table(names, backend, out_dir, timings)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: those this machine can run): "
                        f"{', '.join(BENCHMARKS)}")
    parser.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON results go")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return run_benchmarks(args.names, backend=args.backend, quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
