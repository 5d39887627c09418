// Requests up to 1 MiB, sub-allocated inside 2 MiB segments (each one chunk, held as a
// one-chunk mapping of the MappingCache), 512-byte rounded, with best-fit, splitting and
// coalescing, so a 4-byte tensor does not cost 2 MiB.
//
// Note [Small segments and streams]
// A segment belongs to the stream that created it and serves only that stream, so a
// block freed on a stream is reused only by later work on the same stream (stream order
// makes that safe). A fully free segment stays cached until the large pool needs chunks
// or empty_cache runs; reclaiming it hands its mapping back to the MappingCache, tagged
// with the segment's stream (Note [Stream-ordered reuse]).
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <vector>

#include "backend.hpp"
#include "mapping_cache.hpp"
#include "pointer_map.hpp"
#include "stats.hpp"

namespace vmm {

constexpr std::size_t kSmallRequestLimit = std::size_t{1} << 20;  // 1 MiB
constexpr std::size_t kSmallRounding = 512;

struct SmallSegment;

struct SmallBlock {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;
  bool allocated = false;
  StreamId stream = 0;
  SmallSegment* segment = nullptr;
  SmallBlock* prev = nullptr;  // address-ordered neighbours within the segment
  SmallBlock* next = nullptr;
};

struct SmallSegment {
  Mapping* mapping = nullptr;
  StreamId stream = 0;
  std::size_t allocated_bytes = 0;
  std::size_t index = 0;  // position in SmallPool::segments_
};

struct SmallBlockOrder {
  bool operator()(const SmallBlock* a, const SmallBlock* b) const {
    if (a->stream != b->stream) return a->stream < b->stream;
    if (a->size != b->size) return a->size < b->size;
    return a->addr < b->addr;
  }
};

class SmallPool {
 public:
  ~SmallPool();
  SmallPool() = default;
  SmallPool(const SmallPool&) = delete;
  SmallPool& operator=(const SmallPool&) = delete;

  static std::size_t round(std::size_t size) {
    return size == 0 ? kSmallRounding : (size + kSmallRounding - 1) / kSmallRounding * kSmallRounding;
  }

  // A block from a cached segment of `stream`, or nullptr if none fits.
  SmallBlock* allocate(std::size_t size, StreamId stream);
  // Adds a fresh segment on `mapping` (one chunk, in use) and allocates from it.
  SmallBlock* allocate_in_new_segment(Mapping* mapping, std::size_t size, StreamId stream);
  // Frees a block; returns its rounded size.
  void free(SmallBlock* block);
  SmallBlock* find(std::uintptr_t ptr) const { return live_.find(ptr); }

  // Hands every fully free segment back to `cache`; returns how many.
  std::size_t reclaim(MappingCache& cache);

  std::size_t segment_count() const { return segments_.size(); }
  std::size_t free_bytes_in_used_segments() const;

 private:
  SmallBlock* take(SmallBlock* block, std::size_t size);
  SmallBlock* new_block();
  void delete_block(SmallBlock* block);

  std::set<SmallBlock*, SmallBlockOrder> free_blocks_;
  PointerMap<SmallBlock*> live_;
  std::vector<SmallSegment*> segments_;
  std::vector<SmallBlock*> spare_blocks_;  // recycled block records (no heap churn)
};

}  // namespace vmm
