#include "core/hot_path_timing.hpp"

#include <chrono>
#include <cstdlib>

namespace vmm {

double time_alloc_free_pairs(CachingAllocator& allocator, const std::vector<std::size_t>& sizes,
                             std::size_t rounds, StreamId stream) {
  if (sizes.empty() || rounds == 0) return 0.0;
  for (std::size_t size : sizes) allocator.deallocate(allocator.allocate(size, stream));
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t r = 0; r < rounds; ++r) {
    for (std::size_t size : sizes) allocator.deallocate(allocator.allocate(size, stream));
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  const double ns = std::chrono::duration<double, std::nano>(elapsed).count();
  return ns / static_cast<double>(rounds * sizes.size());
}

double time_malloc_free_pairs(const std::vector<std::size_t>& sizes, std::size_t rounds) {
  if (sizes.empty() || rounds == 0) return 0.0;
  // A volatile sink keeps the compiler from eliding the malloc/free pairs.
  static void* volatile sink = nullptr;
  for (std::size_t size : sizes) {
    sink = std::malloc(size);
    std::free(sink);
  }
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t r = 0; r < rounds; ++r) {
    for (std::size_t size : sizes) {
      sink = std::malloc(size);
      std::free(sink);
    }
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  const double ns = std::chrono::duration<double, std::nano>(elapsed).count();
  return ns / static_cast<double>(rounds * sizes.size());
}

}  // namespace vmm
