"""One decode step's attention over a VirtualKVCache reservation, the kernels the graph
decoder could run, timed alone at bench/graph_decode.py's point (Llama-3-8B attention: 32
query heads over 8 KV heads of 128, bf16; batch 8, 16K positions held of a 17K reservation),
against the HBM bound of reading every row's K and V once. GPU only:

    python -m bench.decode_attention [--context 16384] [--batch 8] [--capacity N] [--repeats 7] [--out FILE]

(--capacity: positions reserved per row, by default the context plus 1024 rounded to 128;
the patch reserves a power of two, 32768 for a 16K prompt.)

- flex_lengths: compiled FlexAttention over the reservation under a LengthMask, what
  graph_attention runs today (Note [Length block masks]);
- flash_varlen: torch's FlashAttention-2 varlen entry (aten._flash_attention_forward) over
  the reservation's own layout, [rows, capacity, heads, dim] read as one packed sequence per
  row starting at ``row * capacity``, each row's length in a device tensor (seqused_k), its
  key splits sized by the context's bucket (Note [Key splits sized by a bucket]), as the
  graph decoder records it;
- flash_varlen_told_capacity: the same, its splits sized by the whole reservation;
- flash_exact: SDPA's flash backend over tensors holding exactly the keys held, the
  attainable rate for a contiguous read (no reservation, one length for every row);
- sdpa_whole_reservation: SDPA's flash backend over the whole reservation, what attending
  over max_length costs (StaticCache's way; it reads unheld positions, so mapped in full here).

Every variant runs 32 calls (one per layer of the model) inside one CUDA graph, replayed;
times are medians of `repeats` replays. Prints one JSON line and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.kv_cache import COPY_BANDWIDTH as HBM_BYTES_PER_S  # the bound graph_decode uses (docs/FACTS.md)


def _graph_time(torch: Any, step: Callable[[], Any], layers: int, repeats: int) -> float:
    """Seconds per call of `step`: `layers` calls in one graph, median over replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            step()
    times = []
    for _ in range(repeats + 1):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / layers)
    return statistics.median(times[1:])


def measure(context: int, batch: int, repeats: int, capacity: int | None = None, layers: int = 32) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vmmalloc.integrations.graph_decode import _flex, key_bucket
    from vmmalloc.integrations.length_attention import LengthMask, RowSpans, attend_row_spans

    heads, kv_heads, dim, dtype, device = 32, 8, 128, torch.bfloat16, torch.device("cuda")
    capacity = capacity or -(-(context + 1024) // 128) * 128
    torch.manual_seed(0)
    k_buf = torch.randn(batch, capacity, kv_heads, dim, dtype=dtype, device=device)
    v_buf = torch.randn_like(k_buf)
    query = torch.randn(batch, heads, 1, dim, dtype=dtype, device=device)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    held_bytes = 2 * batch * context * kv_heads * dim * k_buf.element_size()
    out: dict[str, Any] = {"context": context, "batch": batch, "capacity": capacity, "kv_bytes_read": held_bytes,
                           "seconds": {}, "errors": {}}

    # Reference: SDPA (math) over exactly the held keys.
    keys, values = k_buf[:, :context].transpose(1, 2), v_buf[:, :context].transpose(1, 2)
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(query.float(), keys.float(), values.float(), enable_gqa=True)

    mask = LengthMask(lengths, capacity)
    flex = _flex("cuda")

    def flex_lengths() -> torch.Tensor:
        return flex(query, k_buf.transpose(1, 2), v_buf.transpose(1, 2), mask.block_mask, None, True)

    starts = torch.zeros(batch, dtype=torch.int32, device=device)
    bucketed = RowSpans(batch, capacity, device, max_length=key_bucket(context, capacity))
    whole = RowSpans(batch, capacity, device)
    for spans in (bucketed, whole):
        spans.update(lengths, starts)

    def flash_varlen() -> torch.Tensor:
        return attend_row_spans(query, k_buf, v_buf, bucketed).transpose(1, 2)

    def flash_varlen_told_capacity() -> torch.Tensor:
        return attend_row_spans(query, k_buf, v_buf, whole).transpose(1, 2)

    keys_exact = keys.contiguous()
    values_exact = values.contiguous()

    def flash_exact() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(query, keys_exact, values_exact, enable_gqa=True)

    whole_k, whole_v = k_buf.transpose(1, 2), v_buf.transpose(1, 2)

    def sdpa_whole_reservation() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(query, whole_k, whole_v, enable_gqa=True)

    for name, step in (("flex_lengths", flex_lengths), ("flash_varlen", flash_varlen),
                       ("flash_varlen_told_capacity", flash_varlen_told_capacity), ("flash_exact", flash_exact),
                       ("sdpa_whole_reservation", sdpa_whole_reservation)):
        try:
            result = step().float()
            if name != "sdpa_whole_reservation":  # it attends over unheld positions too
                error = (result - reference).abs().max().item()
                out.setdefault("max_abs_error", {})[name] = error
            out["seconds"][name] = _graph_time(torch, step, layers, repeats)
        except Exception as e:  # noqa: BLE001 (one variant failing must not hide the others)
            out["errors"][name] = f"{type(e).__name__}: {e}"[:400]
    out["fraction_of_hbm_bound"] = {name: held_bytes / HBM_BYTES_PER_S / s for name, s in out["seconds"].items()}
    out["GB_per_s"] = {name: held_bytes / s / 1e9 for name, s in out["seconds"].items()}
    from bench.common import environment

    out["environment"] = environment()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.context, args.batch, args.repeats, args.capacity)
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
