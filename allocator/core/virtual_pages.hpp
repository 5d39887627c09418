// Virtual ranges whose pages (one 2 MiB chunk each) are mapped and unmapped one by one:
// the memory under virtual tensors such as KV caches (vAttention). Pages come from the
// same chunk pool as every tensor (Note [KV pages]). Used by CachingAllocator under its
// lock; it does no locking of its own.
//
// Note [KV pages]
// - A page's chunk is busy from the moment it is mapped until it is unmapped, so no
//   stitch or small segment can use it meanwhile; a cached mapping that also maps the
//   chunk is simply not ready (Note [Mappings and readiness]). Once unmapped, the chunk is
//   free like any other: a freed KV page serves the next torch allocation, and the reverse.
// - A page that is no longer needed may still be read by work queued on the stream that
//   gave it up, and the driver does not wait (docs/FACTS.md). It is retired: an event is
//   recorded on that stream, and the page is unmapped (its chunk returned) only once the
//   event has completed. Until then it stays mapped, so a retired page that is needed again
//   is simply taken back, with no driver call; each retirement carries a serial number so
//   that a stale retirement never unmaps a page that was taken back and retired anew.
// - A range whose owner let go is unreserved only once none of its pages is mapped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "core/chunk_pool.hpp"
#include "core/stats.hpp"

namespace vmm {

struct PageSlot {
  Chunk* chunk = nullptr;           // null: not mapped
  std::uint64_t retire_serial = 0;  // non-zero: mapped, retiring (not counted as live)
};

struct ReservedRange {
  std::uintptr_t base = 0;
  std::size_t bytes = 0;  // reserved, a multiple of kChunkSize
  std::vector<PageSlot> pages;
  std::size_t live_pages = 0;    // mapped and not retiring
  std::size_t mapped_pages = 0;  // mapped, retiring included
  bool freed = false;            // the owner let go: unreserve once nothing is mapped
  std::size_t index = 0;         // position in VirtualPages::ranges_
};

// Which pages a commit maps, takes back from retirement and gives up.
struct PagePlan {
  std::vector<std::size_t> map;      // needed, not mapped
  std::vector<std::size_t> reclaim;  // needed, retiring
  std::vector<std::size_t> drop;     // live, not needed
};

class VirtualPages {
 public:
  explicit VirtualPages(Backend& backend) : backend_(backend) {}
  ~VirtualPages();  // unmaps and unreserves everything (process teardown, device idle)
  VirtualPages(const VirtualPages&) = delete;
  VirtualPages& operator=(const VirtualPages&) = delete;

  ReservedRange* reserve(std::size_t bytes);
  // Pages overlapping [r*stride + begin, r*stride + end) for r < rows are needed; the
  // caller checked that this lies inside the range.
  PagePlan plan(const ReservedRange& range, std::size_t rows, std::size_t stride, std::size_t begin,
                std::size_t end) const;
  // Takes retiring pages back for use on `stream`, which first waits for the work their
  // retirement waits for (it may have been queued on another stream).
  void reclaim(ReservedRange& range, const std::vector<std::size_t>& pages, StreamId stream);
  // Retires live pages after work queued on `stream` (Note [KV pages]).
  void retire(ReservedRange& range, const std::vector<std::size_t>& pages, StreamId stream);
  // Maps chunks[i] at pages[i] and grants access. Throws BackendError; then nothing is
  // mapped and the caller still owns the chunks.
  void map(ReservedRange& range, const std::vector<std::size_t>& pages, const std::vector<Chunk*>& chunks);
  // Retires every live page and lets the range go.
  void free(ReservedRange& range, StreamId stream);
  // Unmaps retired pages whose work has finished (all of them when `wait`: the caller
  // synchronized the device) and returns their chunks, which are idle (kNoStream).
  std::vector<Chunk*> finish_retiring(bool wait);
  bool has_retiring() const { return !retiring_.empty(); }
  template <typename F>
  void for_each_range(F&& f) const {
    for (const auto& range : ranges_) f(*range);
  }
  // Calls f(base, bytes) for every run of consecutive mapped pages, retiring ones included
  // (they can be taken back with no driver call).
  template <typename F>
  void for_each_mapped(F&& f) const {
    for (const auto& range : ranges_) {
      const auto& pages = range->pages;
      for (std::size_t i = 0; i < pages.size();) {
        if (pages[i].chunk == nullptr) {
          ++i;
          continue;
        }
        std::size_t j = i + 1;
        while (j < pages.size() && pages[j].chunk != nullptr) ++j;
        f(range->base + i * kChunkSize, (j - i) * kChunkSize);
        i = j;
      }
    }
  }

  void append_stats(StatList& out) const;
  void reset_peak() { live_bytes.reset_peak(); }

  Stat live_bytes;  // bytes of live pages (KV-mapped bytes)
  std::int64_t backend_errors = 0;

 private:
  struct Retiring {
    ReservedRange* range;
    std::vector<std::size_t> pages;
    EventId event;
    std::uint64_t serial;
  };

  void unmap_pages(ReservedRange& range, const std::vector<std::size_t>& pages, std::uint64_t serial,
                   std::vector<Chunk*>& out);
  void maybe_destroy(ReservedRange* range);
  template <typename F>
  void count_failure(F&& cleanup) noexcept;

  Backend& backend_;
  std::vector<std::unique_ptr<ReservedRange>> ranges_;
  std::vector<Retiring> retiring_;
  std::uint64_t next_serial_ = 1;
  std::size_t reserved_virtual_bytes_ = 0;
};

}  // namespace vmm
