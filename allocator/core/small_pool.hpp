// Requests up to 1 MiB, sub-allocated inside 2 MiB segments (each one chunk, held as a
// one-chunk mapping of the MappingCache), 512-byte rounded, with best-fit, splitting and
// coalescing, so a 4-byte tensor does not cost 2 MiB.
//
// Note [Small segments and streams]
// A segment belongs to the stream that created it and serves only that stream, so a
// block freed on a stream is reused only by later work on the same stream (stream order
// makes that safe). Each stream has its own size-class index of free blocks. A fully free
// segment stays cached until the large pool needs chunks or memory runs out; reclaiming
// it hands its mapping back to the MappingCache, tagged with the segment's stream
// (Note [Stream-ordered reuse]).
//
// Note [Small block invariants]
// Blocks of a segment tile it in address order (prev/next). Free neighbours are always
// merged, so a free block's neighbours are allocated; a segment with no allocated byte is
// one free block, its `first`. The first block of a segment is never merged away (merging
// keeps the lower block), so `first` stays valid for the segment's life.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "backend/backend.hpp"
#include "core/mapping_cache.hpp"
#include "core/pointer_map.hpp"
#include "core/size_class_index.hpp"

namespace vmm {

constexpr std::size_t kSmallRequestLimit = std::size_t{1} << 20;  // 1 MiB

struct SmallSegment;

struct SmallBlock {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;
  bool allocated = false;
  SmallSegment* segment = nullptr;
  SmallBlock* prev = nullptr;  // address-ordered neighbours within the segment
  SmallBlock* next = nullptr;
  SmallBlock* free_prev = nullptr;  // size-class list, while free
  SmallBlock* free_next = nullptr;
};

struct SmallSegment {
  Mapping* mapping = nullptr;
  StreamId stream = 0;
  std::size_t allocated_bytes = 0;
  SmallBlock* first = nullptr;
};

class SmallPool {
 public:
  SmallPool() = default;
  ~SmallPool();
  SmallPool(const SmallPool&) = delete;
  SmallPool& operator=(const SmallPool&) = delete;

  static std::size_t round(std::size_t size) {
    return size == 0 ? kSmallRounding : (size + kSmallRounding - 1) / kSmallRounding * kSmallRounding;
  }

  // A block of `size` (rounded) from a cached segment of `stream`, or nullptr.
  SmallBlock* allocate(std::size_t size, StreamId stream);
  // Adds a fresh segment on `mapping` (one chunk, in use) and allocates from it.
  SmallBlock* allocate_in_new_segment(Mapping* mapping, std::size_t size, StreamId stream);
  // The block of exactly `size` (rounded) at `addr`, carved out of the free block of a
  // cached segment that covers it (checkpoint restores: Note [Private pools]); nullptr when
  // no free block covers it.
  SmallBlock* allocate_at(std::uintptr_t addr, std::size_t size);
  void free(SmallBlock* block);
  SmallBlock* find(std::uintptr_t ptr) const { return live_.find(ptr); }

  // Hands every fully free segment back to `cache`; returns how many.
  std::size_t reclaim(MappingCache& cache);
  // Hands every fully free segment whose base `keep` does not hold back to `cache`.
  void reclaim_except(const std::vector<std::uintptr_t>& keep, MappingCache& cache);

  std::size_t segment_count() const { return segments_.size(); }
  template <typename F>
  void for_each_segment(F&& f) const {
    for (const SmallSegment* segment : segments_) f(*segment);
  }
  std::size_t free_bytes_in_used_segments() const;

 private:
  using Index = SizeClassIndex<SmallBlock>;
  Index& index_for(StreamId stream);
  SmallBlock* take(Index& index, SmallBlock* block, std::size_t size);
  SmallBlock* new_block();
  void reclaim_segment(std::size_t i, MappingCache& cache);
  void recycle(SmallBlock* block) { spare_blocks_.push_back(block); }

  std::vector<std::pair<StreamId, std::unique_ptr<Index>>> indexes_;  // few streams
  std::size_t last_index_ = 0;  // the stream looked up last, tried first
  PointerMap<SmallBlock*> live_;
  std::vector<SmallSegment*> segments_;
  std::vector<SmallBlock*> spare_blocks_;  // recycled block records: no heap churn
};

}  // namespace vmm
