// Private pools: memory that belongs to one CUDA graph (or graph tree) or torch.cuda.MemPool.
//
// Note [Private pools]
// PyTorch's semantics (c10/cuda/CUDACachingAllocator.cpp, Note [Interaction with CUDA
// graph capture]), kept here because a graph's kernels keep reading and writing the
// addresses they were captured with, at every replay:
// - A pool id owns what is allocated into it. While a route is active (a capture, or
//   use_mem_pool on one thread), a request whose stream passes the route's filter is served
//   from that pool's arena, every other request from the main arena.
// - Memory freed inside a pool is reused only by that pool, and nothing of it is given back
//   or handed to other code until the pool is released (its use count, the graphs and
//   MemPools holding it, reaches 0) and its last allocation is freed. Then its mappings are
//   retired (unmapped once the GPU is done with them) and its chunks join the main arena,
//   where eager code and KV pages can use them at once (PyTorch waits for empty_cache).
// - A pool's arena has its own chunks, so a stitch inside it draws only on the pool's free
//   chunks (or new ones), and eager stitches never see them. Its mappings are never evicted
//   and never repaired, since a replay would reach through a captured address whatever is
//   mapped there now: every address a pool handed out keeps its chunks for the pool's life.
//   Stitching inside a pool reuses chunks freed inside it under a new address, which is the
//   aliasing PyTorch's allocator has when it reuses a freed block at its old address. Its
//   small segments are not reclaimed for large requests, so that a restore finds the
//   segments of the small blocks it records; a restore hands back the fully free segments
//   no recorded block needs.
// - Reserved and allocated statistics count pool memory, as PyTorch's do.
// - The live set of a pool can be read and restored (graph trees' checkpoints): restoring
//   frees every live allocation of the pool and allocates exactly the recorded blocks at
//   their recorded addresses, which is possible because the addresses keep their mappings.
//
// Note [Torch's pools map single chunks]
// A pool torch makes maps 2 MiB chunks only, never large handles (Note [Large handles] in
// chunk_pool.hpp), unless config pool_large_handle_size says otherwise. A large handle maps
// only whole and never serves a request's tail (Note [Picking handles]); the main arena
// gives free ones back when memory runs short, but a pool keeps every chunk for its life,
// so each change in the mix of request sizes (a forward's 16 MiB blocks freed, a
// backward's 44 MiB ones needing 2 MiB tails) leaves free handles no tail can use, and the
// pool grows instead. Measured on the trace of inductor's graph tree for a training step
// (bench/NOTES.md, "compile_graphs: the pool's live bytes"), replayed on the host backend:
// the pool held 1.47x its peak of allocated bytes with large handles, 1.023x with single
// chunks; with Note [Capture-safe mode]'s order, 1.24x and 1.007x. For a graph's
// pool what single chunks cost is paid once: its memory is mapped during warm-up and
// recording (that step's handles created: 2136 instead of 1642, the replay's driver
// estimate 109 ms instead of 85), while replays call no allocator. Eager code under
// use_mem_pool pays it at every stitch and fresh mapping in the pool (a grant per 2 MiB
// instead of per 16 MiB), and sharing a MemPool's tensor exports a handle per chunk: set
// pool_large_handle_size:16MiB where that matters more than the pool's packing.
// Torch's ids have one half zero: (0, n) from MemPool() and graph_pool_handle(), (n, 0) for
// a capture given no pool. Nothing else tells a graph's pool from a MemPool's: a graph tree
// warms up into its pool through a thread route, as use_mem_pool does. vmmalloc's own pools
// of tagged memory (sleep_mode: both halves set) keep the device's large handles: they hold
// long-lived weights and KV caches, whose sleep, wake and sharing cost per handle (Note
// [Sleeping pools]).
//
// Note [Sleeping pools]
// A pool can give its physical memory back for a while and take it again at the same
// addresses (sleep mode for RL colocation and model swapping, as vLLM's CuMemAllocator and
// SGLang's torch_memory_saver do, but over vmmalloc's one chunk pool). pause_pool waits for
// the work queued on the streams that used the pool's memory (events on those streams, not
// a device synchronize), copies out the handles that hold live data (when asked to back
// up), unmaps every range of the pool, keeping its address space, and releases the
// physical handles; chunks, mappings and blocks stay as they are, so the pool's tensors
// keep their data pointers and a graph captured on them stays valid. resume_pool creates
// new handles, maps each at the same places (a chunk stitched into several ranges is one
// handle mapped at each of them again, so aliasing is kept) and copies the backups back;
// without a backup the memory comes back with undefined contents. While paused, no route
// may send requests to the pool and nothing in it may be touched; frees of its blocks are
// bookkeeping, and a released paused pool is dropped without being mapped again.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "core/arena.hpp"
#include "core/config.hpp"

namespace vmm {

// torch's MempoolId_t: (0, 0) is no pool; MemPool() and graph_pool_handle() make (0, n), a
// capture given no pool (n, 0).
struct PoolId {
  std::uint64_t first = 0;
  std::uint64_t second = 0;
  bool operator==(const PoolId& o) const { return first == o.first && second == o.second; }
  bool operator!=(const PoolId& o) const { return !(*this == o); }
};

// A pool torch made (MemPool, graph_pool_handle, a capture's own), not one of vmmalloc's
// tags: Note [Torch's pools map single chunks].
inline bool is_torch_pool(PoolId id) { return id.first == 0 || id.second == 0; }

// Whether a request on this stream goes to the route's pool (torch's filter: the stream is
// capturing into this graph, or the request comes from the thread under use_mem_pool).
using StreamFilter = std::function<bool(StreamId)>;

// A live allocation as checkpoints record it: `size` is what it holds (a small block's
// rounded size, or whole chunks), `requested` what the caller asked for.
struct LiveBlock {
  std::uintptr_t ptr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;
  StreamId stream = 0;
};

// The device's options with what a private pool must never do turned off, and the handle
// size of torch's pools.
inline Config private_pool_config(Config config, PoolId id) {
  config.repair_blocked = false;
  if (is_torch_pool(id))
    config.large_handle_size = config.pool_large_handle_size;  // Note [Torch's pools map single chunks]
  config.max_cached_mappings = std::size_t{1} << 40;
  config.max_mapped_bytes = std::size_t{1} << 62;
  return config;
}

// The host memory a sleeping pool's backups go to: one buffer, pinned where the backend can,
// and kept after a resume, so that the pool's next pause copies at the bus's rate without
// pinning again (pinning costs about what a pageable copy does; sleep cycles repeat).
class HostBackup {
 public:
  HostBackup() = default;
  HostBackup(const HostBackup&) = delete;
  HostBackup& operator=(const HostBackup&) = delete;
  ~HostBackup() { reset(); }

  // At least `bytes` of host memory; grows (a new buffer, pinned again) only when smaller.
  unsigned char* reserve(Backend& backend, std::size_t bytes) {
    if (bytes <= size_) return data_.get();
    reset();
    data_.reset(new unsigned char[bytes]);  // uninitialized: the copies write every byte used
    size_ = bytes;
    backend_ = &backend;
    pinned_ = backend.pin_host(data_.get(), bytes);
    return data_.get();
  }
  bool pinned() const { return pinned_; }
  void reset() {
    if (pinned_) backend_->unpin_host(data_.get());
    pinned_ = false;
    data_.reset();
    size_ = 0;
  }

 private:
  Backend* backend_ = nullptr;
  std::unique_ptr<unsigned char[]> data_;
  std::size_t size_ = 0;
  bool pinned_ = false;
};

struct PrivatePool {
  PrivatePool(PoolId pool_id, Backend& backend, ChunkBudget& budget, const Config& device_config)
      : id(pool_id), config(private_pool_config(device_config, pool_id)), arena(backend, budget, config) {}

  PoolId id;
  Config config;  // before arena: its mapping cache refers to it
  Arena arena;
  int use_count = 1;     // graphs, MemPools and active routes holding it
  std::size_t live = 0;  // allocations not yet given back (pending frees included)
  // While paused (Note [Sleeping pools]): the copies that restore the handles which held
  // live data, from backup_memory to the addresses the handles are mapped at again (the
  // ranges stay reserved while paused, and backup_memory stays until the next pause).
  std::vector<Backend::HostCopy> backups;
  HostBackup backup_memory;
  bool paused() const { return arena.chunks.paused(); }
};

}  // namespace vmm
