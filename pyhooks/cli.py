"""The ``vmmalloc`` command (also ``python -m vmmalloc``).

    vmmalloc demo                 native vs vmmalloc on a Hugging Face model (host backend without a GPU)
    vmmalloc run -- CMD ...       run CMD under vmmalloc, then print its peak figures
    vmmalloc replay TRACE         a memory snapshot's allocations through vmmalloc on the CPU

In a source checkout (an editable install, or run from the repository root) also:

    vmmalloc bench [NAMES]        run the benchmarks, each peer in its own process
    vmmalloc report [--write]     bench/results/*.json -> the headline table (--write: also
                                  bench/RESULTS.md, the plots and the README's table)
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path


def find_checkout() -> Path | None:
    """The repository root holding bench/ (the benchmarks are not installed with the package):
    beside the package of an editable install, or the current directory; None for a wheel
    used elsewhere, where `bench` and `report` are not offered."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "bench" / "run.py").is_file() and (root / "pyproject.toml").is_file():
            return root
    return None


def source_checkout() -> Path:
    root = find_checkout()
    if root is None:
        raise SystemExit("vmmalloc: the benchmarks live in the source checkout (bench/), which was not found "
                         "beside the installed package nor in the current directory; run this from the "
                         "repository root, or install it with `pip install -e .`")
    return root


def _with_checkout_on_path() -> Path:
    root = source_checkout()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def _cmd_demo(args: argparse.Namespace) -> int:
    from vmmalloc import demo

    return demo.run_demo(backend=args.backend, out_dir=args.out, quick=args.quick)


def _cmd_run(args: argparse.Namespace) -> int:
    from vmmalloc import run_command

    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("vmmalloc run: give the command to run after --, e.g. `vmmalloc run -- python train.py`")
    return run_command.run(command, conf=args.conf, hf_cache=args.hf_cache, kv_budget=args.kv_budget,
                           history=args.history, out_dir=args.out)


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _with_checkout_on_path()
    from bench import run

    return run.run_benchmarks(args.names, backend=args.backend, quick=args.quick,
                              out_dir=args.out or root / "bench" / "results")


def _cmd_report(args: argparse.Namespace) -> int:
    root = _with_checkout_on_path()
    from bench import report

    results = args.results or root / "bench" / "results"
    # A user command edits no source tree unasked: without --write only the files named.
    if args.write:
        output = args.output or root / "bench" / "RESULTS.md"
        readme = args.readme or (None if args.no_readme else root / "README.md")
        written = report.write_report(results, output, readme=readme, plots=not args.no_plots)
    elif args.output:
        written = report.write_report(results, args.output, readme=args.readme, plots=False)
    elif args.readme:
        table = report.headline_table(report.load_results(results))
        written = [args.readme] if report.update_readme(args.readme, table) else []
    else:
        print("\n".join(report.headline_table(report.load_results(results))))
        return 0
    for path in written:
        print(f"wrote {path}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from vmmalloc import _C, replay
    from vmmalloc.sizes import parse_bytes

    # Bad input is one line that says what to do, never a traceback.
    try:
        device_memory = parse_bytes(args.device_memory, "--device-memory")
        for conf in args.conf or []:
            _C.parse_config(conf)
    except ValueError as error:
        raise SystemExit(f"vmmalloc replay: {error}") from None
    try:
        trace = replay.load_trace(args.trace, device=args.device)
    except FileNotFoundError:
        raise SystemExit(f"vmmalloc replay: {args.trace}: no such file") from None
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, KeyError,
            IndexError, TypeError) as error:
        raise SystemExit(f"vmmalloc replay: {args.trace} is not a memory snapshot or a vmmalloc trace "
                         f"({type(error).__name__}: {error}); write one with "
                         "torch.cuda.memory._dump_snapshot or `vmmalloc run --history N`") from None
    if args.save:
        print(f"wrote {replay.save_trace(trace, args.save)}")
    print(f"{len(trace)} requests and frees"
          + (f"; {trace.unmatched_frees} frees of blocks allocated before the trace began" if trace.unmatched_frees else ""))
    # Handles, not bytes, are what the driver charges for (Note [Large handles]).
    print(f"{'VMMALLOC_CONF':<32} {'stitches':>9} {'stitched GiB':>13} {'handles mapped':>15} "
          f"{'handles made':>13} {'repaired chunks':>16} {'peak res/alloc':>15} {'stream waits':>13} "
          f"{'driver ms (est.)':>17}")
    pool_streams = args.pool_stream or []
    unknown = sorted(set(pool_streams) - set(trace.streams))
    if unknown:
        raise SystemExit(f"vmmalloc replay: --pool-stream {unknown[0]} is not a stream of {args.trace}; "
                         f"its streams: {', '.join(str(s) for s in sorted(set(trace.streams)))}")
    for conf in args.conf or [""]:
        r = replay.replay(trace, conf=conf, device_memory=device_memory, pool_streams=pool_streams)
        mapped = r["vmm.stitched_handles"] + r["vmm.repaired_handles"]
        print(f"{conf or '(defaults)':<32} {r['vmm.stitches']:>9} {r['vmm.stitched_bytes'] / 2**30:>13.1f} "
              f"{mapped:>15} {r['num_device_alloc']:>13} {r['vmm.repaired_chunks']:>16} {r['ratio']:>15.3f} "
              f"{r['vmm.cross_stream_waits']:>13} {r['driver_ms_estimate']:>17.0f}")
        if pool_streams:
            print(f"{'':<32} graph pool: {r['pool_bytes'] / 2**30:.3f} GiB held for a peak of "
                  f"{r['pool_peak_allocated'] / 2**30:.3f} GiB allocated ({r['pool_ratio']:.3f}x)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmmalloc", description="GPU memory management for PyTorch on "
                                     "CUDA virtual memory.", epilog="Run `vmmalloc COMMAND --help` for a "
                                     "command's options.")
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="native vs vmmalloc on a Hugging Face model, side by side",
                               description="A Hugging Face model with random weights serves requests of "
                               "varying batch and length under PyTorch's allocator and under vmmalloc, each "
                               "in its own process; prints peak reserved vs allocated, stitches and KV "
                               "memory, and writes a timeline plot. Without a GPU the same story runs on "
                               "the host backend.")
    demo.add_argument("--backend", choices=["auto", "cuda", "host"], default="auto",
                      help="cuda needs a GPU; host runs on CPU memory (default: cuda when there is a GPU)")
    demo.add_argument("--out", type=Path, default=Path("vmmalloc-demo"),
                      help="where the timeline plot and snapshots go (default: ./vmmalloc-demo)")
    demo.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser("run", help="run a command under vmmalloc and print its peak figures",
                              description="Runs CMD with VMMALLOC=1 (every Python process it starts uses "
                              "vmmalloc), then prints each process's peak reserved and allocated memory.",
                              usage="vmmalloc run [options] -- CMD [ARGS ...]")
    run.add_argument("--conf", default=None, help="VMMALLOC_CONF options, e.g. memory_cap:40GiB")
    run.add_argument("--hf-cache", choices=["vmm", "offload"], default=None,
                     help="generate()'s KV cache: vmm (grows in place) or offload (needs --kv-budget)")
    run.add_argument("--kv-budget", default=None, help="GPU memory for KV under --hf-cache offload, e.g. 8GiB")
    run.add_argument("--history", type=int, default=0, metavar="N",
                     help="record the last N allocator events and write a snapshot PyTorch's memory viewer "
                     "opens, and a timeline plot")
    run.add_argument("--out", type=Path, default=None,
                     help="where per-process reports go (default: a temporary folder; kept with --history)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    run.set_defaults(handler=_cmd_run)

    if find_checkout() is None:
        _add_replay(commands)
        return parser
    bench = commands.add_parser("bench", help="run the benchmarks against their peers",
                                description="Runs the benchmarks with progress bars, each compared system "
                                "in its own process, and writes JSON results with the GPU, driver, torch and "
                                "transformers versions.")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: those this machine can run)")
    bench.add_argument("--quick", action="store_true", help="fewer rounds and shorter runs (the whole suite "
                       "in about 8 minutes on one H100/H200)")
    bench.add_argument("--backend", choices=["auto", "cuda", "host"], default="auto")
    bench.add_argument("--out", type=Path, default=None, help="where the JSON results go (default: bench/results)")
    bench.set_defaults(handler=_cmd_bench)

    report = commands.add_parser("report", help="the benchmark results' headline table (--write: the report files)",
                                 description="Reads the JSON results and prints the headline table. With "
                                 "--write it also writes the Markdown report (ratios against peers, targets "
                                 "beside them), the PNG plots and the README's headline table in the checkout.")
    report.add_argument("--write", action="store_true",
                        help="write bench/RESULTS.md, the plots and the README's headline table")
    report.add_argument("--results", type=Path, default=None, help="folder of JSON results (default: bench/results)")
    report.add_argument("--output", type=Path, default=None, help="write the report there (--write: bench/RESULTS.md)")
    report.add_argument("--readme", type=Path, default=None, help="README whose headline table is updated")
    report.add_argument("--no-readme", action="store_true", help="with --write, leave the README alone")
    report.add_argument("--no-plots", action="store_true", help="write no PNG")
    report.set_defaults(handler=_cmd_report)

    _add_replay(commands)
    return parser


def _add_replay(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser("replay", help="replay a memory snapshot's allocations through vmmalloc on the CPU",
                                 description="Reads the allocations of a memory snapshot in PyTorch's format "
                                 "(torch.cuda.memory._dump_snapshot under any allocator, or `vmmalloc run "
                                 "--history N`) and replays them through vmmalloc on the host backend, once "
                                 "per --conf: stitches, chunks created, peak reserved / allocated, and the "
                                 "driver time those mappings would cost on a GPU.")
    replay.add_argument("trace", type=Path, help="a snapshot .pickle (or .pickle.gz), or a .trace.gz from --save")
    replay.add_argument("--conf", action="append", default=None,
                        help="VMMALLOC_CONF to replay under (repeatable; default: vmmalloc's defaults)")
    replay.add_argument("--device", type=int, default=None, help="which device's trace (when it holds several)")
    replay.add_argument("--device-memory", default="80GiB", help="the GPU memory to play (default 80GiB)")
    replay.add_argument("--save", type=Path, default=None, help="also write the requests compactly (.trace.gz)")
    replay.add_argument("--pool-stream", type=int, action="append", default=None, metavar="STREAM",
                        help="send this stream's requests to a CUDA graph's pool, as a graph tree's warm-up "
                             "and recording are (repeatable; the replay module's docstring says how)")
    replay.set_defaults(handler=_cmd_replay)


def _needed_extras(args: argparse.Namespace) -> tuple[str, ...]:
    """What a command needs beyond torch: the `cli` extra (progress bars, plots)."""
    command = args.command_name
    if command in ("demo", "bench"):
        return ("tqdm", "matplotlib")
    if command == "report" and args.write and not args.no_plots:
        return ("matplotlib",)
    if command == "run" and args.history > 0:  # a timeline plot per process
        return ("matplotlib",)
    return ()


def _check_extras(args: argparse.Namespace) -> None:
    import importlib.util

    missing = [m for m in _needed_extras(args) if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"vmmalloc {args.command_name} needs {' and '.join(missing)}: pip install "
                         f"'vmmalloc[cli]' (or pip install {' '.join(missing)})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_extras(args)
    if args.command_name == "run" and args.kv_budget and args.hf_cache != "offload":
        parser.error("run: --kv-budget is the offload cache's budget; give it with --hf-cache offload")
    if args.command_name == "run" and args.hf_cache == "offload" and not args.kv_budget:
        parser.error("run: --hf-cache offload needs --kv-budget (GPU memory for KV, e.g. 8GiB)")
    if args.command_name == "run" and args.history < 0:
        parser.error(f"run: --history must be >= 0 events, got {args.history}")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
