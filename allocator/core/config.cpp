#include "core/config.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>
#include <stdexcept>

namespace vmm {
namespace {

std::string trim(const std::string& s) {
  std::size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

[[noreturn]] void bad_value(const std::string& key, const std::string& value, const std::string& allowed) {
  throw std::invalid_argument("VMMALLOC_CONF: bad value '" + value + "' for key '" + key +
                              "'; allowed: " + allowed);
}

double parse_double(const std::string& key, const std::string& value, const std::string& allowed) {
  std::size_t used = 0;
  double out = 0;
  try {
    out = std::stod(value, &used);
  } catch (const std::exception&) {
    bad_value(key, value, allowed);
  }
  if (used != value.size() || !std::isfinite(out)) bad_value(key, value, allowed);
  return out;
}

bool parse_bool(const std::string& key, const std::string& value) {
  const std::string v = lower(value);
  if (v == "true" || v == "1" || v == "on" || v == "yes") return true;
  if (v == "false" || v == "0" || v == "off" || v == "no") return false;
  bad_value(key, value, "true or false");
}

}  // namespace

std::size_t parse_bytes(const std::string& raw, const std::string& what) {
  const std::string value = trim(raw);
  const auto fail = [&]() {
    throw std::invalid_argument((what.empty() ? std::string() : what + ": ") + "cannot read '" + raw +
                                "' as a number of bytes; " + kByteCountRule);
  };
  std::size_t split = 0;
  while (split < value.size() &&
         (std::isdigit(static_cast<unsigned char>(value[split])) || value[split] == '.')) {
    ++split;
  }
  if (split > 0 && split < value.size() && (value[split] == 'e' || value[split] == 'E')) {
    std::size_t digits = split + 1;
    if (digits < value.size() && value[digits] == '+') ++digits;
    std::size_t end = digits;
    while (end < value.size() && std::isdigit(static_cast<unsigned char>(value[end]))) ++end;
    if (end > digits) split = end;  // an exponent: 1e9, 2.5E+10
  }
  const std::string number = value.substr(0, split);
  const std::string unit = lower(trim(value.substr(split)));
  double scale = 0;
  if (unit.empty() || unit == "b")
    scale = 1;
  else if (unit == "kb")
    scale = 1e3;
  else if (unit == "mb")
    scale = 1e6;
  else if (unit == "gb")
    scale = 1e9;
  else if (unit == "tb")
    scale = 1e12;
  else if (unit == "kib" || unit == "k")
    scale = 1024.0;
  else if (unit == "mib" || unit == "m")
    scale = 1024.0 * 1024;
  else if (unit == "gib" || unit == "g")
    scale = 1024.0 * 1024 * 1024;
  else if (unit == "tib" || unit == "t")
    scale = 1024.0 * 1024 * 1024 * 1024;
  if (number.empty() || scale == 0) fail();
  std::size_t used = 0;
  double parsed = 0;
  try {
    parsed = std::stod(number, &used);
  } catch (const std::exception&) {
    fail();
  }
  const double bytes = parsed * scale;
  if (used != number.size() || !std::isfinite(bytes) || bytes < 0 || bytes > 1.8e19) fail();
  return static_cast<std::size_t>(bytes);
}

namespace {

std::size_t whole_number(const std::string& key, const std::string& value, double low, const char* allowed) {
  const double n = parse_double(key, value, allowed);
  if (n < low || n != std::floor(n) || n > 1e9) bad_value(key, value, allowed);
  return static_cast<std::size_t>(n);
}

std::size_t bytes_of(const std::string& key, const std::string& value) {
  return parse_bytes(value, "VMMALLOC_CONF key '" + key + "'");
}

constexpr const char* kHandleSizeRule = "0 (off) or a multiple of 2 MiB up to 1 GiB, such as 16MiB";

std::size_t handle_size(const std::string& key, const std::string& value) {
  const std::size_t bytes = bytes_of(key, value);
  if (bytes % (std::size_t{2} << 20) != 0 || bytes > (std::size_t{1} << 30))
    bad_value(key, value, kHandleSizeRule);
  return bytes;
}

}  // namespace

const std::vector<ConfigKey>& config_key_table() {
  static const std::vector<ConfigKey> table = {
      {"memory_cap", "a byte count such as 40GiB (0: the device's memory)",
       [](Config& c, const std::string& k, const std::string& v) { c.memory_cap = bytes_of(k, v); },
       [](const Config& c) -> ConfigValue { return c.memory_cap; }},
      {"memory_fraction", "a number in (0, 1]",
       [](Config& c, const std::string& k, const std::string& v) {
         c.memory_fraction = parse_double(k, v, "a number in (0, 1]");
         if (!(c.memory_fraction > 0 && c.memory_fraction <= 1)) bad_value(k, v, "a number in (0, 1]");
       },
       [](const Config& c) -> ConfigValue { return c.memory_fraction; }},
      {"stitching", "true or false",
       [](Config& c, const std::string& k, const std::string& v) { c.stitching = parse_bool(k, v); },
       [](const Config& c) -> ConfigValue { return c.stitching; }},
      {"max_cached_mappings", "a whole number >= 1",
       [](Config& c, const std::string& k, const std::string& v) {
         c.max_cached_mappings = whole_number(k, v, 1, "a whole number >= 1");
       },
       [](const Config& c) -> ConfigValue { return c.max_cached_mappings; }},
      {"max_mapped_bytes", "a byte count (0: 4x the device's memory)",
       [](Config& c, const std::string& k, const std::string& v) { c.max_mapped_bytes = bytes_of(k, v); },
       [](const Config& c) -> ConfigValue { return c.max_mapped_bytes; }},
      {"reuse_ratio", "a number >= 1",
       [](Config& c, const std::string& k, const std::string& v) {
         c.reuse_ratio = parse_double(k, v, "a number >= 1");
         if (c.reuse_ratio < 1) bad_value(k, v, "a number >= 1");
       },
       [](const Config& c) -> ConfigValue { return c.reuse_ratio; }},
      {"growth_slack", "a number in [0, 1]",
       [](Config& c, const std::string& k, const std::string& v) {
         c.growth_slack = parse_double(k, v, "a number in [0, 1]");
         if (c.growth_slack < 0 || c.growth_slack > 1) bad_value(k, v, "a number in [0, 1]");
       },
       [](const Config& c) -> ConfigValue { return c.growth_slack; }},
      {"max_ready_scan", "a whole number >= 1",
       [](Config& c, const std::string& k, const std::string& v) {
         c.max_ready_scan = whole_number(k, v, 1, "a whole number >= 1");
       },
       [](const Config& c) -> ConfigValue { return c.max_ready_scan; }},
      {"cross_stream_reuse", "last_resort or always",
       [](Config& c, const std::string& k, const std::string& v) {
         const std::string l = lower(v);
         if (l == "last_resort")
           c.cross_stream_reuse = CrossStreamReuse::kLastResort;
         else if (l == "always")
           c.cross_stream_reuse = CrossStreamReuse::kAlways;
         else
           bad_value(k, v, "last_resort or always");
       },
       [](const Config& c) -> ConfigValue {
         return std::string(c.cross_stream_reuse == CrossStreamReuse::kLastResort ? "last_resort" : "always");
       }},
      {"repair_blocked", "true or false",
       [](Config& c, const std::string& k, const std::string& v) { c.repair_blocked = parse_bool(k, v); },
       [](const Config& c) -> ConfigValue { return c.repair_blocked; }},
      {"large_handle_size", kHandleSizeRule,
       [](Config& c, const std::string& k, const std::string& v) { c.large_handle_size = handle_size(k, v); },
       [](const Config& c) -> ConfigValue { return c.large_handle_size; }},
      {"pool_large_handle_size", kHandleSizeRule,
       [](Config& c, const std::string& k, const std::string& v) {
         c.pool_large_handle_size = handle_size(k, v);
       },
       [](const Config& c) -> ConfigValue { return c.pool_large_handle_size; }},
      {"host_timing", "true or false",
       [](Config& c, const std::string& k, const std::string& v) { c.host_timing = parse_bool(k, v); },
       [](const Config& c) -> ConfigValue { return c.host_timing; }},
      {"history", "a whole number >= 0 (events kept)",
       [](Config& c, const std::string& k, const std::string& v) {
         c.history = whole_number(k, v, 0, "a whole number >= 0 (events kept)");
       },
       [](const Config& c) -> ConfigValue { return c.history; }},
      {"share_with_any_process", "true or false",
       [](Config& c, const std::string& k, const std::string& v) {
         c.share_with_any_process = parse_bool(k, v);
       },
       [](const Config& c) -> ConfigValue { return c.share_with_any_process; }},
  };
  return table;
}

std::string config_keys() {
  std::string out;
  for (const ConfigKey& key : config_key_table()) {
    if (!out.empty()) out += ", ";
    out += key.name;
  }
  return out;
}

Config parse_config(const std::string& text) {
  Config config;
  std::set<std::string> seen;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    const std::string item = trim(text.substr(start, end - start));
    start = end + 1;
    if (item.empty()) continue;
    const std::size_t colon = item.find(':');
    if (colon == std::string::npos) {
      throw std::invalid_argument("VMMALLOC_CONF: '" + item +
                                  "' is not key:value; allowed keys: " + config_keys());
    }
    const std::string key = trim(item.substr(0, colon));
    const std::string value = trim(item.substr(colon + 1));
    if (!seen.insert(key).second) {
      throw std::invalid_argument("VMMALLOC_CONF: key '" + key + "' is given twice");
    }
    const auto& table = config_key_table();
    const auto found =
        std::find_if(table.begin(), table.end(), [&](const ConfigKey& k) { return key == k.name; });
    if (found == table.end()) {
      throw std::invalid_argument("VMMALLOC_CONF: unknown key '" + key + "'; allowed keys: " + config_keys());
    }
    found->set(config, key, value);
  }
  if (config.memory_cap != 0 && config.memory_fraction != 0) {
    throw std::invalid_argument("VMMALLOC_CONF: give memory_cap or memory_fraction, not both");
  }
  return config;
}

}  // namespace vmm
