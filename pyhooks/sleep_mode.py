"""Sleep and wake of tagged GPU memory (Note [Sleeping pools] in allocator/private_pool.hpp).

Allocations made under ``with vmmalloc.sleep_mode.tagged("weights"):`` belong to the tag
(a private pool of vmmalloc's: stitched only with memory of the same tag). ``pause(tag)``
gives the tag's physical memory back to the GPU after the work queued on its streams,
keeping every address; ``resume(tag)`` maps new memory at the same addresses and restores
the contents that ``pause(tag, backup=True)`` kept on the host (``backup=False`` discards
them: for KV caches, say). Tensors keep their data pointers, so CUDA graphs captured on them
replay after a resume. Touching paused memory is the caller's error.

    with vmmalloc.sleep_mode.tagged("weights"):
        model = build_model().cuda()
    vmmalloc.sleep_mode.pause("weights")     # the GPU memory is free for something else
    ...
    vmmalloc.sleep_mode.resume("weights")    # same tensors, same contents

Works under ``VMMALLOC=1`` or ``enable_vmm_allocator()``; the tagging calls are the only
code a program adds.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from vmmalloc import _C

# Pool ids of tags: (first, second) with both non-zero, which torch's own ids never are
# (torch makes (n, 0) for MemPool() and (0, n) for graph pools).
_TAG_POOL_FIRST = 0x766D6D
_lock = threading.Lock()
_tags: dict[tuple[str, int], tuple[int, int]] = {}


def _device_index(device: Any) -> int:
    if device is None:
        import torch

        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    index = getattr(device, "index", None)
    if index is None:
        import torch

        return torch.cuda.current_device()
    return int(index)


def pool_of(tag: str, device: Any = None) -> tuple[int, int]:
    """The private pool behind `tag` on `device` (created, and held, on first use)."""
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"a tag is a non-empty string, got {tag!r}")
    key = (tag, _device_index(device))
    with _lock:
        pool = _tags.setdefault(key, (_TAG_POOL_FIRST, len(_tags) + 1))
        allocator = _C.device_allocator(key[1])
        if allocator.pool_use_count(pool) == 0:  # first use (or a fresh allocator): the tag holds it
            allocator.create_or_incref_pool(pool)
        return pool


@contextlib.contextmanager
def tagged(tag: str, device: Any = None) -> Iterator[None]:
    """Allocations of this thread on `device` (default: the current one) belong to `tag`."""
    pool = pool_of(tag, device)
    allocator = _C.device_allocator(_device_index(device))
    allocator.begin_allocate_to_pool(pool, this_thread=True)
    try:
        yield
    finally:
        allocator.end_allocate_to_pool(pool)
        allocator.release_pool(pool)  # the route's reference; the tag keeps its own


def pause(tag: str, *, backup: bool = True, device: Any = None) -> None:
    """Gives `tag`'s GPU memory back, after the work queued on the streams that used it.

    Args:
        backup: keep the contents on the host (restored by resume), else discard them.

    Raises:
        RuntimeError: the tag is paused already, or a CUDA graph capture or use_mem_pool is
            under way in this process.
    """
    _C.device_allocator(_device_index(device)).pause_pool(pool_of(tag, device), backup)


def resume(tag: str, *, device: Any = None) -> None:
    """Maps new GPU memory at `tag`'s addresses and restores what pause() backed up.

    Raises:
        vmmalloc.OutOfMemoryError: the memory is not free (the tag stays paused).
        RuntimeError: the tag is not paused.
    """
    _C.device_allocator(_device_index(device)).resume_pool(pool_of(tag, device))


def is_paused(tag: str, device: Any = None) -> bool:
    """Whether `tag`'s memory is paused now."""
    return _C.device_allocator(_device_index(device)).pool_paused(pool_of(tag, device))
