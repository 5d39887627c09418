#include "core/stats.hpp"

namespace vmm {

void append_stat(StatList& out, const std::string& name, const Stat& stat) {
  out.emplace_back(name + ".current", stat.current);
  out.emplace_back(name + ".peak", stat.peak);
  out.emplace_back(name + ".allocated", stat.allocated);
  out.emplace_back(name + ".freed", stat.freed);
}

void append_pool_stat(StatList& out, const std::string& name, const PoolStat& stat) {
  append_stat(out, name + ".all", stat.all);
  append_stat(out, name + ".small_pool", stat.small);
  append_stat(out, name + ".large_pool", stat.large);
}

}  // namespace vmm
