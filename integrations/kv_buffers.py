"""The K/V reservation of one cache layer (VirtualKVLayer's buffers).

Note [Keys and values share pages]
A page is the 2 MiB granule of CUDA virtual memory, and each run of pages a row grows ends in
a partly empty page. With K and V in reservations of their own, a row of a layer grows two
runs: on the Llama-3-8B shape (8 KV heads of 128, bf16) a page holds 1024 positions of one
row's K, so 64 tokens into a page leave 960 positions mapped for nothing, twice: KV mapped is
1.058x the KV held at 16K tokens whatever the lead. Laid out ``[rows, capacity, 2, heads,
dim]``, a position's K and V are adjacent, a page holds 512 positions of both, and a row grows
one run: the empty tail is half as long (1.027x there). The K and V views keep their shapes
``[rows, capacity, heads, dim]`` with a position stride of 2 x heads x dim, and the last
dimension contiguous: SDPA, FlexAttention and FlashAttention's varlen entry (Note [Row spans
for FlashAttention]) read them as they are. Layers whose K and V differ in heads or head size
keep two reservations.
"""
from __future__ import annotations

import math

import torch

from vmmalloc.virtual_tensor import CHUNK_SIZE, VirtualTensor


class KVBuffers:
    """One layer's K and V: ``keys [rows, capacity, *key_inner]`` and ``values [rows,
    capacity, *value_inner]`` over one virtual tensor (Note [Keys and values share pages]),
    or two where their inner shapes differ. Every commit goes to all of its tensors alike."""

    def __init__(self, rows: int, capacity: int, key_inner: tuple[int, ...], value_inner: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device, value_dtype: torch.dtype | None = None) -> None:
        self.dtype, self.device = dtype, device
        self.value_dtype = dtype if value_dtype is None else value_dtype
        self.key_shape = (rows, capacity, *key_inner)
        self.value_shape = (rows, capacity, *value_inner)
        if tuple(key_inner) == tuple(value_inner) and self.value_dtype == dtype:
            joint = VirtualTensor((rows, capacity, 2, *key_inner), dtype, device)
            self.tensors: tuple[VirtualTensor, ...] = (joint,)
            self._keys: torch.Tensor | None = joint.tensor[:, :, 0]
            self._values: torch.Tensor | None = joint.tensor[:, :, 1]
        else:
            k = VirtualTensor(self.key_shape, dtype, device)
            v = VirtualTensor(self.value_shape, self.value_dtype, device)
            self.tensors = (k, v)
            self._keys, self._values = k.tensor, v.tensor

    @staticmethod
    def capacity_for(capacity: int, key_inner: tuple[int, ...], value_inner: tuple[int, ...], dtype: torch.dtype,
                     value_dtype: torch.dtype | None = None) -> int:
        """The least capacity from `capacity` up, a multiple of 128, at which every row of a page
        or more fills whole pages: its rows then lie exactly `capacity` positions apart, the run
        of positions FlashAttention's varlen entry reads (Note [Row spans for FlashAttention]),
        whatever a position's size. Only address space is added: pages follow the tokens."""
        value_dtype = dtype if value_dtype is None else value_dtype
        sizes = [math.prod(key_inner) * dtype.itemsize, math.prod(value_inner) * value_dtype.itemsize]
        if tuple(key_inner) == tuple(value_inner) and value_dtype == dtype:
            sizes = [sum(sizes)]  # one tensor, K beside V
        step = 128
        while True:
            capacity = -(-capacity // step) * step
            needed = step
            for size in sizes:
                if capacity * size >= CHUNK_SIZE:
                    needed = math.lcm(needed, CHUNK_SIZE // math.gcd(CHUNK_SIZE, size))
            if needed == step:
                return capacity
            step = needed

    def with_rows(self, rows: int) -> KVBuffers:
        """New, empty buffers like these for `rows` rows."""
        return KVBuffers(rows, self.key_shape[1], self.key_shape[2:], self.value_shape[2:], self.dtype, self.device,
                         self.value_dtype)

    def _check(self) -> None:
        for vt in self.tensors:
            vt.tensor  # noqa: B018  (raises, naming why, once freed or asleep)

    @property
    def keys(self) -> torch.Tensor:
        """The whole reservation's keys, ``[rows, capacity, heads, dim]``."""
        self._check()
        assert self._keys is not None
        return self._keys

    @property
    def values(self) -> torch.Tensor:
        """The whole reservation's values, ``[rows, capacity, heads, dim]``."""
        self._check()
        assert self._values is not None
        return self._values

    # The span committed to every tensor: each commit goes to all, but one that failed
    # part-way (out of memory on V after K) leaves them apart, and then the span all of them
    # hold is the narrowest, so that the next commit is made again.
    @property
    def rows(self) -> int:
        return min(vt.rows for vt in self.tensors)

    @property
    def start(self) -> int:
        return max(vt.start for vt in self.tensors)

    @property
    def stop(self) -> int:
        return min(vt.stop for vt in self.tensors)

    @property
    def commits(self) -> int:
        """Commits made to the tensors (sleep and wake included): what a commit mapped holds
        whatever the chunks held before, until written."""
        return sum(vt.commits for vt in self.tensors)

    @property
    def spans(self) -> tuple[tuple[int, int, int], ...]:
        """Each tensor's (rows, start, stop)."""
        return tuple((vt.rows, vt.start, vt.stop) for vt in self.tensors)

    @property
    def tokens_per_page(self) -> int:
        """Positions of one row a page holds (the fewest over the tensors)."""
        return min(vt.tokens_per_page for vt in self.tensors)

    @property
    def rows_share_pages(self) -> bool:
        """Whether short rows are packed into shared pages (a reservation under a page a row)."""
        return any(vt.row_stride < CHUNK_SIZE for vt in self.tensors)

    def holds_row_starts(self, starts: tuple[int, ...] | None) -> bool:
        """Whether every tensor was committed with these row starts (a commit that failed
        part-way leaves them apart: then the next commit is made again)."""
        return all(vt.row_starts == starts for vt in self.tensors)

    def commit(self, rows: int, stop: int, start: int = 0, row_starts: tuple[int, ...] | None = None) -> None:
        """Backs positions ``[start, stop)`` of the first `rows` rows, those before
        ``row_starts[r]`` as padding (VirtualTensor.commit: Note [Padding positions])."""
        for vt in self.tensors:
            vt.commit(rows, stop, start, row_starts)

    def zero(self, rows: int, start: int, stop: int) -> None:
        """Zeros positions ``[start, stop)`` of the first `rows` rows, K and V."""
        for vt in self.tensors:
            vt.tensor[:rows, start:stop].zero_()

    def gather_rows(self, rows: int, start: int, stop: int, index: torch.Tensor) -> list[torch.Tensor]:
        """Copies of positions ``[start, stop)`` of rows `index`, one per tensor (put_rows
        writes them back)."""
        return [vt.tensor[:rows, start:stop].index_select(0, index) for vt in self.tensors]

    def put_rows(self, saved: list[torch.Tensor], start: int, stop: int) -> None:
        for vt, data in zip(self.tensors, saved):
            vt.tensor[:data.shape[0], start:stop].copy_(data)

    @property
    def freed(self) -> bool:
        return self.tensors[0].freed

    def free(self) -> None:
        for vt in self.tensors:
            vt.free()
        self._keys = self._values = None

    @property
    def committed_bytes(self) -> int:
        return sum(vt.committed_bytes for vt in self.tensors if not vt.freed)

    @property
    def reserved_bytes(self) -> int:
        return sum(vt.reserved_bytes for vt in self.tensors if not vt.freed)
