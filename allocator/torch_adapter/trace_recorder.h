// The torch adapter's memory history: what torch.cuda.memory._record_memory_history asks of
// an allocator (recordHistory, snapshot, annotations, compile contexts, user metadata), over
// vmmalloc's core. Included by torch_adapter.cpp only: it is torch-linked.
//
// Note [Adapter history]
// torch's recordHistory hands the allocator a context recorder (torch::CapturedTraceback:
// Python frames, and C++ frames with stacks="all"). Only the adapter can call it, so the
// adapter records the events torch callers cause, with their contexts, user metadata and
// compile context: each alloc and each free request. The core's event log, turned on with
// the recorder, holds what happens inside the allocator: free completions (deferred ones
// after record_stream work), physical growth and release, KV pages, out of memory. A
// snapshot merges both by time (both stamp with std::chrono::steady_clock) into torch's
// TraceEntry lists, and torch converts them to the dict its viewer reads, symbolizing the
// frames, exactly as for its own allocator. Actions as PyTorch's allocator emits them:
// every free is a free_requested, then a free_completed (at once, or when the streams
// recorded on the block are done), both with the request's size and context.
//
// Core events in torch's actions: grow -> segment_map and release -> segment_unmap at
// address 0 (a chunk has no address of its own; the viewer reads them as reserved memory
// growing and shrinking), KV pages -> alloc / free_requested + free_completed of each 2 MiB
// page, oom -> oom. A stitch changes neither reserved nor allocated memory and has no torch
// action: it stays in vmmalloc's own timeline (vmmalloc.timeline). The core keeps twice the
// entries asked for, since its log also holds the alloc and free events the adapter records
// itself; the merged trace keeps the newest `max_entries`. With the adapter's history off and
// the core's log on by itself (VMMALLOC_CONF=history:N), the trace is the core's alone,
// alloc and free requests included, without stacks.
//
// Cost: with history off, one relaxed atomic load per allocation and per free. With it
// on, the recorder's cost (as in PyTorch's allocator) plus one lock and one ring store.
//
// It needs c10 only (no CUDA header), so tests/test_trace_recorder.py builds it on a CPU
// machine too, over the host backend.
#pragma once

#include <c10/core/CachingDeviceAllocator.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "adapter_abi.h"

namespace vmm_torch {

namespace cda = c10::CachingDeviceAllocator;
using Action = cda::TraceEntry::Action;

inline std::uint64_t steady_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

inline std::optional<Action> action_named(const std::string& name) {
  static const std::pair<const char*, Action> kNames[] = {
      {"alloc", Action::ALLOC},
      {"free_requested", Action::FREE_REQUESTED},
      {"free_completed", Action::FREE_COMPLETED},
      {"segment_alloc", Action::SEGMENT_ALLOC},
      {"segment_free", Action::SEGMENT_FREE},
      {"segment_map", Action::SEGMENT_MAP},
      {"segment_unmap", Action::SEGMENT_UNMAP},
      {"snapshot", Action::SNAPSHOT},
      {"oom", Action::OOM},
  };
  for (const auto& [key, action] : kNames) {
    if (name == key) return action;
  }
  return std::nullopt;
}

class TraceRecorder {
 public:
  struct Record {
    Action action = Action::ALLOC;
    int device = 0;
    std::uintptr_t addr = 0;
    std::size_t size = 0;
    std::uintptr_t stream = 0;
    c10::MempoolId_t pool{0, 0};
    std::uint64_t time_ns = 0;
    std::shared_ptr<c10::GatheredContext> context;
    std::string compile_context;
    std::string user_metadata;
  };

  explicit TraceRecorder(const vmm_adapter_api* const* core) : core_(core) {}

  bool on() const { return on_.load(std::memory_order_relaxed); }

  void configure(bool enabled, cda::CreateContextFn recorder, std::size_t max_entries,
                 cda::RecordContext when, bool clear, const std::vector<std::string>& skip_actions) {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!enabled || when == cda::RecordContext::NEVER || recorder != nullptr,
                "vmmalloc: recordHistory with stacks needs a context recorder");
    recorder_ = enabled ? recorder : nullptr;
    when_ = enabled ? when : cda::RecordContext::NEVER;
    skipped_.clear();
    for (const std::string& name : skip_actions) {
      if (auto action = action_named(name)) skipped_.push_back(*action);
    }
    const std::size_t capacity = std::max<std::size_t>(1, max_entries);
    if (!enabled || clear) {
      ring_.clear();
      annotations_.clear();
    }
    // Oldest first again (a full ring's oldest is at next_), then the newest `capacity`.
    std::rotate(ring_.begin(), ring_.begin() + static_cast<std::ptrdiff_t>(next_), ring_.end());
    if (ring_.size() > capacity) ring_.erase(ring_.begin(), ring_.begin() + (ring_.size() - capacity));
    next_ = 0;
    if (!enabled) live_.clear();
    for (int device = 0; device < static_cast<int>(core_recording_.size()); ++device) {
      if (!core_recording_[device]) continue;
      if (!enabled)
        (*core_)->record_events(device, 0);
      else if (clear || capacity != capacity_)
        (*core_)->record_events(device, core_capacity(capacity));
    }
    if (!enabled) core_recording_.assign(core_recording_.size(), false);
    capacity_ = capacity;
    on_.store(enabled, std::memory_order_relaxed);
  }

  // The devices vmmalloc already serves log their events from now on; others start when
  // their first allocation is recorded (begin_allocation).
  void follow_devices_in_use(int device_count) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!on_.load(std::memory_order_relaxed)) return;
    for (int device = 0; device < device_count; ++device) {
      if ((*core_)->device_in_use(device)) follow(device);
    }
  }

  // Called before an allocation while history is on: the allocation's context.
  std::shared_ptr<c10::GatheredContext> begin_allocation(int device) {
    cda::CreateContextFn recorder = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!on_.load(std::memory_order_relaxed)) return nullptr;  // turned off meanwhile
      follow(device);
      recorder = recorder_for(cda::RecordContext::STATE);
    }
    return recorder != nullptr ? recorder() : nullptr;  // outside the lock: it may take the GIL
  }

  void record_alloc(int device, void* ptr, std::size_t size, std::uintptr_t stream,
                    std::shared_ptr<c10::GatheredContext> context) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!on_.load(std::memory_order_relaxed)) return;
    const auto addr = reinterpret_cast<std::uintptr_t>(ptr);
    live_[addr] = Live{device, size, stream, context};
    push(Action::ALLOC, device, addr, size, stream,
         when_ >= cda::RecordContext::ALLOC ? std::move(context) : nullptr);
  }

  // A free request of `ptr` (of `fallback_size` bytes on `fallback_device` when the
  // allocation predates the history).
  void record_free(void* ptr, std::size_t fallback_size, int fallback_device) {
    auto context = gather(cda::RecordContext::ALL);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!on_.load(std::memory_order_relaxed)) return;
    const auto addr = reinterpret_cast<std::uintptr_t>(ptr);
    Live live{fallback_device, fallback_size, 0, nullptr};
    if (auto it = live_.find(addr); it != live_.end()) {
      live = std::move(it->second);
      live_.erase(it);
    }
    push(Action::FREE_REQUESTED, live.device, addr, live.size, live.stream,
         when_ >= cda::RecordContext::ALLOC ? (context ? std::move(context) : std::move(live.context))
                                            : nullptr);
  }

  // A graph tree's checkpoint restore (setCheckpointPoolState), which began at `began_ns`:
  // the blocks it freed are free requests from then (the core logged their completions),
  // the blocks it made are allocations now, with no context (none is known).
  struct Made {
    std::uintptr_t addr;
    std::size_t size;
    std::uintptr_t stream;
  };
  void record_restore(int device, std::uint64_t began_ns, const std::vector<void*>& freed,
                      const std::vector<Made>& made) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!on_.load(std::memory_order_relaxed)) return;
    for (void* ptr : freed) {
      const auto addr = reinterpret_cast<std::uintptr_t>(ptr);
      Live live{device, 0, 0, nullptr};  // size 0: unknown, the completion's is kept
      if (auto it = live_.find(addr); it != live_.end()) {
        live = std::move(it->second);
        live_.erase(it);
      }
      push(Action::FREE_REQUESTED, device, addr, live.size, live.stream, nullptr, began_ns);
    }
    for (const Made& m : made) {
      live_[m.addr] = Live{device, m.size, m.stream, nullptr};
      push(Action::ALLOC, device, m.addr, m.size, m.stream, nullptr);
    }
  }

  void record_annotation(int device, const std::vector<std::pair<std::string, std::string>>& md) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!on_.load(std::memory_order_relaxed)) return;
    annotations_.push_back({device, steady_ns(), md});
    if (annotations_.size() > capacity_) annotations_.pop_front();
  }

  void push_compile_context(const std::string& md) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (on_.load(std::memory_order_relaxed)) compile_contexts_.push_back(md);
  }
  void pop_compile_context() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!compile_contexts_.empty()) compile_contexts_.pop_back();
  }
  void set_user_metadata(const std::string& md) {
    std::lock_guard<std::mutex> lock(mutex_);
    user_metadata_ = md;
  }
  std::string user_metadata() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return user_metadata_;
  }

  // The context an allocation was made in, for a snapshot's blocks.
  std::shared_ptr<c10::GatheredContext> context_of(std::uintptr_t addr) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(addr);
    return it != live_.end() ? it->second.context : nullptr;
  }

  // Device `device`'s trace in torch's form, oldest first (Note [Adapter history]).
  std::vector<cda::TraceEntry> trace(int device) const {
    std::vector<Record> merged;
    std::size_t capacity = 0;
    bool recording = false;
    std::vector<Action> skipped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      recording = on_.load(std::memory_order_relaxed);
      skipped = skipped_;
      capacity = recording ? capacity_ : std::numeric_limits<std::size_t>::max();
      for (const Record& r : ring_) {
        if (r.device == device) merged.push_back(r);
      }
    }
    std::vector<vmm_event> events;
    (*core_)->events(
        device,
        [](void* out, const vmm_event* e) { static_cast<std::vector<vmm_event>*>(out)->push_back(*e); },
        &events);
    for (const vmm_event& e : events) add_core_event(device, e, !recording, merged);
    std::stable_sort(merged.begin(), merged.end(),
                     [](const Record& a, const Record& b) { return a.time_ns < b.time_ns; });
    // A free completion carries its request's size and context, as in PyTorch.
    std::unordered_map<std::uintptr_t, const Record*> requested;
    for (Record& r : merged) {
      if (r.action == Action::FREE_REQUESTED) {
        requested[r.addr] = &r;
      } else if (r.action == Action::FREE_COMPLETED && r.context == nullptr) {
        if (auto it = requested.find(r.addr); it != requested.end()) {
          if (it->second->size != 0) r.size = it->second->size;
          r.context = it->second->context;
          r.user_metadata = it->second->user_metadata;
          r.compile_context = it->second->compile_context;
          requested.erase(it);
        }
      }
    }
    std::vector<Record> kept;  // the adapter's own records were filtered when pushed; the core's here
    for (Record& r : merged) {
      if (std::find(skipped.begin(), skipped.end(), r.action) == skipped.end()) kept.push_back(std::move(r));
    }
    if (kept.size() > capacity) kept.erase(kept.begin(), kept.begin() + (kept.size() - capacity));
    const std::int64_t offset_ns = unix_minus_steady_ns();
    std::vector<cda::TraceEntry> out;
    out.reserve(kept.size());
    for (Record& r : kept) {
      out.emplace_back(r.action, static_cast<c10::DeviceIndex>(r.device), r.addr, r.size,
                       reinterpret_cast<void*>(r.stream), r.pool, 0, std::move(r.context),
                       std::move(r.compile_context), std::move(r.user_metadata));
      out.back().time_.t_ = static_cast<time_t>((static_cast<std::int64_t>(r.time_ns) + offset_ns) / 1000);
    }
    return out;
  }

  std::vector<cda::AnnotationEntry> annotations() const {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::int64_t offset_ns = unix_minus_steady_ns();
    std::vector<cda::AnnotationEntry> out;
    for (const Annotation& a : annotations_) {
      out.emplace_back(static_cast<c10::DeviceIndex>(a.device), 0);
      out.back().time_.t_ = static_cast<time_t>((static_cast<std::int64_t>(a.time_ns) + offset_ns) / 1000);
      for (const auto& [name, value] : a.metadata) out.back().recordUserMetadata(name, value);
    }
    return out;
  }

 private:
  struct Live {
    int device = 0;
    std::size_t size = 0;  // requested
    std::uintptr_t stream = 0;
    std::shared_ptr<c10::GatheredContext> context;
  };
  struct Annotation {
    int device;
    std::uint64_t time_ns;
    std::vector<std::pair<std::string, std::string>> metadata;
  };

  static std::int64_t unix_minus_steady_ns() {
    const auto unix_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
    return static_cast<std::int64_t>(unix_ns) - static_cast<std::int64_t>(steady_ns());
  }

  // Under mutex_: the recorder to call for an event of `level`, or null.
  cda::CreateContextFn recorder_for(cda::RecordContext level) const {
    return when_ >= level ? recorder_ : nullptr;
  }
  std::shared_ptr<c10::GatheredContext> gather(cda::RecordContext level) {
    cda::CreateContextFn recorder = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      recorder = recorder_for(level);
    }
    return recorder != nullptr ? recorder() : nullptr;  // outside the lock: it may take the GIL
  }

  // Under mutex_.
  void follow(int device) {
    if (device < 0) return;
    if (static_cast<std::size_t>(device) >= core_recording_.size()) core_recording_.resize(device + 1, false);
    if (core_recording_[device]) return;
    core_recording_[device] = (*core_)->record_events(device, core_capacity(capacity_)) == VMM_OK;
  }
  // The core's ring is allocated when turned on: twice the entries asked for, at most
  // kCoreEventsMax (56 MB per device; torch's default max_entries is sys.maxsize).
  static constexpr std::size_t kCoreEventsMax = std::size_t{1} << 20;
  static std::size_t core_capacity(std::size_t entries) {
    return entries >= kCoreEventsMax / 2 ? kCoreEventsMax : 2 * entries;
  }

  void push(Action action, int device, std::uintptr_t addr, std::size_t size, std::uintptr_t stream,
            std::shared_ptr<c10::GatheredContext> context, std::uint64_t time_ns = 0) {
    if (std::find(skipped_.begin(), skipped_.end(), action) != skipped_.end()) return;  // as PyTorch
    Record r{action,
             device,
             addr,
             size,
             stream,
             {0, 0},
             time_ns != 0 ? time_ns : steady_ns(),
             std::move(context),
             compile_contexts_.empty() ? std::string() : compile_contexts_.back(),
             user_metadata_};
    if (ring_.size() < capacity_) {
      ring_.push_back(std::move(r));
    } else {
      ring_[next_] = std::move(r);
      next_ = (next_ + 1) % capacity_;
    }
  }

  // `with_requests`: the core's alloc and free events too, when the adapter records none
  // (the core's log alone is on: VMMALLOC_CONF=history:N).
  static void add_core_event(int device, const vmm_event& e, bool with_requests, std::vector<Record>& out) {
    Record r;
    r.device = device;
    r.addr = e.addr;
    r.size = e.size;
    r.stream = e.stream;
    r.time_ns = e.time_ns;
    switch (e.kind) {
      case VMM_EVENT_FREE_COMPLETED:
        r.action = Action::FREE_COMPLETED;
        break;
      case VMM_EVENT_GROW:
        r.action = Action::SEGMENT_MAP;
        break;
      case VMM_EVENT_RELEASE:
        r.action = Action::SEGMENT_UNMAP;
        break;
      case VMM_EVENT_OOM:
        r.action = Action::OOM;
        r.addr = e.aux;  // torch: an OOM entry's addr is the device's free memory
        break;
      case VMM_EVENT_MAP:
        r.action = Action::ALLOC;
        break;
      case VMM_EVENT_ALLOC:
        if (!with_requests) return;
        r.action = Action::ALLOC;
        break;
      case VMM_EVENT_FREE_REQUESTED:
        if (!with_requests) return;
        r.action = Action::FREE_REQUESTED;
        break;
      case VMM_EVENT_UNMAP:
        r.action = Action::FREE_REQUESTED;
        out.push_back(r);
        r.action = Action::FREE_COMPLETED;
        break;
      default:
        return;  // a stitch: no torch action
    }
    out.push_back(std::move(r));
  }

  const vmm_adapter_api* const* core_;
  std::atomic<bool> on_{false};
  mutable std::mutex mutex_;
  cda::CreateContextFn recorder_ = nullptr;
  cda::RecordContext when_ = cda::RecordContext::NEVER;
  std::vector<Action> skipped_;
  std::size_t capacity_ = 1;
  // The adapter's records; once full, next_ is the oldest (a trace sorts them by time).
  std::vector<Record> ring_;
  std::size_t next_ = 0;
  std::deque<Annotation> annotations_;
  std::vector<std::string> compile_contexts_;
  std::string user_metadata_;
  std::unordered_map<std::uintptr_t, Live> live_;
  std::vector<bool> core_recording_;
};

}  // namespace vmm_torch
