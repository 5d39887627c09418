#include "core/caching_allocator.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <unordered_set>

namespace vmm {
namespace {

std::string format_size(std::size_t bytes) {
  char buf[64];
  const double b = static_cast<double>(bytes);
  if (bytes < (std::size_t{1} << 10))
    std::snprintf(buf, sizeof buf, "%zu bytes", bytes);
  else if (bytes < (std::size_t{1} << 20))
    std::snprintf(buf, sizeof buf, "%.2f KiB", b / 1024);
  else if (bytes < (std::size_t{1} << 30))
    std::snprintf(buf, sizeof buf, "%.2f MiB", b / (1 << 20));
  else
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1 << 30));
  return buf;
}

std::string hex(std::uintptr_t ptr) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%zx", static_cast<std::size_t>(ptr));
  return buf;
}

// Note [Capture-safe mode]: the driver calls of a request served while routes are active
// run in the relaxed capture mode.
class CaptureModeGuard {
 public:
  explicit CaptureModeGuard(Backend& backend) : backend_(backend), previous_(backend.relax_capture_mode()) {}
  ~CaptureModeGuard() { backend_.restore_capture_mode(previous_); }
  CaptureModeGuard(const CaptureModeGuard&) = delete;
  CaptureModeGuard& operator=(const CaptureModeGuard&) = delete;

 private:
  Backend& backend_;
  int previous_;
};

// Moves a stat's current value to `value`, keeping peak and cumulative counts right.
void set_current(Stat& stat, std::int64_t value) {
  if (value > stat.current)
    stat.increase(value - stat.current);
  else if (value < stat.current)
    stat.decrease(stat.current - value);
}

}  // namespace

CachingAllocator::CachingAllocator(std::shared_ptr<Backend> backend, Config config)
    : backend_(std::move(backend)), config_(config), main_(*backend_, budget_, config_), pages_(*backend_) {
  if (config_.memory_fraction != 0)
    set_memory_fraction(config_.memory_fraction);
  else
    set_memory_cap(config_.memory_cap);
  events_.enable(config_.history);
}

CachingAllocator::~CachingAllocator() {
  try {
    backend_->synchronize();
  } catch (const std::exception&) {
  }
}

std::uintptr_t CachingAllocator::allocate(std::size_t size, StreamId stream) {
  const HostTimer timer(config_.host_timing ? &host_ns_ : nullptr);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!routes_.empty()) {
    const CaptureModeGuard relaxed(*backend_);
    return place(route(stream), size, stream);
  }
  // Work deferred during capture-safe mode (Note [Capture-safe mode]); on the usual path
  // nothing is owed.
  if (!pending_.empty()) process_pending(/*wait=*/false);
  if (retire_pools_owed_) retire_pools();
  return place(nullptr, size, stream);
}

// Inlined into allocate: as a call it cost the cached pair 30 instructions (callgrind).
__attribute__((always_inline)) inline std::uintptr_t CachingAllocator::place(PrivatePool* pool,
                                                                             std::size_t size,
                                                                             StreamId stream) {
  Arena& arena = arena_of(pool);
  if (size <= kSmallRequestLimit) {
    const std::size_t rounded = SmallPool::round(size);
    SmallBlock* block = arena.small.allocate(rounded, stream);
    if (block == nullptr) {
      Mapping* segment = acquire(arena, 1, stream, size, /*small_segment=*/true);
      block = arena.small.allocate_in_new_segment(segment, rounded, stream);
      sync_reserved_stats();
    }
    block->requested = size;
    count_allocated<Pool::kSmall>(block->size, size);
    allocated_in(pool).increase(static_cast<std::int64_t>(block->size));
    if (pool != nullptr) ++pool->live;
    log(EventKind::kAlloc, block->addr, block->size, stream);
    return block->addr;
  }
  // PyTorch's own check and message, which tools match on; not counted as an OOM there.
  if (size >= kOneExaByte) {
    throw OutOfMemoryError(oom_prefix() + " out of memory. Tried to allocate more than 1EB memory.", size,
                           stats_locked());
  }
  // Neither new chunks under the cap nor what is reserved (a cap lowered after allocation)
  // can serve it; and size + kChunkSize - 1 could wrap.
  if (size > std::max(budget_.cap_bytes, budget_.chunks * kChunkSize)) {
    throw_oom(size, "the request is larger than the memory cap");
  }
  const std::size_t chunks = (size + kChunkSize - 1) / kChunkSize;
  Mapping* mapping = acquire(arena, chunks, stream, size, /*small_segment=*/false);
  const std::size_t bytes = chunks * kChunkSize;
  mapping->requested = size;
  arena.large.insert(mapping->base, mapping);
  sync_reserved_stats();
  count_allocated<Pool::kLarge>(bytes, size);
  allocated_in(pool).increase(static_cast<std::int64_t>(bytes));
  if (pool != nullptr) ++pool->live;
  log(EventKind::kAlloc, mapping->base, bytes, stream);
  return mapping->base;
}

// Note [Small segments before growth]
// A large request takes back fully free small segments (of any stream) before creating
// chunks. A new small segment does not: the free segments belong to other streams (its
// own stream's would have served the request), and moving segments between streams on
// every alternation would chain those streams together with waits. It creates a chunk,
// and only the out-of-memory retry reclaims them, as PyTorch's small pool does.
Mapping* CachingAllocator::acquire(Arena& arena, std::size_t chunks, StreamId stream, std::size_t requested,
                                   bool small_segment) {
  MappingCache& cache = arena.cache;
  const std::int64_t stitches = cache.counters().stitches;
  const std::int64_t created = budget_.created;
  Mapping* mapping = with_oom_retry(requested, [&](bool retry) -> Mapping* {
    if (retry) return cache.acquire(chunks, stream, /*allow_create=*/true);
    if (Mapping* m = cache.acquire(chunks, stream, /*allow_create=*/false)) return m;
    // Before any new physical memory: finish frees and take back free small segments
    // (event queries: not in capture-safe mode; segments: never a private pool's).
    if (routes_.empty()) {
      if (!pending_.empty()) process_pending(/*wait=*/false);
      if (pages_.has_retiring()) finish_page_retiring(/*wait=*/false);
    }
    if (!small_segment && &arena == &main_ && main_.small.reclaim(main_.cache) > 0) {
      sync_reserved_stats();
      if (Mapping* m = cache.acquire(chunks, stream, /*allow_create=*/false)) return m;
    }
    return cache.acquire(chunks, stream, /*allow_create=*/true, growth_budget(chunks));
  });
  if (events_.on() && cache.counters().stitches != stitches) {
    sync_reserved_stats();  // the growth it needed is logged first
    log(EventKind::kStitch, mapping->base, chunks * kChunkSize, stream,
        static_cast<std::uint64_t>(budget_.created - created));
  }
  return mapping;
}

// Note [Out-of-memory retry], for mappings and pages alike: attempt(false) may grow within
// the slack; when the cap or the device refuses a chunk, everything cached is released and
// attempt(true) runs once more before OutOfMemoryError.
template <typename Attempt>
auto CachingAllocator::with_oom_retry(std::size_t requested, Attempt&& attempt) -> decltype(attempt(false)) {
  std::string cause;
  try {
    return attempt(false);
  } catch (const CapExceeded& e) {
    cause = e.what();
  } catch (const DeviceOutOfMemory& e) {
    cause = e.what();
  }
  // Releasing caches synchronizes the device, illegal during a capture (PyTorch does not
  // retry then either): Note [Capture-safe mode].
  if (!routes_.empty()) throw_oom(requested, cause + "; no retry during CUDA graph capture");
  ++num_alloc_retries_;
  release_cached();
  try {
    auto result = attempt(true);
    sync_reserved_stats();
    return result;
  } catch (const CapExceeded& e) {
    cause = e.what();
  } catch (const DeviceOutOfMemory& e) {
    cause = e.what();
  }
  sync_reserved_stats();
  throw_oom(requested, cause);
}

// Note [Growth slack]: chunks that may be created, beyond those the request needs, while
// reserved stays within (1 + growth_slack) x allocated, counting this request as allocated.
std::size_t CachingAllocator::growth_budget(std::size_t chunks) const {
  const double allocated =
      static_cast<double>(allocated_bytes_.all.current) + static_cast<double>(chunks * kChunkSize);
  const double limit = allocated * (1.0 + config_.growth_slack);
  const double reserved = static_cast<double>(budget_.chunks * kChunkSize);
  if (limit <= reserved) return 0;
  return static_cast<std::size_t>((limit - reserved) / static_cast<double>(kChunkSize));
}

std::string CachingAllocator::oom_prefix() const {
  return backend_->kind() == Backend::Kind::kCuda ? "CUDA" : "Host backend";
}

void CachingAllocator::throw_oom(std::size_t requested, const std::string& cause) {
  ++num_ooms_;
  const bool cuda = backend_->kind() == Backend::Kind::kCuda;
  const std::size_t total = backend_->total_memory();
  std::size_t free = 0;
  try {
    free = backend_->free_memory();
  } catch (const std::exception&) {
  }
  const std::size_t reserved = budget_.chunks * kChunkSize;
  const auto allocated = static_cast<std::size_t>(allocated_bytes_.all.current);
  const std::size_t cap = budget_.cap_bytes;
  log(EventKind::kOom, 0, requested, 0, free);
  std::string message = oom_prefix() + " out of memory. Tried to allocate " + format_size(requested) + ". " +
                        (cuda ? "GPU " : "Device ") + std::to_string(backend_->device()) +
                        " has a total capacity of " + format_size(total) + " of which " + format_size(free) +
                        " is free. vmmalloc's cap is " + format_size(cap) + " (" + cause + "); it holds " +
                        format_size(reserved) + " in " + std::to_string(budget_.chunks) +
                        " chunks, of which " + format_size(allocated) + " is allocated and " +
                        format_size(reserved - std::min(reserved, allocated)) +
                        " is reserved but unallocated, in " + std::to_string(main_.cache.mapping_count()) +
                        " mappings. Free tensors you no longer need, lower the batch size";
  message += cap < total ? ", or raise the cap (VMMALLOC_CONF=memory_cap:<bytes> or "
                           "torch.cuda.set_per_process_memory_fraction)."
                         : ".";
  throw OutOfMemoryError(message, requested, stats_locked());
}

void CachingAllocator::release_cached() {
  backend_->synchronize();
  ++num_sync_all_streams_;
  process_pending(/*wait=*/true);
  retire_pools();
  finish_page_retiring(/*wait=*/true);
  main_.small.reclaim(main_.cache);
  main_.cache.finish_retiring(/*wait=*/true);
  main_.cache.forget_streams();
  main_.cache.evict_idle();
  main_.cache.truncate_in_use();
  main_.cache.release_free_chunks();
  sync_reserved_stats();
}

ReservedRange* CachingAllocator::reserve_range(std::size_t bytes, std::uint32_t filler_kind) {
  if (bytes == 0) throw std::invalid_argument("vmmalloc: a virtual tensor needs at least 1 byte");
  if (bytes > (std::numeric_limits<std::size_t>::max() >> 1)) {
    throw std::invalid_argument("vmmalloc: a virtual tensor of " + std::to_string(bytes) +
                                " bytes cannot be reserved");
  }
  const std::size_t rounded = (bytes + kChunkSize - 1) / kChunkSize * kChunkSize;
  std::lock_guard<std::mutex> lock(mutex_);
  return pages_.reserve(rounded, filler_kind);
}

void CachingAllocator::commit_range(ReservedRange* range, std::size_t rows, std::size_t stride,
                                    std::size_t begin, std::size_t end, StreamId stream,
                                    const std::vector<std::size_t>& row_begins) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (range == nullptr || range->freed) {
    throw std::logic_error("vmmalloc: this virtual tensor was freed; create a new one");
  }
  if (rows > 1 && stride == 0) {
    throw std::invalid_argument("vmmalloc: commit of " + std::to_string(rows) +
                                " rows needs a stride > 0 (the bytes between two rows' starts)");
  }
  if (!row_begins.empty() && row_begins.size() != rows) {
    throw std::invalid_argument("vmmalloc: commit of " + std::to_string(rows) + " rows got " +
                                std::to_string(row_begins.size()) +
                                " row beginnings; give one per row, or none");
  }
  const std::size_t limit = range->bytes;
  const bool fits =
      begin <= end && end <= limit && (rows <= 1 || (stride != 0 && (rows - 1) <= (limit - end) / stride));
  if (!fits) {
    throw std::out_of_range("vmmalloc: cannot commit bytes [" + std::to_string(begin) + ", " +
                            std::to_string(end) + ") of " + std::to_string(rows) + " rows " +
                            std::to_string(stride) + " bytes apart: the virtual tensor reserves only " +
                            std::to_string(limit) +
                            " bytes. Reserve a larger one (a longer maximum length or batch).");
  }
  if (pages_.has_retiring() && routes_.empty()) finish_page_retiring(/*wait=*/false);
  const PagePlan plan = pages_.plan(*range, rows, stride, begin, end, row_begins);
  // Needed pages still retiring are taken back first (no memory needed; and the retry of
  // an out-of-memory below finishes retirements, which must not unmap a page this commit
  // needs). Memory is drawn before anything is unmapped, the filler last (that retry may
  // give back a filler only retiring pages still map), and pages are given up only once
  // the new ones are mapped: a failed commit gives up nothing and maps nothing new.
  // The event log shows own-chunk pages only: padding maps the filler, which is no memory of its own.
  const auto log_own = [&](const std::vector<std::size_t>& pages, EventKind kind) {
    for (std::size_t p : pages) {
      if (!range->pages[p].padding) log(kind, range->base + p * kChunkSize, kChunkSize, stream);
    }
  };
  count_pages(static_cast<std::int64_t>(pages_.reclaim(*range, plan.reclaim, stream)));
  log_own(plan.reclaim, EventKind::kMap);
  std::vector<Chunk*> chunks;
  if (!plan.map.empty()) chunks = acquire_page_chunks(plan.map.size(), stream);
  const auto give_back = [&](std::vector<Chunk*> drawn) {
    if (!drawn.empty()) main_.cache.return_chunks(drawn, stream);
    sync_reserved_stats();
  };
  Chunk* filler = nullptr;
  if (!plan.map_padding.empty() && !pages_.holds_filler(range->filler_kind)) {
    try {
      filler = acquire_page_chunks(1, stream).front();
    } catch (...) {
      give_back(chunks);
      throw;
    }
  }
  try {
    pages_.map_padding(*range, plan.map_padding, filler);
  } catch (...) {
    if (filler != nullptr) chunks.push_back(filler);
    give_back(chunks);
    throw;
  }
  if (filler != nullptr) count_pages(1);
  if (!plan.map.empty()) {
    pages_.unpad(*range, plan.unpad, stream);
    try {
      pages_.map(*range, plan.map, chunks);
    } catch (...) {
      pages_.unmap_padding_now(*range, plan.map_padding);
      // Pages that served as padding serve again. Best effort: should that map fail too,
      // those pages stay unmapped, and VirtualTensor forgets its span on any failure that
      // is not out of memory, so its next commit maps them again.
      try {
        pages_.map_padding(*range, plan.unpad, nullptr);
      } catch (...) {
      }
      release_unused_filler(stream);
      give_back(chunks);
      throw;
    }
    count_pages(static_cast<std::int64_t>(plan.map.size()));
    sync_reserved_stats();  // growth is logged before the pages that needed it
    log_own(plan.map, EventKind::kMap);
  }
  // An event carries the totals after it, so own pages given up are told apart before
  // retire() and logged after their count drops.
  std::vector<std::size_t> own_dropped;
  if (events_.on()) {
    for (std::size_t p : plan.drop) {
      if (!range->pages[p].padding) own_dropped.push_back(p);
    }
  }
  count_pages(-static_cast<std::int64_t>(pages_.retire(*range, plan.drop, stream)));
  for (std::size_t p : own_dropped) log(EventKind::kUnmap, range->base + p * kChunkSize, kChunkSize, stream);
  release_unused_filler(stream);
  sync_reserved_stats();
}

void CachingAllocator::release_unused_filler(StreamId stream) {
  const std::vector<Chunk*> unused = pages_.release_unused_fillers();
  if (unused.empty()) return;
  count_pages(-static_cast<std::int64_t>(unused.size()));
  main_.cache.return_chunks(unused, stream);
}

void CachingAllocator::free_range(ReservedRange* range, StreamId stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (range == nullptr || range->freed) return;
  count_pages(-static_cast<std::int64_t>(range->live_pages));
  if (events_.on()) {
    for (std::size_t p = 0; p < range->pages.size(); ++p) {
      if (range->pages[p].chunk != nullptr && range->pages[p].retire_serial == 0 &&
          !range->pages[p].padding) {
        log(EventKind::kUnmap, range->base + p * kChunkSize, kChunkSize, stream);
      }
    }
  }
  pages_.free(*range, stream);  // may destroy *range
  if (pages_.has_retiring() && routes_.empty()) finish_page_retiring(/*wait=*/false);
  sync_reserved_stats();
}

std::vector<std::size_t> CachingAllocator::live_pages(const ReservedRange* range) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::size_t> out;
  if (range == nullptr || range->freed) return out;
  for (std::size_t p = 0; p < range->pages.size(); ++p) {
    const PageSlot& slot = range->pages[p];
    if (slot.chunk != nullptr && slot.retire_serial == 0 && !slot.padding) out.push_back(p);
  }
  return out;
}

// Note [KV pages]: pages are drawn like a stitch's chunks, with the same out-of-memory
// retry as any request (Note [Out-of-memory retry]).
std::vector<Chunk*> CachingAllocator::acquire_page_chunks(std::size_t n, StreamId stream) {
  MappingCache& cache = main_.cache;
  return with_oom_retry(n * kChunkSize, [&](bool retry) -> std::vector<Chunk*> {
    if (retry) return cache.take_chunks(n, stream, /*allow_create=*/true);
    std::vector<Chunk*> chunks = cache.take_chunks(n, stream, /*allow_create=*/false);
    if (!chunks.empty()) return chunks;
    if (!pending_.empty() && routes_.empty()) process_pending(/*wait=*/false);
    if (main_.small.reclaim(cache) > 0) sync_reserved_stats();
    return cache.take_chunks(n, stream, /*allow_create=*/true, growth_budget(n));
  });
}

void CachingAllocator::finish_page_retiring(bool wait) {
  main_.cache.return_chunks(pages_.finish_retiring(wait), kNoStream);
  release_unused_filler(kNoStream);
}

// KV pages count as allocated (and active, and requested) memory of the large pool, as
// the tensors of any other KV cache would.
void CachingAllocator::count_pages(std::int64_t pages) {
  if (pages == 0) return;
  const std::int64_t bytes = pages * static_cast<std::int64_t>(kChunkSize);
  for (PoolStat* s : {&allocated_bytes_, &active_bytes_, &requested_bytes_}) {
    if (bytes > 0)
      s->increase(Pool::kLarge, bytes);
    else
      s->decrease(Pool::kLarge, -bytes);
  }
  if (bytes > 0)
    main_allocated_.increase(bytes);  // pages are main-arena chunks
  else
    main_allocated_.decrease(-bytes);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!routes_.empty()) return;  // Note [Capture-safe mode]: it would synchronize
  release_cached();
}

namespace {
[[noreturn]] __attribute__((noinline, cold)) void throw_not_held(std::uintptr_t ptr) {
  throw std::invalid_argument("vmmalloc: free of " + hex(ptr) +
                              ", which this allocator does not hold (never allocated here, "
                              "or already freed)");
}
}  // namespace

void CachingAllocator::deallocate(std::uintptr_t ptr) {
  const HostTimer timer(config_.host_timing ? &host_ns_ : nullptr);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!free_locked(ptr)) throw_not_held(ptr);
}

bool CachingAllocator::deallocate_if_owned(std::uintptr_t ptr) {
  const HostTimer timer(config_.host_timing ? &host_ns_ : nullptr);
  std::lock_guard<std::mutex> lock(mutex_);
  return free_locked(ptr);
}

CachingAllocator::Located CachingAllocator::locate_in_pools(std::uintptr_t ptr) const {
  Located where;
  for (const auto& pool : pools_) {
    where.block = pool->arena.small.find(ptr);
    if (where.block == nullptr) where.mapping = pool->arena.large.find(ptr);
    if (where.found()) {
      where.pool = pool.get();
      return where;
    }
  }
  return where;
}

// Inlined into deallocate and deallocate_if_owned, for the same reason as place().
__attribute__((always_inline)) inline bool CachingAllocator::free_locked(std::uintptr_t ptr) {
  const Located where = locate(ptr);
  // A block whose free waits for its streams is no longer the caller's: freeing it again
  // is a double free (Note [record_stream]).
  if (!where.found() || (!pending_.empty() && is_pending(ptr))) return false;
  SmallBlock* block = where.block;
  Mapping* mapping = where.mapping;
  if (!recorded_streams_.empty()) {
    auto it = recorded_streams_.find(ptr);
    if (it != recorded_streams_.end()) {
      // Note [record_stream]: the memory stays active until the work queued on every
      // recorded stream up to now has finished; allocated counts drop at once, as in
      // PyTorch.
      PendingFree pending{ptr, where.pool, {}, {}};
      if (!routes_.empty()) {
        pending.unrecorded = it->second;  // Note [Capture-safe mode]: no event now
      } else {
        pending.events.reserve(it->second.size());
        try {
          for (StreamId s : it->second) pending.events.push_back(backend_->record_event(s));
        } catch (...) {
          for (EventId e : pending.events) backend_->release_event(e);
          throw;
        }
      }
      recorded_streams_.erase(it);
      pending_.push_back(std::move(pending));
      if (block != nullptr)
        drop_allocated(Pool::kSmall, block->size, block->requested, where.pool);
      else
        drop_allocated(Pool::kLarge, mapping->used * kChunkSize, mapping->requested, where.pool);
      log_free_requested(block, mapping);
      return true;
    }
  }
  // History off (the usual case) costs one branch here, not a call.
  if (block != nullptr) {
    drop_allocated(Pool::kSmall, block->size, block->requested, where.pool);
    if (events_.on()) log_free_requested(block, nullptr);
    free_small(where.pool, block);
  } else {
    drop_allocated(Pool::kLarge, mapping->used * kChunkSize, mapping->requested, where.pool);
    if (events_.on()) log_free_requested(nullptr, mapping);
    free_large(where.pool, mapping);
  }
  return true;
}

void CachingAllocator::free_located(const Located& where) {
  if (where.block != nullptr)
    free_small(where.pool, where.block);
  else
    free_large(where.pool, where.mapping);
}

// Allocated counts drop when the caller frees; active ones when the memory is reusable.
void CachingAllocator::drop_allocated(Pool pool, std::size_t size, std::size_t requested,
                                      const PrivatePool* owner) {
  allocation_.decrease(pool, 1);
  allocated_bytes_.decrease(pool, static_cast<std::int64_t>(size));
  allocated_in(owner).decrease(static_cast<std::int64_t>(size));
  requested_bytes_.decrease(pool, static_cast<std::int64_t>(requested));
}

// free_small / free_large return the memory of a live or pending allocation to the pools;
// allocated counts were already dropped by deallocate().
void CachingAllocator::log_free_requested(const SmallBlock* block, const Mapping* mapping) {
  if (block != nullptr)
    log(EventKind::kFreeRequested, block->addr, block->size, block->segment->stream);
  else
    log(EventKind::kFreeRequested, mapping->base, mapping->used * kChunkSize, mapping->use_stream);
}

void CachingAllocator::free_small(PrivatePool* pool, SmallBlock* block) {
  log(EventKind::kFreeCompleted, block->addr, block->size, block->segment->stream);
  active_.decrease(Pool::kSmall, 1);
  active_bytes_.decrease(Pool::kSmall, static_cast<std::int64_t>(block->size));
  arena_of(pool).small.free(block);
  if (pool != nullptr) free_completed(pool);
}

void CachingAllocator::free_large(PrivatePool* pool, Mapping* m) {
  log(EventKind::kFreeCompleted, m->base, m->used * kChunkSize, m->use_stream);
  active_.decrease(Pool::kLarge, 1);
  active_bytes_.decrease(Pool::kLarge, static_cast<std::int64_t>(m->used * kChunkSize));
  Arena& arena = arena_of(pool);
  arena.large.erase(m->base);
  arena.cache.release(m, m->use_stream);
  if (pool != nullptr) free_completed(pool);
}

void CachingAllocator::free_completed(PrivatePool* pool) {
  --pool->live;
  if (pool->live == 0 && pool->use_count == 0) retire_pools_when_safe();
}

void CachingAllocator::process_pending(bool wait) {
  std::size_t kept = 0;
  for (std::size_t i = 0; i < pending_.size(); ++i) {
    PendingFree& p = pending_[i];
    if (!wait && !p.unrecorded.empty()) {
      // Recorded now, after capture-safe mode: a later point of those streams, so safe.
      try {
        while (!p.unrecorded.empty()) {
          p.events.push_back(backend_->record_event(p.unrecorded.back()));
          p.unrecorded.pop_back();
        }
      } catch (const BackendError&) {
        // Kept pending; the next pass tries again, and release_cached waits for all.
      }
    }
    bool done = true;
    if (!wait) {
      if (!p.unrecorded.empty()) done = false;
      for (EventId e : p.events) {
        if (!backend_->event_done(e)) {
          done = false;
          break;
        }
      }
    }
    if (!done) {
      // Never self-move: a vector moved onto itself may come out empty, and a pending
      // free with no events would then count as finished (a real bug, seen on a GPU).
      if (kept != i) pending_[kept] = std::move(p);
      ++kept;
      continue;
    }
    for (EventId e : p.events) backend_->release_event(e);
    Arena& arena = arena_of(p.pool);
    if (SmallBlock* block = arena.small.find(p.ptr))
      free_small(p.pool, block);
    else
      free_large(p.pool, arena.large.find(p.ptr));
  }
  pending_.resize(kept);
}

void CachingAllocator::record_stream(std::uintptr_t ptr, StreamId stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  StreamId own;
  if (!live(ptr, &own, nullptr, nullptr)) {
    throw std::invalid_argument("vmmalloc: record_stream on " + hex(ptr) +
                                ", which is not a live allocation of this allocator");
  }
  if (stream == own) return;
  auto& streams = recorded_streams_[ptr];
  if (std::find(streams.begin(), streams.end(), stream) == streams.end()) streams.push_back(stream);
}

bool CachingAllocator::is_pending(std::uintptr_t ptr) const {
  for (const PendingFree& p : pending_) {
    if (p.ptr == ptr) return true;
  }
  return false;
}

bool CachingAllocator::live(std::uintptr_t ptr, StreamId* stream, std::size_t* size, Pool* pool) const {
  const Located where = locate(ptr);
  if (!where.found() || (!pending_.empty() && is_pending(ptr))) return false;
  if (const SmallBlock* block = where.block) {
    if (stream) *stream = block->segment->stream;
    if (size) *size = block->size;
    if (pool) *pool = Pool::kSmall;
    return true;
  }
  const Mapping* m = where.mapping;
  if (stream) *stream = m->use_stream;
  if (size) *size = m->used * kChunkSize;
  if (pool) *pool = Pool::kLarge;
  return true;
}

std::size_t CachingAllocator::small_segments() const {
  std::size_t n = main_.small.segment_count();
  for (const auto& pool : pools_) n += pool->arena.small.segment_count();
  return n;
}

void CachingAllocator::sync_reserved_stats() {
  const auto all = static_cast<std::int64_t>(budget_.chunks);
  const auto small = static_cast<std::int64_t>(small_segments());
  if (all == segment_.all.current && small == segment_.small.current) return;
  const auto chunk = static_cast<std::int64_t>(kChunkSize);
  if (all != segment_.all.current) {
    const std::int64_t delta = all - segment_.all.current;
    log(delta > 0 ? EventKind::kGrow : EventKind::kRelease, 0,
        static_cast<std::size_t>(delta > 0 ? delta : -delta) * kChunkSize, 0);
  }
  set_current(segment_.all, all);
  set_current(segment_.small, small);
  set_current(segment_.large, all - small);
  set_current(reserved_bytes_.all, all * chunk);
  set_current(reserved_bytes_.small, small * chunk);
  set_current(reserved_bytes_.large, (all - small) * chunk);
}

StatList CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_locked();
}

StatList CachingAllocator::stats_locked() const {
  StatList out;
  out.reserve(160);
  append_pool_stat(out, "allocation", allocation_);
  append_pool_stat(out, "active", active_);
  append_pool_stat(out, "segment", segment_);
  append_pool_stat(out, "allocated_bytes", allocated_bytes_);
  append_pool_stat(out, "active_bytes", active_bytes_);
  append_pool_stat(out, "requested_bytes", requested_bytes_);
  append_pool_stat(out, "reserved_bytes", reserved_bytes_);
  // Inactive split: free bytes inside partly used small segments (current only).
  PoolStat inactive;
  std::size_t split = main_.small.free_bytes_in_used_segments();
  for (const auto& pool : pools_) split += pool->arena.small.free_bytes_in_used_segments();
  const auto split_bytes = static_cast<std::int64_t>(split);
  inactive.increase(Pool::kSmall, split_bytes);
  inactive.reset_accumulated();
  append_pool_stat(out, "inactive_split_bytes", inactive);
  PoolStat inactive_count;
  append_pool_stat(out, "inactive_split", inactive_count);
  Stat none;
  append_stat(out, "oversize_allocations", none);
  append_stat(out, "oversize_segments", none);
  out.emplace_back("num_alloc_retries", num_alloc_retries_);
  out.emplace_back("num_ooms", num_ooms_);
  out.emplace_back("num_sync_all_streams", num_sync_all_streams_);
  out.emplace_back("num_device_alloc", budget_.created);
  out.emplace_back("num_device_free", budget_.released);
  out.emplace_back("vmm.host_time_ns", host_ns_.load(std::memory_order_relaxed));
  out.emplace_back("max_split_size", -1);
  append_stat(out, "vmm.chunks", budget_.chunks_stat);
  out.emplace_back("vmm.free_chunks", static_cast<std::int64_t>(main_.chunks.free_count()));
  out.emplace_back("vmm.large_handles", static_cast<std::int64_t>(budget_.large_handles));
  out.emplace_back("vmm.memory_cap", static_cast<std::int64_t>(budget_.cap_bytes));
  out.emplace_back("vmm.small_segments", static_cast<std::int64_t>(small_segments()));
  std::size_t pool_chunks = 0, paused_chunks = 0;
  for (const auto& pool : pools_)
    (pool->paused() ? paused_chunks : pool_chunks) += pool->arena.chunks.count();
  out.emplace_back("vmm.private_pools", static_cast<std::int64_t>(pools_.size()));
  out.emplace_back("vmm.private_pool_bytes", static_cast<std::int64_t>(pool_chunks * kChunkSize));
  append_stat(out, "vmm.main_allocated_bytes", main_allocated_);
  append_stat(out, "vmm.private_pool_allocated_bytes", pools_allocated_);
  // Note [Sleeping pools]: address space kept, no memory; its live blocks still count as
  // allocated (the tensors exist), so allocated may exceed reserved while a pool sleeps.
  out.emplace_back("vmm.paused_bytes", static_cast<std::int64_t>(paused_chunks * kChunkSize));
  out.emplace_back("vmm.pending_frees", static_cast<std::int64_t>(pending_.size()));
  out.emplace_back("vmm.peer_devices", static_cast<std::int64_t>(backend_->peers().size()));
  out.emplace_back("vmm.peer_access_errors", peer_access_errors_);
  main_.cache.append_stats(out);
  pages_.append_stats(out);
  return out;
}

bool CachingAllocator::add_peer(int peer) {
  // Under the lock every mapping is made, so no range is mapped between the backend's
  // learning of the peer and the walk below: each is granted either here or by set_access.
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    if (!backend_->add_peer(peer)) return false;
  } catch (const BackendError&) {
    ++peer_access_errors_;  // the peer's copies fail with CUDA's error; nothing else changes
    return false;
  }
  const auto grant = [&](std::uintptr_t base, std::size_t bytes) {
    try {
      backend_->set_peer_access(base, bytes, peer);
    } catch (const BackendError&) {
      ++peer_access_errors_;
    }
  };
  main_.cache.for_each_mapped(grant);
  for (const auto& pool : pools_) pool->arena.cache.for_each_mapped(grant);
  pages_.for_each_mapped(grant);
  return true;
}

void CachingAllocator::reset_peak_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (PoolStat* s : {&allocation_, &active_, &segment_, &allocated_bytes_, &active_bytes_, &requested_bytes_,
                      &reserved_bytes_}) {
    s->reset_peak();
  }
  budget_.chunks_stat.reset_peak();
  main_allocated_.reset_peak();
  pools_allocated_.reset_peak();
  main_.cache.reset_peak();
  pages_.reset_peak();
}

void CachingAllocator::reset_accumulated_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (PoolStat* s : {&allocation_, &active_, &segment_, &allocated_bytes_, &active_bytes_, &requested_bytes_,
                      &reserved_bytes_}) {
    s->reset_accumulated();
  }
  main_allocated_.reset_accumulated();
  pools_allocated_.reset_accumulated();
  num_alloc_retries_ = num_ooms_ = num_sync_all_streams_ = 0;
  host_ns_.store(0, std::memory_order_relaxed);
}

void CachingAllocator::set_memory_cap(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::size_t total = backend_->total_memory();
  budget_.cap_bytes = bytes == 0 ? total : std::min(bytes, total);
  memory_fraction_ = -1;
}

// As PyTorch: a fraction in [0, 1]; 0 lets no new memory be taken (cached memory still
// serves), and memory_fraction() gives back exactly what was set.
void CachingAllocator::set_memory_fraction(double fraction) {
  if (!(fraction >= 0 && fraction <= 1)) {
    throw std::invalid_argument("vmmalloc: memory fraction must be in [0, 1], got " +
                                std::to_string(fraction));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  budget_.cap_bytes = static_cast<std::size_t>(fraction * static_cast<double>(backend_->total_memory()));
  memory_fraction_ = fraction;
}

double CachingAllocator::memory_fraction() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (memory_fraction_ >= 0) return memory_fraction_;
  return static_cast<double>(budget_.cap_bytes) / static_cast<double>(backend_->total_memory());
}

std::size_t CachingAllocator::memory_cap() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return budget_.cap_bytes;
}

std::size_t CachingAllocator::allocation_size(std::uintptr_t ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t size = 0;
  if (!live(ptr, nullptr, &size, nullptr)) {
    throw std::invalid_argument("vmmalloc: " + hex(ptr) + " is not a live allocation");
  }
  return size;
}

bool CachingAllocator::owns(std::uintptr_t ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return live(ptr, nullptr, nullptr, nullptr);
}

std::vector<std::uint64_t> CachingAllocator::chunk_ids(std::uintptr_t ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::uint64_t> out;
  const Located where = locate(ptr);
  if (const SmallBlock* block = where.block) {
    out.push_back(block->segment->mapping->chunks[0]->id);
  } else if (const Mapping* m = where.mapping) {
    for (std::size_t i = 0; i < m->used; ++i) out.push_back(m->chunks[i]->id);
  } else {
    throw std::invalid_argument("vmmalloc: " + hex(ptr) + " is not a live allocation");
  }
  return out;
}

std::pair<SharedDescription, std::size_t> CachingAllocator::share(std::uintptr_t ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!live(ptr, nullptr, nullptr, nullptr)) {
    throw std::invalid_argument("vmmalloc: cannot share " + hex(ptr) +
                                ": it is not the start of a live allocation of vmmalloc");
  }
  const Located where = locate(ptr);
  if (where.pool != nullptr && where.pool->paused()) {
    throw std::logic_error("vmmalloc: cannot share " + hex(ptr) + ": its pool is paused (sleeping)");
  }
  const Mapping* mapping = where.block != nullptr ? where.block->segment->mapping : where.mapping;
  std::pair<SharedDescription, std::size_t> out;
  SharedDescription& d = out.first;
  d.pid = static_cast<int>(getpid());
  d.kind = backend_->kind();
  // Whole handles from the mapping's base: a mapping maps each handle whole, in order
  // (Note [Large handles]), so a prefix that ends inside a large handle shares all of it.
  for (std::size_t i = 0; i < mapping->used;) {
    const Chunk* head = mapping->chunks[i];
    if (!head->is_head()) throw std::logic_error("vmmalloc: share: a mapping starts inside a handle");
    const std::size_t bytes = std::size_t{head->handle_chunks} * kChunkSize;
    const Backend::SharedHandle exported = backend_->export_handle(head->handle, bytes);
    d.pieces.push_back({exported.fd, exported.offset, bytes, exported.serial});
    i += head->handle_chunks;
  }
  out.second = ptr - mapping->base;
  return out;
}

std::vector<std::uintptr_t> CachingAllocator::chunk_addresses(std::uint64_t chunk_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::uintptr_t> out = main_.cache.addresses_of(chunk_id);
  for (const auto& pool : pools_) {
    const std::vector<std::uintptr_t> more = pool->arena.cache.addresses_of(chunk_id);
    out.insert(out.end(), more.begin(), more.end());
  }
  return out;
}

void CachingAllocator::record_events(std::size_t capacity) {
  std::lock_guard<std::mutex> lock(mutex_);
  events_.enable(capacity);
}

std::size_t CachingAllocator::event_capacity() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.capacity();
}

std::vector<MemoryEvent> CachingAllocator::events() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.events();
}

std::uint64_t CachingAllocator::events_dropped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.dropped();
}

std::pair<std::int64_t, std::int64_t> CachingAllocator::memory_totals() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {allocated_bytes_.all.current, reserved_bytes_.all.current};
}

std::vector<SnapshotSegment> CachingAllocator::segments() const {
  using State = SnapshotBlock::State;
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<SnapshotSegment> out;
  std::unordered_set<std::uintptr_t> pending;
  for (const PendingFree& p : pending_) pending.insert(p.ptr);
  std::size_t busy = 0;
  const auto arena_segments = [&](const Arena& arena, PoolId pool) {
    arena.large.for_each([&](std::uintptr_t base, const Mapping* m) {
      const std::size_t bytes = m->used * kChunkSize;
      const State state = pending.count(base) ? State::kPendingFree : State::kActive;
      out.push_back({base,
                     bytes,
                     m->use_stream,
                     SnapshotSegment::Kind::kLarge,
                     {{base, bytes, m->requested, state}},
                     pool});
      busy += m->used;
    });
    arena.small.for_each_segment([&](const SmallSegment& segment) {
      SnapshotSegment s{segment.first->addr,           kChunkSize, segment.stream,
                        SnapshotSegment::Kind::kSmall, {},         pool};
      for (const SmallBlock* b = segment.first; b != nullptr; b = b->next) {
        const State state = !b->allocated            ? State::kInactive
                            : pending.count(b->addr) ? State::kPendingFree
                                                     : State::kActive;
        s.blocks.push_back({b->addr, b->size, b->allocated ? b->requested : 0, state});
      }
      out.push_back(std::move(s));
      ++busy;
    });
  };
  arena_segments(main_, PoolId{});
  std::size_t pool_free = 0;
  for (const auto& pool : pools_) {
    if (pool->paused()) continue;  // it holds no memory (Note [Sleeping pools])
    const std::size_t before = busy;
    arena_segments(pool->arena, pool->id);
    // A pool's idle chunks are its own: one free region per pool.
    const std::size_t held = pool->arena.chunks.count();
    const std::size_t used = busy - before;
    if (held > used) {
      const std::size_t bytes = (held - used) * kChunkSize;
      out.push_back({0, bytes, 0, SnapshotSegment::Kind::kFree, {{0, bytes, 0, State::kInactive}}, pool->id});
      pool_free += held - used;
    }
  }
  // Note [Padding pages]: one region per filler, however often mapped, at its first address.
  std::vector<std::pair<const Chunk*, std::uintptr_t>> filler_at;
  pages_.for_each_filler([&](const Chunk* chunk) { filler_at.emplace_back(chunk, 0); });
  pages_.for_each_range([&](const ReservedRange& range) {
    // One region per run of mapped own-chunk pages; a block per run of pages in one state.
    const auto& pages = range.pages;
    const auto own = [&](std::size_t i) { return pages[i].chunk != nullptr && !pages[i].padding; };
    for (std::size_t i = 0; i < pages.size();) {
      if (!own(i)) {
        for (auto& [chunk, at] : filler_at) {
          if (pages[i].padding && pages[i].chunk == chunk && at == 0) at = range.base + i * kChunkSize;
        }
        ++i;
        continue;
      }
      SnapshotSegment s{range.base + i * kChunkSize, 0, 0, SnapshotSegment::Kind::kPages, {}, PoolId{}};
      for (; i < pages.size() && own(i); ++i) {
        const State state = pages[i].retire_serial != 0 ? State::kPendingFree : State::kActive;
        if (s.blocks.empty() || s.blocks.back().state != state) {
          s.blocks.push_back({range.base + i * kChunkSize, 0, 0, state});
        }
        s.blocks.back().size += kChunkSize;
        s.blocks.back().requested += kChunkSize;
        s.bytes += kChunkSize;
        ++busy;
      }
      out.push_back(std::move(s));
    }
  });
  for (const auto& [chunk, at] : filler_at) {
    out.push_back({at,
                   kChunkSize,
                   0,
                   SnapshotSegment::Kind::kPages,
                   {{at, kChunkSize, kChunkSize, State::kActive}},
                   PoolId{}});
    ++busy;
  }
  const std::size_t chunks = budget_.chunks - pool_free;
  if (chunks > busy) {
    const std::size_t bytes = (chunks - busy) * kChunkSize;
    out.push_back({0, bytes, 0, SnapshotSegment::Kind::kFree, {{0, bytes, 0, State::kInactive}}, PoolId{}});
  }
  return out;
}

// ---- Private pools (Note [Private pools]) ----

PrivatePool* CachingAllocator::find_pool(PoolId id) const {
  for (const auto& pool : pools_) {
    if (pool->id == id) return pool.get();
  }
  return nullptr;
}

PrivatePool* CachingAllocator::route(StreamId stream) const {
  for (const Route& r : routes_) {
    if (r.filter(stream)) return r.pool;
  }
  return nullptr;
}

void CachingAllocator::set_capture_safe(bool on) {
  main_.cache.set_capture_safe(on);
  for (const auto& pool : pools_) pool->arena.cache.set_capture_safe(on);
}

void CachingAllocator::create_or_incref_pool(PoolId id) {
  if (id == PoolId{}) throw std::invalid_argument("vmmalloc: pool id (0, 0) names no pool");
  std::lock_guard<std::mutex> lock(mutex_);
  if (PrivatePool* pool = find_pool(id)) {
    ++pool->use_count;
    return;
  }
  pools_.reserve(pools_.size() + 1);
  pools_.push_back(std::make_unique<PrivatePool>(id, *backend_, budget_, config_));
  pools_.back()->arena.cache.set_capture_safe(!routes_.empty());
}

static std::string pool_name(PoolId id) {
  return "(" + std::to_string(id.first) + ", " + std::to_string(id.second) + ")";
}

void CachingAllocator::begin_allocate_to_pool(PoolId id, StreamFilter filter) {
  if (!filter) throw std::invalid_argument("vmmalloc: a pool route needs a stream filter");
  if (id == PoolId{}) throw std::invalid_argument("vmmalloc: pool id (0, 0) names no pool");
  std::lock_guard<std::mutex> lock(mutex_);
  // As PyTorch: one route per pool at a time (two threads under use_mem_pool of one pool,
  // or a capture into a pool another thread routes to, would end each other's routes).
  for (const Route& r : routes_) {
    if (r.pool->id == id) {
      throw std::logic_error("vmmalloc: already allocating to pool " + pool_name(id) +
                             "; end that route first (one capture or use_mem_pool per pool at a time)");
    }
  }
  routes_.reserve(routes_.size() + 1);
  PrivatePool* pool = find_pool(id);
  if (pool != nullptr && pool->paused()) {
    throw std::logic_error("vmmalloc: pool " + pool_name(id) +
                           " is paused; resume it before allocating into it");
  }
  if (pool != nullptr) {
    ++pool->use_count;
  } else {
    pools_.reserve(pools_.size() + 1);
    pools_.push_back(std::make_unique<PrivatePool>(id, *backend_, budget_, config_));
    pool = pools_.back().get();
  }
  routes_.push_back({pool, std::move(filter)});  // capacity reserved: cannot throw
  set_capture_safe(true);
}

void CachingAllocator::end_allocate_to_pool(PoolId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = std::find_if(routes_.begin(), routes_.end(), [&](const Route& r) { return r.pool->id == id; });
  if (it == routes_.end()) {
    throw std::logic_error("vmmalloc: not allocating to pool " + pool_name(id) + " (no route to end)");
  }
  routes_.erase(it);
  // Deferred work waits for the next request, not done here: a capture with conditional
  // nodes ends a route and begins one again in the middle of the capture.
  if (routes_.empty()) set_capture_safe(false);
}

void CachingAllocator::release_pool(PoolId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  PrivatePool* pool = find_pool(id);
  if (pool == nullptr || pool->use_count == 0) return;
  if (--pool->use_count == 0 && pool->live == 0) retire_pools_when_safe();
}

int CachingAllocator::pool_use_count(PoolId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const PrivatePool* pool = find_pool(id);
  return pool != nullptr ? pool->use_count : 0;
}

bool CachingAllocator::routes_active() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !routes_.empty();
}

void CachingAllocator::retire_pools_when_safe() {
  if (!routes_.empty()) {
    retire_pools_owed_ = true;  // it records events: Note [Capture-safe mode]
    return;
  }
  retire_pools();
}

// Every released pool with nothing live gives its memory to the main arena: its mappings
// retire there (unmapped once the GPU is done with them), its chunks, with their streams,
// become main-arena chunks (Note [Private pools]).
void CachingAllocator::retire_pools() {
  retire_pools_owed_ = false;
  for (std::size_t i = 0; i < pools_.size();) {
    PrivatePool* pool = pools_[i].get();
    if (pool->use_count != 0 || pool->live != 0) {
      ++i;
      continue;
    }
    Arena& arena = pool->arena;
    arena.small.reclaim(arena.cache);
    arena.cache.evict_idle();  // a paused pool's ranges are unreserved at once
    main_.cache.adopt_retiring(arena.cache);
    // A paused pool's chunks have no memory: they go with the pool (Note [Sleeping pools]).
    if (!pool->paused()) main_.chunks.adopt(arena.chunks);
    pools_[i] = std::move(pools_.back());
    pools_.pop_back();
  }
  sync_reserved_stats();
}

std::vector<LiveBlock> CachingAllocator::pool_allocations(PoolId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<LiveBlock> out;
  const PrivatePool* pool = find_pool(id);
  if (pool == nullptr) {
    throw std::invalid_argument("vmmalloc: pool " + pool_name(id) + " does not exist");
  }
  pool->arena.large.for_each([&](std::uintptr_t base, const Mapping* m) {
    if (pending_.empty() || !is_pending(base)) {
      out.push_back({base, m->used * kChunkSize, m->requested, m->use_stream});
    }
  });
  pool->arena.small.for_each_segment([&](const SmallSegment& segment) {
    for (const SmallBlock* b = segment.first; b != nullptr; b = b->next) {
      if (b->allocated && (pending_.empty() || !is_pending(b->addr))) {
        out.push_back({b->addr, b->size, b->requested, segment.stream});
      }
    }
  });
  std::sort(out.begin(), out.end(), [](const LiveBlock& a, const LiveBlock& b) { return a.ptr < b.ptr; });
  return out;
}

std::vector<std::uintptr_t> CachingAllocator::restore_pool(PoolId id, const std::vector<LiveBlock>& blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  PrivatePool* pool = find_pool(id);
  if (pool == nullptr) {
    throw std::invalid_argument("vmmalloc: cannot restore pool " + pool_name(id) + ": it does not exist");
  }
  if (pool->paused()) {
    throw std::logic_error("vmmalloc: pool " + pool_name(id) + " is paused; resume it before restoring it");
  }
  Arena& arena = pool->arena;
  // Blocks whose free waits for other streams would still hold their memory.
  bool pending_here = false;
  for (const PendingFree& p : pending_) pending_here = pending_here || p.pool == pool;
  if (pending_here) {
    if (!routes_.empty()) {
      throw std::logic_error(
          "vmmalloc: a pool with frees waiting for other streams cannot be "
          "restored during CUDA graph capture");
    }
    backend_->synchronize();
    ++num_sync_all_streams_;
    process_pending(/*wait=*/true);
  }
  // Every live allocation of the pool is freed; a pool that is not retired keeps it all.
  std::vector<std::uintptr_t> freed;
  std::vector<Located> live;
  arena.large.for_each([&](std::uintptr_t, Mapping* m) { live.push_back({pool, nullptr, m}); });
  arena.small.for_each_segment([&](const SmallSegment& segment) {
    for (SmallBlock* b = segment.first; b != nullptr; b = b->next) {
      if (b->allocated) live.push_back({pool, b, nullptr});
    }
  });
  ++pool->use_count;  // not retired while empty for a moment
  for (const Located& where : live) {
    const std::uintptr_t ptr = where.block != nullptr ? where.block->addr : where.mapping->base;
    recorded_streams_.erase(ptr);
    if (where.block != nullptr) {
      drop_allocated(Pool::kSmall, where.block->size, where.block->requested, pool);
    } else {
      drop_allocated(Pool::kLarge, where.mapping->used * kChunkSize, where.mapping->requested, pool);
    }
    log_free_requested(where.block, where.mapping);
    free_located(where);
    freed.push_back(ptr);
  }
  --pool->use_count;
  // Since the checkpoint, small segments may have been made on chunks (or on the very
  // mapping) of a recorded large block: they are fully free now, and only the segments of
  // recorded small blocks are needed (a recorded large block and a recorded small block
  // held disjoint chunks), so the others are handed back to the pool's cache.
  std::vector<std::uintptr_t> keep;
  for (const LiveBlock& b : blocks) {
    if (b.size < kChunkSize) keep.push_back(b.ptr / kChunkSize * kChunkSize);
  }
  arena.small.reclaim_except(keep, arena.cache);
  for (const LiveBlock& b : blocks) {
    const bool small =
        b.size <= kSmallRequestLimit && SmallPool::round(b.size) == b.size && b.size < kChunkSize;
    if (small) {
      SmallBlock* block = arena.small.allocate_at(b.ptr, b.size);
      if (block != nullptr) {
        block->requested = b.requested;
        count_allocated<Pool::kSmall>(block->size, b.requested);
        pools_allocated_.increase(static_cast<std::int64_t>(block->size));
        ++pool->live;
        log(EventKind::kAlloc, block->addr, block->size, b.stream);
        continue;
      }
    } else if (b.size % kChunkSize == 0) {
      if (Mapping* m = arena.cache.acquire_at(b.ptr, b.size / kChunkSize, b.stream)) {
        m->requested = b.requested;
        arena.large.insert(m->base, m);
        count_allocated<Pool::kLarge>(b.size, b.requested);
        pools_allocated_.increase(static_cast<std::int64_t>(b.size));
        ++pool->live;
        log(EventKind::kAlloc, m->base, b.size, b.stream);
        continue;
      }
    }
    sync_reserved_stats();
    throw std::logic_error("vmmalloc: cannot restore the block of " + std::to_string(b.size) + " bytes at " +
                           hex(b.ptr) + " in pool (" + std::to_string(id.first) + ", " +
                           std::to_string(id.second) + "): the pool has no free memory mapped there");
  }
  sync_reserved_stats();
  return freed;
}

// ---- Sleeping pools (Note [Sleeping pools]) ----

namespace {
// Where `head`'s handle is mapped (any of its ranges), and its bytes.
std::uintptr_t handle_address(const Chunk* head) {
  const Mapping* m = head->mappings.front();
  const auto at = std::find(m->chunks.begin(), m->chunks.end(), head) - m->chunks.begin();
  return m->base + static_cast<std::size_t>(at) * kChunkSize;
}
}  // namespace

void CachingAllocator::pause_pool(PoolId id, bool backup) {
  std::lock_guard<std::mutex> lock(mutex_);
  PrivatePool* pool = find_pool(id);
  if (pool == nullptr)
    throw std::invalid_argument("vmmalloc: cannot pause pool " + pool_name(id) + ": it does not exist");
  if (pool->paused()) throw std::logic_error("vmmalloc: pool " + pool_name(id) + " is paused already");
  if (!routes_.empty()) {
    throw std::logic_error("vmmalloc: pool " + pool_name(id) +
                           " cannot be paused while a capture or use_mem_pool is under way");
  }
  Arena& arena = pool->arena;
  // The streams whose queued work may still use the pool's memory; waiting for an event on
  // each waits for that work and nothing else on the device.
  std::vector<StreamId> streams;
  const auto note = [&](StreamId s) {
    if (s != kNoStream && std::find(streams.begin(), streams.end(), s) == streams.end()) streams.push_back(s);
  };
  for (const Chunk* c : arena.chunks.all()) note(c->stream);
  arena.large.for_each([&](std::uintptr_t base, const Mapping* m) {
    note(m->use_stream);
    auto it = recorded_streams_.find(base);
    if (it != recorded_streams_.end())
      for (StreamId s : it->second) note(s);
  });
  arena.small.for_each_segment([&](const SmallSegment& segment) {
    note(segment.stream);
    for (const SmallBlock* b = segment.first; b != nullptr; b = b->next) {
      auto it = recorded_streams_.find(b->addr);
      if (b->allocated && it != recorded_streams_.end())
        for (StreamId s : it->second) note(s);
    }
  });
  for (const PendingFree& p : pending_) {
    if (p.pool != pool) continue;
    for (StreamId s : p.unrecorded) note(s);
    for (EventId e : p.events) backend_->wait_event(e);  // its recorded streams' work
  }
  for (StreamId s : streams) {
    const EventId event = backend_->record_event(s);
    try {
      backend_->wait_event(event);
    } catch (...) {
      backend_->release_event(event);
      throw;
    }
    backend_->release_event(event);
  }
  if (!pending_.empty()) process_pending(/*wait=*/false);  // the pool's frees are done now
  // Copies first: until the unmap nothing has changed, so a failed copy leaves it running.
  std::vector<Backend::HostCopy> backups;  // their host addresses set once backup_memory is reserved
  if (backup) {
    std::size_t total = 0;
    for (Chunk* c : arena.chunks.all()) {
      if (!c->is_head() || c->mappings.empty()) continue;
      bool holds_data = false;
      for (std::size_t k = 0; k < c->handle_chunks; ++k) holds_data = holds_data || c[k].busy;
      if (!holds_data) continue;
      backups.push_back({handle_address(c), nullptr, c->handle_chunks * kChunkSize});
      total += c->handle_chunks * kChunkSize;
    }
    unsigned char* host = pool->backup_memory.reserve(*backend_, total);
    for (Backend::HostCopy& copy : backups) {
      copy.host = host;
      host += copy.bytes;
    }
    const CaptureModeGuard relaxed(*backend_);  // a capture in another thread is not disturbed
    backend_->copy_many_to_host(backups);
  }
  arena.cache.unmap_all();
  arena.chunks.pause_handles();
  pool->backups = std::move(backups);
  sync_reserved_stats();
}

void CachingAllocator::resume_pool(PoolId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  PrivatePool* pool = find_pool(id);
  if (pool == nullptr)
    throw std::invalid_argument("vmmalloc: cannot resume pool " + pool_name(id) + ": it does not exist");
  if (!pool->paused()) throw std::logic_error("vmmalloc: pool " + pool_name(id) + " is not paused");
  Arena& arena = pool->arena;
  const std::size_t bytes = arena.chunks.count() * kChunkSize;
  // Note [Capture-safe mode]: a resume may run while another thread captures a graph (no
  // route can target a paused pool, but others may be active).
  const CaptureModeGuard relaxed(*backend_);
  try {
    arena.chunks.resume_handles();
  } catch (const CapExceeded& e) {
    throw_oom(bytes, e.what());
  } catch (const DeviceOutOfMemory& e) {
    throw_oom(bytes, e.what());
  }
  try {
    arena.cache.map_all();
  } catch (...) {
    arena.chunks.pause_handles();  // back to paused, as before the call
    sync_reserved_stats();
    throw;
  }
  try {
    backend_->copy_many_from_host(pool->backups);
  } catch (...) {
    // Every copy issued was waited for: back to paused with the backups kept, so that a
    // later resume restores them (the contents would be partial otherwise).
    arena.cache.unmap_all();
    arena.chunks.pause_handles();
    sync_reserved_stats();
    throw;
  }
  pool->backups.clear();  // backup_memory stays, for the next pause
  // The new memory is idle on every stream: no wait is owed to the streams of before.
  for (Chunk* c : arena.chunks.all()) {
    if (!c->busy) c->stream = kNoStream;
  }
  sync_reserved_stats();
}

bool CachingAllocator::pool_paused(PoolId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const PrivatePool* pool = find_pool(id);
  return pool != nullptr && pool->paused();
}

}  // namespace vmm
