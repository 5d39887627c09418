// One body of memory the caching allocator serves requests from: its chunks, the mappings
// over them, the small-block segments, and the live large allocations. The device's main
// arena serves eager code; each private pool has an arena of its own (Note [Private pools]
// in private_pool.hpp). Arenas of one device share the backend and the chunk budget.
#pragma once

#include "backend/backend.hpp"
#include "core/chunk_pool.hpp"
#include "core/config.hpp"
#include "core/mapping_cache.hpp"
#include "core/pointer_map.hpp"
#include "core/small_pool.hpp"

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
