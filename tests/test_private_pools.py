"""Note [Private pools] and Note [Capture-safe mode]: the memory of CUDA graphs and
torch.cuda.MemPool in the core, with PyTorch's semantics. Routes stand for what torch does:
`streams=[s]` for a capture on stream s, `this_thread=True` for use_mem_pool. The streams are
made-up numbers, which only the host backend accepts (a CUDA call on one crashes), so these
run on the host backend; on a GPU the same semantics are tested through torch, with real
captures (tests/test_graphs_gpu.py)."""
from __future__ import annotations

import threading

import pytest
from conftest import BackendKind, MiB, pattern

import vmmalloc
from vmmalloc._C import testing

CHUNK = vmmalloc.CHUNK_SIZE


@pytest.fixture
def kind() -> BackendKind:
    return BackendKind("host")


POOL = (1, 7)
OTHER = (1, 8)
S = 5  # the capturing stream


@pytest.fixture(autouse=True, params=["torch", "tag"])
def pool_ids(request, monkeypatch):
    """Every test runs with pools of both id kinds (Note [Torch's pools map single chunks]):
    torch's, (0, n), which map single chunks, and ids with both halves set (vmmalloc's
    tags), which map large handles."""
    first = 0 if request.param == "torch" else 1
    monkeypatch.setitem(globals(), "POOL", (first, 7))
    monkeypatch.setitem(globals(), "OTHER", (first, 8))


def live_ptrs(alloc, pool):
    return [p for p, *_ in alloc.pool_allocations(pool)]


def test_a_route_sends_its_streams_to_the_pool_and_everything_else_to_the_main_arena(kind):
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    assert alloc.routes_active
    graph_large = alloc.allocate(8 * MiB, stream=S)
    graph_small = alloc.allocate(1000, stream=S)
    eager = alloc.allocate(8 * MiB, stream=0)
    alloc.end_allocate_to_pool(POOL)
    assert not alloc.routes_active
    assert sorted(live_ptrs(alloc, POOL)) == sorted([graph_large, graph_small])
    assert eager not in live_ptrs(alloc, POOL)
    stats = alloc.stats()
    assert stats["allocated_bytes.all.current"] == 16 * MiB + 1024, "pool memory counts as allocated"
    assert stats["vmm.private_pools"] == 1
    assert stats["vmm.private_pool_bytes"] == 10 * MiB  # 8 MiB large + one 2 MiB small segment
    for p in (graph_large, graph_small, eager):
        alloc.deallocate(p)
    alloc.release_pool(POOL)


def test_allocated_bytes_are_split_between_the_main_arena_and_the_pools_with_peaks(kind):
    """vmm.main_allocated_bytes + vmm.private_pool_allocated_bytes == allocated_bytes.all,
    at every moment, each with its own peak: pages, pending frees and restores included."""
    from vmmalloc import _C

    alloc = kind.allocator(256 * MiB)

    def split():
        s = alloc.stats()
        main, pools = s["vmm.main_allocated_bytes.current"], s["vmm.private_pool_allocated_bytes.current"]
        assert main + pools == s["allocated_bytes.all.current"]
        return main, pools, s["vmm.main_allocated_bytes.peak"], s["vmm.private_pool_allocated_bytes.peak"]

    eager = alloc.allocate(8 * MiB, stream=0)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    graph = [alloc.allocate(6 * MiB, stream=S), alloc.allocate(1000, stream=S)]
    alloc.end_allocate_to_pool(POOL)
    assert split() == (8 * MiB, 6 * MiB + 1024, 8 * MiB, 6 * MiB + 1024)
    state = alloc.pool_allocations(POOL)
    alloc.record_stream(graph[0], 3)
    alloc.deallocate(graph[0])  # pending on stream 3: no longer allocated
    alloc.deallocate(eager)
    assert split() == (0, 1024, 8 * MiB, 6 * MiB + 1024)
    alloc.reset_peak_stats()
    assert split() == (0, 1024, 0, 1024)
    vr = _C.VirtualRange(alloc, 4 * CHUNK)
    vr.commit(rows=1, stride=4 * CHUNK, begin=0, end=2 * CHUNK)  # KV pages: main-arena memory
    assert split() == (2 * CHUNK, 1024, 2 * CHUNK, 1024)
    del vr
    alloc.empty_cache()  # finishes the pending free
    alloc.restore_pool(POOL, state)  # both recorded blocks live again
    assert split() == (0, 6 * MiB + 1024, 2 * CHUNK, 6 * MiB + 1024)
    for p, *_ in alloc.pool_allocations(POOL):
        alloc.deallocate(p)
    assert split()[:2] == (0, 0)
    alloc.release_pool(POOL)


def test_memory_freed_in_a_pool_is_reused_only_by_that_pool(kind):
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    a = alloc.allocate(8 * MiB, stream=S)
    small = alloc.allocate(4096, stream=S)
    alloc.deallocate(a)  # freed inside the capture
    alloc.deallocate(small)
    again = alloc.allocate(8 * MiB, stream=S)
    assert again == a, "the pool reuses its own freed block"
    alloc.end_allocate_to_pool(POOL)
    alloc.deallocate(again)
    # Eager code never gets the pool's addresses or chunks, even under pressure.
    pool_chunks = alloc.stats()["vmm.private_pool_bytes"] // CHUNK
    eager = [alloc.allocate(8 * MiB) for _ in range(4)]
    assert a not in eager
    eager_small = alloc.allocate(4096)
    assert eager_small != small
    assert alloc.stats()["vmm.private_pool_bytes"] // CHUNK == pool_chunks
    for p in eager + [eager_small]:
        alloc.deallocate(p)
    alloc.empty_cache()  # the main arena gives back; the pool keeps everything
    assert alloc.stats()["reserved_bytes.all.current"] == pool_chunks * CHUNK
    alloc.release_pool(POOL)
    assert alloc.stats()["vmm.private_pools"] == 0


def test_pool_memory_is_never_stitched_into_eager_mappings(kind):
    alloc = kind.allocator(64 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    graph = [alloc.allocate(4 * MiB, stream=S) for _ in range(4)]
    for p in graph[::2]:
        alloc.deallocate(p)  # 8 MiB free in the pool, in two holes
    alloc.end_allocate_to_pool(POOL)
    pool_chunk_ids = set()
    for p in graph[1::2]:
        pool_chunk_ids |= set(alloc.chunk_ids(p))
    # Fill the rest of the cap eagerly: 64 MiB - 16 MiB pool = 48 MiB for eager code.
    eager = alloc.allocate(48 * MiB)
    assert not set(alloc.chunk_ids(eager)) & pool_chunk_ids
    with pytest.raises(vmmalloc.OutOfMemoryError):
        alloc.allocate(8 * MiB)  # the pool's 8 MiB of holes are not eager memory
    alloc.deallocate(eager)
    for p in graph[1::2]:
        alloc.deallocate(p)
    alloc.release_pool(POOL)


def test_stitching_works_inside_a_pool_from_its_own_free_chunks(kind):
    alloc = kind.allocator(256 * MiB, conf="large_handle_size:0")
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    blocks = [alloc.allocate(4 * MiB, stream=S) for _ in range(4)]
    freed = set(alloc.chunk_ids(blocks[0])) | set(alloc.chunk_ids(blocks[2]))
    alloc.deallocate(blocks[0])
    alloc.deallocate(blocks[2])
    before = alloc.stats()
    joined = alloc.allocate(8 * MiB, stream=S)
    after = alloc.stats()
    assert after["vmm.private_pool_bytes"] == before["vmm.private_pool_bytes"], "no growth: a stitch"
    assert after["vmm.stitches"] == before["vmm.stitches"], "main-arena stitches are not counted"
    assert set(alloc.chunk_ids(joined)) == freed
    alloc.backend.write(joined, pattern(3, 8 * MiB))
    assert alloc.backend.read(joined, 8 * MiB) == pattern(3, 8 * MiB)
    alloc.end_allocate_to_pool(POOL)
    for p in (joined, blocks[1], blocks[3]):
        alloc.deallocate(p)
    alloc.release_pool(POOL)


def test_a_released_pool_keeps_live_memory_and_returns_its_chunks_after_the_last_free(kind):
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    out = alloc.allocate(6 * MiB, stream=S)  # a graph's static output
    tmp = alloc.allocate(10 * MiB, stream=S)
    alloc.deallocate(tmp)
    alloc.end_allocate_to_pool(POOL)
    alloc.backend.write(out, pattern(9, 6 * MiB))
    assert alloc.pool_use_count(POOL) == 1
    alloc.release_pool(POOL)  # the graph is gone; its output lives on
    assert alloc.pool_use_count(POOL) == 0
    assert alloc.stats()["vmm.private_pools"] == 1
    assert alloc.backend.read(out, 6 * MiB) == pattern(9, 6 * MiB)
    reserved = alloc.stats()["reserved_bytes.all.current"]
    alloc.deallocate(out)
    stats = alloc.stats()
    assert stats["vmm.private_pools"] == 0
    assert stats["reserved_bytes.all.current"] == reserved, "the chunks joined the main arena"
    assert stats["vmm.free_chunks"] * CHUNK == reserved
    eager = alloc.allocate(16 * MiB)  # served from them without new memory
    assert alloc.stats()["reserved_bytes.all.current"] == reserved
    alloc.deallocate(eager)
    alloc.empty_cache()
    assert alloc.stats()["reserved_bytes.all.current"] == 0


def test_use_counts_follow_torch(kind):
    alloc = kind.allocator(64 * MiB)
    assert alloc.pool_use_count(POOL) == 0
    alloc.create_or_incref_pool(POOL)  # MemPool()
    assert alloc.pool_use_count(POOL) == 1
    alloc.begin_allocate_to_pool(POOL, this_thread=True)  # use_mem_pool
    assert alloc.pool_use_count(POOL) == 2
    p = alloc.allocate(4 * MiB)
    alloc.end_allocate_to_pool(POOL)
    alloc.release_pool(POOL)
    assert alloc.pool_use_count(POOL) == 1
    alloc.deallocate(p)
    assert alloc.stats()["vmm.private_pools"] == 1, "the MemPool still holds it"
    alloc.release_pool(POOL)  # ~MemPool
    assert alloc.stats()["vmm.private_pools"] == 0
    alloc.release_pool(POOL)  # unknown by now: ignored, as torch does
    with pytest.raises(ValueError, match="names no pool"):
        alloc.create_or_incref_pool((0, 0))


def test_a_thread_route_takes_only_that_threads_requests(kind):
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(POOL, this_thread=True)
    mine = alloc.allocate(4 * MiB)
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(alloc.allocate(4 * MiB)))
    worker.start()
    worker.join()
    alloc.end_allocate_to_pool(POOL)
    assert live_ptrs(alloc, POOL) == [mine]
    alloc.deallocate(theirs[0])
    alloc.deallocate(mine)
    alloc.release_pool(POOL)


def test_routes_are_tried_in_the_order_they_began(kind):
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    alloc.begin_allocate_to_pool(OTHER, streams=[S, 6])
    first = alloc.allocate(4 * MiB, stream=S)
    second = alloc.allocate(4 * MiB, stream=6)
    assert live_ptrs(alloc, POOL) == [first]
    assert live_ptrs(alloc, OTHER) == [second]
    alloc.end_allocate_to_pool(POOL)
    assert alloc.routes_active, "the other route is still on"
    third = alloc.allocate(4 * MiB, stream=S)
    assert third in live_ptrs(alloc, OTHER)
    alloc.end_allocate_to_pool(OTHER)
    for p in (first, second, third):
        alloc.deallocate(p)
    alloc.release_pool(POOL)
    alloc.release_pool(OTHER)
    assert alloc.stats()["vmm.private_pools"] == 0


def test_graphs_sharing_a_pool_reuse_each_others_freed_memory(kind):
    """torch.cuda.graph(pool=...): a second capture into the same pool reuses what the first
    freed (PyTorch's sharing semantics)."""
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    tmp = alloc.allocate(8 * MiB, stream=S)
    out1 = alloc.allocate(2 * MiB, stream=S)
    alloc.deallocate(tmp)
    alloc.end_allocate_to_pool(POOL)
    alloc.begin_allocate_to_pool(POOL, streams=[S])  # the second graph, same pool
    assert alloc.pool_use_count(POOL) == 2
    tmp2 = alloc.allocate(8 * MiB, stream=S)
    assert tmp2 == tmp
    alloc.deallocate(tmp2)
    alloc.end_allocate_to_pool(POOL)
    alloc.release_pool(POOL)
    alloc.release_pool(POOL)
    alloc.deallocate(out1)
    assert alloc.stats()["vmm.private_pools"] == 0


def test_checkpoint_and_restore_of_a_pools_live_set(kind):
    """Graph trees: getCheckpointState after recording one path, setCheckpointPoolState
    before recording another, from whatever the pool holds then."""
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    keep_large = alloc.allocate(6 * MiB, stream=S)
    keep_small = alloc.allocate(3000, stream=S)
    gone = alloc.allocate(4 * MiB, stream=S)
    alloc.deallocate(gone)
    alloc.end_allocate_to_pool(POOL)
    state = alloc.pool_allocations(POOL)
    assert [p for p, *_ in state] == sorted([keep_large, keep_small])
    small_entry = next(b for b in state if b[0] == keep_small)
    assert small_entry[1] == 3072 and small_entry[2] == 3000 and small_entry[3] == S
    # Another path ran: the outputs died, other blocks went live.
    alloc.deallocate(keep_large)
    alloc.deallocate(keep_small)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    other_path = [alloc.allocate(6 * MiB, stream=S), alloc.allocate(2000, stream=S)]
    alloc.end_allocate_to_pool(POOL)
    allocated = alloc.stats()["allocated_bytes.all.current"]
    freed = alloc.restore_pool(POOL, state)
    assert sorted(freed) == sorted(other_path)
    assert alloc.pool_allocations(POOL) == state
    assert alloc.stats()["allocated_bytes.all.current"] == allocated - 6 * MiB - 2048 + 6 * MiB + 3072
    alloc.backend.write(keep_large, pattern(1, 6 * MiB))
    assert alloc.backend.read(keep_large, 6 * MiB) == pattern(1, 6 * MiB)
    # The restored blocks are ordinary allocations: freed like any other.
    alloc.deallocate(keep_large)
    alloc.deallocate(keep_small)
    assert alloc.pool_allocations(POOL) == []
    alloc.release_pool(POOL)
    alloc.release_pool(POOL)
    assert alloc.stats()["vmm.private_pools"] == 0


def test_a_restore_that_cannot_place_a_block_says_which(kind):
    alloc = kind.allocator(256 * MiB)
    alloc.create_or_incref_pool(POOL)
    with pytest.raises(RuntimeError, match="cannot restore the block of 4194304 bytes"):
        alloc.restore_pool(POOL, [(0x1000_0000_0000, 4 * MiB, 4 * MiB, 0)])
    with pytest.raises(ValueError, match="does not exist"):
        alloc.restore_pool(OTHER, [])
    alloc.release_pool(POOL)


def test_capture_safe_mode_grows_instead_of_waiting_and_defers_frees_with_streams(kind):
    """While a route is active no event is recorded or queried and no stream waits for
    another: memory last used on another stream is not reused, a free with recorded streams
    waits until the mode ends."""
    inner = vmmalloc.HostBackend(256 * MiB)
    backend = testing.FaultInjectionBackend(inner)
    alloc = kind.allocator(256 * MiB, backend=backend)
    other = alloc.allocate(8 * MiB, stream=9)
    alloc.deallocate(other)  # 8 MiB free, last used on stream 9
    shared = alloc.allocate(1 * MiB, stream=0)
    alloc.record_stream(shared, 3)
    waits = alloc.stats()["vmm.cross_stream_waits"]
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    eager = alloc.allocate(8 * MiB, stream=0)  # another thread's eager request meanwhile
    alloc.deallocate(shared)
    stats = alloc.stats()
    assert stats["vmm.cross_stream_waits"] == waits, "no wait during capture-safe mode"
    assert stats["vmm.pending_frees"] == 1
    assert alloc.owns(shared) is False
    with pytest.raises(ValueError, match="does not hold"):
        alloc.deallocate(shared)  # a second free of a pending block is a double free
    alloc.empty_cache()  # would synchronize: does nothing now
    assert alloc.stats()["reserved_bytes.all.current"] > 0
    alloc.end_allocate_to_pool(POOL)
    after = alloc.allocate(512, stream=0)  # the next request does the deferred work
    assert alloc.stats()["vmm.pending_frees"] == 0
    for p in (eager, after):
        alloc.deallocate(p)
    alloc.release_pool(POOL)


def test_out_of_memory_in_capture_safe_mode_does_not_release_caches(kind):
    alloc = kind.allocator(32 * MiB)
    cached = alloc.allocate(16 * MiB)
    alloc.deallocate(cached)  # 16 MiB cached in the main arena
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    with pytest.raises(vmmalloc.OutOfMemoryError, match="no retry during CUDA graph capture"):
        alloc.allocate(24 * MiB, stream=S)
    assert alloc.stats()["num_alloc_retries"] == 0
    small = alloc.allocate(8 * MiB, stream=S)  # what fits still succeeds
    alloc.end_allocate_to_pool(POOL)
    alloc.deallocate(small)
    alloc.release_pool(POOL)
    big = alloc.allocate(24 * MiB)  # outside capture the retry releases the cache
    alloc.deallocate(big)


def test_failures_while_a_pool_grows_leak_nothing(kind):
    backend = testing.FaultInjectionBackend(vmmalloc.HostBackend(256 * MiB))
    alloc = kind.allocator(256 * MiB, backend=backend)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    for op in ("create_chunk", "map", "set_access", "reserve"):
        # An injected create_chunk failure reads as the device's out of memory, which
        # capture-safe mode meets with one more try (Note [Capture-safe mode]): fail both.
        backend.fail(op, count=2 if op == "create_chunk" else 1)
        reserved = alloc.stats()["reserved_bytes.all.current"]
        with pytest.raises((vmmalloc.BackendError, vmmalloc.OutOfMemoryError)):
            alloc.allocate(6 * MiB, stream=S)
        assert alloc.stats()["reserved_bytes.all.current"] == reserved
        assert alloc.pool_allocations(POOL) == []
    backend.fail("create_chunk")  # the second try serves it
    p = alloc.allocate(6 * MiB, stream=S)
    assert [ptr for ptr, *_ in alloc.pool_allocations(POOL)] == [p]
    alloc.end_allocate_to_pool(POOL)
    alloc.deallocate(p)
    alloc.release_pool(POOL)
    alloc.empty_cache()
    stats = alloc.stats()
    assert stats["reserved_bytes.all.current"] == 0
    assert stats["vmm.private_pools"] == 0


def test_snapshot_segments_name_their_pool(kind):
    alloc = kind.allocator(64 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    p = alloc.allocate(4 * MiB, stream=S)
    alloc.end_allocate_to_pool(POOL)
    q = alloc.allocate(2 * MiB)
    segments = alloc.segments()
    pools = {s["address"]: s["pool"] for s in segments if s["kind"] == "large"}
    assert pools[p] == POOL and pools[q] == (0, 0)
    assert sum(s["total_size"] for s in segments) == alloc.stats()["reserved_bytes.all.current"]
    alloc.deallocate(p)
    alloc.deallocate(q)
    alloc.release_pool(POOL)


def test_one_route_per_pool_at_a_time_and_no_end_without_a_route(kind):
    """As PyTorch: two threads under use_mem_pool of one pool would end each other's routes."""
    alloc = kind.allocator(64 * MiB)
    alloc.begin_allocate_to_pool(POOL, this_thread=True)
    with pytest.raises(RuntimeError, match=rf"already allocating to pool \({POOL[0]}, 7\)"):
        alloc.begin_allocate_to_pool(POOL, streams=[S])
    assert alloc.pool_use_count(POOL) == 1, "a refused route takes no reference"
    alloc.end_allocate_to_pool(POOL)
    with pytest.raises(RuntimeError, match="not allocating to pool"):
        alloc.end_allocate_to_pool(POOL)
    with pytest.raises(ValueError, match="does not exist"):
        alloc.pool_allocations(OTHER)
    alloc.release_pool(POOL)


def test_a_restore_takes_back_a_mapping_that_became_a_small_segment(kind):
    """Found by the stress phase 'pools': after the checkpoint the pool served a small
    request from the freed block's one-chunk mapping; restoring must hand it back."""
    alloc = kind.allocator(64 * MiB)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    out = alloc.allocate(2 * MiB, stream=S)
    alloc.end_allocate_to_pool(POOL)
    state = alloc.pool_allocations(POOL)
    alloc.deallocate(out)
    alloc.begin_allocate_to_pool(POOL, streams=[S])
    small = alloc.allocate(3000, stream=S)
    alloc.end_allocate_to_pool(POOL)
    assert out <= small < out + 2 * MiB, "the small block took the freed mapping as its segment"
    assert alloc.restore_pool(POOL, state) == [small]
    assert alloc.pool_allocations(POOL) == state
    alloc.deallocate(out)
    alloc.release_pool(POOL)
    alloc.release_pool(POOL)
    assert alloc.stats()["vmm.private_pools"] == 0


GRAPH_POOL = (0, 9)  # torch's id from graph_pool_handle() or MemPool()
CAPTURE_POOL = (9, 0)  # torch's id for a capture given no pool
TAG_POOL = (0x766D6D, 9)  # vmmalloc's sleep_mode tags: both halves set


def test_torchs_pools_map_single_chunks_and_tag_pools_large_handles(kind):
    """Note [Torch's pools map single chunks]."""
    alloc = kind.allocator(512 * MiB)
    blocks = []
    for pool, route in ((GRAPH_POOL, {"this_thread": True}), (CAPTURE_POOL, {"streams": [S]})):
        alloc.begin_allocate_to_pool(pool, **route)
        blocks.append(alloc.allocate(40 * MiB, stream=S))
        alloc.end_allocate_to_pool(pool)
    stats = alloc.stats()
    assert stats["vmm.large_handles"] == 0 and stats["num_device_alloc"] == 40
    alloc.begin_allocate_to_pool(TAG_POOL, this_thread=True)
    blocks.append(alloc.allocate(40 * MiB))
    alloc.end_allocate_to_pool(TAG_POOL)
    assert alloc.stats()["vmm.large_handles"] == 2, "two 16 MiB handles and four 2 MiB chunks"
    for tag, p in enumerate(blocks):
        alloc.backend.write(p, pattern(tag, 40 * MiB))
    for tag, p in enumerate(blocks):
        assert alloc.backend.read(p, 40 * MiB) == pattern(tag, 40 * MiB)
        alloc.deallocate(p)
    for pool in (GRAPH_POOL, CAPTURE_POOL, TAG_POOL):
        alloc.release_pool(pool)


def test_a_graph_pool_serves_a_new_mix_of_sizes_from_what_it_freed(kind):
    """A forward's 16 MiB blocks freed, then a backward's 22 MiB ones: the pool's free memory
    covers them, so it must not grow (with large handles it grew by every 22 MiB block's
    2 MiB tails)."""
    alloc = kind.allocator(512 * MiB)
    alloc.begin_allocate_to_pool(GRAPH_POOL, streams=[S])
    forward = [alloc.allocate(16 * MiB, stream=S) for _ in range(8)]
    for p in forward:
        alloc.deallocate(p)
    held = alloc.stats()["vmm.private_pool_bytes"]
    assert held == 128 * MiB
    backward = [alloc.allocate(22 * MiB, stream=S) for _ in range(5)]  # 110 MiB of the 128
    assert alloc.stats()["vmm.private_pool_bytes"] == held, "the pool grew with free memory of its own"
    for i, p in enumerate(backward):
        alloc.backend.write(p, pattern(i, 22 * MiB))
    for i, p in enumerate(backward):
        assert alloc.backend.read(p, 22 * MiB) == pattern(i, 22 * MiB)
        alloc.deallocate(p)
    alloc.end_allocate_to_pool(GRAPH_POOL)
    alloc.release_pool(GRAPH_POOL)
    assert alloc.stats()["vmm.private_pools"] == 0


def test_capture_safe_mode_stitches_chunks_of_ready_mappings_before_growing_past_the_slack(kind):
    """Note [Capture-safe mode]: no waits, but the slack's order. The freed blocks' chunks
    were last used on the request's own stream (no wait needed) and cover 8 of the 12
    chunks a request needs: only the other 4 are new (it grew by all 12 before)."""
    alloc = kind.allocator(256 * MiB)
    alloc.begin_allocate_to_pool(TAG_POOL, this_thread=True)
    small = [alloc.allocate(4 * MiB) for _ in range(4)]
    for p in small:
        alloc.deallocate(p)  # four ready mappings of 2 chunks each
    held = alloc.stats()["vmm.private_pool_bytes"]
    joined = alloc.allocate(24 * MiB - 4096)  # 12 chunks: no ready mapping fits
    assert alloc.stats()["vmm.private_pool_bytes"] == held + 8 * MiB
    alloc.backend.write(joined, pattern(5, 24 * MiB - 4096))
    assert alloc.backend.read(joined, 24 * MiB - 4096) == pattern(5, 24 * MiB - 4096)
    alloc.deallocate(joined)
    alloc.end_allocate_to_pool(TAG_POOL)
    alloc.release_pool(TAG_POOL)


def test_growth_the_cap_refuses_in_capture_safe_mode_takes_ready_chunks_instead(kind):
    """Note [Capture-safe mode]: growth within the slack would pass the cap, and the
    out-of-memory retry cannot run during a capture; the pool's own free chunks (last used
    on the capture's stream) plus fewer new ones fit, so the request must succeed."""
    alloc = kind.allocator(224 * MiB)
    eager = alloc.allocate(200 * MiB)
    alloc.begin_allocate_to_pool(GRAPH_POOL, streams=[S])
    for p in [alloc.allocate(4 * MiB, stream=S) for _ in range(2)]:
        alloc.deallocate(p)  # 8 MiB of the pool's, in two ready mappings
    block = alloc.allocate(20 * MiB, stream=S)  # slack: 10 new chunks, 228 MiB > the cap
    assert alloc.stats()["vmm.private_pool_bytes"] == 20 * MiB, "8 MiB reused, 12 MiB new"
    alloc.backend.write(block, pattern(7, 20 * MiB))
    assert alloc.backend.read(block, 20 * MiB) == pattern(7, 20 * MiB)
    alloc.deallocate(block)
    alloc.end_allocate_to_pool(GRAPH_POOL)
    alloc.release_pool(GRAPH_POOL)
    alloc.deallocate(eager)
