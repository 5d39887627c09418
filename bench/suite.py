"""`vmmalloc bench`: every benchmark in its own process, with a progress bar, then one table."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.run import BENCHMARKS, default_names


def run_suite(names: list[str], backend: str = "auto", quick: bool = False,
              out_dir: Path = Path("bench/results")) -> int:
    """Runs the benchmarks; returns 0 when every one wrote its result."""
    from tqdm import tqdm

    import vmmalloc

    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"vmmalloc bench: unknown benchmark(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(BENCHMARKS)}")
    if backend == "auto":
        backend = "cuda" if vmmalloc.cuda_available() else "host"
    if backend == "cuda" and not vmmalloc.cuda_available():
        raise SystemExit(f"vmmalloc bench: --backend cuda needs a GPU: {vmmalloc.cuda_unavailable_reason()}")
    names = names or default_names(backend)
    out_dir = Path(out_dir)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    failed, timings = [], {}
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
        # after every benchmark, so a suite that is cut off still says where its time went
        (logs / "suite.json").write_text(json.dumps(
            {"backend": backend, "quick": quick, "seconds": timings, "failed": failed}, indent=1) + "\n")
    bar.close()
    _print_table(names, backend, out_dir, timings)
    return 1 if failed else 0


def _print_table(names: list[str], backend: str, out_dir: Path, timings: dict[str, float]) -> None:
    from bench import report

    print(f"\n{'benchmark':<16} {'measure':<52} {'value':>22}  target")
    for name in names:
        path = out_dir / f"{report.result_stem(name, backend)}.json"
        rows = report.rows_for(json.loads(path.read_text())) if path.exists() else None
        for measure, value, target, met in rows or [("(no result)", "-", "", None)]:
            mark = {True: " ok", False: " MISSED", None: ""}[met]
            print(f"{name:<16} {measure[:52]:<52} {value:>22}  {target}{mark}")
    total = sum(timings.values())
    print(f"\n{len(names)} benchmarks in {total / 60:.1f} min: "
          + ", ".join(f"{n} {t:.0f} s" for n, t in timings.items()))
