// One body of memory the caching allocator serves requests from: its chunks, the mappings
// over them, the small-block segments, and the live large allocations. The device's main
// arena serves eager code; each private pool has an arena of its own (Note [Private pools]
// in private_pool.hpp). Arenas of one device share the backend and the chunk budget.
#pragma once

#include "backend.hpp"
#include "chunk_pool.hpp"
#include "config.hpp"
#include "mapping_cache.hpp"
#include "pointer_map.hpp"
#include "small_pool.hpp"

namespace vmm {

struct Arena {
  // `config` must outlive the arena (its mapping cache keeps a reference).
  Arena(Backend& backend, ChunkBudget& budget, const Config& config)
      : chunks(backend, budget), cache(backend, chunks, config) {}
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Declared in dependency order: destroyed the other way round, chunks last.
  ChunkPool chunks;
  MappingCache cache;
  SmallPool small;
  PointerMap<Mapping*> large;  // live large allocations by base address
};

}  // namespace vmm
