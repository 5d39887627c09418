// vmm_adapter_api_table: the C interface the torch adapter calls (allocator/torch_adapter/
// adapter_abi.h), over the per-device allocators of the registry. Thin: no policy here,
// and no exception crosses it (Note [Errors across the ABI] in pluggable_abi.cpp).
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "abi/device_registry.hpp"
#include "abi/shared_mapping.hpp"
#include "core/errors.hpp"
#include "torch_adapter/adapter_abi.h"

#define VMM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using vmm::CachingAllocator;
using vmm::DeviceRegistry;

thread_local std::string last_error_text;

vmm::PoolId to_pool(vmm_pool_id id) { return {id.first, id.second}; }

// Runs `f`; a thrown error becomes a status and this thread's last error.
template <typename F>
int guarded(F&& f) noexcept {
  try {
    f();
    return VMM_OK;
  } catch (const vmm::OutOfMemoryError& e) {
    last_error_text = e.what();
    return VMM_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error_text = e.what();
    return VMM_FAILED;
  } catch (...) {
    last_error_text = "vmmalloc: unknown error";
    return VMM_FAILED;
  }
}

CachingAllocator& on(int device) { return DeviceRegistry::instance().device(device); }

const char* last_error() { return last_error_text.c_str(); }

int allocate(size_t size, int device, void* stream, void** out) {
  return guarded([&] {
    *out = reinterpret_cast<void*>(on(device).allocate(size, reinterpret_cast<vmm::StreamId>(stream)));
  });
}

void deallocate(void* ptr) {
  const int status = guarded([&] {
    if (!DeviceRegistry::instance().deallocate_any(reinterpret_cast<std::uintptr_t>(ptr))) {
      throw std::invalid_argument(
          "vmmalloc holds no allocation there (double free, or memory "
          "of another allocator)");
    }
  });
  if (status != VMM_OK) std::fprintf(stderr, "vmmalloc: free of %p failed: %s\n", ptr, last_error());
}

int deallocate_checked(void* ptr) {
  return guarded([&] {
    if (!DeviceRegistry::instance().deallocate_any(reinterpret_cast<std::uintptr_t>(ptr))) {
      throw std::invalid_argument(
          "vmmalloc: free of a pointer vmmalloc does not hold (double free, or "
          "memory of another allocator)");
    }
  });
}

// The allocator of a device already in use, or null: queries must not create one.
CachingAllocator* in_use(int device) { return DeviceRegistry::instance().existing(device); }

CachingAllocator* owner(std::uintptr_t ptr) {
  CachingAllocator* found = nullptr;
  DeviceRegistry::instance().for_each([&](int, CachingAllocator& a) {
    if (found == nullptr && a.owns(ptr)) found = &a;
  });
  if (found == nullptr)
    throw std::invalid_argument("vmmalloc: the pointer is not a live allocation of vmmalloc");
  return found;
}

int record_stream(void* ptr, void* stream) {
  return guarded([&] {
    const auto address = reinterpret_cast<std::uintptr_t>(ptr);
    owner(address)->record_stream(address, reinterpret_cast<vmm::StreamId>(stream));
  });
}

int allocation_size(void* ptr, size_t* out) {
  return guarded([&] {
    const auto address = reinterpret_cast<std::uintptr_t>(ptr);
    *out = owner(address)->allocation_size(address);
  });
}

int empty_cache() {
  return guarded(
      [] { DeviceRegistry::instance().for_each([](int, CachingAllocator& a) { a.empty_cache(); }); });
}

int set_memory_fraction(int device, double fraction) {
  return guarded([&] { on(device).set_memory_fraction(fraction); });
}

int memory_fraction(int device, double* out) {
  return guarded([&] {
    CachingAllocator* a = in_use(device);
    *out = a != nullptr ? a->memory_fraction() : 1.0;
  });
}

int largest_free_block(int device, size_t* out) {
  // Every free chunk can be stitched into one block: that is the largest block a request
  // is served without new memory.
  return guarded([&] {
    *out = 0;
    CachingAllocator* a = in_use(device);
    if (a == nullptr) return;
    for (const auto& [key, value] : a->stats()) {
      if (key == "vmm.free_chunks") *out = static_cast<size_t>(value) * vmm::kChunkSize;
    }
  });
}

int device_memory(int device, size_t* total, size_t* free_bytes) {
  return guarded([&] {
    CachingAllocator& a = on(device);
    *total = a.backend().total_memory();
    *free_bytes = a.backend().free_memory();
  });
}

int stats(int device, vmm_stat_visitor visit, void* context) {
  return guarded([&] {
    if (CachingAllocator* a = in_use(device)) {
      for (const auto& [key, value] : a->stats()) visit(context, key.c_str(), value);
    }
  });
}

int reset_peak_stats(int device) {
  return guarded([&] {
    if (CachingAllocator* a = in_use(device)) a->reset_peak_stats();
  });
}

int reset_accumulated_stats(int device) {
  return guarded([&] {
    if (CachingAllocator* a = in_use(device)) a->reset_accumulated_stats();
  });
}

int create_or_incref_pool(int device, vmm_pool_id pool) {
  return guarded([&] { on(device).create_or_incref_pool(to_pool(pool)); });
}

int begin_allocate_to_pool(int device, vmm_pool_id pool, vmm_stream_filter filter, void* context,
                           vmm_release_context release) {
  std::shared_ptr<void> owned(context, release);  // released with the route, or now
  return guarded([&] {
    on(device).begin_allocate_to_pool(to_pool(pool), [filter, owned](vmm::StreamId stream) {
      return filter(owned.get(), reinterpret_cast<void*>(stream)) != 0;
    });
  });
}

int end_allocate_to_pool(int device, vmm_pool_id pool) {
  return guarded([&] { on(device).end_allocate_to_pool(to_pool(pool)); });
}

int release_pool(int device, vmm_pool_id pool) {
  return guarded([&] { on(device).release_pool(to_pool(pool)); });
}

int pool_use_count(int device, vmm_pool_id pool, int* out) {
  return guarded([&] { *out = on(device).pool_use_count(to_pool(pool)); });
}

int pool_allocations(int device, vmm_pool_id pool, vmm_block_visitor visit, void* context) {
  return guarded([&] {
    for (const vmm::LiveBlock& b : on(device).pool_allocations(to_pool(pool))) {
      const vmm_block block{b.ptr, b.size, b.requested, b.stream};
      visit(context, &block);
    }
  });
}

int restore_pool(int device, vmm_pool_id pool, const vmm_block* blocks, size_t count,
                 vmm_pointer_visitor freed, void* context) {
  return guarded([&] {
    std::vector<vmm::LiveBlock> wanted;
    wanted.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      wanted.push_back({blocks[i].ptr, blocks[i].size, blocks[i].requested, blocks[i].stream});
    }
    for (std::uintptr_t ptr : on(device).restore_pool(to_pool(pool), wanted)) freed(context, ptr);
  });
}

int device_in_use(int device) { return in_use(device) != nullptr ? 1 : 0; }

int record_events(int device, size_t capacity) {
  return guarded([&] {
    if (capacity > 0)
      on(device).record_events(capacity);
    else if (CachingAllocator* a = in_use(device))
      a->record_events(0);
  });
}

static_assert(static_cast<int>(vmm::EventKind::kOom) == VMM_EVENT_OOM &&
                  static_cast<int>(vmm::EventKind::kStitch) == VMM_EVENT_STITCH &&
                  vmm::kEventKinds == VMM_EVENT_OOM + 1,
              "vmm_event_kind mirrors vmm::EventKind");

int events(int device, vmm_event_visitor visit, void* context) {
  return guarded([&] {
    CachingAllocator* a = in_use(device);
    if (a == nullptr) return;
    for (const vmm::MemoryEvent& e : a->events()) {
      const vmm_event event{static_cast<uint32_t>(e.kind),   e.time_ns, e.addr, e.size, e.aux,
                            static_cast<uintptr_t>(e.stream)};
      visit(context, &event);
    }
  });
}

int segments(int device, vmm_segment_visitor visit, void* context) {
  using Kind = vmm::SnapshotSegment::Kind;
  using State = vmm::SnapshotBlock::State;
  return guarded([&] {
    CachingAllocator* a = in_use(device);
    if (a == nullptr) return;
    std::vector<vmm_snapshot_block> blocks;
    for (const vmm::SnapshotSegment& s : a->segments()) {
      blocks.clear();
      for (const vmm::SnapshotBlock& b : s.blocks) {
        blocks.push_back({b.addr, b.size, b.requested,
                          static_cast<uint32_t>(b.state == State::kActive        ? VMM_BLOCK_ACTIVE
                                                : b.state == State::kPendingFree ? VMM_BLOCK_PENDING_FREE
                                                                                 : VMM_BLOCK_INACTIVE)});
      }
      const uint32_t kind = s.kind == Kind::kLarge   ? VMM_SEGMENT_LARGE
                            : s.kind == Kind::kSmall ? VMM_SEGMENT_SMALL
                            : s.kind == Kind::kPages ? VMM_SEGMENT_PAGES
                                                     : VMM_SEGMENT_FREE;
      const vmm_segment segment{
          s.base,        s.bytes,      static_cast<uintptr_t>(s.stream), kind, {s.pool.first, s.pool.second},
          blocks.data(), blocks.size()};
      visit(context, &segment);
    }
  });
}

int memory_totals(int device, int64_t* allocated, int64_t* reserved) {
  return guarded([&] {
    *allocated = *reserved = 0;
    if (CachingAllocator* a = in_use(device)) std::tie(*allocated, *reserved) = a->memory_totals();
  });
}

int allocation_info(void* ptr, size_t* size, int* device) {
  return guarded([&] {
    const auto address = reinterpret_cast<std::uintptr_t>(ptr);
    bool found = false;
    DeviceRegistry::instance().for_each([&](int index, CachingAllocator& a) {
      if (!found && a.owns(address)) {
        *size = a.allocation_size(address);
        *device = index;
        found = true;
      }
    });
    if (!found) throw std::invalid_argument("vmmalloc: the pointer is not a live allocation of vmmalloc");
  });
}

int share(void* ptr, char* buffer, size_t capacity, size_t* length, size_t* offset) {
  return guarded([&] {
    const auto address = reinterpret_cast<std::uintptr_t>(ptr);
    const std::string handle = vmm::share_handle(*owner(address), address, offset);
    *length = handle.size();
    if (handle.size() > capacity) {
      throw std::length_error("vmmalloc: share: the handle needs " + std::to_string(handle.size()) +
                              " bytes, the buffer has " + std::to_string(capacity));
    }
    std::memcpy(buffer, handle.data(), handle.size());
  });
}

int is_shared_handle(const char* handle, size_t length) {
  return vmm::is_vmmalloc_handle(handle, length) ? 1 : 0;  // allocates nothing: no throw crosses
}

int open_shared(const char* handle, size_t length, int device, void** base, void** token) {
  return guarded([&] {
    const vmm::SharedDescription description = vmm::decode_shared(std::string(handle, length));
    auto mapping = std::make_unique<vmm::SharedMapping>(on(device).shared_backend(), description);
    *base = reinterpret_cast<void*>(mapping->base());
    *token = mapping.release();
  });
}

void close_shared(void* token) { delete static_cast<vmm::SharedMapping*>(token); }

const vmm_adapter_api kTable = {
    VMM_ADAPTER_ABI_VERSION,
    sizeof(vmm_adapter_api),
    last_error,
    allocate,
    deallocate,
    deallocate_checked,
    record_stream,
    allocation_size,
    empty_cache,
    set_memory_fraction,
    memory_fraction,
    largest_free_block,
    device_memory,
    stats,
    reset_peak_stats,
    reset_accumulated_stats,
    create_or_incref_pool,
    begin_allocate_to_pool,
    end_allocate_to_pool,
    release_pool,
    pool_use_count,
    pool_allocations,
    restore_pool,
    device_in_use,
    record_events,
    events,
    segments,
    memory_totals,
    allocation_info,
    share,
    is_shared_handle,
    open_shared,
    close_shared,
};

}  // namespace

VMM_EXPORT const vmm_adapter_api* vmm_adapter_api_table(void) { return &kTable; }
