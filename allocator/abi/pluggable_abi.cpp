// The C ABI that torch.cuda.memory.CUDAPluggableAllocator loads from this shared object,
// when the torch adapter (torch_adapter/, Note [Adapter over the pluggable allocator])
// cannot be built: alloc/free plus the hooks torch lets a pluggable allocator set (init,
// empty_cache, memory fraction, record_stream, base allocation). torch-free: torch only
// ever sees these symbols.
//
// Note [Errors across the ABI]
// Nothing returns null for memory (a null pointer handed to kernels corrupts the CUDA
// context: a driver fact the project measured on an H200). Here vmm_malloc throws instead;
// torch's pluggable wrapper records nothing before alloc returns, so a throw leaves it
// consistent, and out of memory reaches Python as a RuntimeError with PyTorch's message.
// vmm_free runs inside torch's deleters, where an exception would terminate the process:
// it never throws. The adapter's table (adapter_abi.cpp) returns statuses instead of
// throwing, and the adapter raises torch's own exceptions.
//
// Note [Graph capture without the adapter]
// torch's pluggable wrapper ignores graph pools unless C++ hooks are set, so here an
// allocation on a stream that is being captured is an error that says so: serving it from
// the main arena would hand the graph memory that eager code reuses after the graph is
// recorded. The legacy default stream (0) cannot be captured, so the common case pays
// nothing for the check.
#include <sys/types.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "abi/device_registry.hpp"
#include "core/errors.hpp"

#define VMM_EXPORT extern "C" __attribute__((visibility("default")))

using vmm::DeviceRegistry;

VMM_EXPORT void* vmm_malloc(ssize_t size, int device, void* stream) {
  auto& alloc = DeviceRegistry::instance().device(device);
  const auto stream_id = reinterpret_cast<vmm::StreamId>(stream);
  if (stream_id != 0 && alloc.backend().is_capturing(stream_id)) {
    throw std::runtime_error(
        "vmmalloc runs without its torch adapter here (see the warning it gave at start-up), "
        "and a plain pluggable allocator cannot serve allocations during CUDA graph capture "
        "(torch.cuda.graph, torch.compile mode='reduce-overhead'). Install a C++ compiler so "
        "that vmmalloc can build the adapter (python -m vmmalloc.torch_adapter), or capture "
        "without allocating.");
  }
  return reinterpret_cast<void*>(alloc.allocate(static_cast<std::size_t>(size), stream_id));
}

VMM_EXPORT void vmm_free(void* ptr, ssize_t /*size*/, int device, void* /*stream*/) noexcept {
  try {
    DeviceRegistry::instance().device(device).deallocate(reinterpret_cast<std::uintptr_t>(ptr));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vmmalloc: free of %p on device %d failed: %s\n", ptr, device, e.what());
  }
}

VMM_EXPORT void vmm_init(int /*device_count*/) {}

VMM_EXPORT void vmm_empty_cache() {
  DeviceRegistry::instance().for_each([](int, vmm::CachingAllocator& a) { a.empty_cache(); });
}

VMM_EXPORT void vmm_set_memory_fraction(double fraction, int device) {
  DeviceRegistry::instance().device(device).set_memory_fraction(fraction);
}

VMM_EXPORT void vmm_record_stream(void* ptr, void* stream) {
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  bool found = false;
  DeviceRegistry::instance().for_each([&](int, vmm::CachingAllocator& a) {
    if (!found && a.owns(address)) {
      a.record_stream(address, reinterpret_cast<vmm::StreamId>(stream));
      found = true;
    }
  });
  if (!found) {
    throw std::invalid_argument("vmmalloc: record_stream on a pointer vmmalloc does not hold");
  }
}

VMM_EXPORT void* vmm_base_alloc(void* ptr, std::size_t* size) {
  // Every vmmalloc allocation is its own base: blocks are never handed out in pieces.
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  DeviceRegistry::instance().for_each([&](int, vmm::CachingAllocator& a) {
    if (size != nullptr && a.owns(address)) *size = a.allocation_size(address);
  });
  return ptr;
}
