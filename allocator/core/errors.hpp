#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include "core/stats.hpp"

namespace vmm {

// The allocator could not serve a request after releasing its caches and retrying.
// Carries the statistics at the moment of failure, for the message and for callers.
class OutOfMemoryError : public std::runtime_error {
 public:
  OutOfMemoryError(const std::string& message, std::size_t requested, StatList stats)
      : std::runtime_error(message), requested_(requested), stats_(std::move(stats)) {}
  std::size_t requested() const { return requested_; }
  const StatList& stats() const { return stats_; }

 private:
  std::size_t requested_;
  StatList stats_;
};

// Internal: creating a chunk would pass the allocator's memory cap.
class CapExceeded : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace vmm
