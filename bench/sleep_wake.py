"""Sleep and wake of tagged memory (vmmalloc.sleep_mode, Note [Sleeping pools]) against the
hardware's copy limit and the offload users write without it.

One vmmalloc process: a tag holds `size` bytes of weights. Measured, each the median of
`repeats`:
- pause(backup=True) and resume(): the contents go to the host and come back (today
  pageable std::vector buffers, synchronous copies);
- pause(backup=False) and resume(): unmap and map only (what a KV cache pays);
- the limit: pinned-host copies of the same bytes (D2H and H2D through torch);
- the usual offload: t.cpu(), del, empty_cache(), then .cuda() again (new addresses: a
  CUDA graph captured on the old ones would be invalid).
Expectations (issue: sleep/wake): backup pause/resume within 2x of the pinned copies once
backups are pinned and overlapped; unmap/map well under a second per 16 GB.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench.workers import run_worker, worker_main

GiB = 1 << 30


def _timed(fn, torch) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    import vmmalloc
    from vmmalloc import sleep_mode

    size, repeats = args["size"], args["repeats"]
    with sleep_mode.tagged("weights"):
        weights = torch.empty(size, dtype=torch.uint8, device="cuda")
    weights.fill_(7)
    ptr = weights.data_ptr()
    out: dict[str, list[float]] = {k: [] for k in ("pause_backup", "resume_backup", "pause_discard",
                                                   "resume_discard", "pinned_d2h", "pinned_h2d",
                                                   "offload_out", "offload_in")}
    intact = True
    for _ in range(repeats):
        out["pause_backup"].append(_timed(lambda: sleep_mode.pause("weights", backup=True), torch))
        out["resume_backup"].append(_timed(lambda: sleep_mode.resume("weights"), torch))
        low, high = weights.aminmax()
        intact = intact and int(low) == 7 == int(high) and weights.data_ptr() == ptr
        out["pause_discard"].append(_timed(lambda: sleep_mode.pause("weights", backup=False), torch))
        out["resume_discard"].append(_timed(lambda: sleep_mode.resume("weights"), torch))
        weights.fill_(7)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    for _ in range(repeats):
        out["pinned_d2h"].append(_timed(lambda h=host: h.copy_(weights, non_blocking=True), torch))
        out["pinned_h2d"].append(_timed(lambda h=host: weights.copy_(h, non_blocking=True), torch))
    del host
    box: dict[str, Any] = {"t": torch.empty(size, dtype=torch.uint8, device="cuda")}  # the only reference

    def offload_out() -> None:
        box["cpu"] = box.pop("t").cpu()
        torch.cuda.empty_cache()

    def offload_in() -> None:
        box["t"] = box.pop("cpu").cuda()

    for _ in range(repeats):
        out["offload_out"].append(_timed(offload_out, torch))
        out["offload_in"].append(_timed(offload_in, torch))
    medians = {k: statistics.median(v) for k, v in out.items()}
    gbps = {k: size / v / 1e9 for k, v in medians.items()}
    return {"seconds": medians, "GB_per_s": gbps, "all_seconds": out, "intact": intact,
            "vmmalloc_enabled": vmmalloc.is_enabled()}


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    if backend != "cuda":
        raise ValueError("sleep_wake needs a GPU (--backend cuda)")
    sizes = [8 * GiB] if quick else [16 * GiB, 64 * GiB]
    results = {}
    for size in sizes:
        r = run_worker("bench.sleep_wake", "vmmalloc", {"size": size, "repeats": 3 if quick else 5}, timeout=1800)
        s = r["seconds"]
        r["ratios"] = {"pause_backup_vs_pinned_d2h": s["pause_backup"] / s["pinned_d2h"],
                       "resume_backup_vs_pinned_h2d": s["resume_backup"] / s["pinned_h2d"],
                       "pause_backup_vs_offload_out": s["pause_backup"] / s["offload_out"],
                       "resume_backup_vs_offload_in": s["resume_backup"] / s["offload_in"]}
        results[f"{size // GiB}GiB"] = r
    met = {"backup_within_2x_pinned": all(max(r["ratios"]["pause_backup_vs_pinned_d2h"],
                                              r["ratios"]["resume_backup_vs_pinned_h2d"]) <= 2 for r in results.values()),
           "intact": all(r["intact"] for r in results.values())}
    return {"benchmark": "sleep_wake", "sizes": results, "targets": {"backup_vs_pinned_max": 2.0}, "met": met}


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, r in result["sizes"].items():
        s = r["seconds"]
        rows.append((f"{name}: pause+resume with backup", f"{s['pause_backup']:.2f} + {s['resume_backup']:.2f} s",
                     f"pinned copies {s['pinned_d2h']:.2f} + {s['pinned_h2d']:.2f} s"))
        rows.append((f"{name}: pause+resume, no backup", f"{s['pause_discard']:.3f} + {s['resume_discard']:.3f} s", ""))
        rows.append((f"{name}: .cpu()/.cuda() offload", f"{s['offload_out']:.2f} + {s['offload_in']:.2f} s", ""))
    return rows


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(measure)
