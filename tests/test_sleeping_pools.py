"""Note [Sleeping pools]: a pool gives its physical memory back and takes it again at the
same addresses, contents restored from a host backup or discarded; other memory is
untouched. Host backend (its streams here are made-up numbers, see test_private_pools.py)."""
from __future__ import annotations

import pytest
from conftest import BackendKind, MiB, pattern

import vmmalloc
from vmmalloc._C import testing

CHUNK = vmmalloc.CHUNK_SIZE
WEIGHTS = (7, 1)
KV = (7, 2)


def alloc_in(alloc, pool, sizes, stream=0):
    """Allocations under the pool's route, as torch.cuda.use_mem_pool makes them (begin,
    end, release: the caller's create_or_incref_pool keeps the pool, as a MemPool does)."""
    alloc.begin_allocate_to_pool(pool, this_thread=True)
    try:
        return [alloc.allocate(size, stream=stream) for size in sizes]
    finally:
        alloc.end_allocate_to_pool(pool)
        alloc.release_pool(pool)


@pytest.fixture
def alloc():
    return BackendKind("host").allocator(256 * MiB, conf="large_handle_size:4MiB")


def test_pause_gives_memory_back_and_resume_restores_contents_at_the_same_addresses(alloc):
    alloc.create_or_incref_pool(WEIGHTS)
    blocks = alloc_in(alloc, WEIGHTS, [40 * MiB, 3 * MiB, 5000])
    for i, (p, n) in enumerate(zip(blocks, [40 * MiB, 3 * MiB, 5000])):
        alloc.backend.write(p, pattern(i, n))
    eager = alloc.allocate(8 * MiB)
    alloc.backend.write(eager, pattern(9, 8 * MiB))
    backend_free = alloc.backend.free_memory
    reserved = alloc.stats()["reserved_bytes.all.current"]
    alloc.pause_pool(WEIGHTS, backup=True)
    assert alloc.pool_paused(WEIGHTS)
    stats = alloc.stats()
    pool_bytes = 40 * MiB + 4 * MiB + 2 * MiB  # 20 chunks, 2 (3 MiB rounded up), 1 small segment
    assert stats["reserved_bytes.all.current"] == reserved - pool_bytes
    assert stats["vmm.paused_bytes"] == pool_bytes
    assert alloc.backend.free_memory == backend_free + pool_bytes, "the backend got the memory back"
    # Something else uses the memory meanwhile, and is gone again.
    other = alloc.allocate(pool_bytes)
    alloc.backend.write(other, b"\xff" * pool_bytes)
    alloc.deallocate(other)
    alloc.empty_cache()
    alloc.resume_pool(WEIGHTS)
    assert not alloc.pool_paused(WEIGHTS)
    assert alloc.pool_allocations(WEIGHTS)[0][0] in blocks, "the blocks kept their addresses"
    for i, (p, n) in enumerate(zip(blocks, [40 * MiB, 3 * MiB, 5000])):
        assert alloc.backend.read(p, n) == pattern(i, n)
    assert alloc.backend.read(eager, 8 * MiB) == pattern(9, 8 * MiB), "untagged memory untouched"
    assert alloc.stats()["vmm.paused_bytes"] == 0
    for p in blocks + [eager]:
        alloc.deallocate(p)
    alloc.release_pool(WEIGHTS)
    assert alloc.stats()["vmm.private_pools"] == 0


def test_discard_mode_keeps_no_backup_and_other_tags_are_untouched(alloc):
    alloc.create_or_incref_pool(WEIGHTS)
    alloc.create_or_incref_pool(KV)
    (w,) = alloc_in(alloc, WEIGHTS, [6 * MiB])
    (kv,) = alloc_in(alloc, KV, [6 * MiB])
    alloc.backend.write(w, pattern(1, 6 * MiB))
    alloc.pause_pool(KV, backup=False)
    assert not alloc.pool_paused(WEIGHTS)
    assert alloc.backend.read(w, 6 * MiB) == pattern(1, 6 * MiB)
    alloc.resume_pool(KV)
    alloc.backend.write(kv, pattern(2, 6 * MiB))  # usable again: contents are the caller's
    assert alloc.backend.read(kv, 6 * MiB) == pattern(2, 6 * MiB)
    for p in (w, kv):
        alloc.deallocate(p)
    alloc.release_pool(WEIGHTS)
    alloc.release_pool(KV)


def test_stitched_aliases_in_a_paused_pool_map_one_new_handle_each(alloc):
    """A chunk stitched into two ranges of the pool comes back as one handle at both."""
    alloc.create_or_incref_pool(WEIGHTS)
    a, b, c = alloc_in(alloc, WEIGHTS, [2 * MiB, 2 * MiB, 2 * MiB])
    alloc.deallocate(a)
    alloc.deallocate(c)
    (joined,) = alloc_in(alloc, WEIGHTS, [4 * MiB])  # a stitch of a's and c's chunks
    alloc.backend.write(joined, pattern(3, 4 * MiB))
    alloc.pause_pool(WEIGHTS)
    alloc.resume_pool(WEIGHTS)
    assert alloc.backend.read(joined, 4 * MiB) == pattern(3, 4 * MiB)
    assert alloc.backend.read(a, 2 * MiB) == pattern(3, 4 * MiB)[: 2 * MiB], "a's old range aliases it still"
    for p in (b, joined):
        alloc.deallocate(p)
    alloc.release_pool(WEIGHTS)


def test_misuse_of_a_paused_pool_is_refused_and_frees_are_bookkeeping(alloc):
    alloc.create_or_incref_pool(WEIGHTS)
    (p,) = alloc_in(alloc, WEIGHTS, [4 * MiB])
    alloc.pause_pool(WEIGHTS)
    with pytest.raises(RuntimeError, match="is paused already"):
        alloc.pause_pool(WEIGHTS)
    with pytest.raises(RuntimeError, match="resume it before allocating"):
        alloc.begin_allocate_to_pool(WEIGHTS, this_thread=True)
    alloc.resume_pool(WEIGHTS)
    with pytest.raises(RuntimeError, match="not paused"):
        alloc.resume_pool(WEIGHTS)
    alloc.pause_pool(WEIGHTS)
    alloc.deallocate(p)  # a free while paused
    alloc.release_pool(WEIGHTS)  # released and empty: dropped without being mapped again
    stats = alloc.stats()
    assert stats["vmm.private_pools"] == 0 and stats["vmm.paused_bytes"] == 0
    assert stats["reserved_bytes.all.current"] == 0
    assert alloc.backend.free_memory == alloc.backend.total_memory
    with pytest.raises(ValueError, match="does not exist"):
        alloc.pause_pool(WEIGHTS)
    alloc.begin_allocate_to_pool(KV, streams=[5])
    with pytest.raises(RuntimeError, match="while a capture or use_mem_pool is under way"):
        alloc.pause_pool(KV)
    alloc.end_allocate_to_pool(KV)
    alloc.release_pool(KV)


def test_a_resume_without_memory_is_out_of_memory_and_the_pool_stays_paused(alloc):
    alloc.create_or_incref_pool(WEIGHTS)
    (p,) = alloc_in(alloc, WEIGHTS, [100 * MiB])
    alloc.backend.write(p, pattern(4, 100 * MiB))
    alloc.pause_pool(WEIGHTS)
    squatter = alloc.allocate(200 * MiB)  # takes the memory the pool gave back
    with pytest.raises(vmmalloc.OutOfMemoryError):
        alloc.resume_pool(WEIGHTS)
    assert alloc.pool_paused(WEIGHTS)
    alloc.deallocate(squatter)
    alloc.empty_cache()
    alloc.resume_pool(WEIGHTS)
    assert alloc.backend.read(p, 100 * MiB) == pattern(4, 100 * MiB)
    alloc.deallocate(p)
    alloc.release_pool(WEIGHTS)


def test_failures_mid_resume_leave_the_pool_paused_and_nothing_leaked():
    backend = testing.FaultInjectionBackend(vmmalloc.HostBackend(256 * MiB))
    alloc = vmmalloc.Allocator(backend, "large_handle_size:4MiB")
    alloc.create_or_incref_pool(WEIGHTS)
    blocks = alloc_in(alloc, WEIGHTS, [12 * MiB, 6 * MiB])
    for i, p in enumerate(blocks):
        alloc.backend.write(p, pattern(i, 6 * MiB))
    alloc.pause_pool(WEIGHTS)
    free_paused = backend.free_memory
    for op, skip in (("create_chunk", 1), ("map", 2), ("set_access", 1)):
        backend.fail(op, skip=skip)
        with pytest.raises((vmmalloc.BackendError, vmmalloc.OutOfMemoryError)):
            alloc.resume_pool(WEIGHTS)
        assert alloc.pool_paused(WEIGHTS)
        assert backend.free_memory == free_paused, f"a failed resume ({op}) kept memory"
    alloc.resume_pool(WEIGHTS)
    for i, p in enumerate(blocks):
        assert alloc.backend.read(p, 6 * MiB) == pattern(i, 6 * MiB)
    for p in blocks:
        alloc.deallocate(p)
    alloc.release_pool(WEIGHTS)
    alloc.empty_cache()
    assert backend.free_memory == backend.total_memory


def test_failed_copies_leave_a_pause_undone_and_a_resume_paused_with_its_backups():
    """A batch of host copies that fails (before any copy is issued, as a refused enqueue):
    a pause leaves the pool running with its contents, a resume leaves it paused with the
    backups it still has to restore, and neither leaks memory."""
    backend = testing.FaultInjectionBackend(vmmalloc.HostBackend(256 * MiB))
    alloc = vmmalloc.Allocator(backend, "large_handle_size:4MiB")
    alloc.create_or_incref_pool(WEIGHTS)
    blocks = alloc_in(alloc, WEIGHTS, [12 * MiB, 1000])
    alloc.backend.write(blocks[0], pattern(7, 12 * MiB))
    running = backend.free_memory
    backend.fail("copy_many", skip=0)
    with pytest.raises(vmmalloc.BackendError, match="injected failure of copy_many_to_host"):
        alloc.pause_pool(WEIGHTS)
    assert not alloc.pool_paused(WEIGHTS) and backend.free_memory == running
    assert alloc.backend.read(blocks[0], 12 * MiB) == pattern(7, 12 * MiB)
    alloc.pause_pool(WEIGHTS)
    paused = backend.free_memory
    assert paused > running
    backend.fail("copy_many", skip=0)
    with pytest.raises(vmmalloc.BackendError, match="injected failure of copy_many_from_host"):
        alloc.resume_pool(WEIGHTS)
    assert alloc.pool_paused(WEIGHTS) and backend.free_memory == paused, "back to paused, nothing kept"
    alloc.resume_pool(WEIGHTS)
    assert alloc.backend.read(blocks[0], 12 * MiB) == pattern(7, 12 * MiB), "the backups were kept for it"
    for p in blocks:
        alloc.deallocate(p)
    alloc.release_pool(WEIGHTS)
    alloc.empty_cache()
    assert backend.free_memory == backend.total_memory


def test_many_cycles_do_not_grow_anything(alloc):
    alloc.create_or_incref_pool(WEIGHTS)
    blocks = alloc_in(alloc, WEIGHTS, [20 * MiB, 1000, 3 * MiB])
    alloc.backend.write(blocks[0], pattern(5, 20 * MiB))
    first = None
    for _ in range(100):
        alloc.pause_pool(WEIGHTS)
        alloc.resume_pool(WEIGHTS)
        stats = alloc.stats()
        now = (stats["reserved_bytes.all.current"], stats["vmm.chunks.current"], alloc.backend.free_memory)
        first = first or now
        assert now == first
    assert alloc.backend.read(blocks[0], 20 * MiB) == pattern(5, 20 * MiB)
    for p in blocks:
        alloc.deallocate(p)
    alloc.release_pool(WEIGHTS)


def test_the_tagging_api_routes_this_threads_allocations_and_pauses_by_tag(host_devices):
    """vmmalloc.sleep_mode over the per-device allocators torch uses (here on the host backend)."""
    from vmmalloc import _C, sleep_mode

    device = host_devices(0)
    with sleep_mode.tagged("weights", device=0):
        w = device.allocate(6 * MiB)
    eager = device.allocate(6 * MiB)
    pool = sleep_mode.pool_of("weights", device=0)
    assert pool[0] != 0 and pool[1] != 0, "never one of torch's own pool ids"
    assert [p for p, *_ in device.pool_allocations(pool)] == [w]
    device.backend.write(w, pattern(8, 6 * MiB))
    sleep_mode.pause("weights", device=0)
    assert sleep_mode.is_paused("weights", device=0)
    assert device.stats()["vmm.paused_bytes"] == 6 * MiB
    sleep_mode.resume("weights", device=0)
    assert device.backend.read(w, 6 * MiB) == pattern(8, 6 * MiB)
    with pytest.raises(ValueError, match="non-empty string"):
        sleep_mode.pool_of("", device=0)
    for p in (w, eager):
        device.deallocate(p)
    assert _C.device_allocator(0).pool_use_count(pool) == 1, "the tag holds its pool"


def test_a_pause_waits_for_the_streams_of_pending_frees_in_the_pool():
    backend = testing.FaultInjectionBackend(vmmalloc.HostBackend(256 * MiB))
    alloc = vmmalloc.Allocator(backend, "")
    alloc.create_or_incref_pool(WEIGHTS)
    (p,) = alloc_in(alloc, WEIGHTS, [4 * MiB])
    alloc.record_stream(p, 3)
    backend.hold_events()  # stream 3's work is still running
    alloc.deallocate(p)
    assert alloc.stats()["vmm.pending_frees"] == 1
    alloc.pause_pool(WEIGHTS)  # waits for it (the held event completes), then the free is done
    assert alloc.stats()["vmm.pending_frees"] == 0
    backend.release_events()
    alloc.resume_pool(WEIGHTS)
    alloc.release_pool(WEIGHTS)
    assert alloc.stats()["vmm.private_pools"] == 0


def test_attached_virtual_tensors_sleep_and_wake_at_the_same_addresses(host_devices):
    """KV pages mapped into reserved ranges are not pool memory: attach() puts them under a
    tag, and pause/resume unmap and map their committed span in place."""
    import torch

    from vmmalloc import sleep_mode
    from vmmalloc.virtual_tensor import VirtualTensor

    device = host_devices(0)
    kv = VirtualTensor((2, 4 * MiB), torch.uint8, "cpu", allocator=device)
    kv.commit(2, 3 * MiB)
    kv.tensor[:2, :3 * MiB].fill_(5)
    sleep_mode.attach("kv", kv, device=0)
    ptr, committed = kv.tensor.data_ptr(), kv.committed_bytes
    reserved = device.stats()["reserved_bytes.all.current"]
    sleep_mode.pause("kv", backup=False, device=0)
    assert kv.asleep and sleep_mode.is_paused("kv", device=0)
    assert kv.committed_bytes == 0
    assert device.stats()["reserved_bytes.all.current"] == reserved - committed, "pages went back to the device"
    with pytest.raises(RuntimeError, match="asleep"):
        kv.commit(2, MiB)
    with pytest.raises(RuntimeError, match="asleep"):
        _ = kv.tensor  # touching unmapped pages would fault: refused instead
    with pytest.raises(RuntimeError, match="paused already"):
        sleep_mode.pause("kv", device=0)
    sleep_mode.resume("kv", device=0)
    assert not kv.asleep and not sleep_mode.is_paused("kv", device=0)
    assert kv.tensor.data_ptr() == ptr and kv.committed_bytes == committed
    assert (kv.rows, kv.start, kv.stop) == (2, 0, 3 * MiB)

    kv.tensor[:2, :3 * MiB].fill_(9)
    sleep_mode.pause("kv", backup=True, device=0)
    sleep_mode.resume("kv", device=0)
    assert bool((kv.tensor[:2, :3 * MiB] == 9).all()), "a backup restores the committed span"
    with pytest.raises(RuntimeError, match="not paused"):
        sleep_mode.resume("kv", device=0)
    with pytest.raises(TypeError, match="cannot attach"):
        sleep_mode.attach("kv", object(), device=0)

    class CacheOfOtherLayers:  # transformers' own caches: layers without virtual tensors
        layers = [object(), object()]

    with pytest.raises(TypeError, match="cannot attach"):
        sleep_mode.attach("kv", CacheOfOtherLayers(), device=0)
    kv.free()


def test_a_virtual_kv_cache_attached_to_a_tag_sleeps_with_its_layers(host_devices):
    """VirtualKVCache's layers make their buffers lazily: pause asks the cache when it runs."""
    import torch
    from transformers import LlamaConfig

    from vmmalloc import sleep_mode
    from vmmalloc.integrations.kv_cache import VirtualKVCache

    config = LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=4096)
    cache = VirtualKVCache(config, max_length=4096)
    sleep_mode.attach("cache", cache, device=0)
    keys = torch.ones(1, 2, 100, 64)
    for layer in range(2):
        cache.update(keys, keys, layer)
    buffers = [vt for layer in cache.layers for vt in layer.virtual_tensors()]
    assert len(buffers) == 2 and all(vt.committed_bytes > 0 for vt in buffers)  # K and V share one a layer
    sleep_mode.pause("cache", backup=True, device=0)
    assert all(vt.asleep and vt.committed_bytes == 0 for vt in buffers)
    sleep_mode.resume("cache", device=0)
    assert cache.get_seq_length() == 100
    assert bool((cache.layers[1].keys == 1).all()), "contents restored from the backup"
