// One CachingAllocator per device for the process, created on first use with the
// configuration given before (VMMALLOC_CONF syntax). The C ABI that PyTorch's
// CUDAPluggableAllocator calls and the Python module both reach the allocators here, so
// statistics, empty_cache and the cap always refer to the memory torch is using.
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "core/caching_allocator.hpp"
#include "core/config.hpp"

namespace vmm {

class DeviceRegistry {
 public:
  static constexpr int kMaxDevices = 64;
  // Makes the backend of a device; the default makes CudaBackend(device).
  using BackendFactory = std::function<std::shared_ptr<Backend>(int device)>;

  static DeviceRegistry& instance();

  // Options for allocators created from now on; throws std::invalid_argument on a bad
  // string, and std::logic_error once an allocator exists with other options.
  void configure(const std::string& conf);
  const std::string& conf_text() const { return conf_text_; }
  void set_backend_factory(BackendFactory factory);

  // The allocator of `device`, created on first use (thread-safe; lock-free once created).
  CachingAllocator& device(int device) {
    if (device >= 0 && device < kMaxDevices) {
      if (CachingAllocator* a = devices_[device].load(std::memory_order_acquire)) return *a;
    }
    return create(device);
  }
  // Null when `device` has no allocator yet.
  CachingAllocator* existing(int device) const;
  // Calls f(device, allocator) for every allocator created so far.
  void for_each(const std::function<void(int, CachingAllocator&)>& f) const;
  // Frees `ptr` in whichever device's allocator holds it; false when none does.
  bool deallocate_any(std::uintptr_t ptr) const;

  // Drops every allocator and restores the cuda backend factory (tests of the registry
  // itself; nothing may be allocated, no virtual range may be alive).
  void reset_for_tests();

 private:
  DeviceRegistry();
  CachingAllocator& create(int device);

  mutable std::mutex mutex_;
  Config config_;
  std::string conf_text_;
  BackendFactory factory_;
  std::atomic<CachingAllocator*> devices_[kMaxDevices];
  std::unique_ptr<CachingAllocator> owned_[kMaxDevices];
};

}  // namespace vmm
