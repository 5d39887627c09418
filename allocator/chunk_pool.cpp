#include "chunk_pool.hpp"

#include <memory>
#include <string>

#include "errors.hpp"

namespace vmm {

ChunkPool::~ChunkPool() {
  std::vector<Chunk*> heads;  // collected first: deleting a head frees its other chunks
  for (Chunk* chunk : chunks_) {
    if (chunk->is_head()) heads.push_back(chunk);
  }
  for (Chunk* head : heads) {
    try {
      backend_.release_chunk(head->handle);
    } catch (const std::exception&) {
      // Destruction must not throw; the driver reclaims the handle at process exit.
    }
    delete[] head;
  }
}

Chunk* ChunkPool::create(std::size_t chunks) {
  if ((chunks_.size() + chunks) * kChunkSize > cap_bytes_) {
    throw CapExceeded("memory cap of " + std::to_string(cap_bytes_ >> 20) + " MiB reached");
  }
  std::unique_ptr<Chunk[]> handle(new Chunk[chunks]);
  chunks_.reserve(chunks_.size() + chunks);  // so that the pushes below cannot throw
  const ChunkHandle physical = backend_.create_chunk(chunks * kChunkSize);
  for (std::size_t k = 0; k < chunks; ++k) {
    Chunk& c = handle[k];
    c.handle = physical;
    c.id = next_id_++;
    c.index = chunks_.size();
    c.handle_chunks = static_cast<std::uint32_t>(chunks);
    c.handle_pos = static_cast<std::uint32_t>(k);
    chunks_.push_back(&c);
  }
  free_count_ += chunks;
  chunks_stat.increase(static_cast<std::int64_t>(chunks));
  if (chunks > 1) ++large_handles_;
  ++created;
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
  chunks_stat.decrease(static_cast<std::int64_t>(chunks));
  if (chunks > 1) --large_handles_;
  ++released;
  delete[] head;
}

}  // namespace vmm
