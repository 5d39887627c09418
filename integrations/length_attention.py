"""Attention over reserved K/V buffers that reads only the positions each row holds, with the
lengths on the device: the attention a decode step captured in a CUDA graph needs, where the
key length changes every step but the buffers and the graph do not (the plan: bench/NOTES.md,
"KV decode in CUDA graphs").

Note [Length block masks]
A VirtualKVCache reserves ``max_length`` positions per row and maps pages only where tokens
are (Note [Pages mapped ahead, staggered by layer]); reading past them faults. A FlexAttention
BlockMask lists, per row, the key blocks a kernel visits: here the first ceil(length / block)
of them, computed from the lengths by device arithmetic alone (no .item(), no host sync) into
tensors the mask keeps, so one mask serves every step: LengthMask.update rewrites them in place.
The fused kernel never loads an unlisted block, and the mask_mod hides the positions past the
length inside the last listed one. So a row of length L reads positions up to L rounded up
to `block`: whoever maps the buffers maps that far (the graph decoder does, whether or not a
page holds a whole number of blocks), and fills what it maps past the tokens with zeros: the
kernel multiplies each masked position's value by its probability, 0, and a chunk used
before may hold NaN bit patterns there (0 x NaN is NaN; bf16 on a GPU showed it).

Padding (a batch of prompts of different lengths, padded on the left) is a second device
tensor, ``key_mask [batch, capacity]``: positions it marks False are never attended to. The
graph decoder (integrations/graph_decode.py) rewrites it from generate()'s attention mask
before each step.

Without torch.compile (CPU tests), FlexAttention runs an unfused reference that reads every
position, so there the buffers must be mapped in full.

Note [Row spans for FlashAttention]
Where the K/V are fp16 or bf16, the graph decoder reads them with FlashAttention-2's varlen
entry instead (bench/NOTES.md, "KV decode in CUDA graphs", says why: measured). A reservation
``[rows, capacity, heads, dim]`` is already that entry's packed layout (a position's stride
may exceed heads x dim: Note [Keys and values share pages]), read as one sequence per row:
row b's keys start at ``b * row_positions + start[b]`` (``cu_seqlens_k``; row_positions is the
capacity, or more where rows are padded to whole pages) and it uses
``length[b] - start[b]`` of them (``seqused_k``), both device tensors RowSpans rewrites in
place, so one graph serves every step. The kernel never loads a key past a row's span (its
last block's loads are predicated on the length), so only the tokens held need be mapped. A
span is contiguous: it takes left padding (``start`` = the padding's width) but no holes; a
mask with holes inside a row is the LengthMask's.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


class LengthMask:
    """A FlexAttention block mask over `capacity` key positions admitting, in row b, only
    positions ``< lengths[b]`` (Note [Length block masks]). Its tensors keep their addresses:
    update() rewrites them in place with device operations alone, so a CUDA graph that read
    the mask reads the new lengths on its next replay.

    Args:
        lengths: ``[batch]`` integer tensor of positions held per row, on the device the
            attention runs on (copied: the mask owns its lengths).
        capacity: key positions the buffers reserve (a multiple of `block`).
        heads: 1 (every head alike) or the query heads.
        query_length: query positions per call (1 while decoding); each sees the same keys.
        block: key positions per block (a multiple of 16); a row of length L reads up to L
            rounded up to it, so the buffers must be mapped that far.
        key_mask: ``[batch, capacity]`` bool, False at positions never to attend to (padding);
            None: every position below the length. Kept, not copied: its owner rewrites it.

    Raises:
        ValueError: `capacity` is not a positive multiple of `block`, or `lengths` is not 1-D.
    """

    def __init__(self, lengths: torch.Tensor, capacity: int, heads: int = 1, query_length: int = 1,
                 block: int = 128, key_mask: torch.Tensor | None = None) -> None:
        if capacity <= 0 or capacity % block:
            raise ValueError(f"LengthMask: capacity {capacity} must be a positive multiple of block {block}")
        if lengths.dim() != 1:
            raise ValueError(f"LengthMask: lengths must be 1-D [batch], got shape {tuple(lengths.shape)}")
        batch, blocks = lengths.shape[0], capacity // block
        if key_mask is not None and (tuple(key_mask.shape) != (batch, capacity) or key_mask.dtype != torch.bool):
            raise ValueError(f"LengthMask: key_mask must be a bool tensor of shape {(batch, capacity)}, "
                             f"got {key_mask.dtype} {tuple(key_mask.shape)}")
        self.block, self.blocks = block, blocks
        self.lengths = lengths.to(torch.int32).clone()
        self._visited = torch.empty(batch, heads, 1, dtype=torch.int32, device=lengths.device)
        indices = torch.arange(blocks, dtype=torch.int32, device=lengths.device).view(1, 1, 1, blocks)
        held = self.lengths
        self.key_mask = key_mask

        def within_length(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return kv < held[b]

        def within_length_and_key_mask(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor,
                                       kv: torch.Tensor) -> torch.Tensor:
            assert key_mask is not None
            return (kv < held[b]) & key_mask[b, kv]

        self.update(lengths)
        # A query block of 128 (one block for a decode step's query): the fused decoding
        # kernel needs query blocks that are multiples of its own (16).
        self.block_mask = BlockMask.from_kv_blocks(
            self._visited, indices.expand(batch, heads, 1, blocks).contiguous(),
            BLOCK_SIZE=(128, block), mask_mod=within_length if key_mask is None else within_length_and_key_mask,
            seq_lengths=(query_length, capacity), compute_q_blocks=False)
        # from_kv_blocks keeps the tensors it is given: the mask reads _visited and lengths.
        assert self.block_mask.kv_num_blocks.data_ptr() == self._visited.data_ptr()

    def update(self, lengths: torch.Tensor) -> None:
        """The rows hold `lengths` positions now: rewrites the mask's tensors in place."""
        self.lengths.copy_(lengths)
        visited = torch.div(self.lengths + (self.block - 1), self.block, rounding_mode="floor").clamp_(1, self.blocks)
        self._visited.copy_(visited.view(-1, 1, 1).expand_as(self._visited))


def attend_within_lengths(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: LengthMask,
                          scale: float | None = None) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over ``keys``/``values [B, Hkv, capacity, D]`` (Hq a
    multiple of Hkv: grouped-query attention without copies), visiting only the blocks `mask`
    lists; returns ``[B, Hq, q, D]``."""
    if query.shape[1] % keys.shape[1]:
        raise ValueError(f"attend_within_lengths: {query.shape[1]} query heads do not group over {keys.shape[1]} KV heads")
    out = flex_attention(query, keys, values, block_mask=mask.block_mask, scale=scale,
                         enable_gqa=query.shape[1] != keys.shape[1])
    assert isinstance(out, torch.Tensor)  # no auxiliary outputs were asked for
    return out


class RowSpans:
    """Where each row's keys lie in a reservation of `capacity` positions per row, as
    FlashAttention's varlen entry reads them (Note [Row spans for FlashAttention]): device
    tensors a CUDA graph reads, rewritten in place by update().

    Args:
        batch: rows attended over.
        capacity: key positions reserved per row.
        device: where the attention runs.
        max_length: the most positions a row's span may reach (default: `capacity`); the
            kernel sizes its key splits by it (Note [Key splits sized by a bucket] in
            integrations/graph_decode.py), so a span past it would go unread.
        row_positions: positions from one row's start to the next's (default: `capacity`;
            more where rows are padded to whole pages: row_positions()).
    """

    def __init__(self, batch: int, capacity: int, device: torch.device, max_length: int | None = None,
                 row_positions: int | None = None) -> None:
        self.batch, self.capacity = batch, capacity
        self.max_length = capacity if max_length is None else max_length
        self.row_positions = capacity if row_positions is None else row_positions
        if not 0 < self.max_length <= capacity:
            raise ValueError(f"RowSpans: max_length {self.max_length} must be in (0, capacity {capacity}]")
        if self.row_positions < capacity:
            raise ValueError(f"RowSpans: rows {self.row_positions} positions apart cannot hold {capacity} each")
        if not RowSpans.fit(batch, self.row_positions):
            raise ValueError(f"RowSpans: {batch} rows of {self.row_positions} positions overflow FlashAttention's "
                             "int32 sequence starts; attend through a LengthMask instead")
        rows = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.query_starts = rows.clone()  # one query position per row
        self._row_starts = rows * self.row_positions
        self.key_starts = self._row_starts.clone()  # [batch + 1]; the last entry only closes the list
        self.used = torch.ones(batch, dtype=torch.int32, device=device)

    @staticmethod
    def fit(batch: int, capacity: int) -> bool:
        """Whether `batch` rows of `capacity` positions have row starts FlashAttention's int32
        sequence offsets can hold."""
        return batch * capacity < 1 << 31

    def update(self, lengths: torch.Tensor, starts: torch.Tensor) -> None:
        """Row b holds positions ``starts[b] <= p < lengths[b]`` now (device operations only;
        lengths at most max_length, which the caller sizes the spans for)."""
        self.key_starts[:-1].copy_(self._row_starts[:-1] + starts)
        self.used.copy_(lengths - starts)


def left_padding(mask: torch.Tensor) -> torch.Tensor:
    """The width of each row's left padding in a ``[batch, length]`` attention mask (nonzero
    = attend): the position of its first attended key, int32, by device operations alone."""
    return mask.to(torch.bool).to(torch.int32).argmax(dim=1).to(torch.int32)


def is_left_padding_only(mask: torch.Tensor) -> bool:
    """Whether every row of `mask` attends to every position from its first attended one on
    (one host sync). A row attending to nothing is not: its span would be empty."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return bool(torch.equal(mask.to(torch.bool), positions.unsqueeze(0) >= left_padding(mask).unsqueeze(1)))


def row_positions(t: torch.Tensor) -> int | None:
    """Positions from one row's start to the next's in ``t [batch, capacity, heads, dim]``, where
    t reads as FlashAttention's varlen entry takes its keys: one run of positions with each
    head's dim contiguous (a position may be further apart than heads x dim: Note [Keys and
    values share pages]; rows may be padded to whole pages). None where it cannot."""
    if t.stride(-1) != 1 or t.stride(1) <= 0 or t.stride(2) < t.shape[3] or t.stride(0) % t.stride(1):
        return None
    return t.stride(0) // t.stride(1)


def _positions(t: torch.Tensor, spans: RowSpans) -> torch.Tensor:
    """``t [batch, capacity, heads, dim]`` as the run of positions ``[(batch - 1) x
    row_positions + capacity, heads, dim]`` that spans index into."""
    batch, capacity, heads, dim = t.shape
    apart = row_positions(t)
    if apart != spans.row_positions and not (batch == 1 and apart is not None):
        raise ValueError(f"attend_row_spans: buffers of shape {tuple(t.shape)} and strides {t.stride()} are not "
                         f"the cache's layout [batch, capacity, heads, dim] with each head's dim contiguous and "
                         f"rows {spans.row_positions} positions apart, as the spans were made for")
    return t.as_strided(((batch - 1) * spans.row_positions + capacity, heads, dim), (t.stride(1), t.stride(2), 1))


def attend_row_spans(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, spans: RowSpans,
                     scale: float | None = None) -> torch.Tensor:
    """Decode attention of ``query [B, Hq, 1, D]`` over reservations ``keys``/``values
    [B, capacity, Hkv, D]`` (the cache's layout: row_positions) within `spans`; returns
    ``[B, 1, Hq, D]``, the layout transformers' attention functions return. On a GPU it is
    FlashAttention-2's varlen kernel; elsewhere a reference that reads each span alone."""
    batch, q_heads, _, dim = query.shape
    kv_heads = keys.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"attend_row_spans: {q_heads} query heads do not group over {kv_heads} KV heads")
    rows_q = query.transpose(1, 2).reshape(batch, q_heads, dim)
    rows_k, rows_v = _positions(keys, spans), _positions(values, spans)
    if query.device.type == "cuda":
        out = torch.ops.aten._flash_attention_forward(
            rows_q, rows_k, rows_v, spans.query_starts, spans.key_starts, 1, spans.max_length, 0.0, False, False,
            scale=scale, seqused_k=spans.used)[0]
        return out.view(batch, 1, q_heads, dim)
    import torch.nn.functional as F

    outs, spans_used = [], spans.used.tolist()
    if max(spans_used) > spans.max_length:  # the kernel would leave the keys past it unread
        raise ValueError(f"attend_row_spans: a span of {max(spans_used)} keys exceeds the spans' "
                         f"max_length {spans.max_length}")
    for b, (start, used) in enumerate(zip(spans.key_starts[:-1].tolist(), spans_used)):
        k = rows_k[start:start + used].transpose(0, 1).unsqueeze(0)
        v = rows_v[start:start + used].transpose(0, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(query[b:b + 1], k, v, scale=scale,
                                                   enable_gqa=q_heads != kv_heads))
    return torch.cat(outs).transpose(1, 2)
