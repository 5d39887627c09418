#include "abi/shared_mapping.hpp"

#include <unistd.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "backend/process_descriptors.hpp"

namespace vmm {
namespace {

const char* kind_name(Backend::Kind kind) { return kind == Backend::Kind::kCuda ? "cuda" : "host"; }

}  // namespace

SharedMapping::SharedMapping(std::shared_ptr<Backend> backend, const SharedDescription& d)
    : backend_(std::move(backend)) {
  if (d.kind != backend_->kind()) {
    throw std::invalid_argument(std::string("vmmalloc: memory shared by a process on the ") +
                                kind_name(d.kind) + " backend cannot be opened on the " +
                                kind_name(backend_->kind()) + " backend");
  }
  bytes_ = d.bytes();
  try {
    {
      const ProcessDescriptors sender(d.pid);
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
    backend_->set_access(base_, bytes_);
  } catch (...) {
    undo();
    throw;
  }
}

SharedMapping::~SharedMapping() { undo(); }

void SharedMapping::undo() noexcept {
  const auto report = [](const char* what, const std::exception& e) {
    std::fprintf(stderr, "vmmalloc: closing shared memory: %s failed: %s\n", what, e.what());
  };
  if (mapped_ > 0) {
    try {
      // The driver does not wait for work still reading a range it unmaps (docs/FACTS.md),
      // and which streams of this process used it is not known here: as PyTorch closes
      // shared expandable segments, wait for the device.
      backend_->synchronize();
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
