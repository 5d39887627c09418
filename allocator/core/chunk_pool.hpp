// The physical chunks of one device: creation under the memory cap, release, and the list
// of free chunks that stitching draws from.
//
// Note [Large handles]
// A chunk is the allocator's unit, 2 MiB, and what busy/free, streams and mapping lists
// are kept for. Physically a chunk is either a handle of its own or one of the
// `handle_chunks` consecutive chunks of a large handle (16 MiB by default, config
// large_handle_size). A grant costs per handle whatever its size (docs/FACTS.md, bench/NOTES.md
// "Several GPUs" item 15), so a request of n chunks mapped as n/L large handles and n%L
// single chunks pays about L times fewer grants. The driver maps and unmaps a handle only
// whole, so the invariant every mapping keeps: a large handle's chunks are mapped together,
// back to back in order, or not at all. Hence they share one mapping list, and a large
// handle is picked for a stitch only when all its chunks are free. Its chunks are one
// array, so chunk k of a handle is head + k.
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

#include "backend/backend.hpp"
#include "core/stats.hpp"

namespace vmm {

// No stream: the chunk's last use is known to have finished.
constexpr StreamId kNoStream = ~StreamId{0};

struct Mapping;

struct Chunk {
  ChunkHandle handle = 0;
  std::uint64_t id = 0;  // serial number, never reused (introspection and tests)
  bool busy = false;
  StreamId stream = kNoStream;
  std::vector<Mapping*> mappings;   // cached mappings that map this chunk
  std::size_t index = 0;            // position in ChunkPool::chunks_
  std::uint64_t pick_mark = 0;      // MappingCache::pick_chunks' current pick, to skip duplicates
  std::uint32_t handle_chunks = 1;  // chunks of its handle (Note [Large handles])
  std::uint32_t handle_pos = 0;     // its place in the handle: the head is this - handle_pos

  bool is_head() const { return handle_pos == 0; }
};

// What every chunk pool of one device shares (Note [Private pools] in private_pool.hpp):
// the memory cap and the device-wide counts it is checked against. A chunk belongs to
// exactly one pool; it is counted here from its creation to its release.
struct ChunkBudget {
  std::size_t cap_bytes = 0;
  std::size_t chunks = 0;     // live chunks, all pools
  Stat chunks_stat;           // the same, with peak and totals
  std::int64_t created = 0;   // handles
  std::int64_t released = 0;  // handles
  std::size_t large_handles = 0;
};

class ChunkPool {
 public:
  ChunkPool(Backend& backend, ChunkBudget& budget) : backend_(backend), budget_(budget) {}
  ~ChunkPool();  // releases every chunk; the caller unmapped them first
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;

  // A new free handle of `chunks` chunks; returns its head. Throws CapExceeded past the
  // budget's cap, DeviceOutOfMemory or BackendError from the backend; nothing changes on
  // failure.
  Chunk* create(std::size_t chunks = 1);
  // Returns a handle whose chunks are all free and unmapped to the backend (`head`: its
  // first chunk).
  void release(Chunk* head);
  // Takes over every chunk of `other`, which must all be free and mapped nowhere; they keep
  // their streams (Note [Stream-ordered reuse]). The budget is unchanged.
  void adopt(ChunkPool& other);

  // Note [Sleeping pools] (private_pool.hpp): the physical handles go back to the backend
  // (unmapped first, by the caller) while the chunks stay, with their mapping lists, so
  // that resume_handles() puts new handles in the same places. Paused chunks leave the
  // budget. resume_handles() throws CapExceeded, DeviceOutOfMemory or BackendError with
  // nothing changed (still paused).
  void pause_handles();
  void resume_handles();
  bool paused() const { return paused_; }

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
  std::size_t count() const { return chunks_.size(); }  // this pool's chunks, not handles
  // Every chunk, in no particular order; a large handle's chunks are all there.
  const std::vector<Chunk*>& all() const { return chunks_; }

 private:
  Backend& backend_;
  ChunkBudget& budget_;
  // Owns the chunks: each handle's chunks are one new[]-ed array, deleted by release().
  std::vector<Chunk*> chunks_;
  std::size_t free_count_ = 0;
  bool paused_ = false;
};

}  // namespace vmm
