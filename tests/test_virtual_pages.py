"""Virtual ranges in the allocator core: pages mapped where committed, from the same chunk
pool as allocations, retired only after stream work, never leaked on failure. Every test
runs on each backend (see conftest)."""
from __future__ import annotations

import gc

import pytest
from conftest import MiB, pattern

import vmmalloc
from vmmalloc import _C
from vmmalloc._C import testing

CHUNK = vmmalloc.CHUNK_SIZE


def faulty_allocator(kind, capacity=64 * MiB, conf=""):
    faulty = testing.FaultInjectionBackend(kind.backend(capacity))
    return kind.allocator(capacity, conf, backend=faulty), faulty


def test_commit_maps_exactly_the_pages_rows_need_and_growth_keeps_contents(kind):
    alloc = kind.allocator(64 * MiB)
    vr = _C.VirtualRange(alloc, 4 * 3 * CHUNK)  # 4 rows of 3 pages
    stride = 3 * CHUNK
    vr.commit(rows=2, stride=stride, begin=0, end=100)
    assert vr.live_pages() == [0, 3]
    for row in range(2):
        alloc.backend.write(vr.address + row * stride, pattern(row, 100))
    vr.commit(rows=3, stride=stride, begin=0, end=CHUNK + 1)  # grow: rows and length
    assert vr.live_pages() == [0, 1, 3, 4, 6, 7]
    for row in range(2):
        assert alloc.backend.read(vr.address + row * stride, 100) == pattern(row, 100)
    vr.commit(rows=3, stride=stride, begin=CHUNK, end=CHUNK + 1)  # a window that moved on
    assert vr.live_pages() == [1, 4, 7]
    stats = alloc.stats()
    assert stats["vmm.kv_mapped_bytes.current"] == 3 * CHUNK
    assert stats["vmm.kv_mapped_bytes.peak"] == 6 * CHUNK
    assert stats["allocated_bytes.all.current"] == 3 * CHUNK, "KV pages count as allocated memory"
    vr.free()
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["vmm.kv_mapped_bytes.current"] == 0
    assert stats["vmm.virtual_ranges"] == 0
    assert stats["reserved_bytes.all.current"] == 0


def test_kv_pages_and_tensors_share_one_memory_budget(kind):
    alloc = kind.allocator(16 * MiB)  # 8 chunks in all
    vr = _C.VirtualRange(alloc, 8 * CHUNK)
    vr.commit(1, 0, 0, 6 * CHUNK)
    with pytest.raises(vmmalloc.OutOfMemoryError, match="Tried to allocate 6.00 MiB"):
        alloc.allocate(6 * MiB)  # 6 pages + 3 chunks > 8
    vr.commit(1, 0, 0, 2 * CHUNK)  # 4 pages given back ...
    ptr = alloc.allocate(6 * MiB)  # ... serve the tensor
    assert alloc.stats()["vmm.chunks.peak"] <= 8
    alloc.deallocate(ptr)
    vr.commit(1, 0, 0, 8 * CHUNK)  # and the tensor's chunks serve pages again
    assert len(vr.live_pages()) == 8
    assert alloc.stats()["vmm.chunks.current"] == 8
    with pytest.raises(vmmalloc.OutOfMemoryError):
        alloc.allocate(1)
    vr.free()
    alloc.deallocate(alloc.allocate(16 * MiB))  # everything came back


def test_commit_past_memory_is_an_oom_and_gives_up_nothing(kind):
    alloc = kind.allocator(8 * MiB)
    vr = _C.VirtualRange(alloc, 12 * CHUNK)
    vr.commit(1, 0, 0, 2 * CHUNK)
    alloc.backend.write(vr.address, pattern(7, 4096))
    with pytest.raises(vmmalloc.OutOfMemoryError, match="Tried to allocate"):
        vr.commit(1, 0, 0, 8 * CHUNK)
    assert vr.live_pages() == [0, 1]
    assert alloc.backend.read(vr.address, 4096) == pattern(7, 4096)
    with pytest.raises(vmmalloc.OutOfMemoryError):
        vr.commit(1, 0, 6 * CHUNK, 12 * CHUNK)  # a window moved on: pages 0-1 would go ...
    assert vr.live_pages() == [0, 1], "... but not when the commit fails"
    assert alloc.backend.read(vr.address, 4096) == pattern(7, 4096)
    vr.commit(1, 0, 0, 4 * CHUNK)  # what fits still succeeds
    assert vr.live_pages() == [0, 1, 2, 3]


def test_page_given_up_stays_mapped_until_its_stream_is_done(kind):
    alloc, faulty = faulty_allocator(kind)
    vr = _C.VirtualRange(alloc, 4 * CHUNK)
    vr.commit(1, 0, 0, 2 * CHUNK, stream=1)
    chunks_before = alloc.stats()["vmm.chunks.current"]
    faulty.hold_events()  # stream 1 still reads page 1
    vr.commit(1, 0, 0, CHUNK, stream=1)
    stats = alloc.stats()
    assert stats["vmm.retiring_pages"] == 1
    assert stats["vmm.kv_mapped_bytes.current"] == CHUNK
    ptr = alloc.allocate(2 * MiB, stream=0)  # must not take the retiring page's chunk
    assert alloc.stats()["vmm.chunks.current"] == chunks_before + 1
    alloc.deallocate(ptr)
    faulty.release_events()
    alloc.deallocate(alloc.allocate(4 * MiB, stream=0))  # a slow path finishes retiring
    assert alloc.stats()["vmm.retiring_pages"] == 0


def test_retiring_page_needed_again_is_taken_back_with_its_contents(kind):
    alloc, faulty = faulty_allocator(kind)
    vr = _C.VirtualRange(alloc, 4 * CHUNK)
    vr.commit(1, 0, 0, 2 * CHUNK, stream=1)
    faulty.write(vr.address + CHUNK, pattern(3, 4096))
    faulty.hold_events()
    vr.commit(1, 0, 0, CHUNK, stream=1)  # page 1 retires ...
    vr.commit(1, 0, 0, 2 * CHUNK, stream=1)  # ... and is needed again before its event
    assert vr.live_pages() == [0, 1]
    created = alloc.stats()["num_device_alloc"]
    faulty.release_events()
    alloc.empty_cache()  # finishes every retirement: the stale one must not unmap page 1
    assert vr.live_pages() == [0, 1]
    assert faulty.read(vr.address + CHUNK, 4096) == pattern(3, 4096)
    assert alloc.stats()["num_device_alloc"] == created


@pytest.mark.parametrize("op", ["map", "set_access", "create_chunk"])
def test_failure_while_committing_leaks_nothing(kind, op):
    alloc, faulty = faulty_allocator(kind)
    vr = _C.VirtualRange(alloc, 8 * CHUNK)
    vr.commit(1, 0, 0, CHUNK)
    before = alloc.stats()
    # create_chunk fails on the first try and on the retry after releasing caches
    faulty.fail(op, skip=1 if op == "map" else 0, count=2 if op == "create_chunk" else 1)
    error = vmmalloc.OutOfMemoryError if op == "create_chunk" else vmmalloc.BackendError
    with pytest.raises(error):
        vr.commit(1, 0, 0, 4 * CHUNK)
    after = alloc.stats()
    assert vr.live_pages() == [0]
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    assert after["vmm.free_chunks"] == after["vmm.chunks.current"] - 1, "chunks taken for pages came back"
    vr.commit(1, 0, 0, 4 * CHUNK)
    assert vr.live_pages() == [0, 1, 2, 3]


def test_bad_commits_and_freed_ranges_are_clear_errors(kind):
    alloc = kind.allocator()
    vr = _C.VirtualRange(alloc, 2 * CHUNK)
    with pytest.raises(IndexError, match="reserves only 4194304 bytes"):
        vr.commit(3, CHUNK, 0, 10)
    with pytest.raises(IndexError, match="cannot commit"):
        vr.commit(1, 0, 10, 5)
    with pytest.raises(ValueError, match="at least 1 byte"):
        _C.VirtualRange(alloc, 0)
    vr.free()
    with pytest.raises(RuntimeError, match="was freed"):
        vr.commit(1, 0, 0, 10)
    with pytest.raises(RuntimeError, match="was freed"):
        vr.dlpack()


def test_exported_views_keep_the_range_reserved_after_free(kind):
    torch = pytest.importorskip("torch")
    if kind.name == "cuda":
        torch.cuda.init()
    alloc = kind.allocator()
    vr = _C.VirtualRange(alloc, 2 * CHUNK)
    vr.commit(1, 0, 0, 100)
    view = torch.from_dlpack(vr.dlpack())
    assert view.device.type == ("cuda" if kind.name == "cuda" else "cpu")
    assert view.numel() == 2 * CHUNK and vr.exports == 1
    view[:100] = 5
    assert int(view[:100].sum()) == 500
    vr.free()
    assert alloc.stats()["vmm.virtual_ranges"] == 1, "a live view keeps the address space"
    del view
    gc.collect()
    stats = alloc.stats()
    assert stats["vmm.virtual_ranges"] == 0
    assert stats["vmm.kv_mapped_bytes.current"] == 0


def test_empty_cache_keeps_committed_pages(kind):
    alloc = kind.allocator()
    vr = _C.VirtualRange(alloc, 4 * CHUNK)
    vr.commit(1, 0, 0, 2 * CHUNK)
    alloc.backend.write(vr.address, pattern(1, 4096))
    alloc.empty_cache()
    assert vr.live_pages() == [0, 1]
    assert alloc.backend.read(vr.address, 4096) == pattern(1, 4096)
    assert alloc.stats()["reserved_bytes.all.current"] == 2 * CHUNK


# ----- Note [Padding pages] ----------------------------------------------------------------


def test_padding_pages_share_one_chunk_counted_once(kind):
    alloc = kind.allocator(64 * MiB)
    vr = _C.VirtualRange(alloc, 3 * 4 * CHUNK)  # 3 rows of 4 pages
    stride = 4 * CHUNK
    # Row 0 has no padding; row 1's tokens start 2 pages in, row 2's just past a page.
    vr.commit(3, stride, 0, 3 * CHUNK + 5, row_begins=[0, 2 * CHUNK, CHUNK + 1])
    assert vr.live_pages() == [0, 1, 2, 3, 6, 7, 9, 10, 11], "own pages: tokens only"
    stats = alloc.stats()
    assert stats["vmm.kv_padding_pages"] == 3  # pages 4, 5 and 8
    assert stats["allocated_bytes.all.current"] == 10 * CHUNK, "nine own pages and the filler, once"
    assert stats["vmm.kv_mapped_bytes.current"] == 10 * CHUNK
    # Padding is readable and writable, and every padding page is the same memory.
    alloc.backend.write(vr.address + 4 * CHUNK + 64, pattern(5, 256))
    assert alloc.backend.read(vr.address + 8 * CHUNK + 64, 256) == pattern(5, 256)
    for row, page in enumerate([0, 6, 9]):  # tokens stay each row's own
        alloc.backend.write(vr.address + page * CHUNK, pattern(row, 256))
    for row, page in enumerate([0, 6, 9]):
        assert alloc.backend.read(vr.address + page * CHUNK, 256) == pattern(row, 256)
    pages = [s for s in alloc.segments() if s["kind"] == "pages"]
    assert sum(s["total_size"] for s in pages) == 10 * CHUNK, "a snapshot shows the filler once"
    vr.commit(0, 0, 0, 0)
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["vmm.kv_padding_pages"] == 0 and stats["vmm.kv_mapped_bytes.current"] == 0
    assert stats["reserved_bytes.all.current"] == 0, "the filler goes back with the last padding page"


def test_a_padding_page_that_tokens_need_gets_its_own_chunk(kind):
    alloc, faulty = faulty_allocator(kind)
    vr = _C.VirtualRange(alloc, 2 * 3 * CHUNK)
    stride = 3 * CHUNK
    vr.commit(2, stride, 0, 3 * CHUNK, stream=1, row_begins=[2 * CHUNK, 2 * CHUNK])
    assert vr.live_pages() == [2, 5] and alloc.stats()["vmm.kv_padding_pages"] == 4
    faulty.hold_events()  # the work queued on stream 1 has not finished: the move must wait for it
    vr.commit(2, stride, 0, 3 * CHUNK, stream=1, row_begins=[0, 2 * CHUNK])  # row 0's tokens begin earlier
    assert vr.live_pages() == [0, 1, 2, 5]
    faulty.release_events()
    for page in (0, 1, 3):
        faulty.write(vr.address + page * CHUNK, pattern(page, 256))
    for page in (0, 1, 3):
        assert faulty.read(vr.address + page * CHUNK, 256) == pattern(page, 256), "no page aliases another"
    # Padding that widens keeps the own chunks (any memory serves as padding).
    vr.commit(2, stride, 0, 3 * CHUNK, stream=1, row_begins=[2 * CHUNK, 2 * CHUNK])
    assert vr.live_pages() == [0, 1, 2, 5] and alloc.stats()["vmm.kv_padding_pages"] == 2
    assert alloc.stats()["allocated_bytes.all.current"] == 5 * CHUNK


def test_padding_after_a_reset_of_the_rows_reclaims_or_remaps_cleanly(kind):
    alloc, faulty = faulty_allocator(kind)
    vr = _C.VirtualRange(alloc, 2 * 2 * CHUNK)
    stride = 2 * CHUNK
    vr.commit(2, stride, 0, 2 * CHUNK, stream=1, row_begins=[CHUNK, 0])  # page 0 padding
    faulty.hold_events()
    vr.commit(0, 0, 0, 0, stream=1)  # everything retires, the padding page included
    # A new prompt, other padding: retiring page 0 (the filler) now holds tokens and gets its
    # own chunk; retiring page 2 (row 1's own) is taken back as padding, keeping its chunk.
    vr.commit(2, stride, 0, 2 * CHUNK, stream=1, row_begins=[0, CHUNK])
    assert vr.live_pages() == [0, 1, 2, 3] and alloc.stats()["vmm.kv_padding_pages"] == 0
    faulty.release_events()
    alloc.empty_cache()  # stale retirements unmap nothing still in use
    assert vr.live_pages() == [0, 1, 2, 3] and alloc.stats()["vmm.kv_padding_pages"] == 0
    for page in range(4):
        faulty.write(vr.address + page * CHUNK, pattern(page, 64))
    assert faulty.read(vr.address, 64) == pattern(0, 64)
    assert faulty.read(vr.address + 2 * CHUNK, 64) == pattern(2, 64)
    assert alloc.stats()["allocated_bytes.all.current"] == 4 * CHUNK


def test_a_padded_commit_that_runs_out_of_memory_gives_up_nothing(kind):
    alloc = kind.allocator(8 * MiB)  # 4 chunks
    vr = _C.VirtualRange(alloc, 8 * CHUNK)
    with pytest.raises(vmmalloc.OutOfMemoryError):
        vr.commit(1, 0, 0, 7 * CHUNK, row_begins=[2 * CHUNK])  # the filler and 5 own pages
    stats = alloc.stats()
    assert vr.live_pages() == [] and stats["vmm.kv_padding_pages"] == 0
    assert stats["allocated_bytes.all.current"] == 0 and stats["vmm.kv_mapped_bytes.current"] == 0
    vr.commit(1, 0, 0, 5 * CHUNK, row_begins=[2 * CHUNK])  # what fits: the filler and 3 own pages
    assert vr.live_pages() == [2, 3, 4]


@pytest.mark.parametrize("op", ["map", "set_access"])
def test_a_backend_failure_while_mapping_padding_leaks_nothing(kind, op):
    alloc, faulty = faulty_allocator(kind)
    vr = _C.VirtualRange(alloc, 4 * CHUNK)
    faulty.fail(op, skip=0, count=1)
    with pytest.raises(vmmalloc.BackendError):
        vr.commit(1, 0, 0, 4 * CHUNK, row_begins=[2 * CHUNK])
    stats = alloc.stats()
    assert vr.live_pages() == [] and stats["vmm.kv_padding_pages"] == 0
    assert stats["allocated_bytes.all.current"] == 0
    assert stats["vmm.free_chunks"] == stats["vmm.chunks.current"], "the chunks drawn came back"
    vr.commit(1, 0, 0, 4 * CHUNK, row_begins=[2 * CHUNK])
    assert vr.live_pages() == [2, 3] and alloc.stats()["vmm.kv_padding_pages"] == 2


def test_row_begins_of_another_length_are_a_clear_error(kind):
    alloc = kind.allocator()
    vr = _C.VirtualRange(alloc, 4 * CHUNK)
    with pytest.raises(ValueError, match="got 1 row beginnings; give one per row"):
        vr.commit(2, 2 * CHUNK, 0, CHUNK, row_begins=[0])
    with pytest.raises((ValueError, TypeError), match="row_begins"):
        vr.commit(1, 0, 0, CHUNK, row_begins=[-1])


def test_a_filler_only_retiring_pages_map_may_go_in_an_out_of_memory_retry(kind):
    """The retry of an out-of-memory commit finishes retirements; when only retiring pages
    mapped the filler, it goes back to the pool then, and the commit draws a new one."""
    alloc, faulty = faulty_allocator(kind, capacity=3 * CHUNK)
    first = _C.VirtualRange(alloc, 2 * CHUNK)
    first.commit(1, 0, 0, 2 * CHUNK, stream=1, row_begins=[CHUNK])  # the filler and one own page
    faulty.hold_events()
    first.commit(0, 0, 0, 0, stream=1)  # both retire: their chunks stay taken
    second = _C.VirtualRange(alloc, 4 * CHUNK)
    second.commit(1, 0, 0, 4 * CHUNK, stream=1, row_begins=[2 * CHUNK])  # 2 padding + 2 own: retries
    stats = alloc.stats()
    assert second.live_pages() == [2, 3] and stats["vmm.kv_padding_pages"] == 2
    assert stats["allocated_bytes.all.current"] == 3 * CHUNK, "two own pages and the filler once"
    faulty.release_events()
    for vr in (first, second):
        vr.free()
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["vmm.virtual_ranges"] == 0 and stats["reserved_bytes.all.current"] == 0


def test_a_retiring_padding_page_tokens_need_is_taken_back_before_memory_is_drawn(kind):
    """A padding page whose retirement is under way and that tokens now need: the commit
    that runs out of memory leaves every count as it was, and the filler never serves a
    tensor while a page maps it."""
    alloc, faulty = faulty_allocator(kind, capacity=3 * CHUNK)
    vr = _C.VirtualRange(alloc, 2 * CHUNK)
    vr.commit(1, 0, 0, 2 * CHUNK, stream=1, row_begins=[CHUNK])  # page 0 the filler, page 1 own
    hog = alloc.allocate(CHUNK, stream=0)  # the third chunk
    faulty.hold_events()
    vr.commit(0, 0, 0, 0, stream=1)  # both retire
    with pytest.raises(vmmalloc.OutOfMemoryError):
        vr.commit(1, 0, 0, 2 * CHUNK, stream=1, row_begins=[0])  # page 0 needs a chunk of its own
    stats = alloc.stats()
    assert stats["vmm.kv_padding_pages"] == 1 and stats["vmm.page_backend_errors"] == 0
    assert vr.live_pages() == [1], "taken back from retirement, nothing given up"
    faulty.release_events()
    vr.commit(0, 0, 0, 0, stream=1)
    alloc.deallocate(hog)
    alloc.empty_cache()
    vr.commit(1, 0, 0, 2 * CHUNK, stream=1, row_begins=[CHUNK])  # a filler again at page 0
    tensor = alloc.allocate(CHUNK, stream=1)
    alloc.backend.write(tensor, pattern(7, 4096))
    alloc.backend.write(vr.address, pattern(3, 4096))
    assert alloc.backend.read(tensor, 4096) == pattern(7, 4096), "the filler is no tensor's memory"
    alloc.deallocate(tensor)
    vr.free()
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["vmm.virtual_ranges"] == 0 and stats["vmm.kv_padding_pages"] == 0
    assert stats["allocated_bytes.all.current"] == 0 and stats["reserved_bytes.all.current"] == 0


def test_a_failed_own_page_map_unmaps_the_padding_the_commit_mapped(kind):
    """Padding mapped, then an own page's map fails: the commit maps nothing new."""
    alloc, faulty = faulty_allocator(kind)
    vr = _C.VirtualRange(alloc, 4 * CHUNK)
    faulty.fail("map", skip=2, count=1)  # the two padding pages map; the first own page fails
    with pytest.raises(vmmalloc.BackendError):
        vr.commit(1, 0, 0, 4 * CHUNK, row_begins=[2 * CHUNK])
    stats = alloc.stats()
    assert stats["vmm.kv_padding_pages"] == 0 and stats["allocated_bytes.all.current"] == 0
    assert stats["vmm.kv_mapped_bytes.current"] == 0 and stats["vmm.free_chunks"] == stats["vmm.chunks.current"]
    vr.commit(1, 0, 0, 4 * CHUNK, row_begins=[2 * CHUNK])
    assert vr.live_pages() == [2, 3] and alloc.stats()["vmm.kv_padding_pages"] == 2


def test_each_filler_kind_has_a_filler_of_its_own(kind):
    """Ranges of one kind (one element type) share a filler; another kind never reads what
    they wrote there (bytes of one dtype read as another can be NaN)."""
    alloc = kind.allocator(64 * MiB)
    a, b = _C.VirtualRange(alloc, 2 * CHUNK, filler_kind=1), _C.VirtualRange(alloc, 2 * CHUNK, filler_kind=1)
    c = _C.VirtualRange(alloc, 2 * CHUNK, filler_kind=2)
    for vr in (a, b, c):
        vr.commit(1, 0, 0, 2 * CHUNK, row_begins=[CHUNK])  # page 0 padding, page 1 own
    stats = alloc.stats()
    assert stats["vmm.kv_padding_pages"] == 3
    assert stats["allocated_bytes.all.current"] == 5 * CHUNK, "three own pages and two fillers"
    alloc.backend.write(a.address, pattern(1, 256))
    alloc.backend.write(c.address, pattern(2, 256))
    assert alloc.backend.read(b.address, 256) == pattern(1, 256), "one kind, one filler"
    assert alloc.backend.read(a.address, 256) == pattern(1, 256), "the other kind's filler is another chunk"
    pages = [s for s in alloc.segments() if s["kind"] == "pages"]
    assert sum(s["total_size"] for s in pages) == 5 * CHUNK, "a snapshot shows each filler once"
    c.commit(0, 0, 0, 0)
    alloc.empty_cache()
    assert alloc.stats()["allocated_bytes.all.current"] == 3 * CHUNK, "kind 2's filler went with its last page"
    with pytest.raises(ValueError, match="filler_kind must be in"):
        _C.VirtualRange(alloc, CHUNK, filler_kind=1 << 32)


def test_a_filler_whose_unmap_failed_never_serves_a_tensor(kind):
    """An unmap that fails leaves the filler mapped at that address: it must never go back
    to the pool, where a tensor would share memory with the range."""
    alloc, faulty = faulty_allocator(kind, capacity=8 * CHUNK)
    vr = _C.VirtualRange(alloc, 4 * CHUNK, filler_kind=1)
    vr.commit(1, 0, 0, 4 * CHUNK, row_begins=[3 * CHUNK])  # pages 0-2 the filler, page 3 own
    faulty.fail("unmap", skip=0, count=1)  # page 0's unmap, as tokens take the padding over
    with pytest.raises(vmmalloc.BackendError):
        vr.commit(1, 0, 0, 4 * CHUNK, row_begins=[0])
    assert alloc.stats()["vmm.page_backend_errors"] >= 1
    tensors = []
    with pytest.raises(vmmalloc.OutOfMemoryError):
        while True:
            tensors.append(alloc.allocate(CHUNK, stream=0))
    for t in tensors:
        alloc.backend.write(t, pattern(9, 64))
    assert alloc.backend.read(vr.address, 64) != pattern(9, 64), "no tensor is the filler"
