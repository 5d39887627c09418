"""Note [Repairing blocked mappings]: a miss whose fitting idle mapping is blocked by a few
busy chunks remaps those slots in place (or, when the busy chunks lie past the request,
uses the mapping as it is) instead of stitching; only once the mapping's last use has
finished (Note [Stream progress]); a driver failure mid-repair drops the mapping and leaks
nothing. Each test runs on each backend (see conftest)."""
from __future__ import annotations

import pytest
from conftest import MiB, pattern

import vmmalloc
from vmmalloc._C import testing


def blocked_by_a_stitch(alloc):
    """S (12 MiB, six fresh chunks) is freed, then T (4 MiB) is stitched from S's first two
    chunks and kept: S is idle and blocked by two busy chunks out of six."""
    s = alloc.allocate(12 * MiB, stream=1)
    s_chunks = alloc.chunk_ids(s)
    alloc.deallocate(s)
    t = alloc.allocate(4 * MiB, stream=1)
    assert alloc.chunk_ids(t) == s_chunks[:2]
    assert alloc.stats()["vmm.stitches"] == 1
    return s, t


def test_a_blocked_mapping_is_repaired_in_place_instead_of_stitching(kind):
    alloc = kind.allocator(16 * MiB)
    s, t = blocked_by_a_stitch(alloc)
    kind_backend = alloc.backend
    kind_backend.write(t, pattern(1, 4 * MiB))

    again = alloc.allocate(12 * MiB, stream=1)

    stats = alloc.stats()
    assert again == s, "the blocked mapping was not reused"
    assert stats["vmm.repairs"] == 1 and stats["vmm.repaired_chunks"] == 2
    assert stats["vmm.stitches"] == 1, "a repair must not count (or cost) a stitch"
    assert stats["num_device_alloc"] == 8  # six, then two for the repaired slots
    assert not set(alloc.chunk_ids(again)) & set(alloc.chunk_ids(t))
    # The repaired slots map new memory: writing all of S leaves T as it was.
    kind_backend.write(again, pattern(2, 12 * MiB))
    assert kind_backend.read(t, 4 * MiB) == pattern(1, 4 * MiB)
    assert kind_backend.read(again, 12 * MiB) == pattern(2, 12 * MiB)
    alloc.deallocate(again)
    alloc.deallocate(t)


def test_without_repair_the_same_miss_stitches(kind):
    alloc = kind.allocator(16 * MiB, conf="repair_blocked:false")
    s, t = blocked_by_a_stitch(alloc)
    again = alloc.allocate(12 * MiB, stream=1)
    stats = alloc.stats()
    assert again != s
    assert stats["vmm.repairs"] == 0
    assert stats["vmm.stitches"] == 2
    alloc.deallocate(again)
    alloc.deallocate(t)


def test_busy_chunks_past_the_request_do_not_block_its_prefix(kind):
    # M2 (four chunks) and M1 (two) are freed in that order and stitched into S = M2 + M1;
    # the cache keeps two mappings, so M2 is evicted. M1 is then taken again: S is blocked,
    # but only in its last two slots, and a four-chunk request uses S's first four as is.
    alloc = kind.allocator(12 * MiB, conf="max_cached_mappings:2")
    m1 = alloc.allocate(4 * MiB, stream=1)
    m2 = alloc.allocate(8 * MiB, stream=1)
    chunks = alloc.chunk_ids(m2) + alloc.chunk_ids(m1)
    alloc.deallocate(m2)
    alloc.deallocate(m1)
    s = alloc.allocate(12 * MiB, stream=1)
    assert alloc.chunk_ids(s) == chunks
    alloc.deallocate(s)
    assert alloc.allocate(4 * MiB, stream=1) == m1
    alloc.backend.write(m1, pattern(1, 4 * MiB))

    prefix = alloc.allocate(8 * MiB, stream=1)

    stats = alloc.stats()
    assert prefix == s
    assert stats["vmm.prefix_reuses"] == 1 and stats["vmm.repairs"] == 0
    assert stats["vmm.stitches"] == 1
    alloc.backend.write(prefix, pattern(2, 8 * MiB))
    assert alloc.backend.read(m1, 4 * MiB) == pattern(1, 4 * MiB)
    alloc.deallocate(prefix)
    alloc.deallocate(m1)


def test_no_repair_while_the_mappings_last_use_may_still_run(kind):
    faulty = testing.FaultInjectionBackend(kind.backend(16 * MiB))
    alloc = kind.allocator(16 * MiB, backend=faulty)
    faulty.hold_events()  # S's last use is in flight from here on
    s, t = blocked_by_a_stitch(alloc)

    other = alloc.allocate(12 * MiB, stream=1)

    stats = alloc.stats()
    assert other != s, "a slot of S was unmapped while its last use could still run"
    assert stats["vmm.repairs"] == 0
    assert stats["vmm.stitches"] == 2
    assert stats["vmm.progress_events"] == 1, "the question should leave one event to answer it later"
    faulty.release_events()
    alloc.deallocate(other)
    alloc.deallocate(t)


@pytest.mark.parametrize("op", ["unmap", "map", "set_access"])
def test_failure_mid_repair_drops_the_mapping_and_leaks_nothing(kind, op):
    inner = kind.backend(16 * MiB)
    faulty = testing.FaultInjectionBackend(inner)
    alloc = kind.allocator(16 * MiB, backend=faulty)
    s, t = blocked_by_a_stitch(alloc)
    faulty.write(t, pattern(1, 4 * MiB))
    before = alloc.stats()
    free_before = inner.free_memory

    faulty.fail(op, skip=0)
    with pytest.raises(vmmalloc.BackendError, match="injected failure"):
        alloc.allocate(12 * MiB, stream=1)

    after = alloc.stats()
    assert after["vmm.cached_mappings.current"] == before["vmm.cached_mappings.current"] - 1
    assert after["vmm.mapped_bytes.current"] == before["vmm.mapped_bytes.current"] - 12 * MiB
    for key in ("reserved_bytes.all.current", "allocated_bytes.all.current", "vmm.chunks.current"):
        assert after[key] == before[key], key
    assert after["vmm.repairs"] == 0
    assert inner.free_memory == free_before
    assert faulty.read(t, 4 * MiB) == pattern(1, 4 * MiB)
    # Usable afterwards: the same request is served (by a stitch; S is gone).
    again = alloc.allocate(12 * MiB, stream=1)
    faulty.write(again, pattern(2, 12 * MiB))
    assert faulty.read(t, 4 * MiB) == pattern(1, 4 * MiB)
    assert faulty.read(again, 12 * MiB) == pattern(2, 12 * MiB)
    alloc.deallocate(again)
    alloc.deallocate(t)
    alloc.empty_cache()
    assert alloc.stats()["reserved_bytes.all.current"] == 0


def test_the_switch_is_validated_and_reported():
    assert vmmalloc.parse_config("")["repair_blocked"] is True
    assert vmmalloc.parse_config("repair_blocked:false")["repair_blocked"] is False
    with pytest.raises(ValueError, match="repair_blocked.*true or false"):
        vmmalloc.parse_config("repair_blocked:sometimes")
