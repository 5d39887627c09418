"""CUDA tensors shared between processes (torch.multiprocessing) under vmmalloc.

The torch adapter does the work (Note [Adapter IPC] in allocator/torch_adapter/ipc_handles.h):
torch's own reductions call its shareIpcHandle and getIpcDevPtr. What this module adds is the
one thing C++ cannot: a receiver that runs PyTorch's own allocator would fail on vmmalloc's
handle with an error that does not say why. So CUDA tensors whose memory vmmalloc shares are
pickled with :func:`rebuild_cuda_tensor` in place of torch's, which checks the receiver first
and then calls torch's unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_RECEIVER_HINT = (
    "vmmalloc: this CUDA tensor was shared by a process that runs vmmalloc (VMMALLOC=1), and "
    "this process runs PyTorch's own CUDA allocator, which cannot open vmmalloc's memory. Set "
    "VMMALLOC=1 in the receiving process too (for torch.multiprocessing's spawn, set it in "
    "os.environ before the process starts), or share from a process without vmmalloc.")


def is_vmmalloc_handle(handle: Any) -> bool:
    """Whether a storage handle (torch's ``_share_cuda_()`` element) was written by vmmalloc."""
    from vmmalloc import _C

    return isinstance(handle, (bytes, bytearray)) and _C.is_shared_handle(bytes(handle))


def rebuild_cuda_tensor(*args: Any) -> Any:
    """torch.multiprocessing's ``rebuild_cuda_tensor`` for memory vmmalloc shared.

    Raises:
        RuntimeError: this process's CUDA allocator is not vmmalloc's (the message says to set
            VMMALLOC=1 here).
    """
    from torch.multiprocessing import reductions

    from vmmalloc import torch_allocator

    if not torch_allocator.is_enabled():
        raise RuntimeError(_RECEIVER_HINT)
    if not torch_allocator.adapter_active():
        raise RuntimeError(
            "vmmalloc: this process runs vmmalloc without its torch adapter (it could not be built: "
            "see the warning given at start-up; a C++ compiler is needed), and only the adapter opens CUDA "
            "memory another process shared. Install a C++ compiler (or set CXX) in the receiving process.")
    return reductions.rebuild_cuda_tensor(*args)


def _wrap(reduce: Callable[[Any], Any]) -> Callable[[Any], Any]:
    from torch.multiprocessing import reductions

    def reduce_tensor(tensor: Any) -> Any:
        rebuild, args = reduce(tensor)
        # args[7] is the storage handle (rebuild_cuda_tensor's storage_handle).
        if rebuild is reductions.rebuild_cuda_tensor and is_vmmalloc_handle(args[7]):
            return rebuild_cuda_tensor, args
        return rebuild, args

    reduce_tensor.__wrapped__ = reduce  # type: ignore[attr-defined]
    return reduce_tensor


def install() -> None:
    """Routes torch's tensor reductions through the receiver check (idempotent)."""
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    reducers: dict[type, Callable[[Any], Any]] = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    for cls, reduce in list(reducers.items()):
        if reduce is reductions.reduce_tensor:
            ForkingPickler.register(cls, _wrap(reduce))
