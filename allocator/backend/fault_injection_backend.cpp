#include "backend/fault_injection_backend.hpp"

#include <stdexcept>

namespace vmm {

BackendOp parse_backend_op(const std::string& name) {
  if (name == "reserve") return BackendOp::kReserve;
  if (name == "create_chunk") return BackendOp::kCreateChunk;
  if (name == "map") return BackendOp::kMap;
  if (name == "set_access") return BackendOp::kSetAccess;
  if (name == "unmap") return BackendOp::kUnmap;
  if (name == "copy_many") return BackendOp::kCopyMany;
  throw std::invalid_argument("unknown backend operation '" + name +
                              "'; allowed: reserve, create_chunk, map, set_access, unmap, copy_many");
}

FaultInjectionBackend::FaultInjectionBackend(std::shared_ptr<Backend> inner) : inner_(std::move(inner)) {
  if (!inner_) throw std::invalid_argument("FaultInjectionBackend needs a backend to wrap");
}

void FaultInjectionBackend::fail(BackendOp op, int skip, int count) {
  if (skip < 0 || count < 1) throw std::invalid_argument("fail: need skip >= 0 and count >= 1");
  std::lock_guard<std::mutex> lock(mutex_);
  Plan& plan = plans_[static_cast<std::size_t>(op)];
  plan.fail_from = plan.calls + skip;
  plan.fail_until = plan.fail_from + count;
}

long FaultInjectionBackend::calls(BackendOp op) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return plans_[static_cast<std::size_t>(op)].calls;
}

void FaultInjectionBackend::maybe_fail(BackendOp op, const char* what) {
  std::lock_guard<std::mutex> lock(mutex_);
  Plan& plan = plans_[static_cast<std::size_t>(op)];
  const long index = plan.calls++;
  if (index < plan.fail_from || index >= plan.fail_until) return;
  if (op == BackendOp::kCreateChunk) {
    throw DeviceOutOfMemory(std::string("injected failure of ") + what);
  }
  throw BackendError(std::string("injected failure of ") + what);
}

void FaultInjectionBackend::hold_events() {
  std::lock_guard<std::mutex> lock(mutex_);
  holding_ = true;
}

void FaultInjectionBackend::release_events() {
  std::lock_guard<std::mutex> lock(mutex_);
  holding_ = false;
  held_.clear();
}

EventId FaultInjectionBackend::record_event(StreamId stream) {
  const EventId inner = inner_->record_event(stream);
  std::lock_guard<std::mutex> lock(mutex_);
  const EventId event = next_event_++;
  events_.emplace(event, inner);
  if (holding_) held_.insert(event);
  return event;
}

EventId FaultInjectionBackend::inner_event(EventId event) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = events_.find(event);
  if (it == events_.end()) throw BackendError("fault injection: unknown event");
  return it->second;
}

bool FaultInjectionBackend::event_done(EventId event) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (held_.count(event) != 0) return false;
  }
  return inner_->event_done(inner_event(event));
}

void FaultInjectionBackend::stream_wait_event(StreamId stream, EventId event) {
  inner_->stream_wait_event(stream, inner_event(event));
}

void FaultInjectionBackend::wait_event(EventId event) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    held_.erase(event);
  }
  inner_->wait_event(inner_event(event));
}

void FaultInjectionBackend::release_event(EventId event) {
  const EventId inner = inner_event(event);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.erase(event);
    held_.erase(event);
  }
  inner_->release_event(inner);
}

void FaultInjectionBackend::synchronize() {
  inner_->synchronize();
  release_events();
}

std::uintptr_t FaultInjectionBackend::reserve(std::size_t bytes) {
  maybe_fail(BackendOp::kReserve, "reserve");
  return inner_->reserve(bytes);
}

ChunkHandle FaultInjectionBackend::create_chunk(std::size_t bytes) {
  maybe_fail(BackendOp::kCreateChunk, "create_chunk");
  return inner_->create_chunk(bytes);
}

void FaultInjectionBackend::map(std::uintptr_t addr, ChunkHandle chunk, std::size_t bytes) {
  maybe_fail(BackendOp::kMap, "map");
  inner_->map(addr, chunk, bytes);
}

void FaultInjectionBackend::set_access(std::uintptr_t addr, std::size_t bytes) {
  maybe_fail(BackendOp::kSetAccess, "set_access");
  inner_->set_access(addr, bytes);
}

void FaultInjectionBackend::set_peer_access(std::uintptr_t addr, std::size_t bytes, int peer) {
  maybe_fail(BackendOp::kSetAccess, "set_peer_access");
  inner_->set_peer_access(addr, bytes, peer);
}

}  // namespace vmm
