#include "core/chunk_pool.hpp"

#include <atomic>
#include <memory>
#include <string>

#include "core/errors.hpp"

namespace vmm {

ChunkPool::~ChunkPool() {
  std::vector<Chunk*> heads;  // collected first: deleting a head frees its other chunks
  for (Chunk* chunk : chunks_) {
    if (chunk->is_head()) heads.push_back(chunk);
  }
  for (Chunk* head : heads) {
    if (!paused_) {  // a paused pool gave its handles and its budget back already
      try {
        backend_.release_chunk(head->handle);
      } catch (const std::exception&) {
        // Destruction must not throw; the driver reclaims the handle at process exit.
      }
      const std::size_t n = head->handle_chunks;
      budget_.chunks -= n;
      budget_.chunks_stat.decrease(static_cast<std::int64_t>(n));
    }
    delete[] head;
  }
}

void ChunkPool::pause_handles() {
  for (Chunk* c : chunks_) {
    if (!c->is_head()) continue;
    try {
      backend_.release_chunk(c->handle);
    } catch (const std::exception&) {
      // Nothing maps it any more; the driver reclaims it at process exit at the latest.
    }
  }
  budget_.chunks -= chunks_.size();
  budget_.chunks_stat.decrease(static_cast<std::int64_t>(chunks_.size()));
  paused_ = true;
}

void ChunkPool::resume_handles() {
  if ((budget_.chunks + chunks_.size()) * kChunkSize > budget_.cap_bytes) {
    throw CapExceeded("memory cap of " + std::to_string(budget_.cap_bytes >> 20) + " MiB reached");
  }
  std::vector<std::pair<Chunk*, ChunkHandle>> made;
  made.reserve(chunks_.size());
  try {
    for (Chunk* c : chunks_) {
      if (c->is_head()) made.emplace_back(c, backend_.create_chunk(c->handle_chunks * kChunkSize));
    }
  } catch (...) {
    for (const auto& [head, handle] : made) {
      try {
        backend_.release_chunk(handle);
      } catch (const std::exception&) {
      }
    }
    throw;
  }
  for (const auto& [head, handle] : made) {
    for (std::size_t k = 0; k < head->handle_chunks; ++k) head[k].handle = handle;
  }
  budget_.chunks += chunks_.size();
  budget_.chunks_stat.increase(static_cast<std::int64_t>(chunks_.size()));
  paused_ = false;
}

namespace {
// Chunk serial numbers are unique across the pools of every device.
std::uint64_t next_chunk_id() {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

Chunk* ChunkPool::create(std::size_t chunks) {
  if ((budget_.chunks + chunks) * kChunkSize > budget_.cap_bytes) {
    throw CapExceeded("memory cap of " + std::to_string(budget_.cap_bytes >> 20) + " MiB reached");
  }
  std::unique_ptr<Chunk[]> handle(new Chunk[chunks]);
  chunks_.reserve(chunks_.size() + chunks);  // so that the pushes below cannot throw
  const ChunkHandle physical = backend_.create_chunk(chunks * kChunkSize);
  for (std::size_t k = 0; k < chunks; ++k) {
    Chunk& c = handle[k];
    c.handle = physical;
    c.id = next_chunk_id();
    c.index = chunks_.size();
    c.handle_chunks = static_cast<std::uint32_t>(chunks);
    c.handle_pos = static_cast<std::uint32_t>(k);
    chunks_.push_back(&c);
  }
  free_count_ += chunks;
  budget_.chunks += chunks;
  budget_.chunks_stat.increase(static_cast<std::int64_t>(chunks));
  if (chunks > 1) ++budget_.large_handles;
  ++budget_.created;
  return handle.release();
}

void ChunkPool::release(Chunk* head) {
  backend_.release_chunk(head->handle);
  const std::size_t chunks = head->handle_chunks;
  for (std::size_t k = 0; k < chunks; ++k) {
    const std::size_t index = head[k].index;
    chunks_[index] = chunks_.back();
    chunks_[index]->index = index;
    chunks_.pop_back();
  }
  free_count_ -= chunks;
  budget_.chunks -= chunks;
  budget_.chunks_stat.decrease(static_cast<std::int64_t>(chunks));
  if (chunks > 1) --budget_.large_handles;
  ++budget_.released;
  delete[] head;
}

void ChunkPool::adopt(ChunkPool& other) {
  chunks_.reserve(chunks_.size() + other.chunks_.size());
  for (Chunk* c : other.chunks_) {
    c->index = chunks_.size();
    chunks_.push_back(c);
  }
  free_count_ += other.free_count_;
  other.chunks_.clear();
  other.free_count_ = 0;
}

}  // namespace vmm
