// An adaptor that forwards to another backend and makes chosen calls fail, to prove that
// a failure in the middle of a stitch or a map leaks nothing and corrupts nothing.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "backend/backend.hpp"

namespace vmm {

enum class BackendOp { kReserve, kCreateChunk, kMap, kSetAccess, kUnmap, kCopyMany, kCount };

// Parses "reserve", "create_chunk", "map", "set_access", "unmap", "copy_many" (a batch of
// host copies, failing before any is issued); throws std::invalid_argument
// naming the allowed values otherwise.
BackendOp parse_backend_op(const std::string& name);

class FaultInjectionBackend final : public Backend {
 public:
  explicit FaultInjectionBackend(std::shared_ptr<Backend> inner);

  // The next `skip` calls of `op` succeed, then `count` calls fail (create_chunk failures
  // throw DeviceOutOfMemory, others BackendError), then calls succeed again.
  void fail(BackendOp op, int skip, int count = 1);
  // Calls of `op` made so far (successful or not).
  long calls(BackendOp op) const;
  // While held, events recorded from now on stay "in flight" (event_done is false) until
  // release_events() or synchronize(): stream work that has not finished yet, on any
  // backend, including the host's, whose own events complete at once.
  void hold_events();
  void release_events();

  Kind kind() const override { return inner_->kind(); }
  std::string name() const override { return "fault-injection(" + inner_->name() + ")"; }
  int device() const override { return inner_->device(); }
  std::size_t total_memory() const override { return inner_->total_memory(); }
  std::size_t free_memory() const override { return inner_->free_memory(); }
  std::uintptr_t reserve(std::size_t bytes) override;
  void unreserve(std::uintptr_t addr, std::size_t bytes) override { inner_->unreserve(addr, bytes); }
  ChunkHandle create_chunk(std::size_t bytes) override;
  void release_chunk(ChunkHandle chunk) override { inner_->release_chunk(chunk); }
  void map(std::uintptr_t addr, ChunkHandle chunk, std::size_t bytes) override;
  void unmap(std::uintptr_t addr, std::size_t bytes) override {
    maybe_fail(BackendOp::kUnmap, "unmap");
    inner_->unmap(addr, bytes);
  }
  void set_access(std::uintptr_t addr, std::size_t bytes) override;
  bool add_peer(int peer) override { return inner_->add_peer(peer); }
  // Fails like set_access (the same counter): a grant is a grant.
  void set_peer_access(std::uintptr_t addr, std::size_t bytes, int peer) override;
  std::vector<int> peers() const override { return inner_->peers(); }
  EventId record_event(StreamId s) override;
  bool event_done(EventId e) override;
  void stream_wait_event(StreamId s, EventId e) override;
  void release_event(EventId e) override;
  // Waiting completes a held event (what the stream work it stands for would do).
  void wait_event(EventId e) override;
  void synchronize() override;
  bool is_capturing(StreamId s) override { return inner_->is_capturing(s); }
  int relax_capture_mode() override { return inner_->relax_capture_mode(); }
  void restore_capture_mode(int mode) override { inner_->restore_capture_mode(mode); }
  void copy_from_host(std::uintptr_t dst, const void* src, std::size_t n) override {
    inner_->copy_from_host(dst, src, n);
  }
  bool pin_host(void* address, std::size_t n) override { return inner_->pin_host(address, n); }
  void unpin_host(void* address) override { inner_->unpin_host(address); }
  SharedHandle export_handle(ChunkHandle chunk, std::size_t n) override {
    return inner_->export_handle(chunk, n);
  }
  ChunkHandle import_handle(int fd, std::uint64_t offset, std::size_t n) override {
    return inner_->import_handle(fd, offset, n);
  }
  void copy_to_host(void* dst, std::uintptr_t src, std::size_t n) override {
    inner_->copy_to_host(dst, src, n);
  }
  void copy_many_to_host(const std::vector<HostCopy>& copies) override {
    maybe_fail(BackendOp::kCopyMany, "copy_many_to_host");
    inner_->copy_many_to_host(copies);
  }
  void copy_many_from_host(const std::vector<HostCopy>& copies) override {
    maybe_fail(BackendOp::kCopyMany, "copy_many_from_host");
    inner_->copy_many_from_host(copies);
  }

 private:
  struct Plan {
    long calls = 0;
    long fail_from = -1;  // call index of the first failure; -1: none planned
    long fail_until = -1;
  };
  // Counts the call and throws if it is planned to fail.
  void maybe_fail(BackendOp op, const char* what);

  std::shared_ptr<Backend> inner_;
  mutable std::mutex mutex_;
  std::array<Plan, static_cast<std::size_t>(BackendOp::kCount)> plans_{};
  // Events get ids of their own (the host backend reuses one id for all), mapped to the
  // inner backend's events.
  EventId inner_event(EventId event) const;
  std::map<EventId, EventId> events_;
  EventId next_event_ = 1;
  bool holding_ = false;
  std::set<EventId> held_;  // recorded while holding, not yet released
};

}  // namespace vmm
