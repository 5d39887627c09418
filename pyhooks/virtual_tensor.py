"""VirtualTensor: a torch tensor over reserved virtual memory whose 2 MiB pages are mapped
only where they are committed, from the same chunk pool as every other tensor.

The first dimension holds rows (a batch) and the second grows (tokens); a commit names
how many rows and which span of the second dimension must be backed by memory. Growing
maps pages in place: nothing already written moves. Pages that fall out of the committed
span go back to the pool once the work queued on the current stream is done.

Note [Only committed parts are touched]
The tensor returned by ``.tensor`` covers the whole reservation, most of which is not
mapped. Reading or writing outside the committed span faults (on a GPU, it corrupts the
CUDA context), so callers slice it to the committed span only; the KV caches do.

Note [Padding positions]
A commit may name, per row, where its tokens start (``row_starts``): the positions before
are padding, a batch's shorter prompts padded on the left. They stay readable and writable,
but the pages holding only padding are all one chunk shared by every virtual tensor of the
dtype on the allocator (Note [Padding pages] in
allocator/core/virtual_pages.hpp): what is read there is whatever any row wrote at the same
offset of a page. So padding is for positions no computation gives weight to (an attention
mask hides them); a cache that sets it says so. A weight of 0 hides a finite value only (0
times NaN is NaN): the model writes finite values of the tensor's dtype there, but bytes of
one dtype read as another can be NaN (a float32's low half read as bfloat16, bfloat16 bytes
read as float8). So each dtype has a filler of its own (the range's filler kind).
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch

from vmmalloc import _C

CHUNK_SIZE: int = _C.CHUNK_SIZE
_host_allocator: _C.Allocator | None = None
# The filler kind of each dtype (Note [Padding positions]), in order of first use, from a
# base apart from the small kinds direct users of the core pick (0 is its default).
_FILLER_KIND_BASE = 1 << 16
_filler_kinds: dict[torch.dtype, int] = {}
_filler_kinds_lock = threading.Lock()


def filler_kind(dtype: torch.dtype) -> int:
    """The filler kind of `dtype`: virtual tensors of one dtype share a padding chunk."""
    with _filler_kinds_lock:
        return _filler_kinds.setdefault(dtype, _FILLER_KIND_BASE + len(_filler_kinds))


def host_allocator() -> _C.Allocator:
    """The process-wide allocator for CPU virtual tensors (the host backend).

    Its capacity is VMMALLOC_HOST_CAPACITY bytes if set, else half the machine's memory.
    """
    global _host_allocator
    if _host_allocator is None:
        text = os.environ.get("VMMALLOC_HOST_CAPACITY", "")
        if text:
            from vmmalloc.sizes import parse_bytes

            capacity = parse_bytes(text, "VMMALLOC_HOST_CAPACITY")
        else:
            capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        capacity = max(CHUNK_SIZE, capacity // CHUNK_SIZE * CHUNK_SIZE)
        _host_allocator = _C.Allocator(_C.HostBackend(capacity))
    return _host_allocator


def allocator_for(device: torch.device) -> _C.Allocator:
    """The allocator whose chunk pool backs virtual tensors on `device`.

    On CUDA it is the per-device allocator torch itself uses once vmmalloc is enabled, so
    KV pages and ordinary tensors share one memory budget.
    """
    if device.type == "cpu":
        return host_allocator()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _C.device_allocator(index)
    raise ValueError(f"virtual tensors live on 'cuda' or 'cpu' devices, not {device}")


def current_stream(device: torch.device) -> int:
    """The stream value the allocator orders page releases after (0 on the host)."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


class VirtualTensor:
    """A ``[rows, length, *inner]`` tensor backed by memory only where committed.

    Args:
        shape: ``(rows, length, *inner)``: the most rows and the longest length it can hold.
        dtype: element type.
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"`` (the host backend, for machines
            without a GPU).
        allocator: the allocator to draw pages from; by default the device's
            (:func:`allocator_for`).

    Rows are padded to whole pages when a row is at least a page long, so a row's pages
    are its own; shorter rows are packed and share pages.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, device: str | torch.device = "cuda",
                 *, allocator: _C.Allocator | None = None) -> None:
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or any(d <= 0 for d in shape):
            raise ValueError(f"a virtual tensor needs a shape (rows, length, *inner) of positive sizes, got {shape}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.shape = shape
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.item_bytes = math.prod(shape[2:]) * itemsize  # one position of one row
        row_bytes = shape[1] * self.item_bytes
        self.row_stride = -(-row_bytes // CHUNK_SIZE) * CHUNK_SIZE if row_bytes >= CHUNK_SIZE else row_bytes
        self._allocator = allocator if allocator is not None else allocator_for(self.device)
        self._range = _C.VirtualRange(self._allocator, (shape[0] - 1) * self.row_stride + row_bytes,
                                      filler_kind(dtype))
        flat = torch.from_dlpack(self._range.dlpack())
        if flat.device != self.device:
            self._range.free()
            raise ValueError(f"the allocator serves {flat.device}, not {self.device}")
        inner_strides = [math.prod(shape[i + 1:]) for i in range(2, len(shape))]
        self._tensor: torch.Tensor | None = flat.view(dtype).as_strided(
            shape, [self.row_stride // itemsize, self.item_bytes // itemsize, *inner_strides])
        self.rows = 0
        self.start = 0
        self.stop = 0
        self.row_starts: tuple[int, ...] | None = None  # Note [Padding positions]
        self.commits = 0  # commits asked for, sleep's and wake's included: what changed the mapping
        # (rows, start, stop, row_starts, backup)
        self._sleep: tuple[int, int, int, tuple[int, ...] | None, torch.Tensor | None] | None = None

    @property
    def tensor(self) -> torch.Tensor:
        """The whole reservation as a strided tensor (Note [Only committed parts are touched])."""
        if self._tensor is None:
            raise RuntimeError("this virtual tensor was freed; create a new one")
        if self._sleep is not None:
            raise RuntimeError("this virtual tensor is asleep (vmmalloc.sleep_mode.pause); resume its tag "
                               "before touching it")
        return self._tensor

    @property
    def tokens_per_page(self) -> int:
        """Positions of one row that one page holds (at least 1)."""
        return max(1, CHUNK_SIZE // self.item_bytes)

    def commit(self, rows: int, stop: int, start: int = 0, row_starts: Sequence[int] | None = None) -> None:
        """Backs positions ``[start, stop)`` of the first `rows` rows with memory; pages
        outside go back after the work queued on the current stream.

        With `row_starts` (one position per row), row r's positions before ``row_starts[r]``
        are padding (Note [Padding positions]): the pages holding nothing else share one
        chunk, so they cost no memory of their own.

        Raises:
            ValueError: for a span or row count outside the reservation, or row_starts that
                are not one position per row.
            RuntimeError: once freed.
            torch.OutOfMemoryError: when no memory is left after releasing caches.
        """
        if self._sleep is not None:
            raise RuntimeError("this virtual tensor is asleep (vmmalloc.sleep_mode.pause); resume its tag "
                               "before committing or touching it")
        if not (0 <= rows <= self.shape[0] and 0 <= start <= stop <= self.shape[1]):
            raise ValueError(
                f"cannot commit rows [0, {rows}) positions [{start}, {stop}) of a virtual tensor "
                f"of shape {self.shape}: it reserves at most {self.shape[0]} rows and "
                f"{self.shape[1]} positions; reserve a larger one")
        starts = None if row_starts is None else tuple(int(s) for s in row_starts)
        if starts is not None and (len(starts) != rows or any(not 0 <= s <= self.shape[1] for s in starts)):
            raise ValueError(f"row_starts must give one position in [0, {self.shape[1]}] for each of the "
                             f"{rows} rows committed, got {list(starts)}")
        # Out of memory, a commit gives no page up and maps none (CachingAllocator::
        # commit_range), so the span recorded before still holds and stays. After a driver
        # failure, what is mapped is unknown: the span is forgotten, so that the next commit
        # maps again whatever it needs (the core plans from the pages themselves).
        self.commits += 1
        try:
            self._range.commit(rows, self.row_stride, start * self.item_bytes, stop * self.item_bytes,
                               current_stream(self.device),
                               None if starts is None else [s * self.item_bytes for s in starts])
        except _C.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(str(error)) from error
        except Exception:
            self.rows = self.start = self.stop = 0
            self.row_starts = None
            raise
        self.rows, self.start, self.stop, self.row_starts = rows, start, stop, starts

    @property
    def allocator(self) -> _C.Allocator:
        """The allocator whose chunk pool backs the pages."""
        return self._allocator

    @property
    def asleep(self) -> bool:
        """Whether sleep() gave the pages back and wake() has not mapped them again."""
        return self._sleep is not None

    def sleep(self, backup: bool = False) -> None:
        """Gives every page back (after the work queued on the current stream), keeping the
        reservation and the committed span; with `backup` the committed contents go to host
        memory first (pinned for a GPU), else they are discarded (a KV cache's case).
        vmmalloc.sleep_mode.pause calls it for the virtual tensors attached to a tag."""
        if self.freed or self._sleep is not None:
            return
        saved = None
        if backup and self.rows and self.stop > self.start:
            span = self.tensor[:self.rows, self.start:self.stop]
            saved = torch.empty(span.shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
            saved.copy_(span)
        rows, start, stop, starts = self.rows, self.start, self.stop, self.row_starts
        self.commit(0, 0)
        self._sleep = (rows, start, stop, starts, saved)

    def wake(self) -> None:
        """Maps the committed span again at the same addresses (contents restored when sleep
        backed them up, else undefined). On torch.OutOfMemoryError it stays asleep."""
        if self._sleep is None:
            return
        rows, start, stop, starts, saved = self._sleep
        self._sleep = None
        try:
            self.commit(rows, stop, start, starts)
        except BaseException:
            self._sleep = (rows, start, stop, starts, saved)
            raise
        if saved is not None:
            self.tensor[:rows, start:stop].copy_(saved, non_blocking=saved.is_pinned())

    @property
    def committed_bytes(self) -> int:
        """Bytes of memory now mapped under this tensor (whole pages)."""
        return self._range.live_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes of virtual address space reserved."""
        return self._range.bytes

    @property
    def freed(self) -> bool:
        return self._range.freed

    def free(self) -> None:
        """Returns every page to the pool (after the work queued on the current stream).

        ``.tensor`` and views of it must not be used afterwards; the address space stays
        reserved until they are gone, so a stale view never aliases other memory.
        """
        if not self._range.freed:
            self._range.free(current_stream(self.device))
        self._sleep = None
        self._tensor = None  # our own export: the pages go back now unless views remain
        self.rows = self.start = self.stop = 0
        self.row_starts = None

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"rows {self.rows}, positions [{self.start}, {self.stop})"
        return (f"VirtualTensor(shape={self.shape}, dtype={self.dtype}, device={self.device}, {state}, "
                f"committed {self.committed_bytes} of {self.reserved_bytes} bytes)")
