// Access grants run on a worker thread, off the thread that allocates.
//
// Note [Deferred grants]
// cuMemSetAccess costs 25-33 us per 2 MiB handle (FACTS.md): most of what a stitch or a
// repair costs. Under FSDP2 the step is host bound (bench/NOTES.md, "Several GPUs": the
// host finishes queueing a step moments before the GPU finishes it), so that time is paid
// by the thread that launches the kernels, and it was most of vmmalloc's lag behind
// PyTorch's allocator there. A grant need not be done before the pointer is returned,
// only before the GPU touches the range, and everything that touches a new allocation is
// ordered after its stream (PyTorch's contract: a block may be reused by another stream
// only behind that stream's work). So the range is mapped at once (host-side calls that
// look the address up, such as copies, find it), its grant is queued here, and the
// allocating stream is made to wait on the GPU until the worker has published the grant's
// number (CudaBackend: cuStreamWaitValue64, GEQ, on pinned host memory).
// Invariants:
// - grants run in the order they were queued, so "done up to n" is one number;
// - a backend call that could observe a range with a grant pending (unmap, unreserve, a
//   peer grant, a host copy) first waits for the pending grants that overlap it, and
//   synchronize waits for all; the destructor runs every queued grant;
// - a grant that fails is tried again; one that still fails is published anyway (a GPU
//   waiting for it would otherwise hang) and counted, and the backend stops deferring:
//   an access to that range then faults loudly rather than reading another allocation.
// Measured on an H100 (bench/vmm_overlap.py --threads): grants on a second thread slow
// the launching thread by 14-21% of the time they run, against 100% when it runs them.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace vmm {

class DeferredGrants {
 public:
  using Grant = std::function<void(std::uintptr_t addr, std::size_t bytes)>;
  // `grant` runs on the worker thread and throws on failure. `published` (8 bytes the
  // device can read) receives the number of the last grant done, with release order.
  DeferredGrants(Grant grant, std::uint64_t* published);
  ~DeferredGrants();  // runs every queued grant, then stops the worker
  DeferredGrants(const DeferredGrants&) = delete;
  DeferredGrants& operator=(const DeferredGrants&) = delete;

  // Queues a grant of [addr, addr + bytes); returns its number (1, 2, ...).
  std::uint64_t enqueue(std::uintptr_t addr, std::size_t bytes);
  // Blocks until no grant overlapping [addr, addr + bytes) is pending.
  void wait_overlapping(std::uintptr_t addr, std::size_t bytes);
  void wait_all();

  // Whether a grant failed for good (the owner then stops deferring).
  bool failed() const;
  std::size_t pending() const;
  std::int64_t deferred() const;
  std::int64_t failures() const;
  std::string last_error() const;

 private:
  struct Job {
    std::uintptr_t addr;
    std::size_t bytes;
    std::uint64_t number;
  };
  static constexpr int kAttempts = 3;

  void run();
  void wait_until(std::unique_lock<std::mutex>& lock, std::uint64_t number);

  Grant grant_;
  std::uint64_t* published_;
  mutable std::mutex mutex_;
  std::condition_variable work_;
  std::condition_variable done_;
  std::deque<Job> queue_;  // queued and running (the front runs), in number order
  std::uint64_t issued_ = 0;
  std::uint64_t completed_ = 0;
  std::int64_t failures_ = 0;
  std::string last_error_;
  bool stop_ = false;
  std::thread worker_;  // last: started once everything above exists
};

}  // namespace vmm
