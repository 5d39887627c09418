"""Choosing a backend by name, and asking whether CUDA can be used at all."""
from __future__ import annotations

from vmmalloc import _C

BACKEND_NAMES = ("host", "cuda")


def cuda_unavailable_reason() -> str:
    """Why the cuda backend cannot run here, or ``""`` when the CUDA driver is usable."""
    return _C.cuda_unavailable_reason()


def cuda_available() -> bool:
    """Whether the CUDA driver loaded and initialized (no GPU work is done)."""
    return cuda_unavailable_reason() == ""


def make_backend(name: str, device: int = 0, capacity: int = 1 << 30) -> _C.Backend:
    """A backend by name.

    Args:
        name: ``"host"`` (CPU memory standing in for a device of ``capacity`` bytes) or
            ``"cuda"`` (the GPU ``device``).
        device: device ordinal.
        capacity: the host backend's simulated device memory, in bytes.

    Raises:
        ValueError: for an unknown name.
        vmmalloc.BackendError: for ``"cuda"`` when CUDA is unavailable, with the reason.
    """
    if name == "host":
        return _C.HostBackend(capacity, device)
    if name == "cuda":
        return _C.CudaBackend(device)
    raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKEND_NAMES)}")
