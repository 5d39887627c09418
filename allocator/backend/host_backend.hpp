// The host backend: CUDA VMM semantics on CPU memory, so the allocator runs for real in CI.
//
// Physical handles are runs of kChunkSize-sized slots of one memfd. Reserving is a
// PROT_NONE anonymous mapping; mapping a handle is mmap(MAP_FIXED | MAP_SHARED) of its
// memfd offset, so two virtual ranges that map one handle really alias. set_access makes a
// mapped range readable and writable, as cuMemSetAccess does; before it, touching the
// range faults, as on a GPU. Like the driver, it refuses to map over a mapping and to
// unmap or grant part of a handle's mapping, so CPU tests catch what a GPU would refuse.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "backend/backend.hpp"

namespace vmm {

class HostBackend final : public Backend {
 public:
  // `capacity_bytes` plays the device's physical memory: create_chunk throws
  // DeviceOutOfMemory once that many bytes of chunks exist.
  explicit HostBackend(std::size_t capacity_bytes, int device = 0);
  ~HostBackend() override;
  HostBackend(const HostBackend&) = delete;
  HostBackend& operator=(const HostBackend&) = delete;

  Kind kind() const override { return Kind::kHost; }
  std::string name() const override { return "host"; }
  int device() const override { return device_; }
  std::size_t total_memory() const override { return capacity_; }
  std::size_t free_memory() const override;

  std::uintptr_t reserve(std::size_t bytes) override;
  void unreserve(std::uintptr_t addr, std::size_t bytes) override;
  ChunkHandle create_chunk(std::size_t bytes) override;
  void release_chunk(ChunkHandle chunk) override;
  void map(std::uintptr_t addr, ChunkHandle chunk, std::size_t bytes) override;
  void unmap(std::uintptr_t addr, std::size_t bytes) override;
  void set_access(std::uintptr_t addr, std::size_t bytes) override;
  // Host memory is equally reachable from every "device", so peers are bookkeeping only;
  // the bytes granted to each are counted so tests can check what was granted.
  bool add_peer(int peer) override;
  void set_peer_access(std::uintptr_t addr, std::size_t bytes, int peer) override;
  std::vector<int> peers() const override;
  // Bytes granted to `peer`: through set_access once it was added, and set_peer_access.
  std::size_t peer_granted_bytes(int peer) const;

  // Host work is synchronous: every event is complete when recorded.
  EventId record_event(StreamId) override { return 1; }
  bool event_done(EventId) override { return true; }
  void stream_wait_event(StreamId, EventId) override {}
  void release_event(EventId) override {}
  void synchronize() override {}
  bool is_capturing(StreamId) override { return false; }

  void copy_from_host(std::uintptr_t dst, const void* src, std::size_t bytes) override;
  void copy_to_host(void* dst, std::uintptr_t src, std::size_t bytes) override;

  SharedHandle export_handle(ChunkHandle chunk, std::size_t bytes) override;
  ChunkHandle import_handle(int fd, std::uint64_t offset, std::size_t bytes) override;

 private:
  const std::size_t capacity_;
  const int device_;
  int memfd_ = -1;
  mutable std::mutex mutex_;
  // Throws unless [addr, addr + bytes) is exactly a run of mapped handles, back to back.
  void check_whole_handles(std::uintptr_t addr, std::size_t bytes, const char* call) const;

  std::size_t file_chunks_ = 0;  // chunk slots the memfd has room for
  // Released handles' first slots by the handle's size in chunks, reused before growing.
  std::map<std::size_t, std::vector<std::size_t>> free_slots_;
  std::size_t live_chunks_ = 0;
  std::map<std::uintptr_t, std::size_t> mapped_;    // address of each mapped handle -> bytes
  std::vector<std::pair<int, std::size_t>> peers_;  // (peer, bytes granted to it)
  struct Import {
    int fd;  // this backend's duplicate of the descriptor it was imported from
    std::uint64_t offset;
    std::size_t bytes;
  };
  std::map<ChunkHandle, Import> imports_;
  std::map<ChunkHandle, std::uint64_t> exported_;  // own handles exported so far: their serials
  std::uint64_t exports_ = 0;
  std::uint64_t last_import_ = 0;
};

}  // namespace vmm
