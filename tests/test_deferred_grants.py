"""Note [Deferred grants]: access grants of new and repaired mappings run on a worker
thread; the pointer is returned at once, and whatever could observe the range before its
grant is done (copies, unmapping, unreserving, synchronize) waits for it. A grant that keeps
failing is counted and ends deferral. On the host backend, deferral is switched on by
defer_grants(); `hold` keeps grants pending until release_grants(), so that the order of
events is certain rather than timed."""
from __future__ import annotations

import threading

import pytest

import vmmalloc
from conftest import MiB, pattern


def deferring_allocator(capacity: int = 32 * MiB, conf: str = "", hold: bool = True, fail: int = 0):
    backend = vmmalloc.HostBackend(capacity)
    backend.defer_grants(hold=hold, fail=fail)
    return backend, vmmalloc.Allocator(backend, conf)


def release_soon(backend) -> threading.Timer:
    """Releases the held grants from another thread while this one waits on them."""
    timer = threading.Timer(0.05, backend.release_grants)
    timer.start()
    return timer


def test_a_new_mapping_is_returned_before_its_grant_and_a_copy_waits_for_it():
    backend, alloc = deferring_allocator()
    p = alloc.allocate(8 * MiB, stream=1)
    assert backend.pending_grants() == 1, "the grant did not wait for the worker"
    timer = release_soon(backend)
    backend.write(p, pattern(1, 8 * MiB))  # would fault on the inaccessible range otherwise
    timer.join()
    assert backend.pending_grants() == 0
    assert backend.read(p, 8 * MiB) == pattern(1, 8 * MiB)
    stats = alloc.stats()
    assert stats["vmm.deferred_grants"] == 1 and stats["vmm.deferred_grant_failures"] == 0
    alloc.deallocate(p)


def test_a_cached_hit_queues_no_grant():
    backend, alloc = deferring_allocator(hold=False)
    p = alloc.allocate(8 * MiB, stream=1)
    alloc.deallocate(p)
    assert alloc.allocate(8 * MiB, stream=1) == p
    assert alloc.stats()["vmm.deferred_grants"] == 1


def test_unmapping_and_unreserving_wait_for_a_pending_grant():
    backend, alloc = deferring_allocator()
    p = alloc.allocate(8 * MiB, stream=1)
    alloc.deallocate(p)
    timer = release_soon(backend)
    alloc.empty_cache()  # unmaps and unreserves p's range: after its grant, not under it
    timer.join()
    stats = alloc.stats()
    assert stats["vmm.deferred_grant_failures"] == 0, "a grant ran on a range already gone"
    assert stats["vmm.cached_mappings.current"] == 0
    assert backend.pending_grants() == 0


def test_stitched_and_repaired_ranges_hold_their_data():
    # The repair scenario of test_repair.py, every grant deferred: a stitch's and a repaired
    # slot's grants are queued, and the data written through them lands where it should.
    backend, alloc = deferring_allocator(16 * MiB, hold=False)
    s = alloc.allocate(12 * MiB, stream=1)
    alloc.deallocate(s)
    t = alloc.allocate(4 * MiB, stream=1)  # a stitch of S's first two chunks
    backend.write(t, pattern(1, 4 * MiB))
    again = alloc.allocate(12 * MiB, stream=1)  # S, its two blocked slots remapped
    stats = alloc.stats()
    assert again == s and stats["vmm.repaired_chunks"] == 2
    # One grant for S, one for the stitch T, one per repaired slot.
    assert stats["vmm.deferred_grants"] == 4
    backend.write(again, pattern(2, 12 * MiB))
    assert backend.read(t, 4 * MiB) == pattern(1, 4 * MiB)
    assert backend.read(again, 12 * MiB) == pattern(2, 12 * MiB)
    alloc.deallocate(again)
    alloc.deallocate(t)


def test_a_grant_that_keeps_failing_is_counted_and_ends_deferral():
    backend, alloc = deferring_allocator(hold=False, fail=3)  # every attempt of the first
    p = alloc.allocate(8 * MiB, stream=1)
    backend.synchronize()  # waits for every grant
    stats = alloc.stats()
    assert stats["vmm.deferred_grant_failures"] == 1
    assert backend.pending_grants() == 0
    # The next mapping is granted before it is returned: usable at once, nothing queued.
    q = alloc.allocate(6 * MiB, stream=1)
    assert alloc.stats()["vmm.deferred_grants"] == 1
    backend.write(q, pattern(3, 6 * MiB))
    assert backend.read(q, 6 * MiB) == pattern(3, 6 * MiB)
    alloc.deallocate(q)
    alloc.deallocate(p)


def test_a_grant_that_fails_once_is_tried_again():
    backend, alloc = deferring_allocator(hold=False, fail=1)
    p = alloc.allocate(8 * MiB, stream=1)
    backend.write(p, pattern(4, 8 * MiB))
    assert backend.read(p, 8 * MiB) == pattern(4, 8 * MiB)
    assert alloc.stats()["vmm.deferred_grant_failures"] == 0
    alloc.deallocate(p)


def test_deferred_grants_can_be_switched_off():
    backend, alloc = deferring_allocator(conf="deferred_grants:false")
    p = alloc.allocate(8 * MiB, stream=1)
    assert backend.pending_grants() == 0  # granted before returning, although held
    backend.write(p, pattern(5, 8 * MiB))
    assert alloc.stats()["vmm.deferred_grants"] == 0
    alloc.deallocate(p)
    assert vmmalloc.parse_config("")["deferred_grants"] is True
    with pytest.raises(ValueError, match="deferred_grants.*true or false"):
        vmmalloc.parse_config("deferred_grants:later")


def test_a_backend_destroyed_with_grants_queued_runs_them_first():
    backend, alloc = deferring_allocator(hold=False)
    ptrs = [alloc.allocate((2 + i) * MiB, stream=1) for i in range(4)]
    for p in ptrs:
        alloc.deallocate(p)
    del alloc, backend  # joins the worker; a hang or a crash here fails the test run
