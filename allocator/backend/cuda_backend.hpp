// The CUDA backend: the Backend interface on one GPU, through the driver's virtual memory
// management API (cuMemAddressReserve, cuMemCreate, cuMemMap, cuMemSetAccess).
//
// The driver is loaded at run time (Note [No build-time CUDA dependency]); constructing a
// CudaBackend where CUDA is unavailable throws BackendError saying why.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.hpp"
#include "backend/cuda_driver.hpp"

namespace vmm {

class CudaBackend final : public Backend {
 public:
  // `device` is a CUDA device ordinal as this process sees it (after CUDA_VISIBLE_DEVICES).
  // Throws BackendError if CUDA is unavailable, the ordinal does not exist, or the
  // device's allocation granularity does not divide kChunkSize.
  // `shareable`: chunks are created exportable as POSIX file descriptors (Note [Shared
  // handles]) where the driver allows it; off, or where the driver refuses, they are not,
  // and export_handle says so.
  explicit CudaBackend(int device, bool shareable = true);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Kind kind() const override { return Kind::kCuda; }
  std::string name() const override { return "cuda"; }
  int device() const override { return device_; }
  std::size_t total_memory() const override { return total_memory_; }
  std::size_t free_memory() const override;

  std::uintptr_t reserve(std::size_t bytes) override;
  void unreserve(std::uintptr_t addr, std::size_t bytes) override;
  ChunkHandle create_chunk(std::size_t bytes) override;
  void release_chunk(ChunkHandle chunk) override;
  void map(std::uintptr_t addr, ChunkHandle chunk, std::size_t bytes) override;
  void unmap(std::uintptr_t addr, std::size_t bytes) override;
  void set_access(std::uintptr_t addr, std::size_t bytes) override;
  bool add_peer(int peer) override;
  void set_peer_access(std::uintptr_t addr, std::size_t bytes, int peer) override;
  std::vector<int> peers() const override;

  // Events are CUevents created with CU_EVENT_DISABLE_TIMING and pooled: release_event
  // returns one to the pool and record_event reuses it. Events not released before the
  // backend is destroyed are leaked.
  EventId record_event(StreamId stream) override;
  bool event_done(EventId event) override;
  void stream_wait_event(StreamId stream, EventId event) override;
  void release_event(EventId event) override;
  void wait_event(EventId event) override;
  void synchronize() override;
  bool is_capturing(StreamId stream) override;
  int relax_capture_mode() override;
  void restore_capture_mode(int mode) override;

  void copy_from_host(std::uintptr_t dst, const void* src, std::size_t bytes) override;
  void copy_to_host(void* dst, std::uintptr_t src, std::size_t bytes) override;
  void copy_many_to_host(const std::vector<HostCopy>& copies) override;
  void copy_many_from_host(const std::vector<HostCopy>& copies) override;
  bool pin_host(void* address, std::size_t bytes) override;
  void unpin_host(void* address) override;

  SharedHandle export_handle(ChunkHandle chunk, std::size_t bytes) override;
  ChunkHandle import_handle(int fd, std::uint64_t offset, std::size_t bytes) override;
  // Whether chunks created from now on can be exported.
  bool shareable() const { return shareable_.load(std::memory_order_relaxed); }

 private:
  void copy_many(const std::vector<HostCopy>& copies, bool to_host);

  const cu::DriverApi& api_;
  const int device_;
  cu::CUdevice cu_device_ = 0;
  cu::CUcontext context_ = nullptr;  // the device's primary context, retained by us
  std::size_t total_memory_ = 0;

  // This device first, then the peers added (Note [Peer access]). Read by set_access under
  // the allocator's lock, but peers() may be asked from anywhere.
  // Cleared for good the first time the driver refuses an exportable chunk.
  std::atomic<bool> shareable_{true};
  std::string unshareable_reason_;  // why chunks are not exportable (set with shareable_)
  // The descriptor of every handle exported so far, closed when the handle is released.
  std::mutex exported_mutex_;
  std::unordered_map<ChunkHandle, SharedHandle> exported_;
  std::uint64_t exports_ = 0;  // serials given so far

  mutable std::mutex access_mutex_;
  std::vector<cu::CUmemAccessDesc> access_;

  std::mutex events_mutex_;
  std::vector<cu::CUevent> free_events_;  // created, not in use; at most kMaxPooledEvents
};

}  // namespace vmm
