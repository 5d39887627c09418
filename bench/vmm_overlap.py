"""Do CUDA virtual-memory calls stall GPU work already queued? (bench/NOTES.md, "Several GPUs")

docs/FACTS.md gives what cuMemMap, cuMemSetAccess and cuMemUnmap cost the calling thread on an
idle process. A training loop calls them (stitches, repairs) while the GPU is still running
work queued ahead, as FSDP2 always does. If the driver serializes them with that work, a
stitch costs the GPU time too, not only host time that a queue hides. This measures it:

- gpu: K matrix products queued, then a synchronize (wall time);
- vmm: M cycles of "map N handles into a reserved range, grant access, unmap", GPU idle;
- both: the same K products with one cycle after every K/M launches.

If the calls never touch the GPU's queue, both ~= max(gpu, vmm + launch time); a stall shows as
both - max(...) > 0. (Launch time includes the host's waits on a full launch queue, so with
many products the GPU time is the bound.) Per-cycle latency is also reported for an idle and
a busy GPU.

With --threads, the question is whether such calls, made on another thread, slow the thread
that launches kernels (a driver lock held across them would): the main thread launches small
kernels, host bound, while a second thread (a) sleeps in short naps, releasing the GIL as a
driver call does, or (b) runs map/grant/unmap cycles. (b) / (a) above 1 is that contention.

With --enqueue-checks, the question is whether a range may be handed out mapped but not yet
granted (the grant finished later by another thread, the stream held back on the GPU until
then): each call below is made on a stream blocked on a host flag, against such a range, and
its return code printed. (Measured: copies and memsets of every kind are rejected at enqueue,
"invalid argument", so a grant must be done before the pointer is returned.)

    python3 -m bench.vmm_overlap [--handles 32] [--cycles 20] [--products 2000] [--repeats 5]
    python3 -m bench.vmm_overlap --threads [--launches 20000]
    python3 -m bench.vmm_overlap --enqueue-checks
    python3 -m bench.vmm_overlap --handle-sizes   # what each call costs per handle size

Needs a GPU and cuda-python's driver bindings (cuda.bindings); prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def _check(result):
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return result[1] if len(result) == 2 else result[1:]


class VmmCycle:
    """N physical handles of the recommended granularity (2 MiB on our GPUs) and one reserved
    range to map them into, again and again."""

    def __init__(self, device: int, handles: int):
        from cuda.bindings import driver as cu

        self.cu = cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self.chunk = int(_check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)))
        self.handles = [_check(cu.cuMemCreate(self.chunk, prop, 0)) for _ in range(handles)]
        self.bytes = self.chunk * handles
        self.base = _check(cu.cuMemAddressReserve(self.bytes, 0, 0, 0))
        self.access = cu.CUmemAccessDesc()
        self.access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.access.location.id = device
        self.access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

    def cycle(self) -> None:
        """A stitch of every handle (map, grant) and its eviction (unmap)."""
        cu = self.cu
        base = int(self.base)
        for i, h in enumerate(self.handles):
            _check(cu.cuMemMap(base + i * self.chunk, self.chunk, 0, h, 0))
        _check(cu.cuMemSetAccess(base, self.bytes, [self.access], 1))
        _check(cu.cuMemUnmap(base, self.bytes))

    def close(self) -> None:
        cu = self.cu
        _check(cu.cuMemAddressFree(self.base, self.bytes))
        for h in self.handles:
            _check(cu.cuMemRelease(h))


def measure(handles: int, cycles: int, products: int, repeats: int, size: int) -> dict:
    import torch

    torch.cuda.init()
    device = torch.cuda.current_device()
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(size, size, device="cuda", dtype=torch.bfloat16)
    vmm = VmmCycle(device, handles)
    every = max(1, products // cycles)

    def gpu_only() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def launches_only() -> float:  # host time to queue the products (blocks on a full queue)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return elapsed

    def vmm_only() -> tuple[float, list[float]]:
        torch.cuda.synchronize()
        lat = []
        start = time.perf_counter()
        for _ in range(cycles):
            t = time.perf_counter()
            vmm.cycle()
            lat.append(time.perf_counter() - t)
        return time.perf_counter() - start, lat

    def both() -> tuple[float, list[float]]:
        torch.cuda.synchronize()
        lat = []
        start = time.perf_counter()
        for i in range(products):
            torch.mm(a, b, out=out)
            if (i + 1) % every == 0 and len(lat) < cycles:
                t = time.perf_counter()
                vmm.cycle()
                lat.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        return time.perf_counter() - start, lat

    gpu_only(), vmm_only(), both()  # warm-up: cuBLAS, driver paths
    rows = {"gpu": [], "launch": [], "vmm": [], "both": []}
    idle_lat, busy_lat = [], []
    for _ in range(repeats):  # interleaved, so drifts hit every figure alike
        rows["gpu"].append(gpu_only())
        rows["launch"].append(launches_only())
        t, lat = vmm_only()
        rows["vmm"].append(t)
        idle_lat += lat
        t, lat = both()
        rows["both"].append(t)
        busy_lat += lat
    vmm.close()
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    bound = max(med["gpu"], med["vmm"] + med["launch"])
    return {
        "benchmark": "vmm_overlap", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "handles_per_cycle": handles, "cycles": cycles, "products": products, "matrix": size,
        "repeats": repeats, "median_ms": {k: round(v, 3) for k, v in med.items()},
        "no_stall_bound_ms": round(bound, 3), "stall_ms": round(med["both"] - bound, 3),
        "stall_ms_per_handle": round((med["both"] - bound) / (cycles * handles), 4),
        "cycle_us_per_handle_idle": round(statistics.median(idle_lat) * 1e6 / handles, 2),
        "cycle_us_per_handle_busy": round(statistics.median(busy_lat) * 1e6 / handles, 2),
    }


def measure_threads(handles: int, launches: int, repeats: int) -> dict:
    import threading

    import torch

    torch.cuda.init()
    device = torch.cuda.current_device()
    x = torch.ones(1024, device="cuda")
    vmm = VmmCycle(device, handles)

    def launch() -> None:
        x.add_(1.0)

    def python_only() -> None:  # tells GIL contention from driver contention
        sum(range(20))

    def run(worker, body=launch) -> tuple[float, int]:
        stop = threading.Event()
        cycles = [0]

        def loop() -> None:
            while not stop.is_set():
                worker()
                cycles[0] += 1

        thread = threading.Thread(target=loop) if worker else None
        torch.cuda.synchronize()
        if thread:
            thread.start()
        start = time.perf_counter()
        for _ in range(launches):
            body()
        elapsed = time.perf_counter() - start
        stop.set()
        if thread:
            thread.join()
        torch.cuda.synchronize()
        return elapsed, cycles[0]

    def nap() -> None:
        time.sleep(0.0005)

    run(None), run(nap), run(vmm.cycle)  # warm-up
    rows: dict[str, list[float]] = {"alone": [], "nap": [], "vmm": [], "py_nap": [], "py_vmm": []}
    vmm_cycles = []
    for _ in range(repeats):
        rows["alone"].append(run(None)[0])
        rows["nap"].append(run(nap)[0])
        t, n = run(vmm.cycle)
        rows["vmm"].append(t)
        vmm_cycles.append(n)
        rows["py_nap"].append(run(nap, python_only)[0])
        rows["py_vmm"].append(run(vmm.cycle, python_only)[0])
    vmm.close()
    med = {k: statistics.median(v) * 1e6 / launches for k, v in rows.items()}
    return {
        "benchmark": "vmm_overlap_threads", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "handles_per_cycle": handles, "launches": launches, "repeats": repeats,
        "launch_us": {k: round(v, 3) for k, v in med.items()},
        "vmm_over_nap": round(med["vmm"] / med["nap"], 3),
        "python_only_vmm_over_nap": round(med["py_vmm"] / med["py_nap"], 3),
        "worker_cycles_per_run": statistics.median(vmm_cycles),
    }


def enqueue_checks() -> dict:
    import ctypes

    import torch
    from cuda.bindings import driver as cu
    from cuda.bindings import runtime as rt

    torch.cuda.init()
    device = torch.cuda.current_device()
    torch.zeros(1, device="cuda")  # the primary context, current on this thread
    handle_cycle = VmmCycle(device, 1)  # for its property and access descriptors
    chunk = handle_cycle.chunk
    flag = _check(cu.cuMemHostAlloc(64, 0x3))  # portable, device-mapped
    flag_device = _check(cu.cuMemHostGetDevicePointer(flag, 0))
    word = ctypes.c_uint64.from_address(int(flag))
    word.value = 0
    other = torch.zeros(chunk // 4, device="cuda")
    host = torch.zeros(chunk // 4).pin_memory()
    stream = torch.cuda.Stream().cuda_stream
    kinds = rt.cudaMemcpyKind
    calls = {
        "cudaMemcpyAsync H2D": lambda p: rt.cudaMemcpyAsync(p, host.data_ptr(), chunk, kinds.cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync D2H": lambda p: rt.cudaMemcpyAsync(host.data_ptr(), p, chunk, kinds.cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync D2D to it":
            lambda p: rt.cudaMemcpyAsync(p, other.data_ptr(), chunk, kinds.cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpyAsync D2D from it":
            lambda p: rt.cudaMemcpyAsync(other.data_ptr(), p, chunk, kinds.cudaMemcpyDeviceToDevice, stream),
        "cudaMemsetAsync": lambda p: rt.cudaMemsetAsync(p, 0, chunk, stream),
        "cudaPointerGetAttributes": lambda p: rt.cudaPointerGetAttributes(p),
    }
    out = {}
    for number, (name, call) in enumerate(calls.items(), start=1):
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        handle = _check(cu.cuMemCreate(chunk, prop, 0))
        base = int(_check(cu.cuMemAddressReserve(chunk, 0, 0, 0)))
        _check(cu.cuMemMap(base, chunk, 0, handle, 0))
        _check(cu.cuStreamWaitValue64(stream, flag_device, number, 0))  # holds the stream
        err = call(base)[0]
        out[name] = "accepted" if int(err) == 0 else f"rejected: {err}"
        _check(cu.cuMemSetAccess(base, chunk, [handle_cycle.access], 1))
        word.value = number  # the grant is done: the stream may run
        torch.cuda.synchronize()
        _check(cu.cuMemUnmap(base, chunk))
        _check(cu.cuMemAddressFree(base, chunk))
        _check(cu.cuMemRelease(handle))
    handle_cycle.close()
    return {"benchmark": "vmm_overlap_enqueue_checks", "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "calls": out}


def handle_sizes(repeats: int) -> dict:
    """cuMemCreate, cuMemMap, cuMemSetAccess and cuMemUnmap of one handle, by its size
    (GPU idle): is a grant charged per handle or per byte?"""
    import torch
    from cuda.bindings import driver as cu

    torch.cuda.init()
    device = torch.cuda.current_device()
    torch.zeros(1, device="cuda")  # the primary context, current on this thread
    access = VmmCycle(device, 1)
    out = {}
    for mib in (2, 8, 32, 128, 512):
        size = mib << 20
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        times: dict[str, list[float]] = {"create": [], "map": [], "set_access": [], "unmap": [], "release": []}
        base = int(_check(cu.cuMemAddressReserve(size, 0, 0, 0)))
        for _ in range(repeats):
            t0 = time.perf_counter()
            handle = _check(cu.cuMemCreate(size, prop, 0))
            t1 = time.perf_counter()
            _check(cu.cuMemMap(base, size, 0, handle, 0))
            t2 = time.perf_counter()
            _check(cu.cuMemSetAccess(base, size, [access.access], 1))
            t3 = time.perf_counter()
            _check(cu.cuMemUnmap(base, size))
            t4 = time.perf_counter()
            _check(cu.cuMemRelease(handle))
            t5 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[key].append(dt)
        _check(cu.cuMemAddressFree(base, size))
        out[f"{mib}MiB"] = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
    access.close()
    return {"benchmark": "vmm_overlap_handle_sizes", "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "repeats": repeats, "median_us_per_call": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.vmm_overlap", description=__doc__.splitlines()[0])
    p.add_argument("--handles", type=int, default=32, help="2 MiB handles mapped per cycle (default 32)")
    p.add_argument("--cycles", type=int, default=20, help="map/grant/unmap cycles per run (default 20)")
    p.add_argument("--products", type=int, default=2000, help="matrix products queued per run (default 2000)")
    p.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", action="store_true", help="measure contention between threads instead")
    p.add_argument("--launches", type=int, default=20000, help="kernels launched per run with --threads")
    p.add_argument("--handle-sizes", action="store_true",
                   help="what create/map/grant/unmap cost per handle size (GPU idle)")
    p.add_argument("--enqueue-checks", action="store_true",
                   help="which calls reject a range mapped but not yet granted")
    args = p.parse_args(argv)
    if args.handle_sizes:
        print(json.dumps(handle_sizes(args.repeats * 4)))
    elif args.enqueue_checks:
        print(json.dumps(enqueue_checks()))
    elif args.threads:
        print(json.dumps(measure_threads(args.handles, args.launches, args.repeats)))
    else:
        print(json.dumps(measure(args.handles, args.cycles, args.products, args.repeats, args.size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
