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

#include "caching_allocator.hpp"
#include "config.hpp"

namespace vmm {

class DeviceRegistry {
 public:
  static constexpr int kMaxDevices = 64;
  // Makes the backend of a device; the default makes CudaBackend(device).
  using BackendFactory = std::function<std::shared_ptr<Backend>(int device)>;
  // Called with PyTorch-style message when a request cannot be served; expected to throw
  // the caller's out-of-memory exception (torch's, when torch is around). If it returns,
  // or none is set, the C ABI throws OutOfMemoryError itself.
  using OomHandler = void (*)(const char* message, std::size_t requested, int device);

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

  void set_oom_handler(OomHandler handler) { oom_handler_.store(handler); }
  OomHandler oom_handler() const { return oom_handler_.load(); }

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
  std::atomic<OomHandler> oom_handler_{nullptr};
};

}  // namespace vmm
