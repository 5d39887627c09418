#include "backend/host_backend.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iterator>
#include <string>

namespace vmm {
namespace {

std::string errno_text(const char* call) {
  return std::string("host backend: ") + call + " failed: " + std::strerror(errno);
}

void check_aligned(std::uintptr_t addr, std::size_t bytes, const char* call) {
  if (addr % kChunkSize != 0 || bytes % kChunkSize != 0 || bytes == 0) {
    throw BackendError(std::string("host backend: ") + call + " needs a non-empty, chunk-aligned range");
  }
}

// A handle is (first slot + 1) | (chunks << 40): 0 never names one, and it carries its size.
constexpr int kSizeShift = 40;
std::size_t slot_of(ChunkHandle chunk) {
  return static_cast<std::size_t>((chunk & ((ChunkHandle{1} << kSizeShift) - 1)) - 1);
}
std::size_t chunks_of(ChunkHandle chunk) { return static_cast<std::size_t>(chunk >> kSizeShift); }
// A handle imported from another process (Note [Shared handles]) has the top bit set and
// indexes imports_; an own handle's chunk count never reaches that bit.
constexpr ChunkHandle kImportedBit = ChunkHandle{1} << 63;

}  // namespace

HostBackend::HostBackend(std::size_t capacity_bytes, int device)
    : capacity_(capacity_bytes / kChunkSize * kChunkSize), device_(device) {
  if (capacity_ == 0) {
    throw BackendError("host backend: capacity must be at least one 2 MiB chunk");
  }
  memfd_ = memfd_create("vmmalloc-host-chunks", MFD_CLOEXEC);
  if (memfd_ < 0) throw BackendError(errno_text("memfd_create"));
}

HostBackend::~HostBackend() {
  for (const auto& entry : imports_) close(entry.second.fd);
  if (memfd_ >= 0) close(memfd_);
}

std::size_t HostBackend::free_memory() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return capacity_ - live_chunks_ * kChunkSize;
}

std::uintptr_t HostBackend::reserve(std::size_t bytes) {
  if (bytes == 0 || bytes % kChunkSize != 0) {
    throw BackendError("host backend: reserve needs a non-zero multiple of 2 MiB");
  }
  // Over-reserve by one chunk and trim, so that the range is chunk-aligned like CUDA's.
  const std::size_t padded = bytes + kChunkSize;
  void* raw = mmap(nullptr, padded, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) throw BackendError(errno_text("mmap(reserve)"));
  const auto start = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t aligned = (start + kChunkSize - 1) / kChunkSize * kChunkSize;
  if (aligned > start) munmap(raw, aligned - start);
  const std::uintptr_t end = start + padded;
  if (end > aligned + bytes) munmap(reinterpret_cast<void*>(aligned + bytes), end - aligned - bytes);
  return aligned;
}

void HostBackend::unreserve(std::uintptr_t addr, std::size_t bytes) {
  check_aligned(addr, bytes, "unreserve");
  std::lock_guard<std::mutex> lock(mutex_);  // the range is free for others once unmapped
  if (munmap(reinterpret_cast<void*>(addr), bytes) != 0) throw BackendError(errno_text("munmap"));
  mapped_.erase(mapped_.lower_bound(addr), mapped_.lower_bound(addr + bytes));
}

ChunkHandle HostBackend::create_chunk(std::size_t bytes) {
  if (bytes == 0 || bytes % kChunkSize != 0) {
    throw BackendError("host backend: create_chunk needs a non-zero multiple of 2 MiB, got " +
                       std::to_string(bytes) + " bytes");
  }
  const std::size_t chunks = bytes / kChunkSize;
  std::lock_guard<std::mutex> lock(mutex_);
  if ((live_chunks_ + chunks) * kChunkSize > capacity_) {
    throw DeviceOutOfMemory("host backend: out of memory (capacity " + std::to_string(capacity_ >> 20) +
                            " MiB, " + std::to_string((live_chunks_ * kChunkSize) >> 20) + " MiB in use)");
  }
  std::size_t slot;
  auto& reusable = free_slots_[chunks];
  if (!reusable.empty()) {
    slot = reusable.back();
    reusable.pop_back();
  } else {
    slot = file_chunks_;
    if (ftruncate(memfd_, static_cast<off_t>((slot + chunks) * kChunkSize)) != 0) {
      throw DeviceOutOfMemory(errno_text("ftruncate"));
    }
    file_chunks_ += chunks;
  }
  live_chunks_ += chunks;
  return (ChunkHandle{chunks} << kSizeShift) | (slot + 1);
}

void HostBackend::release_chunk(ChunkHandle chunk) {
  std::lock_guard<std::mutex> lock(mutex_);
  if ((chunk & kImportedBit) != 0) {
    const auto it = imports_.find(chunk);
    if (it == imports_.end()) throw BackendError("host backend: unknown imported handle");
    close(it->second.fd);
    imports_.erase(it);
    return;
  }
  const std::size_t slot = slot_of(chunk);
  const std::size_t chunks = chunks_of(chunk);
  if (chunks == 0 || slot + chunks > file_chunks_) throw BackendError("host backend: unknown chunk");
  // Give the pages back to the kernel; the slots' offsets stay valid for reuse.
  if (fallocate(memfd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(slot * kChunkSize),
                static_cast<off_t>(chunks * kChunkSize)) != 0) {
    throw BackendError(errno_text("fallocate(PUNCH_HOLE)"));
  }
  free_slots_[chunks].push_back(slot);
  live_chunks_ -= chunks;
  exported_.erase(chunk);  // a slot reused later is another handle (SharedHandle::serial)
}

void HostBackend::map(std::uintptr_t addr, ChunkHandle chunk, std::size_t bytes) {
  check_aligned(addr, bytes, "map");
  std::lock_guard<std::mutex> lock(mutex_);
  int fd = memfd_;
  std::uint64_t offset = 0;
  std::size_t handle_bytes = 0;
  if ((chunk & kImportedBit) != 0) {
    const auto it = imports_.find(chunk);
    if (it == imports_.end()) throw BackendError("host backend: map of an unknown imported handle");
    fd = it->second.fd;
    offset = it->second.offset;
    handle_bytes = it->second.bytes;
  } else {
    offset = slot_of(chunk) * kChunkSize;
    handle_bytes = chunks_of(chunk) * kChunkSize;
  }
  if (bytes != handle_bytes) {
    throw BackendError("host backend: map of " + std::to_string(bytes) + " bytes, but the handle has " +
                       std::to_string(handle_bytes) + " (a handle maps whole)");
  }
  auto next = mapped_.lower_bound(addr);
  const bool overlaps_next = next != mapped_.end() && next->first < addr + bytes;
  const bool overlaps_prev =
      next != mapped_.begin() && std::prev(next)->first + std::prev(next)->second > addr;
  if (overlaps_next || overlaps_prev) {
    throw BackendError("host backend: map over a range that is already mapped");
  }
  // PROT_NONE until set_access, as a CUDA mapping is inaccessible until cuMemSetAccess.
  void* got = mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE, MAP_SHARED | MAP_FIXED, fd,
                   static_cast<off_t>(offset));
  if (got == MAP_FAILED) throw BackendError(errno_text("mmap(map)"));
  mapped_.emplace(addr, bytes);
}

void HostBackend::check_whole_handles(std::uintptr_t addr, std::size_t bytes, const char* call) const {
  std::uintptr_t at = addr;
  for (auto it = mapped_.find(addr); it != mapped_.end() && it->first == at && at < addr + bytes; ++it) {
    at += it->second;
  }
  if (at != addr + bytes) {
    throw BackendError(std::string("host backend: ") + call +
                       " needs a range of whole mapped handles, back to back (as the driver does)");
  }
}

void HostBackend::unmap(std::uintptr_t addr, std::size_t bytes) {
  check_aligned(addr, bytes, "unmap");
  std::lock_guard<std::mutex> lock(mutex_);
  check_whole_handles(addr, bytes, "unmap");
  // Replace the mapping by a fresh PROT_NONE reservation, so the range stays reserved.
  void* got = mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (got == MAP_FAILED) throw BackendError(errno_text("mmap(unmap)"));
  mapped_.erase(mapped_.find(addr), mapped_.lower_bound(addr + bytes));
}

void HostBackend::set_access(std::uintptr_t addr, std::size_t bytes) {
  check_aligned(addr, bytes, "set_access");
  std::lock_guard<std::mutex> lock(mutex_);
  check_whole_handles(addr, bytes, "set_access");
  if (mprotect(reinterpret_cast<void*>(addr), bytes, PROT_READ | PROT_WRITE) != 0) {
    throw BackendError(errno_text("mprotect"));
  }
  for (auto& peer : peers_) peer.second += bytes;
}

bool HostBackend::add_peer(int peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (peer == device_) return false;
  for (const auto& p : peers_) {
    if (p.first == peer) return false;
  }
  peers_.emplace_back(peer, 0);
  return true;
}

void HostBackend::set_peer_access(std::uintptr_t addr, std::size_t bytes, int peer) {
  check_aligned(addr, bytes, "set_peer_access");
  std::lock_guard<std::mutex> lock(mutex_);
  check_whole_handles(addr, bytes, "set_peer_access");
  for (auto& p : peers_) {
    if (p.first == peer) {
      p.second += bytes;
      return;
    }
  }
  throw BackendError("host backend: set_peer_access for device " + std::to_string(peer) +
                     ", which was never added as a peer");
}

std::vector<int> HostBackend::peers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int> out;
  for (const auto& p : peers_) out.push_back(p.first);
  return out;
}

std::size_t HostBackend::peer_granted_bytes(int peer) const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& p : peers_) {
    if (p.first == peer) return p.second;
  }
  return 0;
}

void HostBackend::copy_from_host(std::uintptr_t dst, const void* src, std::size_t bytes) {
  std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
}

void HostBackend::copy_to_host(void* dst, std::uintptr_t src, std::size_t bytes) {
  std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
}

Backend::SharedHandle HostBackend::export_handle(ChunkHandle chunk, std::size_t bytes) {
  // Every own handle is a part of the one memfd, open for the backend's life. Unlike a CUDA
  // handle, a part released here is emptied for every process that maps it: the host
  // backend plays a device for tests, and its receivers must finish before the sender
  // releases the handle.
  std::lock_guard<std::mutex> lock(mutex_);
  if ((chunk & kImportedBit) != 0 || chunks_of(chunk) == 0 || chunks_of(chunk) * kChunkSize != bytes ||
      slot_of(chunk) + chunks_of(chunk) > file_chunks_) {
    throw BackendError("host backend: export_handle of a handle this backend did not create");
  }
  auto exported = exported_.find(chunk);
  if (exported == exported_.end()) exported = exported_.emplace(chunk, ++exports_).first;
  return {memfd_, slot_of(chunk) * kChunkSize, exported->second};
}

ChunkHandle HostBackend::import_handle(int fd, std::uint64_t offset, std::size_t bytes) {
  if (bytes == 0 || bytes % kChunkSize != 0 || offset % kChunkSize != 0) {
    throw BackendError("host backend: import_handle needs a chunk-aligned, non-empty part of a file");
  }
  const int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) throw BackendError(errno_text("fcntl(F_DUPFD_CLOEXEC)"));
  std::lock_guard<std::mutex> lock(mutex_);
  const ChunkHandle handle = kImportedBit | ++last_import_;
  imports_.emplace(handle, Import{own, offset, bytes});
  return handle;
}

}  // namespace vmm
