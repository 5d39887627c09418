#include "abi/shared_mapping.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>

#include "backend/process_descriptors.hpp"

namespace vmm {
namespace {

const char* kind_name(Backend::Kind kind) { return kind == Backend::Kind::kCuda ? "cuda" : "host"; }

// The mappings open now, so that a device that becomes a peer later is granted them too
// (Note [Peer access]). Held across a mapping's grant and its registration, and across a
// peer's grants, so that no peer added meanwhile is missed.
std::mutex& open_mutex() {
  static std::mutex m;
  return m;
}
std::vector<SharedMapping*>& open_mappings() {
  static auto* v = new std::vector<SharedMapping*>();  // leaked: mappings close during teardown
  return *v;
}

}  // namespace

std::string share_handle(CachingAllocator& allocator, std::uintptr_t ptr, std::size_t* offset) {
  auto [description, at] = allocator.share(ptr);
  description.start_time = process_start_time(description.pid);
  if (allocator.config().share_with_any_process) allow_any_process_to_take_descriptors();
  *offset = at;
  return encode_shared(description);
}

void grant_shared_mappings(const Backend& backend, int peer) {
  std::lock_guard<std::mutex> lock(open_mutex());
  for (SharedMapping* mapping : open_mappings()) {
    if (mapping->backend_.get() != &backend) continue;
    try {
      mapping->backend_->set_peer_access(mapping->base_, mapping->bytes_, peer);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "vmmalloc: granting device %d shared memory failed: %s\n", peer, e.what());
    }
  }
}

SharedMapping::SharedMapping(std::shared_ptr<Backend> backend, const SharedDescription& d)
    : backend_(std::move(backend)) {
  if (d.kind != backend_->kind()) {
    throw std::invalid_argument(std::string("vmmalloc: memory shared by a process on the ") +
                                kind_name(d.kind) + " backend cannot be opened on the " +
                                kind_name(backend_->kind()) + " backend");
  }
  // The driver does not promise that importing one's own export gives a new handle
  // (cuMemImportFromShareableHandle), and releasing the original would pull the memory from
  // under its allocation; torch reuses the sender's storage in its own process anyway, as
  // CUDA's runtime IPC refuses a process's own handles.
  if (d.kind == Backend::Kind::kCuda && d.pid == static_cast<int>(getpid())) {
    throw std::invalid_argument(
        "vmmalloc: this process shared this CUDA memory itself; use the tensor it shared instead "
        "of opening its handle");
  }
  bytes_ = d.bytes();
  try {
    {
      const ProcessDescriptors sender(d.pid, d.start_time);
      handles_.reserve(d.pieces.size());
      for (const SharedPiece& p : d.pieces) {
        const int fd = sender.take(p.fd);
        ChunkHandle handle = 0;
        try {
          handle = backend_->import_handle(fd, p.offset, p.bytes);
        } catch (...) {
          close(fd);
          throw;
        }
        close(fd);  // the imported handle holds the memory; the descriptor is not needed
        handles_.emplace_back(handle, p.bytes);
      }
    }
    base_ = backend_->reserve(bytes_);
    for (const auto& [handle, bytes] : handles_) {
      backend_->map(base_ + mapped_, handle, bytes);
      mapped_ += bytes;
    }
    std::lock_guard<std::mutex> lock(open_mutex());
    backend_->set_access(base_, bytes_);  // this device and the peers added so far
    open_mappings().push_back(this);
  } catch (...) {
    undo(false);  // nothing was queued on the range yet
    throw;
  }
}

SharedMapping::~SharedMapping() {
  {
    std::lock_guard<std::mutex> lock(open_mutex());
    auto& open = open_mappings();
    open.erase(std::remove(open.begin(), open.end(), this), open.end());
  }
  undo(true);
}

void SharedMapping::undo(bool wait_for_device) noexcept {
  const auto report = [](const char* what, const std::exception& e) {
    std::fprintf(stderr, "vmmalloc: closing shared memory: %s failed: %s\n", what, e.what());
  };
  if (mapped_ > 0 && wait_for_device) {
    try {
      // The driver does not wait for work still reading a range it unmaps (docs/FACTS.md),
      // and which streams of this process used it is not known here: as PyTorch closes
      // shared expandable segments, wait for the device.
      backend_->synchronize();
    } catch (const std::exception& e) {
      report("synchronize", e);
    }
  }
  if (mapped_ > 0) {
    try {
      backend_->unmap(base_, mapped_);
    } catch (const std::exception& e) {
      report("unmap", e);
    }
  }
  if (base_ != 0) {
    try {
      backend_->unreserve(base_, bytes_);
    } catch (const std::exception& e) {
      report("unreserve", e);
    }
  }
  for (const auto& entry : handles_) {
    try {
      backend_->release_chunk(entry.first);
    } catch (const std::exception& e) {
      report("release", e);
    }
  }
  mapped_ = 0;
  base_ = 0;
  handles_.clear();
}

}  // namespace vmm
