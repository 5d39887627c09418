"""Memory shared between processes on the host backend (Note [Sharing memory between
processes], Note [Shared handles]): the handle's encoding, a child process that opens what the
parent shared and writes into it, and every refusal with its reason. The host backend's handles
are parts of one memfd, shared by the same pidfd_getfd mechanism as CUDA's descriptors, so CI
runs the protocol the GPU uses (tests/test_ipc_gpu.py runs it through torch.multiprocessing)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from vmmalloc import _C, ipc

MiB = 1 << 20
CHILD = """
import sys
from vmmalloc import _C
handle, offset, n = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
backend = _C.HostBackend(1 << 30)
memory = _C.SharedMemory(backend, handle)
print(backend.read(memory.base + offset, n).hex(), memory.bytes)
backend.write(memory.base + offset, b"child wrote this")
"""


@pytest.fixture
def allocator():
    backend = _C.HostBackend(1 << 30)
    return backend, _C.Allocator(backend, "growth_slack:0")


def pidfd_allowed() -> bool:
    """False only where the kernel or a container refuses pidfd_open / pidfd_getfd (the two
    messages vmmalloc gives for that); any other failure runs the tests, which then fail."""
    try:
        backend = _C.HostBackend(64 * MiB)
        a = _C.Allocator(backend, "")
        handle, _ = a.share(a.allocate(4 * MiB))
        _C.SharedMemory(backend, handle)
        return True
    except RuntimeError as error:
        return "Operation not permitted" not in str(error) and "Linux 5.6" not in str(error)


needs_pidfd = pytest.mark.skipif(not pidfd_allowed(), reason="this kernel or container forbids pidfd_getfd")


def open_in_child(handle: bytes, offset: int, n: int) -> tuple[bytes, int]:
    proc = subprocess.run([sys.executable, "-c", CHILD, handle.hex(), str(offset), str(n)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data, mapped = proc.stdout.split()
    return bytes.fromhex(data), int(mapped)


def test_the_handle_lists_whole_handles_in_mapping_order(allocator):
    backend, a = allocator
    first = a.allocate(100)
    second = a.allocate(100)
    handle, offset = a.share(second)
    d = _C.decode_shared_handle(handle)
    assert d["pid"] == os.getpid() and d["backend"] == "host"
    assert [p["bytes"] for p in d["pieces"]] == [2 * MiB], "a small block is shared as its segment"
    assert offset == second - first, "with the block's offset in it"
    big = a.allocate(40 * MiB)
    handle, offset = a.share(big)
    pieces = _C.decode_shared_handle(handle)["pieces"]
    assert offset == 0
    assert [p["bytes"] for p in pieces] == [16 * MiB, 16 * MiB] + [2 * MiB] * 4
    assert len({p["serial"] for p in pieces}) == len(pieces), "serials tell handles apart"
    assert ipc.is_vmmalloc_handle(handle) and not ipc.is_vmmalloc_handle(b"\x02c" + bytes(64))


@needs_pidfd
@pytest.mark.parametrize("size", [100, 3 * MiB, 40 * MiB])
def test_a_child_reads_the_parents_memory_and_its_writes_come_back(allocator, size):
    backend, a = allocator
    a.allocate(512)  # a small block then is not at its segment's start
    ptr = a.allocate(size)
    backend.write(ptr, b"parent data")
    handle, offset = a.share(ptr)
    data, mapped = open_in_child(handle, offset, 11)
    assert data == b"parent data"
    assert mapped >= size
    assert backend.read(ptr, 16) == b"child wrote this"


@needs_pidfd
def test_a_stitched_block_and_a_view_inside_it_are_shared_as_mapped(allocator):
    backend, a = allocator
    parts = [a.allocate(4 * MiB) for _ in range(8)]
    for ptr in parts[::2]:
        a.deallocate(ptr)
    stitches = a.stats()["vmm.stitches"]
    ptr = a.allocate(14 * MiB)
    assert a.stats()["vmm.stitches"] == stitches + 1
    assert len(a.chunk_ids(ptr)) == 7
    backend.write(ptr + 9 * MiB, b"inside the stitch")
    handle, offset = a.share(ptr)
    data, _ = open_in_child(handle, offset + 9 * MiB, 17)
    assert data == b"inside the stitch"
    serials = [p["serial"] for p in _C.decode_shared_handle(handle)["pieces"]]
    assert len(serials) == len(set(serials)) == 7, "seven handles, each named once"
    assert a.share(ptr) == (handle, offset), "sharing again names the same memory the same way"


def test_new_physical_handles_get_new_serials_after_a_pause(allocator):
    """A pool's pause and resume puts new handles under the same chunks: a receiver that cached
    the old handle's mapping must not take the new handle for it (Backend::SharedHandle)."""
    _, a = allocator
    pool = (1, 9)
    a.begin_allocate_to_pool(pool, this_thread=True)
    ptr = a.allocate(6 * MiB)
    a.end_allocate_to_pool(pool)
    before, _ = a.share(ptr)
    a.pause_pool(pool, True)
    a.resume_pool(pool)
    after, _ = a.share(ptr)
    serials = [{p["serial"] for p in _C.decode_shared_handle(h)["pieces"]} for h in (before, after)]
    assert not serials[0] & serials[1] and before != after


@needs_pidfd
def test_opening_and_closing_many_times_leaks_no_descriptor(allocator):
    backend, a = allocator
    ptr = a.allocate(6 * MiB)
    handle, _ = a.share(ptr)
    backend.write(ptr, b"x")
    _C.SharedMemory(backend, handle)  # the first open may create lasting state
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(300):
        memory = _C.SharedMemory(backend, handle)
        assert backend.read(memory.base, 1) == b"x"
        del memory
    assert len(os.listdir("/proc/self/fd")) == before


def patched(handle: bytes, at: int, fmt: str, value: int) -> bytes:
    return handle[:at] + struct.pack(fmt, value) + handle[at + struct.calcsize(fmt):]


def test_bad_handles_are_refused_with_the_reason(allocator):
    backend, a = allocator
    handle, _ = a.share(a.allocate(4 * MiB))
    with pytest.raises(ValueError, match="not written by vmmalloc"):
        _C.decode_shared_handle(b"\x02c" + bytes(64))
    with pytest.raises(ValueError, match="truncated"):
        _C.decode_shared_handle(handle[:12])
    with pytest.raises(ValueError, match="format version 7"):
        _C.decode_shared_handle(patched(handle, 8, "<I", 7))
    with pytest.raises(ValueError, match="does not match"):
        _C.decode_shared_handle(handle[:-1])
    with pytest.raises(ValueError, match="cuda backend cannot be opened on the host backend"):
        _C.SharedMemory(backend, patched(handle, 12, "<I", 0))
    with pytest.raises(ValueError, match="larger than any device"):
        _C.decode_shared_handle(patched(handle, 44, "<Q", 1 << 50))
    with pytest.raises(ValueError, match="names no process"):
        _C.decode_shared_handle(patched(handle, 16, "<i", 0))


@needs_pidfd
def test_a_closed_descriptor_or_an_exited_sender_is_named(allocator):
    backend, a = allocator
    handle, _ = a.share(a.allocate(4 * MiB))
    with pytest.raises(RuntimeError, match="is not open: the sender has released"):
        _C.SharedMemory(backend, patched(handle, 32, "<i", 1 << 20))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with pytest.raises(RuntimeError, match="has exited"):
        _C.SharedMemory(backend, patched(handle, 16, "<i", int(gone.stdout)))
    # a live process that is not the sender: its start time gives it away
    other = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(RuntimeError, match="another process has its pid now"):
            _C.SharedMemory(backend, patched(handle, 16, "<i", other.pid))
    finally:
        other.kill()
        other.wait()


def test_only_the_start_of_a_live_allocation_can_be_shared(allocator):
    _, a = allocator
    ptr = a.allocate(4 * MiB)
    with pytest.raises(ValueError, match="not the start of a live allocation"):
        a.share(ptr + 4096)
    a.deallocate(ptr)
    with pytest.raises(ValueError, match="not the start of a live allocation"):
        a.share(ptr)


def test_memory_of_a_paused_pool_is_not_shared(allocator):
    _, a = allocator
    pool = (1, 7)
    a.begin_allocate_to_pool(pool, this_thread=True)
    ptr = a.allocate(4 * MiB)
    a.end_allocate_to_pool(pool)
    a.pause_pool(pool, False)
    with pytest.raises(RuntimeError, match="paused"):
        a.share(ptr)


def test_a_receiver_without_vmmalloc_is_told_to_set_it(monkeypatch):
    with pytest.raises(RuntimeError, match="Set VMMALLOC=1 in the receiving process"):
        ipc.rebuild_cuda_tensor(*([None] * 15))
    from vmmalloc import torch_allocator

    monkeypatch.setattr(torch_allocator, "_enabled_conf", "")  # enabled, without the adapter
    with pytest.raises(RuntimeError, match="without its torch adapter"):
        ipc.rebuild_cuda_tensor(*([None] * 15))


def test_tensor_reductions_pass_through_the_receiver_check(monkeypatch):
    from multiprocessing.reduction import ForkingPickler

    import torch

    monkeypatch.setattr(ForkingPickler, "_extra_reducers", dict(ForkingPickler._extra_reducers))
    ipc.install()
    ipc.install()  # idempotent
    reduce = ForkingPickler._extra_reducers[torch.Tensor]
    assert reduce.__wrapped__ is torch.multiprocessing.reductions.reduce_tensor
    t = torch.arange(6.0)
    assert torch.equal(ForkingPickler.loads(ForkingPickler.dumps(t)), t), "CPU tensors as before"


@needs_pidfd
def test_a_device_in_use_later_is_granted_the_shared_memory_open_before(host_devices):
    """Note [Peers are the devices in use]: a receiver that opened memory on device 0 and then
    uses device 1 (a copy there) needs the shared range granted to device 1 too."""
    d0 = host_devices(0)
    ptr = d0.allocate(6 * MiB)
    handle, _ = d0.share(ptr)
    memory = _C.SharedMemory(d0.backend, handle)  # opened here, as a receiver would
    own = d0.stats()["vmm.mapped_bytes.current"]
    host_devices(1)
    assert d0.backend.peer_granted_bytes(1) == own + memory.bytes
    del memory
    d0.deallocate(ptr)
