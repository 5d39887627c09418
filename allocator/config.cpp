#include "config.hpp"

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

[[noreturn]] void bad_value(const std::string& key, const std::string& value,
                            const std::string& allowed) {
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

const char* config_keys() {
  return "memory_cap, memory_fraction, stitching, max_cached_mappings, max_mapped_bytes, "
         "reuse_ratio, growth_slack, max_ready_scan, cross_stream_reuse, repair_blocked, "
         "large_handle_size, host_timing, history";
}

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
  if (unit.empty() || unit == "b") scale = 1;
  else if (unit == "kb") scale = 1e3;
  else if (unit == "mb") scale = 1e6;
  else if (unit == "gb") scale = 1e9;
  else if (unit == "tb") scale = 1e12;
  else if (unit == "kib" || unit == "k") scale = 1024.0;
  else if (unit == "mib" || unit == "m") scale = 1024.0 * 1024;
  else if (unit == "gib" || unit == "g") scale = 1024.0 * 1024 * 1024;
  else if (unit == "tib" || unit == "t") scale = 1024.0 * 1024 * 1024 * 1024;
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
    if (key == "memory_cap") {
      config.memory_cap = parse_bytes(value, "VMMALLOC_CONF key '" + key + "'");
    } else if (key == "memory_fraction") {
      config.memory_fraction = parse_double(key, value, "a number in (0, 1]");
      if (!(config.memory_fraction > 0 && config.memory_fraction <= 1)) {
        bad_value(key, value, "a number in (0, 1]");
      }
    } else if (key == "host_timing") {
      config.host_timing = parse_bool(key, value);
    } else if (key == "repair_blocked") {
      config.repair_blocked = parse_bool(key, value);
    } else if (key == "stitching") {
      config.stitching = parse_bool(key, value);
    } else if (key == "max_cached_mappings") {
      const double n = parse_double(key, value, "a whole number >= 1");
      if (n < 1 || n != std::floor(n) || n > 1e9) bad_value(key, value, "a whole number >= 1");
      config.max_cached_mappings = static_cast<std::size_t>(n);
    } else if (key == "max_mapped_bytes") {
      config.max_mapped_bytes = parse_bytes(value, "VMMALLOC_CONF key '" + key + "'");
    } else if (key == "reuse_ratio") {
      config.reuse_ratio = parse_double(key, value, "a number >= 1");
      if (config.reuse_ratio < 1) bad_value(key, value, "a number >= 1");
    } else if (key == "max_ready_scan") {
      const double n = parse_double(key, value, "a whole number >= 1");
      if (n < 1 || n != std::floor(n) || n > 1e9) bad_value(key, value, "a whole number >= 1");
      config.max_ready_scan = static_cast<std::size_t>(n);
    } else if (key == "history") {
      const double n = parse_double(key, value, "a whole number >= 0 (events kept)");
      if (n < 0 || n != std::floor(n) || n > 1e9) bad_value(key, value, "a whole number >= 0 (events kept)");
      config.history = static_cast<std::size_t>(n);
    } else if (key == "cross_stream_reuse") {
      const std::string v = lower(value);
      if (v == "last_resort") config.cross_stream_reuse = CrossStreamReuse::kLastResort;
      else if (v == "always") config.cross_stream_reuse = CrossStreamReuse::kAlways;
      else bad_value(key, value, "last_resort or always");
    } else if (key == "large_handle_size") {
      const char* allowed = "0 (off) or a multiple of 2 MiB up to 1 GiB, such as 16MiB";
      config.large_handle_size = parse_bytes(value, "VMMALLOC_CONF key '" + key + "'");
      if (config.large_handle_size % (std::size_t{2} << 20) != 0 ||
          config.large_handle_size > (std::size_t{1} << 30)) {
        bad_value(key, value, allowed);
      }
    } else if (key == "growth_slack") {
      config.growth_slack = parse_double(key, value, "a number in [0, 1]");
      if (config.growth_slack < 0 || config.growth_slack > 1) bad_value(key, value, "a number in [0, 1]");
    } else {
      throw std::invalid_argument("VMMALLOC_CONF: unknown key '" + key +
                                  "'; allowed keys: " + config_keys());
    }
  }
  if (config.memory_cap != 0 && config.memory_fraction != 0) {
    throw std::invalid_argument(
        "VMMALLOC_CONF: give memory_cap or memory_fraction, not both");
  }
  return config;
}

}  // namespace vmm
