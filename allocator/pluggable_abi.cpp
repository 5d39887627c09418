// The C ABI that torch.cuda.memory.CUDAPluggableAllocator loads from this shared object:
// alloc/free plus the hooks torch lets a pluggable allocator set (init, empty_cache,
// memory fraction, record_stream, base allocation). torch-free: torch only ever sees
// these symbols.
//
// Note [Errors across the ABI]
// vmm_malloc never returns null (a null pointer handed to kernels corrupts the CUDA
// context: FACTS.md). It throws instead: out of memory goes through the registry's OOM
// handler, which raises torch.OutOfMemoryError when the torch glue is loaded, else a
// vmm::OutOfMemoryError (RuntimeError in Python). torch's pluggable wrapper records
// nothing before alloc returns, so a throw leaves it consistent. vmm_free runs inside
// torch's deleters, where an exception would terminate the process: it never throws.
//
// Note [Graph capture]
// Until graph pools are supported, an allocation on a stream that is being captured is an
// error that says so. Serving it from the cache would hand the graph memory that eager
// code reuses after the graph is recorded. The legacy default stream (0) cannot be
// captured, so the common case pays nothing for the check.
#include <sys/types.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "device_registry.hpp"
#include "errors.hpp"

#define VMM_EXPORT extern "C" __attribute__((visibility("default")))

using vmm::DeviceRegistry;

VMM_EXPORT void* vmm_malloc(ssize_t size, int device, void* stream) {
  auto& alloc = DeviceRegistry::instance().device(device);
  const auto stream_id = reinterpret_cast<vmm::StreamId>(stream);
  if (stream_id != 0 && alloc.backend().is_capturing(stream_id)) {
    throw std::runtime_error(
        "vmmalloc does not support allocation during CUDA graph capture yet (torch.cuda.graph, "
        "torch.compile mode='reduce-overhead'). Run graph-captured code without vmmalloc "
        "(unset VMMALLOC / do not call enable_vmm_allocator), or capture without allocating.");
  }
  try {
    return reinterpret_cast<void*>(alloc.allocate(static_cast<std::size_t>(size), stream_id));
  } catch (const vmm::OutOfMemoryError& e) {
    if (auto handler = DeviceRegistry::instance().oom_handler()) {
      handler(e.what(), e.requested(), device);  // throws torch.OutOfMemoryError
    }
    throw;
  }
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
