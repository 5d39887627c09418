// The per-device caching allocator: one lock, requests routed to the small pool (<= 1 MiB)
// or to the mapping cache (larger, in 2 MiB chunks), record_stream, the out-of-memory
// retry, and statistics under PyTorch's names.
//
// Note [Out-of-memory retry]
// Growth is the last resort: a large request is served by a ready mapping, else by
// stitching free chunks, else, after finishing pending frees and handing free small
// segments back, by stitching with new chunks. If the cap or the device refuses a chunk,
// everything cached is released (device synchronized, idle mappings unmapped, free chunks
// returned) and the request is retried once; only then OutOfMemoryError is thrown, with
// the statistics. Every step leaves the allocator consistent, so the next request that
// fits succeeds.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "core/chunk_pool.hpp"
#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/event_log.hpp"
#include "core/private_pool.hpp"
#include "core/shared_memory.hpp"
#include "core/stats.hpp"
#include "core/virtual_pages.hpp"

namespace vmm {

// Note [Snapshot segments]
// A memory snapshot lists regions as PyTorch's does, so its tooling can read them: every
// busy chunk is in exactly one region (a live or pending-free large allocation, a small
// segment with its blocks, a run of KV pages), and the chunks left over are free, shown
// as one region at address 0 since a free chunk has no address of its own (it may be
// mapped by several idle mappings, or by none). The regions' sizes add up to reserved.
struct SnapshotBlock {
  enum class State { kActive, kPendingFree, kInactive };
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;
  State state = State::kActive;
};

struct SnapshotSegment {
  enum class Kind { kLarge, kSmall, kPages, kFree };
  std::uintptr_t base = 0;
  std::size_t bytes = 0;
  StreamId stream = 0;
  Kind kind = Kind::kLarge;
  std::vector<SnapshotBlock> blocks;  // tile the region in address order
  PoolId pool;                        // the private pool it belongs to; (0, 0) for the main arena
};

// Note [Host time]
// vmm.host_time_ns is the wall time callers spent in allocate and deallocate, lock waits
// included: what the allocator costs a CPU-bound training step. Only with host_timing:
// two steady-clock reads per call cost ~65 ns on a VM's host, about what a cached
// allocate + deallocate pair costs without them. Added after the lock is released.
class HostTimer {
 public:
  explicit HostTimer(std::atomic<std::int64_t>* total) : total_(total) {
    if (total_ != nullptr) start_ = std::chrono::steady_clock::now();
  }
  ~HostTimer() {
    if (total_ == nullptr) return;
    total_->fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_)
            .count(),
        std::memory_order_relaxed);
  }
  HostTimer(const HostTimer&) = delete;
  HostTimer& operator=(const HostTimer&) = delete;

 private:
  std::atomic<std::int64_t>* total_;
  std::chrono::steady_clock::time_point start_;
};

// PyTorch refuses requests of 1 EB and more up front, with a message tools match on.
constexpr std::size_t kOneExaByte = std::size_t{1} << 60;

class CachingAllocator {
 public:
  CachingAllocator(std::shared_ptr<Backend> backend, Config config = {});
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Never returns 0: a size of 0 gets a minimal block. Throws OutOfMemoryError. While a
  // route to a private pool is active, a request its filter accepts is served from that
  // pool (Note [Private pools]).
  std::uintptr_t allocate(std::size_t size, StreamId stream);
  // Throws std::invalid_argument for a pointer this allocator does not hold.
  void deallocate(std::uintptr_t ptr);
  // deallocate, or false (nothing done) for a pointer this allocator does not hold.
  bool deallocate_if_owned(std::uintptr_t ptr);
  // `ptr` is also used on `stream`: its memory is not reused before that work is done.
  void record_stream(std::uintptr_t ptr, StreamId stream);
  // Returns every unused chunk and virtual range of the main arena to the backend (private
  // pools keep theirs: Note [Private pools]). Does nothing while a route is active, since
  // it synchronizes the device (Note [Capture-safe mode]).
  void empty_cache();

  // Private pools (Note [Private pools]). A pool is created with use count 1 by the first
  // create_or_incref_pool or begin_allocate_to_pool naming it; each of those adds 1 after
  // that, and each release_pool takes 1 away.
  void create_or_incref_pool(PoolId id);
  // Routes the requests `filter` accepts to pool `id` until end_allocate_to_pool (adds 1 to
  // its use count, creating it if needed). Routes are tried in the order they began. As in
  // PyTorch, a pool has one route at a time: a second throws std::logic_error.
  void begin_allocate_to_pool(PoolId id, StreamFilter filter);
  // Ends the route to `id` (std::logic_error when there is none); its use count is
  // unchanged (release_pool takes it back).
  void end_allocate_to_pool(PoolId id);
  // At use count 0, the pool's memory goes back to the main arena once its last allocation
  // is freed. Unknown ids are ignored, as PyTorch does.
  void release_pool(PoolId id);
  int pool_use_count(PoolId id) const;  // 0 for a pool that does not exist
  bool routes_active() const;
  // The pool's live allocations (pending frees excluded), in address order; throws
  // std::invalid_argument for a pool that does not exist.
  std::vector<LiveBlock> pool_allocations(PoolId id) const;
  // Frees every live allocation of pool `id` (returned), then allocates exactly `blocks`
  // at their addresses. Throws std::invalid_argument for an unknown pool, std::logic_error
  // when a block cannot be placed (then the pool holds the blocks placed so far, and the
  // error names the first one that was not).
  std::vector<std::uintptr_t> restore_pool(PoolId id, const std::vector<LiveBlock>& blocks);

  // Note [Sleeping pools]. pause_pool gives the pool's physical memory back, keeping its
  // addresses, after the work queued on the streams that used it; with `backup` the live
  // contents are kept on the host. Throws std::invalid_argument for an unknown pool,
  // std::logic_error when it is paused already or a route is active (a capture may be
  // under way). resume_pool maps new memory at the same addresses and restores the
  // backups; throws OutOfMemoryError (still paused, nothing changed) when the memory is
  // not there, std::logic_error when the pool is not paused.
  void pause_pool(PoolId id, bool backup);
  void resume_pool(PoolId id);
  bool pool_paused(PoolId id) const;

  StatList stats() const;
  void reset_peak_stats();
  void reset_accumulated_stats();

  // Caps physical memory; 0 means the device's total memory.
  void set_memory_cap(std::size_t bytes);
  // Caps physical memory at a fraction in [0, 1] of the device's total memory.
  void set_memory_fraction(double fraction);
  std::size_t memory_cap() const;
  // The fraction set last, exactly; else the cap over the device's memory.
  double memory_fraction() const;

  std::size_t allocation_size(std::uintptr_t ptr) const;
  // Whether `ptr` is the start of a live allocation of this allocator.
  bool owns(std::uintptr_t ptr) const;
  std::vector<std::uint64_t> chunk_ids(std::uintptr_t ptr) const;
  // The live allocation at `ptr` described for another process (Note [Sharing memory
  // between processes]), and ptr's offset in the range the description maps. Throws
  // std::invalid_argument for a pointer that is not the start of a live allocation,
  // std::logic_error for memory of a paused pool, BackendError when a handle cannot be
  // exported.
  std::pair<SharedDescription, std::size_t> share(std::uintptr_t ptr);
  std::vector<std::uintptr_t> chunk_addresses(std::uint64_t chunk_id) const;

  // Virtual tensors (Note [KV pages]). A range is reserved virtual space, kChunkSize-
  // aligned, of at least `bytes`; its pages are mapped by commit_range. Throws
  // std::invalid_argument for 0 bytes, BackendError when the space cannot be reserved.
  // Its padding pages map the filler of `filler_kind` (Note [Padding pages]: ranges of one
  // element type share one).
  ReservedRange* reserve_range(std::size_t bytes, std::uint32_t filler_kind = 0);
  // Afterwards exactly the pages overlapping [r*stride + begin, r*stride + end) for every
  // r < rows are mapped (and counted as allocated); pages no longer needed are unmapped
  // once the work queued on `stream` so far is done. With `row_begins` (one byte offset per
  // row, or empty), pages that only row r's bytes before r*stride + row_begins[r] need are
  // mapped to the filler of the range's kind (Note [Padding pages]). Throws std::invalid_argument for
  // row_begins of another length, std::out_of_range past the range, std::logic_error for a
  // freed range, OutOfMemoryError after the usual retry. On a throw no page was given up
  // and none newly mapped (needed pages that were retiring may have been taken back); after
  // two driver failures in a row (an own page's map, then mapping back the padding it
  // replaced), padding pages may be left unmapped (VirtualTensor forgets its span then).
  void commit_range(ReservedRange* range, std::size_t rows, std::size_t stride, std::size_t begin,
                    std::size_t end, StreamId stream, const std::vector<std::size_t>& row_begins = {});
  // Gives every page back (after the work queued on `stream`) and the range with them;
  // `range` must not be used afterwards.
  void free_range(ReservedRange* range, StreamId stream);
  // Indices of the pages of `range` that are mapped and live (introspection and tests).
  std::vector<std::size_t> live_pages(const ReservedRange* range) const;

  // Lets device `peer` reach this device's memory (Note [Peer access]): every range mapped
  // so far is granted to it, and every range mapped from now on. Returns false when the
  // backend has no peer path to `peer` (or already had it). Never throws: a grant that
  // fails is counted (vmm.peer_access_errors), and the allocator's own device is unaffected.
  bool add_peer(int peer);

  // The event log (Note [Event log cost]): keeps the last `capacity` events from now on;
  // 0 turns it off. Either way the events kept so far are forgotten.
  void record_events(std::size_t capacity);
  std::size_t event_capacity() const;
  std::vector<MemoryEvent> events() const;
  std::uint64_t events_dropped() const;
  // The regions memory is in now (Note [Snapshot segments]).
  std::vector<SnapshotSegment> segments() const;
  // (allocated bytes, reserved bytes) now: what torch's profiler reports with each event.
  std::pair<std::int64_t, std::int64_t> memory_totals() const;

  Backend& backend() { return *backend_; }
  const std::shared_ptr<Backend>& shared_backend() const { return backend_; }
  const Config& config() const { return config_; }

 private:
  // Note [record_stream]
  // The memory stays active until the work queued on every recorded
  // stream up to the free has finished. During capture-safe mode (Note [Capture-safe mode])
  // no event is recorded: `unrecorded` keeps the streams until the mode ends.
  struct PendingFree {
    std::uintptr_t ptr;
    PrivatePool* pool;  // nullptr: the main arena
    std::vector<EventId> events;
    std::vector<StreamId> unrecorded;
  };
  // Where a live allocation is: its pool (nullptr: main), and its block or mapping.
  struct Located {
    PrivatePool* pool = nullptr;
    SmallBlock* block = nullptr;
    Mapping* mapping = nullptr;
    bool found() const { return block != nullptr || mapping != nullptr; }
  };

  Arena& arena_of(PrivatePool* pool) { return pool != nullptr ? pool->arena : main_; }
  Stat& allocated_in(const PrivatePool* pool) { return pool != nullptr ? pools_allocated_ : main_allocated_; }
  // The main arena first, inline: the hot path (Note [Private pools]: pools are few).
  Located locate(std::uintptr_t ptr) const {
    Located where;
    where.block = main_.small.find(ptr);
    if (where.block == nullptr) where.mapping = main_.large.find(ptr);
    if (where.found() || pools_.empty()) return where;
    return locate_in_pools(ptr);
  }
  Located locate_in_pools(std::uintptr_t ptr) const;
  // deallocate under the lock; false for a pointer this allocator does not hold.
  bool free_locked(std::uintptr_t ptr);
  PrivatePool* find_pool(PoolId id) const;
  PrivatePool* route(StreamId stream) const;
  void set_capture_safe(bool on);
  // Released pools with nothing live go back to the main arena: now, or once no route is
  // active (retiring records events).
  void retire_pools_when_safe();
  void retire_pools();
  std::uintptr_t place(PrivatePool* pool, std::size_t size, StreamId stream);
  void free_located(const Located& where);
  Mapping* acquire(Arena& arena, std::size_t chunks, StreamId stream, std::size_t requested,
                   bool small_segment);
  std::size_t growth_budget(std::size_t chunks) const;
  [[noreturn]] void throw_oom(std::size_t requested, const std::string& cause);
  std::string oom_prefix() const;  // "CUDA" or "Host backend", as messages start
  void release_cached();
  std::vector<Chunk*> acquire_page_chunks(std::size_t n, StreamId stream);
  template <typename Attempt>
  auto with_oom_retry(std::size_t requested, Attempt&& attempt) -> decltype(attempt(false));
  void finish_page_retiring(bool wait);
  void count_pages(std::int64_t pages);
  // Returns the fillers no page maps any more to the pool (Note [Padding pages]).
  void release_unused_filler(StreamId stream);
  void process_pending(bool wait);
  void drop_allocated(Pool pool, std::size_t size, std::size_t requested, const PrivatePool* owner);
  // A constant `pool` folds the per-pool branches away (measured: 80 instructions per
  // allocation as a plain argument).
  template <Pool kPool>
  void count_allocated(std::size_t size, std::size_t requested) {
    allocation_.increase(kPool, 1);
    active_.increase(kPool, 1);
    allocated_bytes_.increase(kPool, static_cast<std::int64_t>(size));
    active_bytes_.increase(kPool, static_cast<std::int64_t>(size));
    requested_bytes_.increase(kPool, static_cast<std::int64_t>(requested));
  }
  void log_free_requested(const SmallBlock* block, const Mapping* mapping);
  void free_small(PrivatePool* pool, SmallBlock* block);
  void free_large(PrivatePool* pool, Mapping* mapping);
  void free_completed(PrivatePool* pool);
  void sync_reserved_stats();
  void log(EventKind kind, std::uintptr_t addr, std::size_t size, StreamId stream, std::uint64_t aux = 0) {
    if (events_.on()) {
      events_.record(kind, addr, size, stream, allocated_bytes_.all.current,
                     static_cast<std::int64_t>(budget_.chunks * kChunkSize), aux);
    }
  }
  bool live(std::uintptr_t ptr, StreamId* stream, std::size_t* size, Pool* pool) const;
  bool is_pending(std::uintptr_t ptr) const;
  StatList stats_locked() const;
  std::size_t small_segments() const;

  mutable std::mutex mutex_;
  std::shared_ptr<Backend> backend_;
  Config config_;
  ChunkBudget budget_;  // before every arena: their chunk pools count into it
  Arena main_;
  VirtualPages pages_;  // declared after main_: unmapped before its chunks go
  // Private pools, few; declared after main_ so that they go first.
  std::vector<std::unique_ptr<PrivatePool>> pools_;
  struct Route {
    PrivatePool* pool;
    StreamFilter filter;
  };
  std::vector<Route> routes_;       // non-empty: capture-safe mode (Note [Capture-safe mode])
  bool retire_pools_owed_ = false;  // a released pool went idle during capture-safe mode
  std::unordered_map<std::uintptr_t, std::vector<StreamId>> recorded_streams_;
  std::vector<PendingFree> pending_;
  EventLog events_;

  PoolStat allocation_, active_, segment_;
  PoolStat allocated_bytes_, active_bytes_, requested_bytes_, reserved_bytes_;
  // allocated_bytes_ split by arena: the main arena's and every private pool's together
  // (vmm.main_allocated_bytes, vmm.private_pool_allocated_bytes). Memory freed in a pool
  // serves only that pool and the main arena's only eager code, so no allocator with
  // PyTorch's pool semantics reserves less than the sum of the two peaks.
  Stat main_allocated_, pools_allocated_;
  std::int64_t num_alloc_retries_ = 0;
  std::int64_t num_ooms_ = 0;
  std::int64_t num_sync_all_streams_ = 0;
  std::int64_t peer_access_errors_ = 0;
  double memory_fraction_ = -1;           // the fraction set last; < 0 when the cap was set in bytes
  std::atomic<std::int64_t> host_ns_{0};  // Note [Host time]
};

}  // namespace vmm
