"""A short demonstration of stitching: `python -m vmmalloc.demo [--backend host|cuda]`.

A workload that defeats a non-stitching caching allocator (many 20 MiB blocks, every other
one freed, then one block as large as all the holes) runs under a memory cap twice: with
stitching and without. On a machine without a GPU it runs on the host backend, where CPU
memory (a memfd) plays the device with the same virtual-memory semantics.
"""
from __future__ import annotations

import argparse
import sys

import vmmalloc

MiB = 1 << 20


def run_workload(backend_name: str, stitching: bool, blocks: int = 8, block_mib: int = 20) -> dict[str, int]:
    cap = blocks * block_mib * MiB
    backend = vmmalloc.make_backend(backend_name, capacity=cap + 64 * MiB)
    alloc = vmmalloc.Allocator(backend, f"memory_cap:{cap},stitching:{str(stitching).lower()}")
    held = [alloc.allocate(block_mib * MiB) for _ in range(blocks)]
    for ptr in held[::2]:
        alloc.deallocate(ptr)
    before = alloc.stats()
    big = alloc.allocate(blocks // 2 * block_mib * MiB)
    backend.write(big, b"stitched")
    assert backend.read(big, 8) == b"stitched"
    after = alloc.stats()
    for ptr in [big, *held[1::2]]:
        alloc.deallocate(ptr)
    alloc.empty_cache()
    return {
        "reserved_mib": after["reserved_bytes.all.peak"] // MiB,
        "new_chunks": after["num_device_alloc"] - before["num_device_alloc"],
        "released_chunks": after["num_device_free"] - before["num_device_free"],
        "stitches": after["vmm.stitches"],
        "retries": after["num_alloc_retries"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmmalloc.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    args = parser.parse_args(argv)
    backend = args.backend
    if backend == "auto":
        backend = "cuda" if vmmalloc.cuda_available() else "host"
    if backend == "host":
        print("No GPU here: running on the host backend (CPU memory with CUDA VMM semantics).")
        if not vmmalloc.cuda_available():
            print(f"  ({vmmalloc.cuda_unavailable_reason()})")
    print("Workload: 8 x 20 MiB blocks under a 160 MiB cap, every other one freed, then one 80 MiB block.\n")
    rows = {"stitching (vmmalloc)": run_workload(backend, True),
            "no stitching": run_workload(backend, False)}
    print(f"{'':22} {'peak reserved':>14} {'new chunks':>11} {'released':>9} {'stitches':>9} {'retries':>8}")
    for name, r in rows.items():
        print(f"{name:22} {r['reserved_mib']:>10} MiB {r['new_chunks']:>11} {r['released_chunks']:>9} "
              f"{r['stitches']:>9} {r['retries']:>8}")
    print("\nWith stitching the 80 MiB block is built from the four 20 MiB holes: no new physical "
          "memory, no release.\nWithout it the holes must be given back and 80 MiB created anew.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
