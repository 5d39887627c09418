#include "deferred_grants.hpp"

#include <exception>
#include <utility>

namespace vmm {

DeferredGrants::DeferredGrants(Grant grant, std::uint64_t* published)
    : grant_(std::move(grant)), published_(published) {
  __atomic_store_n(published_, std::uint64_t{0}, __ATOMIC_RELEASE);
  worker_ = std::thread([this] { run(); });
}

DeferredGrants::~DeferredGrants() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_.notify_all();
  worker_.join();
}

std::uint64_t DeferredGrants::enqueue(std::uintptr_t addr, std::size_t bytes) {
  std::uint64_t number = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    number = ++issued_;
    queue_.push_back(Job{addr, bytes, number});
  }
  work_.notify_one();
  return number;
}

void DeferredGrants::wait_until(std::unique_lock<std::mutex>& lock, std::uint64_t number) {
  done_.wait(lock, [&] { return completed_ >= number; });
}

void DeferredGrants::wait_overlapping(std::uintptr_t addr, std::size_t bytes) {
  std::unique_lock<std::mutex> lock(mutex_);
  std::uint64_t last = 0;
  for (const Job& job : queue_) {
    if (job.addr < addr + bytes && addr < job.addr + job.bytes) last = job.number;
  }
  if (last != 0) wait_until(lock, last);
}

void DeferredGrants::wait_all() {
  std::unique_lock<std::mutex> lock(mutex_);
  wait_until(lock, issued_);
}

void DeferredGrants::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and every grant ran
    const Job job = queue_.front();  // stays queued while it runs: waiters see it
    lock.unlock();
    std::string error;
    bool granted = false;
    for (int attempt = 0; attempt < kAttempts && !granted; ++attempt) {
      try {
        grant_(job.addr, job.bytes);
        granted = true;
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    lock.lock();
    if (!granted) {
      ++failures_;
      last_error_ = std::move(error);
    }
    queue_.pop_front();
    completed_ = job.number;
    __atomic_store_n(published_, job.number, __ATOMIC_RELEASE);
    done_.notify_all();
  }
}

bool DeferredGrants::failed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failures_ > 0;
}

std::size_t DeferredGrants::pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size();
}

std::int64_t DeferredGrants::deferred() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<std::int64_t>(issued_);
}

std::int64_t DeferredGrants::failures() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failures_;
}

std::string DeferredGrants::last_error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_error_;
}

}  // namespace vmm
