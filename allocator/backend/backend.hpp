// The one interface between the allocator and the memory it manages.
//
// A backend reserves virtual ranges, creates physical handles (one 2 MiB chunk, or a large
// handle of several: Note [Large handles] in chunk_pool.hpp), maps handles into ranges and
// unmaps them, and tells the allocator when work on a stream has finished.
// It holds no allocator policy: the caching allocator decides what to map where.
//
// Note [Backend error contract]
// - Every failing call throws. Lack of physical memory on the device throws
//   DeviceOutOfMemory (so the allocator can release caches and retry); anything else
//   throws BackendError naming the call and the driver's error.
// - A call that throws has no effect: a failed map leaves the range unmapped, a failed
//   create_chunk leaks no handle. The allocator's rollback depends on it.
// - unmap/unreserve/release_chunk/release_event are used on rollback paths; they may
//   throw too, and the allocator counts such failures instead of propagating them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace vmm {

// Physical chunk size. CUDA's VMM granularity on every GPU we target is 2 MiB
// (docs/FACTS.md); a backend whose granularity does not divide it is refused at construction.
constexpr std::size_t kChunkSize = std::size_t{2} << 20;

// A stream as the caller names it: the cudaStream_t value on CUDA (0 is the legacy
// default stream), anything on the host backend, whose streams are trivially ordered.
using StreamId = std::uintptr_t;
using EventId = std::uintptr_t;
using ChunkHandle = std::uint64_t;

class BackendError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The device itself has no physical memory left (as opposed to the allocator's cap).
class DeviceOutOfMemory : public BackendError {
 public:
  using BackendError::BackendError;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // What memory the backend serves: decides messages and exports (a name is for people).
  enum class Kind { kCuda, kHost };
  virtual Kind kind() const = 0;
  virtual std::string name() const = 0;
  virtual int device() const = 0;
  // Bytes of physical memory the device has in all (the base for fraction caps).
  virtual std::size_t total_memory() const = 0;
  // Bytes of physical memory the device has free right now, as the driver sees it.
  virtual std::size_t free_memory() const = 0;

  // Virtual ranges: `bytes` is a multiple of kChunkSize; the result is kChunkSize-aligned.
  virtual std::uintptr_t reserve(std::size_t bytes) = 0;
  virtual void unreserve(std::uintptr_t addr, std::size_t bytes) = 0;

  // A physical handle of `bytes`, a non-zero multiple of kChunkSize.
  virtual ChunkHandle create_chunk(std::size_t bytes) = 0;
  virtual void release_chunk(ChunkHandle chunk) = 0;

  // Maps the whole handle `chunk`, created with `bytes`, at `addr` (kChunkSize-aligned,
  // inside a reserved range, nothing mapped there yet). A mapped range is not accessible
  // until set_access is called on it. unmap takes any range made of whole mapped handles,
  // back to back (cuMemUnmap refuses part of a handle's mapping).
  virtual void map(std::uintptr_t addr, ChunkHandle chunk, std::size_t bytes) = 0;
  virtual void unmap(std::uintptr_t addr, std::size_t bytes) = 0;
  // Grants read-write access to this device and to every peer added so far, on a range
  // of whole mapped handles. Its cost is per handle, whatever the handle's size (docs/FACTS.md).
  virtual void set_access(std::uintptr_t addr, std::size_t bytes) = 0;

  // Note [Peer access]
  // Memory mapped through the VMM API is accessible only to the devices its
  // cuMemSetAccess names; cudaDeviceEnablePeerAccess does not cover it. So a copy to
  // another GPU, or a kernel there reading this memory, fails ("invalid argument") unless
  // the other GPU was named. Each grant costs per handle and per device (docs/FACTS.md), so a
  // peer is added only once this process uses that device (the registry adds every device
  // in use to every other: Note [Peers are the devices in use]); set_access then names it,
  // and set_peer_access grants it on what was mapped before.
  //
  // Adds `peer` to the devices set_access grants. Returns false, recording nothing, when
  // `peer` is this device, already added, or has no peer path to this device.
  virtual bool add_peer(int peer) = 0;
  // Grants `peer` (added before) read-write access to a mapped range.
  virtual void set_peer_access(std::uintptr_t addr, std::size_t bytes, int peer) = 0;
  virtual std::vector<int> peers() const = 0;

  // Stream ordering. An event recorded on a stream completes once all work submitted to
  // that stream before the record has finished.
  virtual EventId record_event(StreamId stream) = 0;
  virtual bool event_done(EventId event) = 0;
  // Work submitted to `stream` after this call starts only once `event` has completed;
  // the host does not block.
  virtual void stream_wait_event(StreamId stream, EventId event) = 0;
  virtual void release_event(EventId event) = 0;
  // Blocks the host until `event` has completed (only that stream's work, not the device's).
  virtual void wait_event(EventId event) {
    while (!event_done(event)) std::this_thread::yield();
  }
  // Blocks the host until all work on the device has finished.
  virtual void synchronize() = 0;
  // Whether `stream` is being captured into a CUDA graph (never on the host backend).
  virtual bool is_capturing(StreamId stream) = 0;
  // Note [Capture-safe mode] (mapping_cache.hpp): while a graph may be capturing, the
  // calling thread's driver calls run in the relaxed capture mode, as PyTorch's allocator
  // runs cudaMalloc then, so that no capture in another thread is invalidated by them.
  // Returns the mode to give back to restore_capture_mode; the host backend has none.
  virtual int relax_capture_mode() { return 0; }
  virtual void restore_capture_mode(int mode) { (void)mode; }

  // Data movement between host memory and mapped device memory (tests, tools, sleeping
  // pools' backups).
  virtual void copy_from_host(std::uintptr_t dst, const void* src, std::size_t bytes) = 0;
  virtual void copy_to_host(void* dst, std::uintptr_t src, std::size_t bytes) = 0;
  // Many copies at once (a sleeping pool's backup and restore, one per physical handle):
  // returns when every one has finished, failed or not. The CUDA backend issues them all
  // on one stream of its own and waits once, so the bus never idles between copies; here
  // they run one by one through the single-copy calls above.
  struct HostCopy {
    std::uintptr_t device;
    unsigned char* host;
    std::size_t bytes;
  };
  virtual void copy_many_to_host(const std::vector<HostCopy>& copies) {
    for (const HostCopy& c : copies) copy_to_host(c.host, c.device, c.bytes);
  }
  virtual void copy_many_from_host(const std::vector<HostCopy>& copies) {
    for (const HostCopy& c : copies) copy_from_host(c.device, c.host, c.bytes);
  }
  // Page-locks host memory the caller allocated, so that copies to and from it run at the
  // bus's rate. False where it cannot (the host backend, or a refused pin): copies to that
  // memory still work, at pageable speed.
  virtual bool pin_host(void* address, std::size_t bytes) {
    (void)address;
    (void)bytes;
    return false;
  }
  virtual void unpin_host(void* address) { (void)address; }

  // Note [Shared handles]
  // Another process maps this process's memory by importing its physical handles. Each
  // handle is exported as a file descriptor (with an offset into it, for backends whose
  // handles are parts of one file); the receiver copies the descriptor into itself
  // (ProcessDescriptors, backend/process_descriptors.hpp) and imports it. A handle is
  // exported once: its descriptor stays open, owned by the backend, until the handle is
  // released, so a receiver may take it at any time before. On CUDA the physical memory
  // lives until every process holding a handle to it has released it (the driver counts
  // them), so a receiver's mapping outlives the sender's release of the handle.
  struct SharedHandle {
    int fd = -1;
    std::uint64_t offset = 0;
    // Names this physical handle among all the backend ever exported: descriptor numbers
    // and handle values are reused once a handle is released (a pool's pause and resume
    // makes new handles for the same chunks), and receivers cache mappings by handle.
    std::uint64_t serial = 0;
  };
  // Throws BackendError when the backend cannot share the handle (then it names why).
  virtual SharedHandle export_handle(ChunkHandle chunk, std::size_t bytes) {
    (void)chunk;
    (void)bytes;
    throw BackendError(name() + " backend: memory cannot be shared with other processes");
  }
  // The handle of `bytes` another process exported as `fd` at `offset` (`fd` is this
  // process's descriptor; the caller keeps it and closes it). It is mapped, unmapped and
  // granted as create_chunk's handles are, and given back with release_chunk. Throws
  // BackendError.
  virtual ChunkHandle import_handle(int fd, std::uint64_t offset, std::size_t bytes) {
    (void)fd;
    (void)offset;
    (void)bytes;
    throw BackendError(name() + " backend: memory of other processes cannot be imported");
  }
};

}  // namespace vmm
