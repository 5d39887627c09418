#include "abi/device_registry.hpp"

#include <stdexcept>

#include "abi/shared_mapping.hpp"
#include "backend/cuda_backend.hpp"

namespace vmm {

DeviceRegistry& DeviceRegistry::instance() {
  // Never destroyed: torch may free tensors during interpreter teardown, after static
  // destructors would have run.
  static DeviceRegistry* registry = new DeviceRegistry();
  return *registry;
}

namespace {
std::shared_ptr<Backend> make_cuda_backend(int device) { return std::make_shared<CudaBackend>(device); }
}  // namespace

DeviceRegistry::DeviceRegistry() : factory_(make_cuda_backend) {
  for (auto& d : devices_) d.store(nullptr);
}

void DeviceRegistry::configure(const std::string& conf) {
  Config parsed = parse_config(conf);
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& owned : owned_) {
    if (owned && conf != conf_text_) {
      throw std::logic_error(
          "vmmalloc: the allocator options cannot change once memory was allocated (was '" + conf_text_ +
          "', now '" + conf + "'); set them before the first CUDA allocation");
    }
  }
  config_ = parsed;
  conf_text_ = conf;
}

void DeviceRegistry::set_backend_factory(BackendFactory factory) {
  std::lock_guard<std::mutex> lock(mutex_);
  factory_ = std::move(factory);
}

CachingAllocator& DeviceRegistry::create(int device) {
  if (device < 0 || device >= kMaxDevices) {
    throw std::invalid_argument("vmmalloc: device " + std::to_string(device) + " is out of range (0 to " +
                                std::to_string(kMaxDevices - 1) + ")");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (!owned_[device]) {
    owned_[device] = std::make_unique<CachingAllocator>(factory_(device), config_);
    // Note [Peers are the devices in use]
    // A device whose memory torch touches in this process gets an allocator here (its
    // first tensor, or the destination of a copy, is allocated before any kernel there
    // runs), so the devices with an allocator are the devices that can read each other's
    // memory. Each is made a peer of every other (Note [Peer access]); a process that uses
    // one GPU, as a torchrun rank does, grants nothing beyond its own device and pays
    // nothing. Added before publication: the new allocator's first mapping names them.
    for (int other = 0; other < kMaxDevices; ++other) {
      if (other == device || !owned_[other]) continue;
      owned_[device]->add_peer(other);
      if (owned_[other]->add_peer(device)) grant_shared_mappings(owned_[other]->backend(), device);
    }
    devices_[device].store(owned_[device].get(), std::memory_order_release);
  }
  return *owned_[device];
}

CachingAllocator* DeviceRegistry::existing(int device) const {
  if (device < 0 || device >= kMaxDevices) return nullptr;
  return devices_[device].load(std::memory_order_acquire);
}

void DeviceRegistry::for_each(const std::function<void(int, CachingAllocator&)>& f) const {
  for (int d = 0; d < kMaxDevices; ++d) {
    if (CachingAllocator* a = existing(d)) f(d, *a);
  }
}

bool DeviceRegistry::deallocate_any(std::uintptr_t ptr) const {
  for (int d = 0; d < kMaxDevices; ++d) {
    if (CachingAllocator* a = existing(d)) {
      if (a->deallocate_if_owned(ptr)) return true;
    }
  }
  return false;
}

void DeviceRegistry::reset_for_tests() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (int d = 0; d < kMaxDevices; ++d) {
    devices_[d].store(nullptr);
    owned_[d].reset();
  }
  factory_ = make_cuda_backend;
}

}  // namespace vmm
