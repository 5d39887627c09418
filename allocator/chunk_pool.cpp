#include "chunk_pool.hpp"

#include <string>

#include "errors.hpp"

namespace vmm {

ChunkPool::~ChunkPool() {
  for (auto& chunk : chunks_) {
    try {
      backend_.release_chunk(chunk->handle);
    } catch (const std::exception&) {
      // Destruction must not throw; the driver reclaims the handle at process exit.
    }
  }
}

Chunk* ChunkPool::create() {
  if ((chunks_.size() + 1) * kChunkSize > cap_bytes_) {
    throw CapExceeded("memory cap of " + std::to_string(cap_bytes_ >> 20) + " MiB reached");
  }
  auto chunk = std::make_unique<Chunk>();
  chunks_.reserve(chunks_.size() + 1);  // so that push_back below cannot throw
  chunk->handle = backend_.create_chunk();
  chunk->id = next_id_++;
  chunk->index = chunks_.size();
  Chunk* raw = chunk.get();
  chunks_.push_back(std::move(chunk));
  link_free(raw);
  chunks_stat.increase(1);
  ++created;
  return raw;
}

void ChunkPool::release(Chunk* chunk) {
  backend_.release_chunk(chunk->handle);
  unlink_free(chunk);
  const std::size_t index = chunk->index;
  chunks_[index] = std::move(chunks_.back());
  chunks_[index]->index = index;
  chunks_.pop_back();
  chunks_stat.decrease(1);
  ++released;
}

void ChunkPool::mark_busy(Chunk* chunk) {
  unlink_free(chunk);
  chunk->busy = true;
}

void ChunkPool::mark_free(Chunk* chunk, StreamId stream) {
  chunk->busy = false;
  chunk->stream = stream;
  link_free(chunk);
}

void ChunkPool::link_free(Chunk* chunk) {
  chunk->free_prev = nullptr;
  chunk->free_next = free_head_;
  if (free_head_) free_head_->free_prev = chunk;
  free_head_ = chunk;
  ++free_count_;
}

void ChunkPool::unlink_free(Chunk* chunk) {
  if (chunk->free_prev) chunk->free_prev->free_next = chunk->free_next;
  else free_head_ = chunk->free_next;
  if (chunk->free_next) chunk->free_next->free_prev = chunk->free_prev;
  chunk->free_prev = chunk->free_next = nullptr;
  --free_count_;
}

}  // namespace vmm
