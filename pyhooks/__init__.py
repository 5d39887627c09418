"""vmmalloc: GPU memory management for PyTorch on CUDA virtual memory.

Every allocation is served from 2 MiB physical chunks; when no cached block fits, free
chunks are stitched into a new virtually contiguous block instead of asking the device
for more (GMLake). The core is C++ (``vmmalloc._C``) and runs on two backends with the
same semantics: ``cuda`` (the driver's virtual memory API) and ``host`` (memfd + mmap,
so everything runs on a machine without a GPU).

Turn it on for PyTorch with ``vmmalloc.enable_vmm_allocator()`` before any CUDA work, or
with no code change: ``VMMALLOC=1 python train.py``.
"""
from vmmalloc import sleep_mode
from vmmalloc._C import (
    CHUNK_SIZE,
    SMALL_REQUEST_LIMIT,
    Allocator,
    Backend,
    BackendError,
    CudaBackend,
    HostBackend,
    OutOfMemoryError,
    parse_config,
)
from vmmalloc.backends import cuda_available, cuda_unavailable_reason, make_backend
from vmmalloc.torch_allocator import enable_vmm_allocator, is_enabled

__all__ = [
    "CHUNK_SIZE",
    "SMALL_REQUEST_LIMIT",
    "Allocator",
    "Backend",
    "BackendError",
    "CudaBackend",
    "HostBackend",
    "OutOfMemoryError",
    "cuda_available",
    "cuda_unavailable_reason",
    "enable_vmm_allocator",
    "is_enabled",
    "make_backend",
    "parse_config",
    "sleep_mode",
]
__version__ = "0.1.0"
