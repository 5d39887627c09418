"""Peer access between the devices a process uses (Note [Peer access], Note [Peers are the
devices in use]), on host backends standing in for GPUs: which devices are granted, and
that the grant covers exactly what is mapped, before and after a peer arrives."""
from __future__ import annotations

import pytest
from conftest import MiB

from vmmalloc import _C
from vmmalloc._C import testing


@pytest.fixture
def devices(host_devices):
    _C.configure("")
    return host_devices


def mapped_bytes(allocator: _C.Allocator) -> int:
    stats = allocator.stats()
    return stats["vmm.mapped_bytes.current"] + stats["vmm.kv_mapped_bytes.current"]


def test_a_process_on_one_device_grants_no_peer(devices):
    d0 = devices(0)
    d0.allocate(8 * MiB)
    assert d0.backend.peers() == []
    assert d0.stats()["vmm.peer_devices"] == 0


def test_a_new_device_is_granted_everything_already_mapped(devices):
    d0 = devices(0)
    large = [d0.allocate(n * MiB) for n in (3, 8, 17)]
    small = d0.allocate(4096)
    kv = _C.VirtualRange(d0, 64 * MiB)
    kv.commit(rows=1, stride=0, begin=0, end=5 * MiB)
    d0.deallocate(large[1])  # idle mappings stay mapped, and reachable once reused
    before = mapped_bytes(d0)
    assert before >= (3 + 8 + 17 + 5) * MiB

    d1 = devices(1)
    assert d0.backend.peers() == [1] and d1.backend.peers() == [0]
    assert d0.backend.peer_granted_bytes(1) == before
    assert d1.backend.peer_granted_bytes(0) == 0  # nothing was mapped on device 1 yet
    assert d0.stats()["vmm.peer_devices"] == 1

    # From now on every new mapping names the peer, KV pages included.
    d0.allocate(10 * MiB)
    kv.commit(rows=1, stride=0, begin=0, end=13 * MiB)
    assert d0.backend.peer_granted_bytes(1) == mapped_bytes(d0) == before + 10 * MiB + 8 * MiB
    d1.allocate(6 * MiB)
    assert d1.backend.peer_granted_bytes(0) == mapped_bytes(d1) == 6 * MiB
    del small, kv


def test_every_device_in_use_is_a_peer_of_every_other(devices):
    for d in (0, 2, 1):
        devices(d).allocate(2 * MiB)
    assert sorted(devices(0).backend.peers()) == [1, 2]
    assert sorted(devices(1).backend.peers()) == [0, 2]
    assert sorted(devices(2).backend.peers()) == [0, 1]
    # A peer is added once: asking again grants nothing more.
    granted = devices(0).backend.peer_granted_bytes(2)
    assert devices(0).add_peer(2) is False
    assert devices(0).add_peer(0) is False  # a device is not its own peer
    assert devices(0).backend.peer_granted_bytes(2) == granted


def test_a_failed_grant_is_counted_and_leaves_the_allocator_usable():
    inner = _C.HostBackend(64 * MiB, 0)
    backend = testing.FaultInjectionBackend(inner)
    allocator = _C.Allocator(backend)
    ptrs = [allocator.allocate(n * MiB) for n in (4, 6)]
    backend.fail("set_access", 0, 1)  # the first backfill grant fails, the second succeeds
    assert allocator.add_peer(3) is True
    stats = allocator.stats()
    assert stats["vmm.peer_access_errors"] == 1
    assert inner.peer_granted_bytes(3) in (4 * MiB, 6 * MiB)
    p = allocator.allocate(10 * MiB)
    assert allocator.owns(p)
    for q in ptrs + [p]:
        allocator.deallocate(q)
