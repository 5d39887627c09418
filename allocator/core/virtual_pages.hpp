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
//
// Note [Padding pages]
// A batch of prompts of different lengths is padded on the left: row r's positions before
// its first token are never attended to with any weight (the attention mask says so), yet
// eager attention and the prompt's copy still touch them, so they must be mapped. A page
// wholly inside such padding (a commit's `row_begins`) is mapped to one shared chunk, the
// filler of its kind, held while any page maps it: memory follows the tokens, not
// the longest prompt. What the filler holds is whatever some row wrote last at that
// offset (every write there is a padding position's K or V, a finite value the mask
// weighs by 0), so no reader may give a padding position weight. A weight of 0 hides a
// finite value only (0 times NaN is NaN), and bytes of one element type read as another
// can be NaN, so each range names its filler kind when reserved (its element type) and
// each kind has a filler of its own: a range only ever reads what ranges of its kind wrote.
// - A page that serves tokens is never the filler: a page a commit needs for tokens that
//   maps the filler now (a row's tokens begin earlier than before) is unmapped once the
//   work queued on the stream has finished, a host wait (rare: a new prompt over a range
//   whose retirements are still under way, a reorder of rows), then mapped to its own chunk.
// - A page needed as padding that is mapped to its own chunk keeps it: any memory serves
//   as padding, and giving it up would cost a wait for nothing.
// - Each filler counts once in every statistic (allocated, kv_mapped_bytes, snapshots), as
//   one page; a range's live pages are its own chunks only.
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
  bool padding = false;             // chunk is the filler (Note [Padding pages])
};

struct ReservedRange {
  std::uintptr_t base = 0;
  std::size_t bytes = 0;  // reserved, a multiple of kChunkSize
  std::vector<PageSlot> pages;
  std::size_t live_pages = 0;     // mapped to their own chunk and not retiring
  std::size_t live_padding = 0;   // mapped to the filler and not retiring
  std::size_t mapped_pages = 0;   // mapped, retiring and padding included
  bool freed = false;             // the owner let go: unreserve once nothing is mapped
  std::size_t index = 0;          // position in VirtualPages::ranges_
  std::uint32_t filler_kind = 0;  // which filler its padding maps (Note [Padding pages])
};

// Which pages a commit maps, takes back from retirement and gives up.
struct PagePlan {
  std::vector<std::size_t> map;          // needed for tokens, not mapped
  std::vector<std::size_t> map_padding;  // needed as padding, not mapped
  std::vector<std::size_t> unpad;        // needed for tokens, mapped to the filler (also in map)
  std::vector<std::size_t> reclaim;      // needed, retiring (own chunk, or the filler; unpad's too)
  std::vector<std::size_t> drop;         // live, not needed
};

class VirtualPages {
 public:
  explicit VirtualPages(Backend& backend) : backend_(backend) {}
  ~VirtualPages();  // unmaps and unreserves everything (process teardown, device idle)
  VirtualPages(const VirtualPages&) = delete;
  VirtualPages& operator=(const VirtualPages&) = delete;

  ReservedRange* reserve(std::size_t bytes, std::uint32_t filler_kind = 0);
  // Pages overlapping [r*stride + begin, r*stride + end) for r < rows are needed; with
  // `row_begins` (one per row, or empty), those overlapping only row r's positions before
  // r*stride + row_begins[r] are needed as padding (Note [Padding pages]). The caller
  // checked that this lies inside the range.
  PagePlan plan(const ReservedRange& range, std::size_t rows, std::size_t stride, std::size_t begin,
                std::size_t end, const std::vector<std::size_t>& row_begins) const;
  // Takes retiring pages back for use on `stream`, which first waits for the work their
  // retirement waits for (it may have been queued on another stream). Returns how many
  // were own-chunk pages (the rest map the filler).
  std::size_t reclaim(ReservedRange& range, const std::vector<std::size_t>& pages, StreamId stream);
  // Retires live pages after work queued on `stream` (Note [KV pages]). Returns how many
  // were own-chunk pages.
  std::size_t retire(ReservedRange& range, const std::vector<std::size_t>& pages, StreamId stream);
  // Maps chunks[i] at pages[i] and grants access. Throws BackendError; then nothing is
  // mapped and the caller still owns the chunks.
  void map(ReservedRange& range, const std::vector<std::size_t>& pages, const std::vector<Chunk*>& chunks);
  // Maps the filler of the range's kind at `pages` (Note [Padding pages]); `fresh` becomes
  // it if none is held (the caller drew it from the pool). Throws BackendError; then
  // nothing is mapped. Throws std::logic_error unless `fresh` is given exactly when none of
  // the kind is held.
  void map_padding(ReservedRange& range, const std::vector<std::size_t>& pages, Chunk* fresh);
  // Unmaps live pages mapped to the filler once the work queued on `stream` has finished: a
  // host wait. Retiring ones must be reclaimed first (plan() puts them in `reclaim`).
  void unpad(ReservedRange& range, const std::vector<std::size_t>& pages, StreamId stream);
  // Unmaps live padding pages at once: for pages no queued work can read (mapped by this
  // very commit: undoing its map_padding; or after unpad's wait).
  void unmap_padding_now(ReservedRange& range, const std::vector<std::size_t>& pages);
  // The fillers no page maps any more (then no longer held).
  std::vector<Chunk*> release_unused_fillers();
  bool holds_filler(std::uint32_t kind) const {
    for (const Filler& f : fillers_) {
      if (f.kind == kind) return true;
    }
    return false;
  }
  template <typename F>
  void for_each_filler(F&& f) const {
    for (const Filler& filler : fillers_) f(filler.chunk);
  }
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

  Stat live_bytes;  // bytes of live own-chunk pages and each filler once (KV-mapped bytes)
  std::int64_t backend_errors = 0;

 private:
  struct Retiring {
    ReservedRange* range;
    std::vector<std::size_t> pages;
    EventId event;
    std::uint64_t serial;
  };

  // The driver's part of map(): maps and grants access, or nothing on a throw.
  void map_chunks(ReservedRange& range, const std::vector<std::size_t>& pages,
                  const std::vector<Chunk*>& chunks);
  void unmap_pages(ReservedRange& range, const std::vector<std::size_t>& pages, std::uint64_t serial,
                   std::vector<Chunk*>& out);
  void maybe_destroy(ReservedRange* range);
  template <typename F>
  bool count_failure(F&& cleanup) noexcept;

  Backend& backend_;
  std::vector<std::unique_ptr<ReservedRange>> ranges_;
  std::vector<Retiring> retiring_;
  std::uint64_t next_serial_ = 1;
  std::size_t reserved_virtual_bytes_ = 0;
  // Note [Padding pages]: a filler per kind held, with the pages mapping it, retiring ones
  // included (kinds are a range's element types: a handful).
  struct Filler {
    std::uint32_t kind;
    Chunk* chunk;
    std::size_t mappings;
  };
  // One page that mapped `chunk`, a filler, no longer does.
  void unmapped_filler_page(Chunk* chunk);
  std::vector<Filler> fillers_;
};

}  // namespace vmm
