"""Sleep and wake of tagged GPU memory (Note [Sleeping pools] in allocator/core/private_pool.hpp).

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

KV caches whose pages are mapped into reserved ranges (``VirtualKVCache``, a
``VirtualTensor``) are not allocated from a pool: ``attach(tag, cache)`` puts them under a
tag, and pause/resume unmap and map their committed pages at the same addresses too.

Works under ``VMMALLOC=1`` or ``enable_vmm_allocator()``; the tagging calls are the only
code a program adds.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from vmmalloc import _C

# Pool ids of tags: (first, second) with both non-zero, which torch's own ids never are
# (torch makes (0, n) for MemPool() and graph_pool_handle(), (n, 0) for a capture given no
# pool); the core keeps large handles for these pools only (Note [Torch's pools map single
# chunks]).
_TAG_POOL_FIRST = 0x766D6D
_lock = threading.Lock()
_tags: dict[tuple[str, int], tuple[int, int]] = {}
# Objects attached to a tag (virtual tensors, KV caches), held weakly: a cache that is gone
# leaves its tag.
_attached: dict[tuple[str, int], list[weakref.ref]] = {}


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


def attach(tag: str, obj: Any, device: Any = None) -> None:
    """Puts `obj` under `tag`: a ``VirtualTensor``, a layer with ``virtual_tensors()``, or a
    cache whose ``layers`` have it (``VirtualKVCache``: layers made later count too, since
    pause() asks the cache for its buffers when it runs)."""
    _buffers_of(obj)  # refuses what has no virtual tensors, now rather than at pause()
    key = (tag, _device_index(device))
    pool_of(tag, device)
    with _lock:
        _attached.setdefault(key, []).append(weakref.ref(obj))


def _buffers_of(obj: Any) -> list[Any]:
    from vmmalloc.virtual_tensor import VirtualTensor

    if isinstance(obj, VirtualTensor):
        return [obj]
    if hasattr(obj, "virtual_tensors"):
        return list(obj.virtual_tensors())
    if hasattr(obj, "layers") and any(hasattr(layer, "virtual_tensors") for layer in obj.layers):
        return [vt for layer in obj.layers if hasattr(layer, "virtual_tensors") for vt in layer.virtual_tensors()]
    raise TypeError(f"cannot attach a {type(obj).__name__} to a tag: it is not a VirtualTensor and has no "
                    "virtual_tensors() or layers with virtual_tensors() (VirtualKVCache has them)")


def _attached_buffers(tag: str, device: Any) -> list[Any]:
    key = (tag, _device_index(device))
    with _lock:
        alive = [r() for r in _attached.get(key, [])]
        _attached[key] = [weakref.ref(o) for o in alive if o is not None]
    return [vt for obj in alive if obj is not None for vt in _buffers_of(obj)]


def pause(tag: str, *, backup: bool = True, device: Any = None) -> None:
    """Gives `tag`'s GPU memory back, after the work queued on the streams that used it.

    Args:
        backup: keep the contents on the host (restored by resume), else discard them.

    Raises:
        RuntimeError: the tag is paused already, or a CUDA graph capture or use_mem_pool is
            under way in this process.
    """
    allocator = _C.device_allocator(_device_index(device))
    pool = pool_of(tag, device)
    buffers = _attached_buffers(tag, device)
    if allocator.pool_paused(pool) and all(vt.asleep for vt in buffers):
        raise RuntimeError(f"vmmalloc: tag {tag!r} is paused already")
    # The buffers first, then the pool: a call that fails part way (out of host memory for a
    # backup) is finished by calling pause() again.
    for vt in buffers:
        vt.sleep(backup=backup)
    if not allocator.pool_paused(pool):
        allocator.pause_pool(pool, backup)
    # Their pages went back to their allocators' chunk pools, once the current stream's
    # work is done: hand them to the GPU.
    owners = {id(vt.allocator): vt for vt in buffers}
    for vt in owners.values():
        if vt.device.type == "cuda":
            import torch

            torch.cuda.current_stream(vt.device).synchronize()
        vt.allocator.empty_cache()


def resume(tag: str, *, device: Any = None) -> None:
    """Maps new GPU memory at `tag`'s addresses and restores what pause() backed up.

    Raises:
        vmmalloc.OutOfMemoryError: the tag's pool memory is not free (the tag stays paused).
        torch.OutOfMemoryError: an attached virtual tensor's pages are not free (it and those
            after it stay asleep; resume() again goes on from there).
        RuntimeError: the tag is not paused.
    """
    allocator = _C.device_allocator(_device_index(device))
    pool = pool_of(tag, device)
    asleep = [vt for vt in _attached_buffers(tag, device) if vt.asleep]
    if not allocator.pool_paused(pool) and not asleep:
        raise RuntimeError(f"vmmalloc: tag {tag!r} is not paused")
    if allocator.pool_paused(pool):
        allocator.resume_pool(pool)
    for vt in asleep:
        vt.wake()


def is_paused(tag: str, device: Any = None) -> bool:
    """Whether `tag`'s memory is paused now (its pool, or a virtual tensor attached to it)."""
    if _C.device_allocator(_device_index(device)).pool_paused(pool_of(tag, device)):
        return True
    return any(vt.asleep for vt in _attached_buffers(tag, device))
