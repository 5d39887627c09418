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
#include <vector>

#include "backend.hpp"
#include "chunk_pool.hpp"
#include "config.hpp"
#include "errors.hpp"
#include "event_log.hpp"
#include "mapping_cache.hpp"
#include "pointer_map.hpp"
#include "small_pool.hpp"
#include "stats.hpp"
#include "virtual_pages.hpp"

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
    total_->fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - start_).count(),
                      std::memory_order_relaxed);
  }
  HostTimer(const HostTimer&) = delete;
  HostTimer& operator=(const HostTimer&) = delete;

 private:
  std::atomic<std::int64_t>* total_;
  std::chrono::steady_clock::time_point start_;
};

class CachingAllocator {
 public:
  CachingAllocator(std::shared_ptr<Backend> backend, Config config = {});
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Never returns 0: a size of 0 gets a minimal block. Throws OutOfMemoryError.
  std::uintptr_t allocate(std::size_t size, StreamId stream);
  // Throws std::invalid_argument for a pointer this allocator does not hold.
  void deallocate(std::uintptr_t ptr);
  // `ptr` is also used on `stream`: its memory is not reused before that work is done.
  void record_stream(std::uintptr_t ptr, StreamId stream);
  // Returns every unused chunk and virtual range to the backend.
  void empty_cache();

  StatList stats() const;
  void reset_peak_stats();
  void reset_accumulated_stats();

  // Caps physical memory; 0 means the device's total memory.
  void set_memory_cap(std::size_t bytes);
  // Caps physical memory at a fraction in (0, 1] of the device's total memory.
  void set_memory_fraction(double fraction);
  std::size_t memory_cap() const;

  std::size_t allocation_size(std::uintptr_t ptr) const;
  // Whether `ptr` is the start of a live allocation of this allocator.
  bool owns(std::uintptr_t ptr) const;
  std::vector<std::uint64_t> chunk_ids(std::uintptr_t ptr) const;
  std::vector<std::uintptr_t> chunk_addresses(std::uint64_t chunk_id) const;

  // Virtual tensors (Note [KV pages]). A range is reserved virtual space, kChunkSize-
  // aligned, of at least `bytes`; its pages are mapped by commit_range. Throws
  // std::invalid_argument for 0 bytes, BackendError when the space cannot be reserved.
  VirtualRange* reserve_range(std::size_t bytes);
  // Afterwards exactly the pages overlapping [r*stride + begin, r*stride + end) for every
  // r < rows are mapped (and counted as allocated); pages no longer needed are unmapped
  // once the work queued on `stream` so far is done. Throws std::out_of_range past the
  // range, std::logic_error for a freed range, OutOfMemoryError after the usual retry. On
  // a throw no page was given up and none newly mapped (needed pages that were retiring
  // may have been taken back).
  void commit_range(VirtualRange* range, std::size_t rows, std::size_t stride,
                    std::size_t begin, std::size_t end, StreamId stream);
  // Gives every page back (after the work queued on `stream`) and the range with them;
  // `range` must not be used afterwards.
  void free_range(VirtualRange* range, StreamId stream);
  // Indices of the pages of `range` that are mapped and live (introspection and tests).
  std::vector<std::size_t> live_pages(const VirtualRange* range) const;

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

  Backend& backend() { return *backend_; }
  const std::shared_ptr<Backend>& shared_backend() const { return backend_; }
  const Config& config() const { return config_; }

 private:
  struct PendingFree {
    std::uintptr_t ptr;
    std::vector<EventId> events;
  };

  Mapping* acquire(std::size_t chunks, StreamId stream, std::size_t requested,
                   bool small_segment);
  std::size_t growth_budget(std::size_t chunks) const;
  [[noreturn]] void throw_oom(std::size_t requested, const std::string& cause);
  void release_cached();
  std::vector<Chunk*> acquire_page_chunks(std::size_t n, StreamId stream);
  template <typename Attempt>
  auto with_oom_retry(std::size_t requested, Attempt&& attempt) -> decltype(attempt(false));
  void finish_page_retiring(bool wait);
  void count_pages(std::int64_t pages);
  void process_pending(bool wait);
  void drop_allocated(Pool pool, std::size_t size, std::size_t requested);
  void log_free_requested(const SmallBlock* block, const Mapping* mapping);
  void free_small(SmallBlock* block);
  void free_large(Mapping* mapping);
  void sync_reserved_stats();
  void log(EventKind kind, std::uintptr_t addr, std::size_t size, StreamId stream,
           std::uint64_t aux = 0) {
    if (events_.on()) {
      events_.record(kind, addr, size, stream, allocated_bytes_.all.current,
                     static_cast<std::int64_t>(pool_.count() * kChunkSize), aux);
    }
  }
  bool live(std::uintptr_t ptr, StreamId* stream, std::size_t* size, Pool* pool) const;
  StatList stats_locked() const;

  mutable std::mutex mutex_;
  std::shared_ptr<Backend> backend_;
  Config config_;
  ChunkPool pool_;
  MappingCache cache_;
  SmallPool small_;
  VirtualPages pages_;  // declared after cache_ and pool_: unmapped before they go
  PointerMap<Mapping*> large_;  // live large allocations by base address
  std::unordered_map<std::uintptr_t, std::vector<StreamId>> recorded_streams_;
  std::vector<PendingFree> pending_;
  EventLog events_;

  PoolStat allocation_, active_, segment_;
  PoolStat allocated_bytes_, active_bytes_, requested_bytes_, reserved_bytes_;
  std::int64_t num_alloc_retries_ = 0;
  std::int64_t num_ooms_ = 0;
  std::int64_t num_sync_all_streams_ = 0;
  std::int64_t peer_access_errors_ = 0;
  std::atomic<std::int64_t> host_ns_{0};  // Note [Host time]
};

}  // namespace vmm
