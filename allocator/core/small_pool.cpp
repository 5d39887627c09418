#include "core/small_pool.hpp"

#include <algorithm>

namespace vmm {

SmallPool::~SmallPool() {
  for (SmallSegment* seg : segments_) {
    for (SmallBlock* b = seg->first; b != nullptr;) {
      SmallBlock* next = b->next;
      delete b;
      b = next;
    }
    delete seg;
  }
  for (SmallBlock* b : spare_blocks_) delete b;
}

SmallPool::Index& SmallPool::index_for(StreamId stream) {
  if (last_index_ < indexes_.size() && indexes_[last_index_].first == stream) {
    return *indexes_[last_index_].second;
  }
  for (std::size_t i = 0; i < indexes_.size(); ++i) {
    if (indexes_[i].first == stream) {
      last_index_ = i;
      return *indexes_[i].second;
    }
  }
  indexes_.emplace_back(stream, std::make_unique<Index>());
  last_index_ = indexes_.size() - 1;
  return *indexes_.back().second;
}

SmallBlock* SmallPool::new_block() {
  if (spare_blocks_.empty()) return new SmallBlock();
  SmallBlock* b = spare_blocks_.back();
  spare_blocks_.pop_back();
  *b = SmallBlock();
  return b;
}

SmallBlock* SmallPool::allocate(std::size_t size, StreamId stream) {
  Index& index = index_for(stream);
  SmallBlock* block = index.best_fit(size);
  if (block == nullptr) return nullptr;
  index.remove(block);
  return take(index, block, size);
}

SmallBlock* SmallPool::allocate_in_new_segment(Mapping* mapping, std::size_t size, StreamId stream) {
  auto* seg = new SmallSegment();
  seg->mapping = mapping;
  seg->stream = stream;
  SmallBlock* block = new_block();
  block->addr = mapping->base;
  block->size = kChunkSize;
  block->segment = seg;
  seg->first = block;
  segments_.push_back(seg);
  return take(index_for(stream), block, size);
}

// `block` is free and in no index; splits off the tail when it can serve another request.
SmallBlock* SmallPool::take(Index& index, SmallBlock* block, std::size_t size) {
  if (block->size - size >= kSmallRounding) {
    SmallBlock* rest = new_block();
    rest->addr = block->addr + size;
    rest->size = block->size - size;
    rest->segment = block->segment;
    rest->prev = block;
    rest->next = block->next;
    if (block->next) block->next->prev = rest;
    block->next = rest;
    block->size = size;
    index.insert(rest);
  }
  block->allocated = true;
  block->segment->allocated_bytes += block->size;
  live_.insert(block->addr, block);
  return block;
}

SmallBlock* SmallPool::allocate_at(std::uintptr_t addr, std::size_t size) {
  for (SmallSegment* seg : segments_) {
    if (addr < seg->first->addr || addr >= seg->first->addr + kChunkSize) continue;
    SmallBlock* b = seg->first;
    while (b != nullptr && b->addr + b->size <= addr) b = b->next;
    if (b == nullptr || b->allocated || addr + size > b->addr + b->size) return nullptr;
    Index& index = index_for(seg->stream);
    index.remove(b);
    if (b->addr < addr) {
      // The front stays free; its neighbours are then allocated (Note [Small block invariants]).
      SmallBlock* rest = new_block();
      rest->addr = addr;
      rest->size = b->addr + b->size - addr;
      rest->segment = seg;
      rest->prev = b;
      rest->next = b->next;
      if (b->next) b->next->prev = rest;
      b->next = rest;
      b->size = addr - b->addr;
      index.insert(b);
      b = rest;
    }
    return take(index, b, size);
  }
  return nullptr;
}

void SmallPool::free(SmallBlock* block) {
  live_.erase(block->addr);
  block->allocated = false;
  block->requested = 0;
  block->segment->allocated_bytes -= block->size;
  Index& index = index_for(block->segment->stream);
  // Merge with free neighbours, keeping the lower block (Note [Small block invariants]).
  if (SmallBlock* prev = block->prev; prev && !prev->allocated) {
    index.remove(prev);
    prev->size += block->size;
    prev->next = block->next;
    if (block->next) block->next->prev = prev;
    recycle(block);
    block = prev;
  }
  if (SmallBlock* next = block->next; next && !next->allocated) {
    index.remove(next);
    block->size += next->size;
    block->next = next->next;
    if (next->next) next->next->prev = block;
    recycle(next);
  }
  index.insert(block);
}

void SmallPool::reclaim_segment(std::size_t i, MappingCache& cache) {
  SmallSegment* seg = segments_[i];
  index_for(seg->stream).remove(seg->first);
  recycle(seg->first);
  cache.release(seg->mapping, seg->stream);
  segments_[i] = segments_.back();
  segments_.pop_back();
  delete seg;
}

std::size_t SmallPool::reclaim(MappingCache& cache) {
  std::size_t reclaimed = 0;
  for (std::size_t i = 0; i < segments_.size();) {
    if (segments_[i]->allocated_bytes != 0) {
      ++i;
      continue;
    }
    reclaim_segment(i, cache);
    ++reclaimed;
  }
  return reclaimed;
}

void SmallPool::reclaim_except(const std::vector<std::uintptr_t>& keep, MappingCache& cache) {
  for (std::size_t i = 0; i < segments_.size();) {
    const SmallSegment* seg = segments_[i];
    if (seg->allocated_bytes != 0 || std::find(keep.begin(), keep.end(), seg->first->addr) != keep.end()) {
      ++i;
      continue;
    }
    reclaim_segment(i, cache);
  }
}

std::size_t SmallPool::free_bytes_in_used_segments() const {
  std::size_t total = 0;
  for (const SmallSegment* seg : segments_) {
    if (seg->allocated_bytes != 0) total += kChunkSize - seg->allocated_bytes;
  }
  return total;
}

}  // namespace vmm
