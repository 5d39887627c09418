// Which memory a request on one stream may reuse without making that stream wait.
//
// Note [Streams before stitches]
// Memory last used on stream X serves a request on stream S only behind a GPU-side wait:
// S waits for an event recorded on X now, that is for everything queued on X so far, not
// just for the work that used the memory (Note [Stream-ordered reuse]). Under FSDP2 that
// chains the compute stream to the all-gather and reduce-scatter streams: a compute-stream
// allocation that reuses an all-gather buffer's chunks stalls until the all-gather queued
// for the next layer has finished, and the overlap FSDP2 is built for is gone. PyTorch's
// allocator never does this (each stream has its own pool). So a request first takes only
// memory that needs no wait: last used on S, known idle (kNoStream), or, in kWhenIdle,
// last used on a stream X whose queued work has all finished (one event query per stream
// per request, and only once S's own memory did not serve). Growth within the slack comes
// next; a wait comes only after that (Note [Growth slack] still bounds memory). kAlways is
// the plain policy: any stream's memory, waiting where needed (for comparisons).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>

#include "backend.hpp"
#include "chunk_pool.hpp"
#include "config.hpp"

namespace vmm {

class StreamAffinity {
 public:
  // `errors` counts failed event calls; a stream whose state cannot be read counts as busy.
  StreamAffinity(Backend& backend, StreamId stream, CrossStreamReuse mode, std::int64_t& errors)
      : backend_(backend), stream_(stream), mode_(mode), errors_(errors) {}

  // Whether memory last used on `last` serves this request with no wait.
  bool no_wait(StreamId last) {
    if (last == stream_ || last == kNoStream) return true;
    if (mode_ != CrossStreamReuse::kWhenIdle) return false;
    for (std::size_t i = 0; i < known_; ++i) {
      if (streams_[i] == last) return idle_[i];
    }
    const bool idle = query_idle(last);
    if (known_ < kRemembered) {
      streams_[known_] = last;
      idle_[known_] = idle;
      ++known_;
    }
    return idle;
  }

  StreamId stream() const { return stream_; }

 private:
  static constexpr std::size_t kRemembered = 8;

  bool query_idle(StreamId other) {
    EventId event = 0;
    bool done = false;
    try {
      event = backend_.record_event(other);
      done = backend_.event_done(event);
    } catch (const std::exception&) {
      ++errors_;
      done = false;
    }
    if (event != 0) {
      try {
        backend_.release_event(event);
      } catch (const std::exception&) {
        ++errors_;
      }
    }
    return done;
  }

  Backend& backend_;
  StreamId stream_;
  CrossStreamReuse mode_;
  std::int64_t& errors_;
  StreamId streams_[kRemembered] = {};
  bool idle_[kRemembered] = {};
  std::size_t known_ = 0;
};

}  // namespace vmm
