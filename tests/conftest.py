"""Shared fixtures: every allocator test runs on each backend (host in CI, cuda on a GPU)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import vmmalloc
from vmmalloc._C import testing

MiB = 1 << 20


@dataclass
class BackendKind:
    """Makes allocators over one backend kind with a given amount of usable memory."""

    name: str

    def backend(self, capacity: int) -> vmmalloc.Backend:
        if self.name == "host":
            return vmmalloc.HostBackend(capacity)
        return vmmalloc.CudaBackend(0)

    def allocator(self, capacity: int = 256 * MiB, conf: str = "", backend=None) -> vmmalloc.Allocator:
        """An allocator limited to `capacity` bytes: the host backend's whole device, or a
        cap on the real GPU (so tests behave alike on both)."""
        backend = backend if backend is not None else self.backend(capacity)
        if self.name == "cuda" and "memory_cap" not in conf:
            conf = f"{conf},memory_cap:{capacity}" if conf else f"memory_cap:{capacity}"
        return vmmalloc.Allocator(backend, conf)


@pytest.fixture(
    params=[
        "host",
        pytest.param("cuda", marks=pytest.mark.gpu),
    ]
)
def kind(request) -> BackendKind:
    if request.param == "cuda":
        reason = vmmalloc.cuda_unavailable_reason()
        if reason:
            pytest.skip(reason)
    return BackendKind(request.param)


def pattern(tag: int, size: int) -> bytes:
    """Bytes that differ between allocations and between offsets, so that an overlap or a
    lost write shows up as a mismatch."""
    import numpy as np

    words = (size + 3) // 4
    values = (np.arange(words, dtype=np.uint64) * 2654435761 + tag * 40503 + 17) & 0xFFFFFFFF
    return values.astype(np.uint32).tobytes()[:size]


def assert_stitched_aliases_its_chunks(alloc, stitched: int, data: bytes) -> None:
    """`data` was written through the stitched block `stitched`: each of its chunks must
    still be mapped where it was before the stitch, and read back the same bytes there."""
    chunk = vmmalloc.CHUNK_SIZE
    for index, chunk_id in enumerate(alloc.chunk_ids(stitched)):
        addresses = alloc.chunk_addresses(chunk_id)
        assert stitched + index * chunk in addresses
        others = [a for a in addresses if a != stitched + index * chunk]
        assert others, "the chunk's original mapping should still be cached"
        for other in others:
            assert alloc.backend.read(other, chunk) == data[index * chunk:(index + 1) * chunk]


@pytest.fixture
def host_devices():
    """The process-wide per-device allocators (what torch reaches through the C ABI), each
    on a host backend of 64 MiB, created afresh; yields the registry's accessor."""
    import gc

    from vmmalloc import _C

    gc.collect()  # virtual tensors of earlier tests hold the per-device allocators
    testing.reset_devices_for_tests()
    testing.use_host_backend_for_devices(64 * MiB)
    yield _C.device_allocator
    gc.collect()
    testing.reset_devices_for_tests()
    _C.configure("")


# ----- the KV-cache tests (test_kv_cache.py, test_offload_cache.py) -----------------------


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Each cache test on the host backend and, where there is a GPU, on CUDA."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return request.param


@pytest.fixture
def no_patch_left_behind():
    """Restores transformers' generate() after a test and collects the caches it left."""
    import gc

    yield
    from vmmalloc.integrations import unpatch_generate

    unpatch_generate()
    gc.collect()
