#include "small_pool.hpp"

namespace vmm {

SmallPool::~SmallPool() {
  for (SmallSegment* seg : segments_) delete seg;
  for (SmallBlock* b : free_blocks_) delete b;
  live_.for_each([](std::uintptr_t, SmallBlock* b) { delete b; });
  for (SmallBlock* b : spare_blocks_) delete b;
}

SmallBlock* SmallPool::new_block() {
  if (spare_blocks_.empty()) return new SmallBlock();
  SmallBlock* b = spare_blocks_.back();
  spare_blocks_.pop_back();
  *b = SmallBlock();
  return b;
}

void SmallPool::delete_block(SmallBlock* block) { spare_blocks_.push_back(block); }

SmallBlock* SmallPool::allocate(std::size_t size, StreamId stream) {
  SmallBlock key;
  key.stream = stream;
  key.size = size;
  key.addr = 0;
  auto it = free_blocks_.lower_bound(&key);
  if (it == free_blocks_.end() || (*it)->stream != stream) return nullptr;
  SmallBlock* block = *it;
  free_blocks_.erase(it);
  return take(block, size);
}

SmallBlock* SmallPool::allocate_in_new_segment(Mapping* mapping, std::size_t size,
                                               StreamId stream) {
  auto* seg = new SmallSegment();
  seg->mapping = mapping;
  seg->stream = stream;
  seg->index = segments_.size();
  segments_.push_back(seg);
  SmallBlock* block = new_block();
  block->addr = mapping->base;
  block->size = kChunkSize;
  block->stream = stream;
  block->segment = seg;
  return take(block, size);
}

// `block` is free and not in free_blocks_; splits off the tail if it is big enough to
// serve another request.
SmallBlock* SmallPool::take(SmallBlock* block, std::size_t size) {
  if (block->size - size >= kSmallRounding) {
    SmallBlock* rest = new_block();
    rest->addr = block->addr + size;
    rest->size = block->size - size;
    rest->stream = block->stream;
    rest->segment = block->segment;
    rest->prev = block;
    rest->next = block->next;
    if (block->next) block->next->prev = rest;
    block->next = rest;
    block->size = size;
    free_blocks_.insert(rest);
  }
  block->allocated = true;
  block->segment->allocated_bytes += block->size;
  live_.insert(block->addr, block);
  return block;
}

void SmallPool::free(SmallBlock* block) {
  live_.erase(block->addr);
  block->allocated = false;
  block->requested = 0;
  block->segment->allocated_bytes -= block->size;
  // Coalesce with free neighbours: a segment's free space is always maximal blocks.
  if (SmallBlock* prev = block->prev; prev && !prev->allocated) {
    free_blocks_.erase(prev);
    prev->size += block->size;
    prev->next = block->next;
    if (block->next) block->next->prev = prev;
    delete_block(block);
    block = prev;
  }
  if (SmallBlock* next = block->next; next && !next->allocated) {
    free_blocks_.erase(next);
    block->size += next->size;
    block->next = next->next;
    if (next->next) next->next->prev = block;
    delete_block(next);
  }
  free_blocks_.insert(block);
}

std::size_t SmallPool::reclaim(MappingCache& cache) {
  std::size_t reclaimed = 0;
  for (std::size_t i = 0; i < segments_.size();) {
    SmallSegment* seg = segments_[i];
    if (seg->allocated_bytes != 0) {
      ++i;
      continue;
    }
    // A fully free segment is one free block covering the whole chunk.
    SmallBlock key;
    key.stream = seg->stream;
    key.size = kChunkSize;
    key.addr = seg->mapping->base;
    auto it = free_blocks_.find(&key);
    SmallBlock* whole = *it;
    free_blocks_.erase(it);
    delete_block(whole);
    cache.release(seg->mapping, seg->stream);
    segments_[i] = segments_.back();
    segments_[i]->index = i;
    segments_.pop_back();
    delete seg;
    ++reclaimed;
  }
  return reclaimed;
}

std::size_t SmallPool::free_bytes_in_used_segments() const {
  std::size_t total = 0;
  for (const SmallSegment* seg : segments_) {
    if (seg->allocated_bytes != 0) total += kChunkSize - seg->allocated_bytes;
  }
  return total;
}

}  // namespace vmm
