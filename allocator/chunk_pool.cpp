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
  ++free_count_;
  chunks_stat.increase(1);
  ++created;
  return raw;
}

void ChunkPool::release(Chunk* chunk) {
  backend_.release_chunk(chunk->handle);
  --free_count_;
  const std::size_t index = chunk->index;
  chunks_[index] = std::move(chunks_.back());
  chunks_[index]->index = index;
  chunks_.pop_back();
  chunks_stat.decrease(1);
  ++released;
}

}  // namespace vmm
