// The torch adapter's CUDA IPC: shareIpcHandle and getIpcDevPtr, what torch.multiprocessing
// (torch/csrc/StorageSharing.cpp) asks of an allocator to hand a CUDA tensor to another
// process. Included by torch_adapter.cpp only: it is torch-linked.
//
// Note [Adapter IPC]
// Sending: the handle is the core's (Note [Sharing memory between processes] in
// allocator/core/shared_memory.hpp), with the allocation's offset in what it maps. torch
// wraps the sender's storage in its CudaIPCSentData, so the block is freed only once every
// receiver has let go of it (torch.cuda.ipc_collect frees the ones waiting).
// Receiving: a handle opened before and still in use is not mapped again (as PyTorch's
// allocator caches opened handles); the mapping goes when the last tensor on it dies.
// PyTorch's default allocator's handles ('c': a cudaMalloc'ed segment, behind a version
// byte, or a bare cudaIpcMemHandle_t from older torch) are opened with cudaIpcOpenMemHandle,
// so a vmmalloc process receives from a process without vmmalloc too. Its expandable
// segments' handles ('e') change layout between torch releases and are refused by name.
#pragma once

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "adapter_abi.h"

namespace vmm_torch {

class IpcHandles {
 public:
  explicit IpcHandles(const vmm_adapter_api* const* core) : core_(core) {}

  c10::cuda::CUDACachingAllocator::ShareableHandle share(void* ptr) {
    const vmm_adapter_api* api = *core_;
    std::string handle(256, '\0');
    size_t length = 0, offset = 0;
    int status = api->share(ptr, handle.data(), handle.size(), &length, &offset);
    if (status != VMM_OK && length > handle.size()) {  // a large allocation lists many handles
      handle.resize(length);
      status = api->share(ptr, handle.data(), handle.size(), &length, &offset);
    }
    TORCH_CHECK(status == VMM_OK, api->last_error());
    handle.resize(length);
    return {static_cast<ptrdiff_t>(offset), std::move(handle)};
  }

  std::shared_ptr<void> open(const std::string& handle, c10::DeviceIndex device) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = opened_.find(handle);
    if (found != opened_.end()) {
      if (std::shared_ptr<void> live = found->second.lock()) return live;
    }
    std::shared_ptr<void> mapped = (*core_)->is_shared_handle(handle.data(), handle.size()) != 0
                                       ? open_vmmalloc(handle, device)
                                       : open_native(handle, device);
    // Opens are rare: forgetting the handles whose mappings are gone here keeps the map small.
    for (auto it = opened_.begin(); it != opened_.end();) {
      it = it->second.expired() ? opened_.erase(it) : std::next(it);
    }
    opened_[handle] = mapped;
    return mapped;
  }

 private:
  std::shared_ptr<void> open_vmmalloc(const std::string& handle, c10::DeviceIndex device) {
    const vmm_adapter_api* api = *core_;
    void* base = nullptr;
    void* token = nullptr;
    if (api->open_shared(handle.data(), handle.size(), device, &base, &token) != VMM_OK) {
      TORCH_CHECK(false, api->last_error());
    }
    return std::shared_ptr<void>(base, [api, token](void*) { api->close_shared(token); });
  }

  static std::shared_ptr<void> open_native(const std::string& handle, c10::DeviceIndex device) {
    constexpr char kCudaMalloc = 'c';
    constexpr char kExpandableSegment = 'e';
    constexpr size_t kIpcHandleBytes = sizeof(cudaIpcMemHandle_t);
    size_t at = 0;
    if (handle.size() != kIpcHandleBytes) {  // else a bare handle, from torch before versions
      TORCH_CHECK(handle.size() >= 2, "vmmalloc: an unreadable CUDA IPC handle (", handle.size(), " bytes)");
      TORCH_CHECK(handle[1] != kExpandableSegment,
                  "vmmalloc: this CUDA tensor was shared by a process whose PyTorch allocator uses "
                  "expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True). vmmalloc "
                  "opens memory shared by vmmalloc and by PyTorch's default allocator: run the "
                  "sender with VMMALLOC=1 too, or without expandable segments.");
      TORCH_CHECK(handle[1] == kCudaMalloc && handle.size() == 2 + kIpcHandleBytes,
                  "vmmalloc: a CUDA IPC handle neither vmmalloc nor PyTorch's allocator wrote");
      at = 2;
    }
    cudaIpcMemHandle_t ipc{};
    std::memcpy(&ipc, handle.data() + at, kIpcHandleBytes);
    c10::cuda::CUDAGuard guard(device);
    void* ptr = nullptr;
    C10_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, ipc, cudaIpcMemLazyEnablePeerAccess));
    return std::shared_ptr<void>(ptr, [device](void* p) {
      c10::cuda::CUDAGuard close_guard(device);
      C10_CUDA_CHECK_WARN(cudaIpcCloseMemHandle(p));  // a deleter must not throw
    });
  }

  const vmm_adapter_api* const* core_;
  std::mutex mutex_;
  std::unordered_map<std::string, std::weak_ptr<void>> opened_;
};

}  // namespace vmm_torch
