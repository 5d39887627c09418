"""Sleep and wake of tagged memory (vmmalloc.sleep_mode, Note [Sleeping pools]) against the
hardware's copy limit and the offload users write without it.

One vmmalloc process: a tag holds `size` bytes of weights. Measured, each the median of
`repeats`:
- pause(backup=True) and resume(): the contents go to the host and come back (into the
  pool's pinned host buffer, kept between cycles: Note [Sleeping pools]);
- pause(backup=False) and resume(): unmap and map only (what a KV cache pays);
- the copy limit: pinned-host copies of the same bytes through torch (D2H and H2D), in
  slices of at most 16 GiB of pinned memory so that the 64 GiB run fits the host beside
  the pool's own 64 GiB backup;
- the driver's limit for discarding: one cuMemUnmap + cuMemRelease per 2 MiB handle, and
  one cuMemCreate + cuMemMap + cuMemSetAccess per handle to come back, timed on 1 GiB of
  handles through cuda-python and given per GB (what a sleep mode with one 2 MiB handle
  per unmap pays; torch_memory_saver and vLLM's CuMemAllocator map one handle per
  allocation instead);
- the usual offload: t.cpu(), del, empty_cache(), then .cuda() again (new addresses: a
  CUDA graph captured on the old ones would be invalid), at sizes whose pageable copy fits
  the host (16 GiB here).
Targets (issue: sleep and wake): backup pause and resume at >= 80% of the pinned copy
bandwidth; discard faster per GB than the driver's per-handle calls. torch_memory_saver is
not in the comparison: it is built from source against CUDA and nothing can be downloaded
on the GPU machine.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench.report import target_met
from bench.workers import run_worker, worker_main

GiB = 1 << 30
PINNED_SLICE = 16 * GiB  # pinned host memory for the copy limit's measurement
PAGEABLE_MAX = 16 * GiB  # the largest size whose pageable .cpu() copy is measured


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
    pinned_copies(torch, weights, repeats, out)
    driver = driver_per_handle(torch, repeats)
    if size > PAGEABLE_MAX:
        for key in ("offload_out", "offload_in"):
            del out[key]
        return _result(size, out, driver, intact, vmmalloc.is_enabled())
    box: dict[str, Any] = {"t": torch.empty(size, dtype=torch.uint8, device="cuda")}  # the only reference

    def offload_out() -> None:
        box["cpu"] = box.pop("t").cpu()
        torch.cuda.empty_cache()

    def offload_in() -> None:
        box["t"] = box.pop("cpu").cuda()

    for _ in range(repeats):
        out["offload_out"].append(_timed(offload_out, torch))
        out["offload_in"].append(_timed(offload_in, torch))
    return _result(size, out, driver, intact, vmmalloc.is_enabled())


def pinned_copies(torch, weights, repeats: int, out: dict[str, list[float]]) -> None:
    """The copy limit: `weights` to pinned host memory and back through torch, in slices of
    at most PINNED_SLICE bytes."""
    size = weights.numel()
    slice_bytes = min(size, PINNED_SLICE)
    host = torch.empty(slice_bytes, dtype=torch.uint8, pin_memory=True)
    slices = [weights[i:i + slice_bytes] for i in range(0, size, slice_bytes)]

    def d2h() -> None:
        for part in slices:
            host[:part.numel()].copy_(part, non_blocking=True)

    def h2d() -> None:
        for part in slices:
            part.copy_(host[:part.numel()], non_blocking=True)

    for _ in range(repeats):
        out["pinned_d2h"].append(_timed(d2h, torch))
        out["pinned_h2d"].append(_timed(h2d, torch))


def _result(size: int, out: dict[str, list[float]], driver: dict[str, float], intact: bool,
            enabled: bool) -> dict[str, Any]:
    medians = {k: statistics.median(v) for k, v in out.items()}
    gbps = {k: size / v / 1e9 for k, v in medians.items()}
    gbps.update({f"driver_{k}": v for k, v in driver.items()})
    # The first pause with backup pins the tag's host buffer (once per tag): the medians leave
    # it out, so it is given on its own.
    medians["first_pause_backup"] = out["pause_backup"][0]
    return {"seconds": medians, "GB_per_s": gbps, "all_seconds": out, "intact": intact, "vmmalloc_enabled": enabled}


def driver_per_handle(torch, repeats: int, handles: int = 512) -> dict[str, float]:
    """GB/s of giving back and taking again `handles` 2 MiB handles one call per handle
    (median of `repeats`): unmap + release, and create + map + grant."""
    from cuda.bindings import driver as cu

    def check(result):
        if int(result[0]) != 0:
            raise RuntimeError(f"CUDA driver call failed: {result[0]}")
        return result[1] if len(result) == 2 else None

    device = torch.cuda.current_device()
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = device
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    chunk = 2 << 20
    base = int(check(cu.cuMemAddressReserve(chunk * handles, 0, 0, 0)))
    give, take = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            held = []
            for i in range(handles):
                h = check(cu.cuMemCreate(chunk, prop, 0))
                check(cu.cuMemMap(base + i * chunk, chunk, 0, h, 0))
                check(cu.cuMemSetAccess(base + i * chunk, chunk, [access], 1))
                held.append(h)
            take.append(time.perf_counter() - start)
            start = time.perf_counter()
            for i, h in enumerate(held):
                check(cu.cuMemUnmap(base + i * chunk, chunk))
                check(cu.cuMemRelease(h))
            give.append(time.perf_counter() - start)
    finally:
        check(cu.cuMemAddressFree(base, chunk * handles))
    total = chunk * handles / 1e9
    return {"give_back_per_2MiB_handle": total / statistics.median(give),
            "take_again_per_2MiB_handle": total / statistics.median(take)}


def run(backend: str = "cuda", quick: bool = False) -> dict[str, Any]:
    if backend != "cuda":
        raise ValueError("sleep_wake needs a GPU (--backend cuda)")
    sizes = [8 * GiB] if quick else [16 * GiB, 64 * GiB]
    results = {}
    for size in sizes:
        r = run_worker("bench.sleep_wake", "vmmalloc", {"size": size, "repeats": 3}, timeout=1800)
        r["ratios"] = ratios(r)
        results[f"{size // GiB}GiB"] = r
    # One source for the targets: RATIO_ROWS, checked as the report checks them.
    met = {f"{size}: {key}": target_met(f"{r['ratios'][key]:.6f}", target)
           for size, r in results.items() for key, _, target in RATIO_ROWS}
    met["intact"] = all(r["intact"] for r in results.values())
    return {"benchmark": "sleep_wake", "sizes": results, "targets": {key: target for key, _, target in RATIO_ROWS},
            "met": met}


RATIO_ROWS = (
    ("pause_backup_over_pinned_bandwidth", "pause with backup, bandwidth / pinned copy's", ">= 0.80"),
    ("resume_backup_over_pinned_bandwidth", "resume with backup, bandwidth / pinned copy's", ">= 0.80"),
    ("pause_discard_over_driver_per_handle", "pause without backup / a driver call per 2 MiB handle", "> 1"),
    ("resume_discard_over_driver_per_handle", "resume without backup / a driver call per 2 MiB handle", "> 1"),
)


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """Bandwidths against their limits, and the offload people write, where measured."""
    g, s = r["GB_per_s"], r["seconds"]
    out = {"pause_backup_over_pinned_bandwidth": g["pause_backup"] / g["pinned_d2h"],
           "resume_backup_over_pinned_bandwidth": g["resume_backup"] / g["pinned_h2d"],
           "pause_discard_over_driver_per_handle": g["pause_discard"] / g["driver_give_back_per_2MiB_handle"],
           "resume_discard_over_driver_per_handle": g["resume_discard"] / g["driver_take_again_per_2MiB_handle"]}
    if "offload_out" in s:
        out.update(pause_backup_vs_offload_out=s["pause_backup"] / s["offload_out"],
                   resume_backup_vs_offload_in=s["resume_backup"] / s["offload_in"])
    return out


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, r in result["sizes"].items():
        s = r["seconds"]
        if "first_pause_backup" in s:
            rows.append((f"{name}: first pause with backup (pins the host buffer)", f"{s['first_pause_backup']:.2f} s", ""))
        rows.append((f"{name}: pause+resume with backup", f"{s['pause_backup']:.2f} + {s['resume_backup']:.2f} s",
                     f"pinned copies {s['pinned_d2h']:.2f} + {s['pinned_h2d']:.2f} s"))
        g = r["GB_per_s"]
        rows.append((f"{name}: pause+resume, no backup", f"{s['pause_discard']:.3f} + {s['resume_discard']:.3f} s",
                     f"driver, a call per 2 MiB handle: {g['driver_give_back_per_2MiB_handle']:.0f} + "
                     f"{g['driver_take_again_per_2MiB_handle']:.0f} GB/s against {g['pause_discard']:.0f} + "
                     f"{g['resume_discard']:.0f}"))
        if "offload_out" in s:
            rows.append((f"{name}: .cpu()/.cuda() offload", f"{s['offload_out']:.2f} + {s['offload_in']:.2f} s", ""))
        ratios = r.get("ratios", {})
        for key, words, target in RATIO_ROWS:
            if key in ratios:
                rows.append((f"{name}: {words}", f"{ratios[key]:.2f}", target))
    return rows


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(measure)
