// Allocator options, parsed from "key:value,key:value" (the VMMALLOC_CONF syntax, which
// mirrors PYTORCH_CUDA_ALLOC_CONF). Every key is validated: an unknown key or a bad value
// throws std::invalid_argument naming the key and what is allowed. Never a silent default.
#pragma once

#include <cstddef>
#include <string>
#include <variant>
#include <vector>

namespace vmm {

// When a request may reuse memory last used on another stream, behind a GPU-side wait
// (Note [Streams before stitches] in stream_affinity.hpp).
enum class CrossStreamReuse { kLastResort, kAlways };

struct Config {
  // Cap on physical bytes held (chunks). 0 with memory_fraction 0: no cap beyond the device.
  std::size_t memory_cap = 0;
  // Cap as a fraction of the device's total memory, in (0, 1]; 0 means unset.
  double memory_fraction = 0.0;
  // Serve large requests by stitching free chunks into new virtual ranges. Off: behave
  // like a non-stitching caching allocator (for comparisons).
  bool stitching = true;
  // Bounds on cached mappings (stitched and primary); past either, idle ones are unmapped,
  // least recently used first.
  std::size_t max_cached_mappings = 4096;
  // Virtual bytes all mappings may hold; 0 means 4x the device's total memory.
  std::size_t max_mapped_bytes = 0;
  // A cached idle mapping of m chunks serves a request of n chunks when n <= m <= n * ratio.
  double reuse_ratio = 2.0;
  // Physical memory may exceed allocated memory by this fraction through growth before a
  // stitch breaks up cached mappings (Note [Growth slack]).
  double growth_slack = 0.04;
  // Idle mappings a lookup may pass over (their chunks busy elsewhere) before stitching.
  // Measured (bench/NOTES.md): 16 left fitting mappings unfound and cost 1700 stitches in
  // one training step; a miss stitches at >= 23 us per chunk, so a deep scan is cheap.
  std::size_t max_ready_scan = 4096;
  // Memory last used on another stream (reused behind a wait): only once this stream's own
  // memory and growth within the slack did not serve (last_resort), or like any other
  // memory (always, the plain policy, for comparisons).
  CrossStreamReuse cross_stream_reuse = CrossStreamReuse::kLastResort;
  // A miss repairs a fitting idle mapping that a few busy chunks block, remapping only
  // those slots, instead of stitching a new one (Note [Repairing blocked mappings]).
  bool repair_blocked = true;
  // Requests of at least this many bytes are mapped from physical handles of this size,
  // their tails from 2 MiB chunks (Note [Large handles]); 0 or 2 MiB: 2 MiB chunks only.
  std::size_t large_handle_size = std::size_t{16} << 20;
  // The same for the pools torch makes (MemPools, CUDA graphs' pools); 0 by default: they
  // keep their memory for life, where large handles strand free memory (Note [Torch's
  // pools map single chunks] in private_pool.hpp).
  std::size_t pool_large_handle_size = 0;
  // Time allocate and deallocate into vmm.host_time_ns (Note [Host time]); off by default
  // since the clock reads cost as much as the cached path itself.
  bool host_timing = false;
  // Events the allocator keeps in its log from creation on (Note [Event log cost]); 0: off.
  std::size_t history = 0;
  // Where the kernel's Yama policy lets a process take only its descendants' descriptors
  // (ptrace_scope 1, Ubuntu's default), a process that shares memory lets every process of
  // its user take them, as a receiver must (Note [Shared handles]): with torch.multiprocessing
  // the receiver is usually the sender's child. Off: only the sender's ancestors can open
  // what it shares.
  bool share_with_any_process = true;
};

// Parses a configuration string; later issues add keys here, each with its own check.
Config parse_config(const std::string& text);

// The one rule for byte counts, in VMMALLOC_CONF and in every option and environment
// variable of the Python layers (vmmalloc.sizes.parse_bytes calls this): a number, decimals
// and an exponent allowed, then an optional unit; k/m/g/t and KiB..TiB are powers of 1024,
// KB..TB powers of 1000, case ignored.
inline constexpr const char* kByteCountRule =
    "write e.g. 1073741824, 512MiB, 8GiB, 1.5GB or 1e9 (k, m, g, t and KiB to TiB are powers "
    "of 1024; KB to TB powers of 1000)";
// Parses a byte count by that rule; throws std::invalid_argument naming `what` (when not
// empty) and the value otherwise.
std::size_t parse_bytes(const std::string& value, const std::string& what);

// One entry per VMMALLOC_CONF key, in the order the docs list them: the one place a key is
// spelled. Parsing, the error messages, the dict the bindings return and the Python
// layer's option list (enable_vmm_allocator's keywords and docstring) all come from it.
using ConfigValue = std::variant<std::size_t, double, bool, std::string>;
struct ConfigKey {
  const char* name;
  const char* allowed;  // what a value may be, in words
  // Sets the key from its text; throws std::invalid_argument naming the key and `allowed`.
  void (*set)(Config& config, const std::string& key, const std::string& value);
  ConfigValue (*get)(const Config& config);
};
const std::vector<ConfigKey>& config_key_table();

// The accepted keys, comma separated (for error messages and docs).
std::string config_keys();

}  // namespace vmm
