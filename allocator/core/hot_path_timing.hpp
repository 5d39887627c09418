// Times the allocator's cached hit path from C++, so benchmarks measure the allocator and
// not the Python call around it.
#pragma once

#include <cstddef>
#include <vector>

#include "core/caching_allocator.hpp"

namespace vmm {

// Allocates and frees each size in `sizes` in turn, `rounds` times, after one warm-up
// round; returns nanoseconds per allocate+deallocate pair.
double time_alloc_free_pairs(CachingAllocator& allocator, const std::vector<std::size_t>& sizes,
                             std::size_t rounds, StreamId stream);

// The same loop over the C library's malloc/free: the peer the host hot path is held to.
double time_malloc_free_pairs(const std::vector<std::size_t>& sizes, std::size_t rounds);

}  // namespace vmm
