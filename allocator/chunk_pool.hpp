// The physical chunks of one device: creation under the memory cap, release, and the list
// of free chunks that stitching draws from.
//
// Note [Chunk states]
// Only slow paths (stitching, release) enumerate free chunks, by scanning all(); the hot
// path flips `busy` and a counter, nothing more.
//
// A chunk is busy while a live allocation (or a small-pool segment) uses it through any
// mapping, and free otherwise. A free chunk may still be mapped by cached mappings; it is
// released to the backend only once no mapping refers to it. `stream` is the stream of
// the chunk's last use (kNoStream once the device was synchronized); it decides whether
// reuse on another stream must first wait for that stream (Note [Stream-ordered reuse]).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend.hpp"
#include "stats.hpp"

namespace vmm {

// No stream: the chunk's last use is known to have finished.
constexpr StreamId kNoStream = ~StreamId{0};

struct Mapping;

struct Chunk {
  ChunkHandle handle = 0;
  std::uint64_t id = 0;  // serial number, never reused (introspection and tests)
  bool busy = false;
  StreamId stream = kNoStream;
  std::vector<Mapping*> mappings;  // cached mappings that map this chunk
  std::size_t index = 0;  // position in ChunkPool::chunks_
  std::uint64_t pick_mark = 0;  // MappingCache::pick_chunks' current pick, to skip duplicates
};

class ChunkPool {
 public:
  explicit ChunkPool(Backend& backend) : backend_(backend) {}
  ~ChunkPool();  // releases every chunk; the caller unmapped them first
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;

  // A new free chunk. Throws CapExceeded past `cap_bytes`, DeviceOutOfMemory or
  // BackendError from the backend; nothing changes on failure.
  Chunk* create();
  // Returns a free, unmapped chunk to the backend.
  void release(Chunk* chunk);

  void mark_busy(Chunk* chunk) {
    chunk->busy = true;
    --free_count_;
  }
  void mark_free(Chunk* chunk, StreamId stream) {
    chunk->busy = false;
    chunk->stream = stream;
    ++free_count_;
  }

  std::size_t free_count() const { return free_count_; }
  std::size_t count() const { return chunks_.size(); }
  const std::vector<std::unique_ptr<Chunk>>& all() const { return chunks_; }

  void set_cap(std::size_t bytes) { cap_bytes_ = bytes; }
  std::size_t cap() const { return cap_bytes_; }

  Stat chunks_stat;  // live chunks
  std::int64_t created = 0;
  std::int64_t released = 0;

 private:
  Backend& backend_;
  std::size_t cap_bytes_ = 0;
  std::vector<std::unique_ptr<Chunk>> chunks_;
  std::size_t free_count_ = 0;
  std::uint64_t next_id_ = 1;
};

}  // namespace vmm
