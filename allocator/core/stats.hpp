// Statistics under PyTorch's key names ("allocated_bytes.all.current", ...) so that
// torch.cuda.memory_stats / memory_summary read vmmalloc's figures unchanged, plus
// vmmalloc's own under the "vmm." prefix.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vmm {

struct Stat {
  std::int64_t current = 0;
  std::int64_t peak = 0;
  std::int64_t allocated = 0;  // cumulative increases
  std::int64_t freed = 0;      // cumulative decreases

  void increase(std::int64_t amount) {
    current += amount;
    allocated += amount;
    if (current > peak) peak = current;
  }
  void decrease(std::int64_t amount) {
    current -= amount;
    freed += amount;
  }
  void reset_peak() { peak = current; }
  void reset_accumulated() { allocated = freed = 0; }
};

// PyTorch splits each stat by pool: all, small_pool, large_pool.
enum class Pool { kSmall = 0, kLarge = 1 };

struct PoolStat {
  Stat all, small, large;
  void increase(Pool pool, std::int64_t amount) {
    all.increase(amount);
    (pool == Pool::kSmall ? small : large).increase(amount);
  }
  void decrease(Pool pool, std::int64_t amount) {
    all.decrease(amount);
    (pool == Pool::kSmall ? small : large).decrease(amount);
  }
  void reset_peak() {
    all.reset_peak();
    small.reset_peak();
    large.reset_peak();
  }
  void reset_accumulated() {
    all.reset_accumulated();
    small.reset_accumulated();
    large.reset_accumulated();
  }
};

using StatList = std::vector<std::pair<std::string, std::int64_t>>;

// Appends "<name>.{all,small_pool,large_pool}.{current,peak,allocated,freed}".
void append_pool_stat(StatList& out, const std::string& name, const PoolStat& stat);
// Appends "<name>.{current,peak,allocated,freed}".
void append_stat(StatList& out, const std::string& name, const Stat& stat);

}  // namespace vmm
