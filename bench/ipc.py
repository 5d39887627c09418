"""Sharing a CUDA tensor with another process (torch.multiprocessing, spawn): vmmalloc's
handles (Note [Adapter IPC]) against PyTorch's allocator (cudaIpcGetMemHandle of the segment)
and its expandable segments (one descriptor per 20 MiB segment, pidfd_getfd), same run.

Each system runs in a process of its own with one receiver child. A round: the sender puts
the tensor on a queue; the child unpickles it (opens the memory), reads one byte on the GPU,
drops it (closes the memory) and answers. Measured per size: the first round (the sender
exports its handles then) and the median of the others (the exports are cached; the
receiver opens and closes everything every round). Also, in the vmmalloc process: what
creating chunks exportable (POSIX descriptors) costs per chunk, against chunks that cannot
be shared (CudaBackend(shareable=False)), each the median of five 1 GiB growths.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench.workers import run_worker, worker_main

GiB = 1 << 30
SYSTEMS = ("native", "expandable_segments", "vmmalloc")


def _receiver(inbox, outbox) -> None:
    while True:
        tensor = inbox.get()
        if tensor is None:
            return
        value = int(tensor[-1])  # a kernel reads the far end of what was opened
        del tensor
        outbox.put(value)


def _chunk_cost(torch, shareable: bool, rounds: int = 5) -> float:
    from vmmalloc import _C

    allocator = _C.Allocator(_C.CudaBackend(torch.cuda.current_device(), shareable), "large_handle_size:0")
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        ptr = allocator.allocate(GiB)  # 512 new 2 MiB chunks, mapped and granted
        times.append(time.perf_counter() - start)
        allocator.deallocate(ptr)
        allocator.empty_cache()
    return statistics.median(times) / (GiB // (2 << 20))


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_receiver, args=(inbox, outbox))
    child.start()
    out: dict[str, Any] = {}
    try:
        for size in args["sizes"]:
            tensor = torch.full((size,), 7, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            rounds = []
            for _ in range(args["rounds"]):
                start = time.perf_counter()
                inbox.put(tensor)
                assert outbox.get(timeout=600) == 7
                rounds.append(time.perf_counter() - start)
            del tensor
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()
            out[f"{size // GiB}GiB"] = {"first_s": rounds[0], "median_s": statistics.median(rounds[1:]),
                                         "all_s": rounds}
    finally:
        inbox.put(None)
        child.join(60)
    result: dict[str, Any] = {"sizes": out}
    if args["system"] == "vmmalloc":
        result["chunk_create_s"] = {"shareable": _chunk_cost(torch, True), "not_shareable": _chunk_cost(torch, False)}
    return result


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    if backend != "cuda":
        raise ValueError("ipc needs a GPU (--backend cuda)")
    sizes = [GiB] if quick else [GiB, 16 * GiB]
    args = {"sizes": sizes, "rounds": 4 if quick else 8}
    systems = {s: run_worker("bench.ipc", s, args, timeout=1200) for s in SYSTEMS}
    ratios = {}
    for name in systems["vmmalloc"]["sizes"]:
        ours = systems["vmmalloc"]["sizes"][name]["median_s"]
        ratios[name] = {peer: ours / systems[peer]["sizes"][name]["median_s"] for peer in ("native", "expandable_segments")}
    cost = systems["vmmalloc"]["chunk_create_s"]
    return {"benchmark": "ipc", "systems": systems, "vmmalloc_time_over_peer": ratios,
            "chunk_create_us": {k: v * 1e6 for k, v in cost.items()},
            "note": "round = put on a queue, child opens, reads one byte, closes, answers; median of rounds after the first"}


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, ratio in result["vmmalloc_time_over_peer"].items():
        s = {k: v["sizes"][name]["median_s"] for k, v in result["systems"].items()}
        rows.append((f"share + open {name} (round trip)", f"{s['vmmalloc'] * 1e3:.1f} ms",
                     f"native {s['native'] * 1e3:.1f} ms ({ratio['native']:.2f}x), expandable "
                     f"{s['expandable_segments'] * 1e3:.1f} ms ({ratio['expandable_segments']:.2f}x)"))
    c = result["chunk_create_us"]
    rows.append(("2 MiB chunk growth, exportable vs not", f"{c['shareable']:.1f} us", f"{c['not_shareable']:.1f} us"))
    return rows


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(measure)
