"""Host memory for offloaded KV: one allocation per buffer, page-locked for the GPU when the
system allows it, so that a layer moves in one asynchronous copy at the bus's full rate.

Note [Exact sizes, pinned in place]
PyTorch's pinned-memory allocator rounds every request up to a power of two, so a 537 MB
layer of an 8B model at 32K context would hold 1 GiB of locked memory. The buffers here are
ordinary host tensors of the exact size, page-locked in place through the driver
(Note [Pinning through the driver, not the runtime] in allocator/backend/host_pinning.hpp) and
unlocked before they are freed.

Note [Host memory is checked before it is touched]
Linux overcommits: allocating a host tensor larger than the memory left succeeds, and the
process is killed later, when copies touch the pages. So a request beyond the memory the
kernel reports available (MemAvailable) is refused up front with MemoryError, and pinning,
which faults every page in, never starts on memory that is not there.
"""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from typing import Any

import torch

from vmmalloc import _C

_warned_unpinned = False
_pinning = {"bytes": 0, "seconds": 0.0}  # what pinning has cost this process (summed over threads)
_pinning_lock = threading.Lock()


def pinning_totals() -> dict[str, float]:
    """Bytes of host memory pinned so far in this process and the seconds it took (for
    benchmarks: pinning faults every page in, at a few GB/s)."""
    return dict(_pinning)


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where the kernel does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(needed: int, what: str) -> None:
    """Raises MemoryError when `needed` bytes exceed the host memory available now.

    Args:
        needed: bytes about to be allocated.
        what: what they are for, for the message.
    """
    available = available_host_bytes()
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} needs {needed / 1e9:.2f} GB of host memory and {available / 1e9:.2f} GB is available; "
            "lower the batch or the length, or give the KV cache a larger GPU budget")


def _wait_fences(state: dict[str, Any]) -> None:
    for event in state["fences"].values():
        event.synchronize()
    state["fences"].clear()


def _release(state: dict[str, Any]) -> None:
    """Waits for the copies still using the buffer, then unlocks it (a finalizer: never raises)."""
    _wait_fences(state)
    if state["pinned"]:
        _C.unpin_host_memory(state["address"], state["device"])
        state["pinned"] = False


class HostBuffer:
    """``nbytes`` of host memory as a uint8 tensor, pinned for `device` when it is a GPU.

    Asynchronous copies that read or write the buffer register their completion event with
    :meth:`fence`; :meth:`wait` and :meth:`close` wait for them, so the host never reads a
    half-written buffer and memory is never freed under a copy.

    Raises:
        MemoryError: when the host does not have the memory (Note [Host memory is checked
            before it is touched]).
    """

    def __init__(self, nbytes: int, device: torch.device, what: str = "the offloaded KV cache") -> None:
        check_host_memory(nbytes, what)
        try:
            self.tensor: torch.Tensor | None = torch.empty(nbytes, dtype=torch.uint8)
        except RuntimeError as error:
            raise MemoryError(f"{what}: allocating {nbytes / 1e9:.2f} GB of host memory failed ({error}); "
                              "lower the batch or the length, or give the KV cache a larger GPU budget") from None
        self.nbytes = nbytes
        self.device = device
        self._state: dict[str, Any] = {"fences": {}, "pinned": False, "address": self.tensor.data_ptr(),
                                       "device": device.index if device.index is not None else 0}
        if device.type == "cuda" and nbytes > 0:
            start = time.perf_counter()
            refused = _C.pin_host_memory(self.tensor.data_ptr(), nbytes, self._state["device"])
            with _pinning_lock:
                _pinning["seconds"] += time.perf_counter() - start
                _pinning["bytes"] += 0 if refused else nbytes
            if refused:
                _warn_unpinned(refused)
            else:
                self._state["pinned"] = True
        self._finalizer = weakref.finalize(self, _release, self._state)

    @property
    def pinned(self) -> bool:
        """Whether the buffer is page-locked (copies are then asynchronous and full rate)."""
        return self._state["pinned"]

    def fence(self, key: str, event: Any) -> None:
        """Records that the copies on stream `key` that touch the buffer end with `event`."""
        self._state["fences"][key] = event

    def wait(self) -> None:
        """Blocks until every copy registered with :meth:`fence` is done."""
        _wait_fences(self._state)

    def close(self) -> None:
        """Waits for the copies, unlocks and frees the memory now."""
        self._finalizer()
        self.tensor = None


def _warn_unpinned(error: str) -> None:
    global _warned_unpinned
    if not _warned_unpinned:
        _warned_unpinned = True
        warnings.warn(f"vmmalloc could not page-lock host memory for the offloaded KV cache ({error}); it works "
                      "on ordinary memory, with slower, synchronous copies. Raise the locked-memory limit "
                      "(ulimit -l) or leave more host memory free", RuntimeWarning, stacklevel=3)
