"""Note [Large handles] and Note [Picking handles]: a request of n chunks is mapped from
n // 8 physical handles of 16 MiB (config large_handle_size) and n % 8 single 2 MiB chunks;
a large handle is mapped, stitched, repaired and released only whole, never serves a
single span or a KV page, and a larger idle mapping is reused only when the request ends
at the end of one of its handles.
num_device_alloc / num_device_free count handles, not chunks. Every allocator test runs on
each backend (see conftest)."""
from __future__ import annotations

import pytest
from conftest import MiB, assert_stitched_aliases_its_chunks, pattern

import vmmalloc
from vmmalloc import _C

CHUNK = vmmalloc.CHUNK_SIZE


def assert_holds(alloc, ptr, tag, size):
    assert alloc.backend.read(ptr, size) == pattern(tag, size)


# ----- how requests are cut into handles -------------------------------------------------


def test_a_fresh_request_is_mapped_from_large_handles_and_single_chunks(kind):
    alloc = kind.allocator(256 * MiB)
    ptr = alloc.allocate(40 * MiB)  # 20 chunks: two 16 MiB handles and four 2 MiB chunks
    stats = alloc.stats()
    assert stats["num_device_alloc"] == 6
    assert stats["vmm.large_handles"] == 2
    assert stats["vmm.chunks.current"] == 20, "chunks are still counted in 2 MiB units"
    assert stats["reserved_bytes.all.current"] == 40 * MiB
    alloc.backend.write(ptr, pattern(1, 40 * MiB))
    assert_holds(alloc, ptr, 1, 40 * MiB)
    alloc.deallocate(ptr)


@pytest.mark.parametrize("off", ["large_handle_size:0", "large_handle_size:2MiB"])
def test_large_handles_can_be_turned_off(kind, off):
    # 0, or one chunk per handle, means 2 MiB chunks only, one handle each.
    alloc = kind.allocator(256 * MiB, conf=off)
    ptr = alloc.allocate(40 * MiB)
    stats = alloc.stats()
    assert stats["num_device_alloc"] == 20
    assert stats["vmm.large_handles"] == 0
    assert stats["reserved_bytes.all.current"] == 40 * MiB
    alloc.deallocate(ptr)


def test_large_handle_size_sets_the_handle_size(kind):
    alloc = kind.allocator(256 * MiB, conf="large_handle_size:32MiB")
    ptr = alloc.allocate(80 * MiB)  # 40 chunks: two 32 MiB handles and eight single chunks
    stats = alloc.stats()
    assert stats["num_device_alloc"] == 10
    assert stats["vmm.large_handles"] == 2
    assert stats["reserved_bytes.all.current"] == 80 * MiB
    alloc.deallocate(ptr)


@pytest.mark.parametrize("good", ["large_handle_size:0", "large_handle_size:32MiB",
                                  "large_handle_size:1GiB"])
def test_large_handle_size_accepts_multiples_of_two_mib_up_to_one_gib(good):
    vmmalloc.parse_config(good)  # no exception (the parsed dict does not report the key)


@pytest.mark.parametrize("key", ["large_handle_size", "pool_large_handle_size"])
@pytest.mark.parametrize("bad", ["3MiB", "2GiB", "big"])
def test_bad_large_handle_sizes_name_the_key(key, bad):
    with pytest.raises(ValueError, match=f"'{key}'"):
        _C.parse_config(f"{key}:{bad}")


@pytest.mark.parametrize("conf, handles", [("", 0), ("pool_large_handle_size:16MiB", 2),
                                           ("pool_large_handle_size:32MiB", 1)])
def test_pool_large_handle_size_sets_the_handles_of_torchs_pools(kind, conf, handles):
    """Note [Torch's pools map single chunks]: 2 MiB chunks by default, the key's handles
    when set; the main arena keeps large_handle_size's."""
    alloc = kind.allocator(256 * MiB, conf=conf)
    alloc.begin_allocate_to_pool((0, 3), this_thread=True)  # torch's MemPool id
    in_pool = alloc.allocate(40 * MiB)
    alloc.end_allocate_to_pool((0, 3))
    assert alloc.stats()["vmm.large_handles"] == handles
    eager = alloc.allocate(40 * MiB)
    assert alloc.stats()["vmm.large_handles"] == handles + 2
    alloc.backend.write(in_pool, pattern(1, 40 * MiB))
    alloc.backend.write(eager, pattern(2, 40 * MiB))
    assert_holds(alloc, in_pool, 1, 40 * MiB)
    assert_holds(alloc, eager, 2, 40 * MiB)
    alloc.deallocate(in_pool)
    alloc.deallocate(eager)
    alloc.release_pool((0, 3))


# ----- stitching and reuse ------------------------------------------------------------------


def test_stitch_reuses_freed_large_handles_whole_and_aliases_them(kind):
    # Four 32 MiB blocks (two handles each) fill the cap; freeing blocks 0 and 2 leaves two
    # 32 MiB holes that only a stitch of their four handles can turn into 64 MiB.
    alloc = kind.allocator(128 * MiB)
    be = alloc.backend
    blocks = [alloc.allocate(32 * MiB) for _ in range(4)]
    freed_chunks = set(alloc.chunk_ids(blocks[0])) | set(alloc.chunk_ids(blocks[2]))
    alloc.deallocate(blocks[0])
    alloc.deallocate(blocks[2])
    before = alloc.stats()
    assert before["num_device_alloc"] == 8 and before["vmm.large_handles"] == 8

    stitched = alloc.allocate(64 * MiB)

    stats = alloc.stats()
    assert stats["vmm.stitches"] == 1
    assert stats["num_device_alloc"] == before["num_device_alloc"], "a stitch creates no handle"
    assert stats["vmm.stitched_handles"] == 4, "one per 16 MiB handle mapped, not one per chunk"
    assert set(alloc.chunk_ids(stitched)) == freed_chunks
    data = pattern(7, 64 * MiB)
    be.write(stitched, data)
    assert_stitched_aliases_its_chunks(alloc, stitched, data)
    alloc.deallocate(stitched)
    for b in (blocks[1], blocks[3]):
        alloc.deallocate(b)


def test_free_single_chunks_fill_a_large_span_before_memory_grows(kind):
    # Note [Picking handles], step 3: eight free single chunks (four 4 MiB blocks) serve a
    # 16 MiB request as a span of singles, though that costs eight handles, not one.
    alloc = kind.allocator(256 * MiB)
    blocks = [alloc.allocate(4 * MiB) for _ in range(4)]
    singles = {c for b in blocks for c in alloc.chunk_ids(b)}
    for b in blocks:
        alloc.deallocate(b)

    ptr = alloc.allocate(16 * MiB)

    stats = alloc.stats()
    assert set(alloc.chunk_ids(ptr)) == singles
    assert stats["num_device_alloc"] == 8 and stats["vmm.large_handles"] == 0
    assert stats["vmm.stitches"] == 1 and stats["vmm.stitched_handles"] == 8
    alloc.backend.write(ptr, pattern(3, 16 * MiB))
    assert_holds(alloc, ptr, 3, 16 * MiB)
    alloc.deallocate(ptr)


def test_a_ready_mappings_large_handle_is_taken_before_memory_grows(kind):
    # Found in review: the ready mappings' handles were gathered as if each large one counted
    # for the request, so the gathering stopped early and the request went to the
    # out-of-memory retry (a cap of exactly what is cached) with all it needed free. 18 MiB
    # is one large span and one single; the freed 32 MiB block's two handles and the 2 MiB
    # block's chunk are all free and ready.
    alloc = kind.allocator(64 * MiB, conf="memory_cap:34MiB")
    big, small = alloc.allocate(32 * MiB), alloc.allocate(2 * MiB)
    alloc.deallocate(big)
    alloc.deallocate(small)

    ptr = alloc.allocate(18 * MiB)

    stats = alloc.stats()
    assert stats["num_alloc_retries"] == 0 and stats["vmm.mapping_evictions"] == 0
    assert stats["num_device_alloc"] == 3, "nothing created: the cached memory serves"
    alloc.backend.write(ptr, pattern(9, 18 * MiB))
    assert_holds(alloc, ptr, 9, 18 * MiB)


def test_a_large_handle_replaces_singles_that_fill_a_span_in_part(kind):
    # Found in review: free single chunks that feed no ready mapping filled the large span in
    # part, the only other free memory was a ready mapping's 16 MiB handle, and a handle could
    # not take a span holding singles: memory grew (no cap) or the request retried (cap).
    # Here 16 MiB (one handle) and 8 MiB (four singles) are freed, a 2 MiB block takes one
    # single (breaking that mapping's readiness), and 18 MiB must come from what is free.
    alloc = kind.allocator(64 * MiB, conf="memory_cap:24MiB,growth_slack:0")
    handle_block, singles_block = alloc.allocate(16 * MiB), alloc.allocate(8 * MiB)
    alloc.deallocate(singles_block)
    alloc.deallocate(handle_block)
    keep = alloc.allocate(2 * MiB)

    ptr = alloc.allocate(18 * MiB)

    stats = alloc.stats()
    assert stats["num_alloc_retries"] == 0 and stats["vmm.mapping_evictions"] == 0
    assert stats["reserved_bytes.all.current"] == 24 * MiB
    assert not set(alloc.chunk_ids(ptr)) & set(alloc.chunk_ids(keep))
    alloc.backend.write(ptr, pattern(10, 18 * MiB))
    assert_holds(alloc, ptr, 10, 18 * MiB)


def reuse_ready_mapping_of_64mib(kind, request_chunks):
    """A 64 MiB block (four large handles) is freed, leaving the only idle mapping; then a
    request of `request_chunks` chunks. Returns (alloc, old base, old chunks, new ptr)."""
    alloc = kind.allocator(128 * MiB)
    old = alloc.allocate(64 * MiB)
    old_chunks = alloc.chunk_ids(old)
    alloc.deallocate(old)
    return alloc, old, old_chunks, alloc.allocate(request_chunks * CHUNK)


# Chunks of the request -> whether the 64 MiB mapping's prefix serves it: only when the
# prefix ends at a handle's end (wastes_tail), since the rest of a handle it ended in would
# be unusable while the block lives. Below 16 chunks the mapping exceeds reuse_ratio 2.
@pytest.mark.parametrize(("chunks", "reused"),
                         [(16, True), (17, False), (20, False), (24, True), (31, False)])
def test_a_larger_mapping_is_reused_only_up_to_a_handle_end(kind, chunks, reused):
    alloc, old, old_chunks, ptr = reuse_ready_mapping_of_64mib(kind, chunks)
    stats = alloc.stats()
    if reused:
        assert ptr == old
        assert stats["vmm.mapping_hits"] == 1 and stats["vmm.stitches"] == 0
        assert stats["num_device_alloc"] == 4, "a hit creates nothing"
    else:
        assert ptr != old, "the prefix would hold the rest of a large handle unusable"
        assert stats["vmm.mapping_hits"] == 0 and stats["vmm.stitches"] == 1
        # The stitch takes the idle mapping's handles whole for its large spans and creates
        # its n % 8 tail chunks: a large handle never covers a single span.
        large, singles = divmod(chunks, 8)
        taken = alloc.chunk_ids(ptr)
        assert set(taken[:large * 8]) <= set(old_chunks)
        assert not set(taken[large * 8:]) & set(old_chunks)
        assert stats["num_device_alloc"] == 4 + singles
        assert stats["vmm.large_handles"] == 4
        assert stats["vmm.stitched_handles"] == large + singles
    alloc.backend.write(ptr, pattern(chunks, chunks * CHUNK))
    assert_holds(alloc, ptr, chunks, chunks * CHUNK)
    alloc.deallocate(ptr)


def test_empty_cache_trims_an_in_use_mapping_by_whole_handles(kind):
    # 48 MiB (24 chunks) reuses the 64 MiB mapping, ending with its third handle: empty_cache
    # unmaps the fourth, idle behind the block, and releases it; the block's data survives;
    # then everything goes back.
    alloc, old, _, ptr = reuse_ready_mapping_of_64mib(kind, 24)
    assert ptr == old
    alloc.backend.write(ptr, pattern(5, 48 * MiB))

    alloc.empty_cache()

    stats = alloc.stats()
    assert stats["reserved_bytes.all.current"] == 48 * MiB
    assert stats["vmm.large_handles"] == 3
    assert stats["num_device_free"] == 1
    assert stats["vmm.free_chunks"] == 0
    assert_holds(alloc, ptr, 5, 48 * MiB)
    alloc.deallocate(ptr)
    again = alloc.allocate(48 * MiB)  # the trimmed mapping is ready again
    assert again == old and alloc.stats()["num_device_alloc"] == 4
    alloc.deallocate(again)
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["reserved_bytes.all.current"] == 0
    assert stats["vmm.large_handles"] == 0
    assert stats["num_device_alloc"] == stats["num_device_free"] == 4


# ----- repair ---------------------------------------------------------------------------------


def test_a_blocked_large_handle_is_repaired_whole(kind):
    # A (48 MiB, three handles) is freed; B (16 MiB) is stitched from A's first handle and
    # kept, so A is idle and blocked in slots 0-7. A new 48 MiB request repairs A by
    # remapping that one handle (8 blocked chunks <= 24 / 3), creating one new handle.
    alloc = kind.allocator(64 * MiB)
    a = alloc.allocate(48 * MiB, stream=1)
    a_chunks = alloc.chunk_ids(a)
    alloc.deallocate(a)
    b = alloc.allocate(16 * MiB, stream=1)
    assert alloc.chunk_ids(b) == a_chunks[:8]
    alloc.backend.write(b, pattern(1, 16 * MiB))

    again = alloc.allocate(48 * MiB, stream=1)

    stats = alloc.stats()
    assert again == a, "the blocked mapping was not repaired"
    assert stats["vmm.repairs"] == 1
    assert stats["vmm.repaired_chunks"] == 8
    assert stats["vmm.repaired_handles"] == 1, "one 16 MiB handle, not eight chunks"
    assert stats["vmm.stitches"] == 1, "only B's"
    assert stats["num_device_alloc"] == 4 and stats["vmm.large_handles"] == 4
    again_chunks = alloc.chunk_ids(again)
    assert again_chunks[8:] == a_chunks[8:]
    assert not set(again_chunks) & set(alloc.chunk_ids(b))
    alloc.backend.write(again, pattern(2, 48 * MiB))
    assert_holds(alloc, b, 1, 16 * MiB)
    assert_holds(alloc, again, 2, 48 * MiB)
    alloc.deallocate(again)
    alloc.deallocate(b)


# ----- KV pages -------------------------------------------------------------------------------


def test_kv_pages_never_take_chunks_of_free_large_handles(kind):
    # Note [KV pages]: a page maps and unmaps alone, so the free handles of the ready 32 MiB
    # mapping are left alone and the pages get single chunks of their own.
    alloc = kind.allocator(64 * MiB)
    old = alloc.allocate(32 * MiB)
    alloc.deallocate(old)
    vr = _C.VirtualRange(alloc, 8 * CHUNK)
    vr.commit(1, 0, 0, 4 * CHUNK)
    stats = alloc.stats()
    assert vr.live_pages() == [0, 1, 2, 3]
    assert stats["num_device_alloc"] == 2 + 4 and stats["vmm.large_handles"] == 2
    assert stats["vmm.ready_mappings"] == 1, "the 32 MiB mapping must stay whole"
    alloc.backend.write(vr.address, pattern(4, 4 * CHUNK))
    assert alloc.allocate(32 * MiB) == old
    assert alloc.backend.read(vr.address, 4 * CHUNK) == pattern(4, 4 * CHUNK)
    vr.free()


def test_kv_pages_under_the_cap_release_free_large_handles_on_the_retry(kind):
    # The cap is full of two free large handles that pages cannot use: the out-of-memory
    # retry releases them and the pages are served by new single chunks.
    alloc = kind.allocator(32 * MiB)
    alloc.deallocate(alloc.allocate(32 * MiB))
    vr = _C.VirtualRange(alloc, 8 * CHUNK)

    vr.commit(1, 0, 0, 4 * CHUNK)

    stats = alloc.stats()
    assert vr.live_pages() == [0, 1, 2, 3]
    assert stats["num_alloc_retries"] == 1 and stats["num_ooms"] == 0
    assert stats["num_device_free"] == 2 and stats["vmm.large_handles"] == 0
    assert stats["vmm.chunks.current"] == 4
    alloc.backend.write(vr.address, pattern(6, 4 * CHUNK))
    assert alloc.backend.read(vr.address, 4 * CHUNK) == pattern(6, 4 * CHUNK)
    vr.free()


# ----- out of memory --------------------------------------------------------------------------


def test_small_requests_under_the_cap_release_free_large_handles_on_the_retry(kind):
    # 48 MiB of free large handles and a 64 MiB cap: 2 MiB requests need single chunks.
    # The first eight grow to the cap; the ninth hits it, and the retry releases the three
    # free handles (never carving them up), so all 32 succeed.
    alloc = kind.allocator(64 * MiB)
    alloc.deallocate(alloc.allocate(48 * MiB))
    assert alloc.stats()["vmm.large_handles"] == 3

    ptrs = [alloc.allocate(2 * MiB) for _ in range(32)]

    stats = alloc.stats()
    assert stats["num_ooms"] == 0 and stats["num_alloc_retries"] == 1
    assert stats["num_device_free"] == 3 and stats["vmm.large_handles"] == 0
    assert stats["num_device_alloc"] == 3 + 32
    assert stats["reserved_bytes.all.current"] == 64 * MiB
    for tag, ptr in enumerate(ptrs):
        alloc.backend.write(ptr, pattern(tag, 2 * MiB))
    for tag, ptr in enumerate(ptrs):
        assert_holds(alloc, ptr, tag, 2 * MiB)
    for ptr in ptrs:
        alloc.deallocate(ptr)
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["reserved_bytes.all.current"] == 0
    assert stats["num_device_alloc"] == stats["num_device_free"]
