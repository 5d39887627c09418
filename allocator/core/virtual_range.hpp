// A handle on one virtual range of a CachingAllocator: reserved address space whose pages
// are mapped only where the owner commits them (Note [KV pages]). The allocator it refers
// to must outlive it. Python binds it as vmmalloc._C.VirtualRange, and
// vmmalloc.virtual_tensor.VirtualTensor is a shaped tensor over one; the range's page state
// inside the allocator is ReservedRange (virtual_pages.hpp).
//
// Note [Exported views outlive free]
// Tensors exported over the range (DLPack) may outlive the handle's free(): they are views
// the owner cannot recall. If the range were unmapped under them they would fault, and if
// its address space were reserved anew they would silently alias other memory. So free()
// makes the handle unusable at once (commits throw), but the pages and the address space go
// back only when the last export is released, or at once when there is none.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "core/caching_allocator.hpp"

namespace vmm {

class VirtualRange {
 public:
  VirtualRange(CachingAllocator& allocator, std::size_t bytes, std::uint32_t filler_kind = 0)
      : allocator_(allocator), range_(allocator.reserve_range(bytes, filler_kind)) {
    base_ = range_->base;
    bytes_ = range_->bytes;
  }
  ~VirtualRange() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_locked();
  }
  VirtualRange(const VirtualRange&) = delete;
  VirtualRange& operator=(const VirtualRange&) = delete;

  std::uintptr_t address() const { return base_; }
  std::size_t bytes() const { return bytes_; }
  Backend& backend() const { return allocator_.backend(); }
  bool freed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return free_requested_;
  }

  // See CachingAllocator::commit_range.
  void commit(std::size_t rows, std::size_t stride, std::size_t begin, std::size_t end, StreamId stream,
              const std::vector<std::size_t>& row_begins = {}) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_usable();
    allocator_.commit_range(range_, rows, stride, begin, end, stream, row_begins);
    last_stream_ = stream;
  }
  // Note [Exported views outlive free]. Pages go back after the work queued on `stream`.
  void free(StreamId stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_requested_) return;
    free_requested_ = true;
    last_stream_ = stream;
    if (exports_ == 0) release_locked();
  }
  std::vector<std::size_t> live_pages() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_requested_) return {};
    return allocator_.live_pages(range_);
  }
  std::size_t live_bytes() const { return live_pages().size() * kChunkSize; }

  // An export (a view the handle cannot recall) now refers to the range.
  void add_export() {
    std::lock_guard<std::mutex> lock(mutex_);
    check_usable();
    ++exports_;
  }
  void remove_export() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--exports_ == 0 && free_requested_) release_locked();
  }
  std::size_t exports() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return exports_;
  }

 private:
  void check_usable() const {
    if (free_requested_) {
      throw std::logic_error("vmmalloc: this virtual tensor was freed; create a new one");
    }
  }
  void release_locked() {
    if (range_ == nullptr) return;
    allocator_.free_range(range_, last_stream_);
    range_ = nullptr;
  }

  CachingAllocator& allocator_;
  mutable std::mutex mutex_;
  ReservedRange* range_;  // null once given back to the allocator
  std::uintptr_t base_ = 0;
  std::size_t bytes_ = 0;
  StreamId last_stream_ = 0;
  std::size_t exports_ = 0;
  bool free_requested_ = false;
};

}  // namespace vmm
