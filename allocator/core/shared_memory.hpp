// Memory shared between processes: the handle a sender writes for one of its allocations
// (the receiver's mapping of it: abi/shared_mapping.hpp).
//
// Note [Sharing memory between processes]
// torch.multiprocessing hands a CUDA tensor to another process as a handle string the
// sender's allocator writes (shareIpcHandle) and the receiver's allocator opens
// (getIpcDevPtr); the runtime's cudaIpcGetMemHandle does not work on cuMemMap'ed memory.
// vmmalloc's handle lists the physical handles under the allocation's mapping, in mapping
// order, each as the sender's exported descriptor (Note [Shared handles] in
// backend/backend.hpp). A large allocation is shared from its own first byte; a small block
// as its 2 MiB segment, with the block's offset beside the handle (as PyTorch shares a
// block as its cudaMalloc'ed segment). The receiver takes the descriptors from the sender
// (backend/process_descriptors.hpp), imports them, maps them back to back into a range of
// its own and grants access; the mapping lives until the receiver's last tensor on it dies.
//
// Lifetimes, with torch's protocol (CudaIPCSentData, torch.cuda.ipc_collect): the sender's
// allocation is freed only once every receiver has dropped it, so its memory is never
// reused under a receiver; and a receiver's imported handles keep the physical memory
// alive even after the sender releases its chunks (the driver counts handles).
//
// Format, fixed-width little-endian fields: the magic "vmmalloc", u32 format version, u32
// backend kind, i32 sender pid, u64 sender start time (clock ticks since boot, as
// /proc/<pid>/stat says: with the pid it names the process, never a later one given the
// same pid), u32 piece count, then per piece i32 descriptor, u64 offset into it, u64 bytes,
// u64 serial. The serial names the physical handle among all the sender's backend ever
// exported (Backend::SharedHandle): descriptor numbers are reused once a handle is
// released, and a receiver caches mappings by handle string, so without it one string
// could name two different memories in turn.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.hpp"

namespace vmm {

struct SharedPiece {
  int fd = -1;
  std::uint64_t offset = 0;
  std::uint64_t bytes = 0;
  std::uint64_t serial = 0;
};

struct SharedDescription {
  int pid = 0;
  std::uint64_t start_time = 0;
  Backend::Kind kind = Backend::Kind::kCuda;
  std::vector<SharedPiece> pieces;  // mapped back to back, in this order
  std::size_t bytes() const;
};

std::string encode_shared(const SharedDescription& description);
// Whether `handle` starts as a vmmalloc handle (a cheap test: the magic; never throws).
bool is_vmmalloc_handle(const char* handle, std::size_t length) noexcept;
inline bool is_vmmalloc_handle(const std::string& handle) noexcept {
  return is_vmmalloc_handle(handle.data(), handle.size());
}
// Throws std::invalid_argument naming what is wrong (not vmmalloc's, another format,
// truncated, a piece that is not whole chunks, sizes past what a device holds).
SharedDescription decode_shared(const std::string& handle);

}  // namespace vmm
