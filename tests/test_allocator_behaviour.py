"""Scripted allocator scenarios: stitching and aliasing, fragmentation, the cap and OOM,
empty_cache, failures injected mid-stitch, streams and threads. Every test runs on each
backend (see conftest)."""
from __future__ import annotations

import threading

import pytest
from conftest import MiB, assert_stitched_aliases_its_chunks, pattern

import vmmalloc
from vmmalloc._C import testing

CHUNK = vmmalloc.CHUNK_SIZE


def test_stitched_block_aliases_the_chunks_it_was_built_from(kind):
    alloc = kind.allocator(64 * MiB)
    be = alloc.backend
    blocks = [alloc.allocate(4 * MiB) for _ in range(4)]
    alloc.deallocate(blocks[0])
    alloc.deallocate(blocks[2])
    created_before = alloc.stats()["num_device_alloc"]

    stitched = alloc.allocate(8 * MiB)

    stats = alloc.stats()
    assert stats["vmm.stitches"] == 1
    assert stats["num_device_alloc"] == created_before, "stitching must not create chunks"
    data = pattern(7, 8 * MiB)
    be.write(stitched, data)
    assert_stitched_aliases_its_chunks(alloc, stitched, data)


FRAGMENTED_CAP = 160 * MiB


def fragmented(kind, conf=""):
    """Eight 20 MiB blocks fill a 160 MiB cap; every other one is freed, leaving 80 MiB in
    holes no single one of which fits an 80 MiB request. Returns the allocator and its
    statistics at that point."""
    conf = f"memory_cap:{FRAGMENTED_CAP}" + (f",{conf}" if conf else "")
    alloc = kind.allocator(FRAGMENTED_CAP + 8 * MiB, conf=conf)
    blocks = [alloc.allocate(20 * MiB) for _ in range(8)]
    for ptr in blocks[::2]:
        alloc.deallocate(ptr)
    return alloc, alloc.stats()


def test_fragmented_holes_serve_a_large_block_without_new_memory(kind):
    alloc, before = fragmented(kind)
    cap = FRAGMENTED_CAP
    assert before["reserved_bytes.all.current"] == cap

    big = alloc.allocate(80 * MiB)

    after = alloc.stats()
    assert after["reserved_bytes.all.current"] == cap
    assert after["num_device_alloc"] == before["num_device_alloc"]
    assert after["num_alloc_retries"] == 0
    assert after["vmm.stitches"] == 1
    alloc.backend.write(big, pattern(3, 80 * MiB))
    assert alloc.backend.read(big, 80 * MiB) == pattern(3, 80 * MiB)


def test_without_stitching_the_same_holes_cost_a_release_and_new_memory(kind):
    # The comparison point: a non-stitching allocator cannot use the holes; it must give
    # them back to the device and create the memory anew (or fail where it cannot).
    alloc, before = fragmented(kind, "stitching:false")

    alloc.allocate(80 * MiB)

    after = alloc.stats()
    assert after["vmm.stitches"] == 0
    assert after["num_alloc_retries"] == 1
    # Handles, not chunks (Note [Large handles]): each freed 20 MiB block was one 16 MiB
    # handle and two 2 MiB chunks; the 80 MiB block is five 16 MiB handles.
    assert after["num_device_free"] - before["num_device_free"] == 4 * 3
    assert after["num_device_alloc"] - before["num_device_alloc"] == 5
    assert after["reserved_bytes.all.current"] == FRAGMENTED_CAP


def test_cap_oom_error_carries_statistics_and_allocator_stays_usable(kind):
    alloc = kind.allocator(64 * MiB, conf="memory_cap:32MiB")
    a = alloc.allocate(16 * MiB)
    b = alloc.allocate(14 * MiB)
    with pytest.raises(vmmalloc.OutOfMemoryError) as caught:
        alloc.allocate(16 * MiB)
    error = caught.value
    assert isinstance(error, MemoryError)
    message = str(error)
    assert "out of memory. Tried to allocate 16.00 MiB" in message
    assert "memory_cap" in message, "the message should say how to raise the cap"
    assert error.requested_bytes == 16 * MiB
    assert error.stats["num_ooms"] == 1
    assert error.stats["num_alloc_retries"] == 1
    assert error.stats["allocated_bytes.all.current"] == 30 * MiB
    # Still usable: a request that fits succeeds, and so does one that fits after a free
    # (16 MiB + one small chunk + 14 MiB is the whole 32 MiB cap).
    small = alloc.allocate(100)
    alloc.deallocate(b)
    c = alloc.allocate(14 * MiB)
    for ptr in (a, small, c):
        alloc.deallocate(ptr)
    assert alloc.stats()["allocated_bytes.all.current"] == 0


def test_large_request_takes_back_free_small_segments_before_growing(kind):
    alloc = kind.allocator(64 * MiB, conf="memory_cap:8MiB")
    smalls = [alloc.allocate(600 * 1024) for _ in range(8)]  # 3 per segment: 3 segments
    for ptr in smalls:
        alloc.deallocate(ptr)
    assert alloc.stats()["vmm.small_segments"] == 3
    big = alloc.allocate(8 * MiB)  # needs all 4 chunks: the free segments must come back
    stats = alloc.stats()
    assert stats["vmm.small_segments"] == 0
    assert stats["reserved_bytes.all.current"] == 8 * MiB
    alloc.deallocate(big)


def test_set_memory_cap_and_fraction(kind):
    alloc = kind.allocator(64 * MiB)
    alloc.set_memory_cap(10 * MiB)
    assert alloc.memory_cap == 10 * MiB
    with pytest.raises(vmmalloc.OutOfMemoryError):
        alloc.allocate(12 * MiB)
    alloc.set_memory_fraction(1.0)
    assert alloc.memory_cap == alloc.backend.total_memory
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # PyTorch's range
        alloc.set_memory_fraction(1.5)


def test_empty_cache_returns_every_unused_chunk_and_range(kind):
    alloc = kind.allocator(128 * MiB)
    free_at_start = alloc.backend.free_memory
    ptrs = [alloc.allocate(size) for size in (100, 5000, 700_000, 3 * MiB, 9 * MiB, 20 * MiB)]
    keep = ptrs[3]
    for ptr in ptrs:
        if ptr != keep:
            alloc.deallocate(ptr)
    alloc.deallocate(alloc.allocate(6 * MiB))  # stitched from the freed blocks' chunks
    alloc.empty_cache()
    stats = alloc.stats()
    kept_chunks = len(alloc.chunk_ids(keep))
    assert stats["reserved_bytes.all.current"] >= kept_chunks * CHUNK
    alloc.deallocate(keep)
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["reserved_bytes.all.current"] == 0
    assert stats["vmm.chunks.current"] == 0
    assert stats["vmm.cached_mappings.current"] == 0
    assert stats["vmm.mapped_bytes.current"] == 0
    assert stats["num_device_alloc"] == stats["num_device_free"]
    if kind.name == "host":
        assert alloc.backend.free_memory == free_at_start


def test_empty_cache_keeps_live_data_and_trims_in_use_mappings(kind):
    alloc = kind.allocator(64 * MiB)
    big = alloc.allocate(10 * MiB)
    alloc.deallocate(big)
    prefix = alloc.allocate(5 * MiB)  # reuses the 10 MiB mapping's first 3 chunks
    alloc.backend.write(prefix, pattern(1, 5 * MiB))
    alloc.empty_cache()
    assert alloc.stats()["reserved_bytes.all.current"] == 6 * MiB
    assert alloc.backend.read(prefix, 5 * MiB) == pattern(1, 5 * MiB)
    alloc.deallocate(prefix)


@pytest.mark.parametrize("op", ["reserve", "map", "set_access"])
def test_failure_mid_stitch_leaks_nothing(kind, op):
    inner = kind.backend(64 * MiB)
    faulty = testing.FaultInjectionBackend(inner)
    alloc = kind.allocator(64 * MiB, backend=faulty)
    blocks = [alloc.allocate(4 * MiB) for _ in range(4)]
    for index, ptr in enumerate(blocks):
        faulty.write(ptr, pattern(index, 4 * MiB))
    alloc.deallocate(blocks[0])
    alloc.deallocate(blocks[2])
    before = alloc.stats()
    free_before = inner.free_memory

    faulty.fail(op, skip=1 if op == "map" else 0)
    with pytest.raises(vmmalloc.BackendError, match="injected failure"):
        alloc.allocate(8 * MiB)

    after = alloc.stats()
    for key in ("reserved_bytes.all.current", "allocated_bytes.all.current", "vmm.chunks.current",
                "vmm.cached_mappings.current", "vmm.mapped_bytes.current", "vmm.stitches"):
        assert after[key] == before[key], key
    assert after["vmm.backend_errors"] == 0
    assert inner.free_memory == free_before
    for index in (1, 3):
        assert faulty.read(blocks[index], 4 * MiB) == pattern(index, 4 * MiB)
    # The same request succeeds once the backend behaves.
    stitched = alloc.allocate(8 * MiB)
    assert alloc.stats()["vmm.stitches"] == before["vmm.stitches"] + 1
    alloc.deallocate(stitched)


def test_chunk_creation_failure_is_retried_then_reported_without_leak(kind):
    inner = kind.backend(64 * MiB)
    faulty = testing.FaultInjectionBackend(inner)
    alloc = kind.allocator(64 * MiB, backend=faulty)
    free_before = inner.free_memory
    faulty.fail("create_chunk", skip=2, count=1)  # third chunk of five fails once
    ptr = alloc.allocate(10 * MiB)
    assert alloc.stats()["num_alloc_retries"] == 1
    alloc.deallocate(ptr)
    alloc.empty_cache()
    assert inner.free_memory == free_before

    faulty.fail("create_chunk", skip=2, count=1000)
    with pytest.raises(vmmalloc.OutOfMemoryError):
        alloc.allocate(10 * MiB)
    stats = alloc.stats()
    assert stats["vmm.chunks.current"] == 0
    assert stats["reserved_bytes.all.current"] == 0
    assert inner.free_memory == free_before


def test_host_device_exhaustion_is_an_oom_error():
    # Host only: exhausting a real GPU is the GPU suite's torch-level OOM test.
    alloc = vmmalloc.Allocator(vmmalloc.HostBackend(16 * MiB))
    a = alloc.allocate(12 * MiB)
    with pytest.raises(vmmalloc.OutOfMemoryError, match="Tried to allocate 6.00 MiB"):
        alloc.allocate(6 * MiB)
    alloc.deallocate(a)
    alloc.deallocate(alloc.allocate(16 * MiB))


def test_small_requests_share_one_chunk_and_coalesce(kind):
    alloc = kind.allocator(64 * MiB)
    tiny = [alloc.allocate(4) for _ in range(1000)]
    stats = alloc.stats()
    assert stats["reserved_bytes.all.current"] == CHUNK
    assert stats["allocated_bytes.all.current"] == 1000 * 512
    assert len(set(tiny)) == 1000
    for ptr in tiny:
        alloc.deallocate(ptr)
    # Coalesced back into one free block: a 1 MiB request fits in the same segment.
    one = alloc.allocate(1 * MiB)
    assert alloc.stats()["reserved_bytes.all.current"] == CHUNK
    assert alloc.stats()["inactive_split_bytes.all.current"] == CHUNK - MiB
    alloc.deallocate(one)


def test_cached_mappings_stay_within_bounds(kind):
    alloc = kind.allocator(128 * MiB, conf="max_cached_mappings:4")
    for size_chunks in range(1, 12):
        ptr = alloc.allocate(size_chunks * CHUNK)
        alloc.deallocate(ptr)
        assert alloc.stats()["vmm.cached_mappings.current"] <= 4
    assert alloc.stats()["vmm.mapping_evictions"] > 0


def test_small_block_freed_on_one_stream_is_not_reused_on_another(kind):
    alloc = kind.allocator(64 * MiB)
    a = alloc.allocate(1000, stream=1)
    alloc.deallocate(a)
    b = alloc.allocate(1000, stream=2)
    assert b != a
    assert alloc.stats()["vmm.cross_stream_waits"] == 0
    assert alloc.allocate(1000, stream=1) == a


def test_large_reuse_across_streams_waits_for_the_old_stream(kind):
    alloc = kind.allocator(64 * MiB, conf="cross_stream_reuse:always")
    a = alloc.allocate(8 * MiB, stream=1)
    alloc.deallocate(a)
    b = alloc.allocate(8 * MiB, stream=2)
    assert b == a  # the cached mapping is reused ...
    assert alloc.stats()["vmm.cross_stream_waits"] == 1  # ... behind an event on stream 1


def test_record_stream_keeps_memory_active_until_that_stream_is_done(kind):
    alloc = kind.allocator(64 * MiB)
    # Streams 0, 1 and 2 are valid handles on CUDA too (default, legacy, per-thread).
    ptr = alloc.allocate(4 * MiB, stream=0)
    alloc.record_stream(ptr, 2)
    alloc.deallocate(ptr)
    stats = alloc.stats()
    assert stats["allocated_bytes.all.current"] == 0
    assert stats["active_bytes.all.current"] == 4 * MiB
    alloc.backend.synchronize()
    other = alloc.allocate(100)  # any allocation processes finished events
    stats = alloc.stats()
    assert stats["active_bytes.all.current"] == 512
    alloc.deallocate(other)
    with pytest.raises(ValueError, match="not a live allocation"):
        alloc.record_stream(ptr, 2)


def test_bad_frees_are_clear_errors(kind):
    alloc = kind.allocator(64 * MiB)
    ptr = alloc.allocate(3 * MiB)
    alloc.deallocate(ptr)
    with pytest.raises(ValueError, match="already freed"):
        alloc.deallocate(ptr)
    with pytest.raises(ValueError, match="does not hold"):
        alloc.deallocate(12345)


def test_zero_byte_request_is_no_memory_as_in_pytorch(kind):
    """The C++ core still gives 0 bytes a real block (torch's pluggable wrapper keys its
    bookkeeping by pointer); the Python API and the torch adapter give none, as PyTorch."""
    alloc = kind.allocator(64 * MiB)
    assert alloc.allocate(0) == 0
    assert alloc.stats()["allocation.all.current"] == 0


def test_threads_allocate_and_free_concurrently(kind):
    alloc = kind.allocator(256 * MiB)
    be = alloc.backend
    errors: list[BaseException] = []
    sizes = [64, 3000, 200_000, 900_000, 3 * MiB, 7 * MiB]

    def worker(seed: int) -> None:
        try:
            held = []
            for step in range(300):
                size = sizes[(seed * 7 + step) % len(sizes)]
                ptr = alloc.allocate(size, stream=seed % 2)
                tag = seed * 100_000 + step
                be.write(ptr, pattern(tag, min(size, 4096)))
                held.append((ptr, size, tag))
                if len(held) > 6:
                    p, s, t = held.pop(step % len(held))
                    assert be.read(p, min(s, 4096)) == pattern(t, min(s, 4096))
                    alloc.deallocate(p)
            for p, s, t in held:
                assert be.read(p, min(s, 4096)) == pattern(t, min(s, 4096))
                alloc.deallocate(p)
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = alloc.stats()
    assert stats["allocation.all.current"] == 0
    assert stats["allocated_bytes.all.current"] == 0
    alloc.empty_cache()
    assert alloc.stats()["reserved_bytes.all.current"] == 0


def test_peak_and_accumulated_statistics_reset(kind):
    alloc = kind.allocator(64 * MiB)
    ptr = alloc.allocate(6 * MiB)
    alloc.deallocate(ptr)
    stats = alloc.stats()
    assert stats["allocated_bytes.all.peak"] == 6 * MiB
    assert stats["allocated_bytes.large_pool.allocated"] == 6 * MiB
    alloc.reset_peak_stats()
    alloc.reset_accumulated_stats()
    stats = alloc.stats()
    assert stats["allocated_bytes.all.peak"] == 0
    assert stats["allocated_bytes.large_pool.allocated"] == 0
    assert stats["reserved_bytes.all.peak"] == stats["reserved_bytes.all.current"]


def test_trimmed_mapping_becomes_ready_again(kind):
    # Found by the sanitizer stress: empty_cache trimmed a mapping whose tail chunk was
    # busy elsewhere and left it counting that chunk as busy forever.
    alloc = kind.allocator(64 * MiB)
    alloc.deallocate(alloc.allocate(6 * MiB))
    b = alloc.allocate(4 * MiB)  # prefix of the 3-chunk mapping
    c = alloc.allocate(2 * MiB)  # its third chunk, stitched into a mapping of its own
    alloc.empty_cache()
    alloc.deallocate(b)
    alloc.deallocate(c)
    stats = alloc.stats()
    assert stats["vmm.ready_mappings"] == stats["vmm.cached_mappings.current"]
    stitches = stats["vmm.stitches"]
    alloc.deallocate(alloc.allocate(4 * MiB))
    assert alloc.stats()["vmm.stitches"] == stitches, "the trimmed mapping should serve it"


def test_absurd_sizes_are_out_of_memory_errors(kind):
    alloc = kind.allocator(64 * MiB)
    for size in (2**64 - 1, 2**62, 2**60):
        with pytest.raises(vmmalloc.OutOfMemoryError, match="Tried to allocate more than 1EB memory"):
            alloc.allocate(size)
    for size in (2**60 - 1, 2**50):
        with pytest.raises(vmmalloc.OutOfMemoryError, match="larger than the memory cap"):
            alloc.allocate(size)
    alloc.deallocate(alloc.allocate(4 * MiB))


def held_allocator(kind, capacity=64 * MiB, conf=""):
    """An allocator whose backend can keep stream work 'in flight' on any backend."""
    faulty = testing.FaultInjectionBackend(kind.backend(capacity))
    return kind.allocator(capacity, conf, backend=faulty), faulty


def test_record_stream_block_is_not_reused_while_the_stream_works(kind):
    # On a GPU this was a real bug: a pending free lost its events and was reused at once.
    alloc, faulty = held_allocator(kind)
    x = alloc.allocate(8 * MiB, stream=0)
    alloc.record_stream(x, 2)
    faulty.hold_events()  # stream 2 is still working when x is freed
    alloc.deallocate(x)
    for _ in range(3):  # several passes over the pending list
        y = alloc.allocate(8 * MiB, stream=0)
        assert y != x, "reused while stream 2 may still use it"
        assert alloc.stats()["vmm.pending_frees"] == 1
        alloc.deallocate(y)
    faulty.release_events()
    z = alloc.allocate(8 * MiB, stream=0)
    assert alloc.stats()["vmm.pending_frees"] == 0
    assert z == x or alloc.stats()["vmm.mapping_hits"] > 0
    alloc.deallocate(z)


def test_empty_cache_waits_for_pending_frees(kind):
    alloc, faulty = held_allocator(kind)
    x = alloc.allocate(4 * MiB)
    alloc.record_stream(x, 2)
    faulty.hold_events()
    alloc.deallocate(x)
    alloc.empty_cache()  # synchronizes the device: the pending free completes
    stats = alloc.stats()
    assert stats["vmm.pending_frees"] == 0
    assert stats["reserved_bytes.all.current"] == 0


def test_evicted_mapping_is_unmapped_only_after_its_stream_is_done(kind):
    alloc, faulty = held_allocator(kind, 128 * MiB, "max_cached_mappings:1")
    a = alloc.allocate(4 * MiB, stream=1)
    faulty.hold_events()
    alloc.deallocate(a)
    b = alloc.allocate(6 * MiB, stream=1)  # a new mapping pushes a's out of the cache
    stats = alloc.stats()
    assert stats["vmm.mapping_evictions"] == 1
    assert stats["vmm.retiring_mappings"] == 1, "a's range may still be read by stream 1"
    faulty.release_events()
    alloc.deallocate(b)
    alloc.deallocate(alloc.allocate(10 * MiB, stream=1))  # any slow path finishes retiring
    assert alloc.stats()["vmm.retiring_mappings"] == 0


@pytest.mark.parametrize("slack", [0.04, 0.0])
def test_growth_within_slack_keeps_cached_mappings_whole(kind, slack):
    alloc = kind.allocator(256 * MiB, conf=f"growth_slack:{slack}")
    keep = alloc.allocate(100 * MiB)
    alloc.deallocate(alloc.allocate(4 * MiB))  # a ready 2-chunk mapping
    before = alloc.stats()
    big = alloc.allocate(6 * MiB)  # 3 chunks: no cached mapping fits
    after = alloc.stats()
    if slack:
        # 104 MiB reserved + 6 MiB new <= 1.04 x 106 MiB allocated: grow, break nothing.
        assert after["vmm.stitches"] == before["vmm.stitches"]
        assert after["vmm.ready_mappings"] == before["vmm.ready_mappings"]
        assert after["reserved_bytes.all.current"] == 110 * MiB
    else:
        assert after["vmm.stitches"] == before["vmm.stitches"] + 1
        assert after["reserved_bytes.all.current"] == 106 * MiB
    assert after["reserved_bytes.all.peak"] <= (1 + slack) * after["allocated_bytes.all.peak"]
    alloc.deallocate(big)
    alloc.deallocate(keep)


def test_a_stitch_breaks_whole_ready_mappings_least_recently_released_first(kind):
    """Note [Breaking ready mappings]: with no spare chunk and no room to grow, a stitch
    consumes the coldest ready mapping whole before touching the next one, so as few ready
    mappings as possible stop being ready."""
    alloc = kind.allocator(64 * MiB, conf="growth_slack:0,memory_cap:24MiB")
    blocks = [alloc.allocate(8 * MiB) for _ in range(3)]  # three 4-chunk mappings, 24 MiB
    chunks = [set(alloc.chunk_ids(b)) for b in blocks]
    for b in (blocks[2], blocks[0], blocks[1]):  # released in this order: 2 is the coldest
        alloc.deallocate(b)
    assert alloc.stats()["vmm.ready_mappings"] == 3

    stitched = alloc.allocate(12 * MiB)  # 6 chunks: no mapping fits, no chunk may be created
    taken = set(alloc.chunk_ids(stitched))
    assert chunks[2] <= taken  # the coldest, whole
    assert len(taken & chunks[0]) == 2 and not taken & chunks[1]  # then the next; 1 untouched
    stats = alloc.stats()
    assert stats["vmm.stitches"] == 1 and stats["num_device_alloc"] == 12
    hits = stats["vmm.mapping_hits"]
    again = alloc.allocate(8 * MiB)  # the mapping released last is still ready
    assert set(alloc.chunk_ids(again)) == chunks[1]
    assert alloc.stats()["vmm.mapping_hits"] == hits + 1
    alloc.deallocate(again)
    alloc.deallocate(stitched)


@pytest.mark.parametrize("size", [20 * MiB, 100])
def test_a_second_free_of_a_block_whose_free_waits_for_a_stream_is_a_double_free(kind, size):
    if kind.name != "host":
        pytest.skip("stream 7 is a made-up stream, which only the host backend accepts")
    alloc = kind.allocator(64 * MiB)
    p = alloc.allocate(size)
    alloc.record_stream(p, 7)
    alloc.deallocate(p)  # pending until stream 7's work is done
    assert not alloc.owns(p)
    with pytest.raises(ValueError, match="does not hold"):
        alloc.deallocate(p)
    with pytest.raises(ValueError, match="not a live allocation"):
        alloc.record_stream(p, 7)
    again = [alloc.allocate(size) for _ in range(3)]  # the pending list is intact
    for q in again:
        alloc.deallocate(q)
    stats = alloc.stats()
    assert stats["allocation.all.current"] == 0 and stats["allocated_bytes.all.current"] == 0


def test_core_api_misuse_is_a_value_error_naming_the_argument(kind):
    alloc = kind.allocator(64 * MiB)
    for bad in (-1, 1.5, 2**64, "8", True):
        with pytest.raises(ValueError, match=r"allocate: size must be a whole number in \[0, 2\*\*64\)"):
            alloc.allocate(bad)
    with pytest.raises(ValueError, match="allocate: stream"):
        alloc.allocate(512, stream=-3)
    with pytest.raises(ValueError, match="deallocate: ptr"):
        alloc.deallocate(-8)
    with pytest.raises(ValueError, match="record_stream: stream"):
        alloc.record_stream(alloc.allocate(512), -1)
    assert alloc.allocate(0) == 0, "0 bytes is no memory, as PyTorch's allocator gives"
    alloc.deallocate(0)  # freeing it does nothing
    assert alloc.stats()["allocation.all.current"] == 1
    vt = vmmalloc._C.VirtualRange(alloc, 8 * MiB)
    with pytest.raises(ValueError, match="needs a stride > 0"):
        vt.commit(2, 0, 0, 4096)
    with pytest.raises(ValueError, match="commit: end"):
        vt.commit(1, 4096, 0, -5)
    vt.free()


def test_requests_of_an_exabyte_get_pytorchs_message(kind):
    alloc = kind.allocator(64 * MiB)
    with pytest.raises(vmmalloc.OutOfMemoryError, match="out of memory. Tried to allocate more than 1EB memory."):
        alloc.allocate(1 << 60)
    assert alloc.stats()["num_ooms"] == 0, "PyTorch does not count it either"


def test_a_memory_fraction_of_zero_allows_no_new_memory_and_reads_back_exactly(kind):
    alloc = kind.allocator(64 * MiB)
    cached = alloc.allocate(4 * MiB)
    alloc.deallocate(cached)
    alloc.set_memory_fraction(0.0)
    assert alloc.memory_fraction == 0.0
    again = alloc.allocate(4 * MiB)  # cached memory still serves
    with pytest.raises(vmmalloc.OutOfMemoryError):
        alloc.allocate(16 * MiB)
    alloc.deallocate(again)
    alloc.set_memory_fraction(0.3)
    assert alloc.memory_fraction == 0.3
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        alloc.set_memory_fraction(1.5)
