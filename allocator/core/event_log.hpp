// A bounded record of what the allocator did (alloc, free, stitch, physical growth and
// release, KV page map/unmap, out of memory), for memory timelines and for PyTorch's
// snapshot format (torch.cuda.memory._record_memory_history does not reach a pluggable
// allocator: docs/FACTS.md).
//
// Note [Event log cost]
// Off (capacity 0), recording is one predictable branch. On, it is one clock read and a
// store into a ring allocated when the log is turned on: no allocation, no lock of its
// own (the caller holds the allocator's lock). When the ring is full the oldest events are
// overwritten and counted as dropped; every event carries the allocated and reserved
// totals after the operation that logged it, so a timeline drawn from a wrapped log is
// still exact from its first kept event on.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"

namespace vmm {

enum class EventKind : std::uint8_t {
  kAlloc = 0,          // a block handed out: allocated += size
  kFreeRequested = 1,  // the caller freed it: allocated -= size
  kFreeCompleted = 2,  // its memory is reusable (after record_stream work, if any)
  kGrow = 3,           // physical chunks created: reserved += size
  kRelease = 4,        // physical chunks given back to the device: reserved -= size
  kStitch = 5,         // a new virtual mapping of `size` bytes over free chunks (aux: chunks created for it)
  kMap = 6,            // a KV page mapped into a virtual tensor: allocated += size
  kUnmap = 7,          // a KV page given up: allocated -= size
  kOom = 8,            // out of memory for a request of `size` (aux: the device's free bytes)
};
constexpr int kEventKinds = 9;
const char* event_kind_name(EventKind kind);

struct MemoryEvent {
  std::uint64_t time_ns = 0;  // steady clock
  std::uintptr_t addr = 0;
  std::uint64_t size = 0;
  std::uint64_t aux = 0;
  std::int64_t allocated = 0;  // allocated bytes after the operation
  std::int64_t reserved = 0;   // reserved (physical) bytes after the operation
  StreamId stream = 0;
  EventKind kind = EventKind::kAlloc;
};

class EventLog {
 public:
  // Keeps the last `capacity` events from now on (0 turns recording off); forgets the
  // events kept so far.
  void enable(std::size_t capacity) {
    ring_.assign(capacity, MemoryEvent{});
    ring_.shrink_to_fit();
    next_ = 0;
    count_ = 0;
    dropped_ = 0;
  }
  bool on() const { return !ring_.empty(); }
  std::size_t capacity() const { return ring_.size(); }
  std::uint64_t dropped() const { return dropped_; }

  void record(EventKind kind, std::uintptr_t addr, std::uint64_t size, StreamId stream,
              std::int64_t allocated, std::int64_t reserved, std::uint64_t aux = 0) {
    if (ring_.empty()) return;
    MemoryEvent& e = ring_[next_];
    e.time_ns = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                               std::chrono::steady_clock::now().time_since_epoch())
                                               .count());
    e.addr = addr;
    e.size = size;
    e.aux = aux;
    e.allocated = allocated;
    e.reserved = reserved;
    e.stream = stream;
    e.kind = kind;
    next_ = next_ + 1 == ring_.size() ? 0 : next_ + 1;
    if (count_ < ring_.size())
      ++count_;
    else
      ++dropped_;
  }

  // The kept events, oldest first.
  std::vector<MemoryEvent> events() const {
    std::vector<MemoryEvent> out;
    out.reserve(count_);
    const std::size_t start = count_ < ring_.size() ? 0 : next_;
    for (std::size_t i = 0; i < count_; ++i) out.push_back(ring_[(start + i) % ring_.size()]);
    return out;
  }

 private:
  std::vector<MemoryEvent> ring_;
  std::size_t next_ = 0;   // where the next event goes
  std::size_t count_ = 0;  // events kept (<= capacity)
  std::uint64_t dropped_ = 0;
};

}  // namespace vmm
