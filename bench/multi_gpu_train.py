"""Data-parallel training of a Llama (random weights) on several GPUs, one process per GPU:
the multi-GPU example, the worker of the multi-GPU tests and of bench.multi_gpu.

    VMMALLOC=1 torchrun --nproc-per-node 2 -m bench.multi_gpu_train --mode fsdp2
    torchrun --nproc-per-node 2 -m bench.multi_gpu_train --mode ddp --enable-in-script

Each rank trains on its own GPU (LOCAL_RANK) on its own data; the batch and sequence length
vary from step to step, the same on every rank. It first checks NCCL collectives on freshly
allocated tensors, then trains, and rank 0 prints one line `RESULT {json}` with every rank's
losses, memory figures and step times under "ranks", and "world_size".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from typing import Any

BATCHES = [1, 2, 3, 4, 6, 8]
SEQS = [256, 384, 512, 768, 1024, 1536, 2048]
MiB = 1 << 20
# Counters whose per-step deltas --vmm-counters records: where the stitches come from.
VMM_COUNTERS = ("vmm.stitches", "vmm.stitched_bytes", "vmm.host_time_ns", "vmm.fresh_mappings", "vmm.mapping_hits",
                "vmm.misses_no_candidate", "vmm.misses_candidates_busy", "vmm.cross_stream_waits",
                "vmm.repairs", "vmm.repaired_chunks", "vmm.prefix_reuses", "num_device_alloc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m bench.multi_gpu_train",
                                description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["ddp", "fsdp2"], default="fsdp2",
                   help="DistributedDataParallel, or FSDP2 (fully_shard per decoder layer)")
    p.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256; 2048 is ~1B with 16 layers)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the schedule")
    p.add_argument("--max-seq", type=int, default=2048, help="longest sequence of the schedule")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels and eager attention, for comparing runs bit for bit")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu runs the same script with gloo on CPU processes (a smoke test without GPUs)")
    p.add_argument("--vmm-counters", action="store_true",
                   help="record per-step deltas of vmmalloc's stitch and miss counters (diagnosis)")
    p.add_argument("--pin-cpus", action="store_true",
                   help="pin each rank to its own equal share of the allowed CPUs (steadier step times)")
    p.add_argument("--enable-in-script", action="store_true",
                   help="call vmmalloc.enable_vmm_allocator() here instead of relying on VMMALLOC=1")
    args = p.parse_args(argv)
    for name in ("steps", "layers", "hidden", "max_batch", "max_seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.device == "cpu" and args.enable_in_script:
        p.error("--enable-in-script needs --device cuda: vmmalloc serves CUDA memory")
    if args.hidden % 64:
        p.error(f"--hidden must be a multiple of 64 (heads of 64), got {args.hidden}")
    return args


def schedule(steps: int, max_batch: int, max_seq: int, seed: int = 0) -> list[tuple[int, int]]:
    """(batch, sequence length) per step; the same on every rank."""
    rng = random.Random(seed)
    batches = [b for b in BATCHES if b <= max_batch] or [max_batch]
    seqs = [s for s in SEQS if s <= max_seq] or [max_seq]
    return [(rng.choice(batches), rng.choice(seqs)) for _ in range(steps)]


def check_collectives(torch, dist, rank: int, world: int, device: str) -> bool:
    """all_reduce, all_gather and reduce_scatter on tensors this process just allocated."""
    n = 3 * MiB // 4 + 17  # not a multiple of anything convenient
    x = torch.full((n,), float(rank + 1), device=device)
    dist.all_reduce(x)
    ok = bool((x == world * (world + 1) / 2).all())
    part = torch.arange(n, device=device, dtype=torch.float32) + rank * n
    gathered = torch.empty(world * n, device=device)
    dist.all_gather_into_tensor(gathered, part)
    ok &= bool(torch.equal(gathered, torch.arange(world * n, device=device, dtype=torch.float32)))
    full = torch.ones(world * n, device=device) * (rank + 1)
    mine = torch.empty(n, device=device)
    dist.reduce_scatter_tensor(mine, full)
    ok &= bool((mine == world * (world + 1) / 2).all())
    return ok


def build(torch, args: argparse.Namespace, local_rank: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = args.hidden // 64
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), max_position_embeddings=max(4096, args.max_seq),
                         attn_implementation="eager" if args.deterministic else "sdpa", use_cache=False)
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[local_rank] if device == "cuda" else None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # An explicit mesh: fully_shard's default one is on the accelerator whenever one is
        # visible, and a CPU run with more ranks than GPUs would then ask for a missing GPU.
        mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def owned_by_vmmalloc(model, local_rank: int) -> bool | None:
    """Whether the rank's parameters live in vmmalloc memory of its own device."""
    import vmmalloc

    if not vmmalloc.is_enabled():
        return None
    allocator = vmmalloc._C.device_allocator(local_rank)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel() == 0:
            continue
        storage = local.untyped_storage()
        # Storage pointers are where an allocation starts (a parameter may be a view into one).
        if local.device.index != local_rank or not allocator.owns(storage.data_ptr()):
            return False
    return True


def train(args: argparse.Namespace) -> dict[str, Any]:
    if args.enable_in_script:
        import vmmalloc

        vmmalloc.enable_vmm_allocator()
    import torch
    import torch.distributed as dist

    import vmmalloc

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cpus = None
    if args.pin_cpus:  # before the process group, so NCCL's and gloo's threads inherit it
        from bench.workers import pin_process, rank_cpus

        cpus = rank_cpus(os.sched_getaffinity(0), local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        pin_process(cpus)
    device = args.device
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if cuda:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    collectives_ok = check_collectives(torch, dist, rank, world, device)

    model, optimizer = build(torch, args, local_rank, device)
    vocab = 32000
    losses, times, issue_times = [], [], []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    counters: list[dict[str, int]] = []
    count = args.vmm_counters and cuda and vmmalloc.is_enabled()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step, (batch, seq) in enumerate(schedule(args.steps, args.max_batch, args.max_seq)):
        g = torch.Generator(device=device).manual_seed(1000 * step + rank)  # each rank its own data
        ids = torch.randint(0, vocab, (batch, seq), device=device, generator=g)
        sync()
        before = torch.cuda.memory_stats() if count else {}
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        issued = time.perf_counter()  # the host has queued the step; the GPU may still run it
        sync()
        times.append(time.perf_counter() - start)
        issue_times.append(issued - start)
        losses.append(loss.item())
        if count:
            after = torch.cuda.memory_stats()
            counters.append({k: after.get(k, 0) - before.get(k, 0) for k in VMM_COUNTERS} | {"batch": batch, "seq": seq})

    warm = times[3:] if len(times) > 6 else times
    figures = {"rank": rank, "local_rank": local_rank, "collectives_ok": collectives_ok, "losses": losses,
               "step_time_median": statistics.median(warm), "step_times": times, "issue_times": issue_times,
               "vmmalloc_enabled": vmmalloc.is_enabled(), "cpus": sorted(cpus) if cpus else None}
    if cuda:
        figures.update(memory_figures(torch, model, local_rank))
    if count:
        figures["vmm_counters_per_step"] = counters
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, figures)
    # DDP's reducer and FSDP's state hold work on the group; they are torn down while the
    # group is alive. Left to train()'s return, after destroy_process_group, a gloo rank
    # now and then hung in their destructors (1 CPU run in 10-25 under load, CI included).
    del model, optimizer, loss
    gc.collect()
    # Every rank leaves all_gather_object before any tears its group down: without this,
    # gloo aborted a rank at teardown now and then ("terminate called without an active
    # exception", about 1 run in 5 on CPU).
    dist.barrier()
    dist.destroy_process_group()
    return {"world_size": world, "mode": args.mode, "device": device, "steps": args.steps, "ranks": ranks}


def memory_figures(torch, model, local_rank: int) -> dict[str, Any]:
    """This rank's memory figures, through torch's own API (vmmalloc's figures when it is on)."""
    stats = torch.cuda.memory_stats()
    return {
        "device": torch.cuda.current_device(),
        "owned_by_own_device": owned_by_vmmalloc(model, local_rank),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "ratio": torch.cuda.max_memory_reserved() / max(1, torch.cuda.max_memory_allocated()),
        "allocated_now": torch.cuda.memory_allocated(),
        "stats_allocated_now": stats.get("allocated_bytes.all.current"),
        "stitches": stats.get("vmm.stitches"),
        "cross_stream_waits": stats.get("vmm.cross_stream_waits"),
        "repaired_chunks": stats.get("vmm.repaired_chunks"),
        "prefix_reuses": stats.get("vmm.prefix_reuses"),
        "host_time_ns": stats.get("vmm.host_time_ns"),
        "peer_devices": stats.get("vmm.peer_devices"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
