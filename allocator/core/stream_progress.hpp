// How far the GPU has got on each stream, learnt without blocking the host.
//
// Note [Stream progress]
// Unmapping a range that a kernel may still read is a fault (the driver does not wait:
// docs/FACTS.md), so remapping a slot of an idle mapping in place (Note [Repairing blocked
// mappings]) needs the mapping's last use finished. Releases are numbered in order; an
// event recorded on stream S when the count was r completes once every use released on S
// up to r has finished. Events are recorded only when a question could not be answered
// (a few per stream, and at most one per kEventSpacing releases), and queried at the next
// question that one of them can answer. So the
// answer "finished" is always true; "not known yet" may be said of work that is in fact
// done, and the caller then does what it did before (a stitch). On the host backend every
// event completes when recorded.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.hpp"

namespace vmm {

class StreamProgress {
 public:
  StreamProgress(Backend& backend, std::int64_t& errors) : backend_(backend), errors_(errors) {}
  ~StreamProgress() { forget(); }
  StreamProgress(const StreamProgress&) = delete;
  StreamProgress& operator=(const StreamProgress&) = delete;

  // Whether the work queued on `stream` up to release number `release` has finished. When
  // that is not known yet, records an event on `stream` at release number `now` (unless
  // one recorded at or after `release` is pending) so that a later question can tell.
  bool finished(StreamId stream, std::uint64_t release, std::uint64_t now);
  // The device was synchronized: every event is done and no longer needed.
  void forget();

  std::int64_t events_recorded = 0;

 private:
  struct Pending {
    std::uint64_t release;
    EventId event;
  };
  struct Track {
    StreamId stream;
    std::uint64_t finished = 0;    // releases on `stream` up to this one have finished
    std::vector<Pending> pending;  // in recording order, so in completion order
  };
  // Events a stream may have in flight; a question beyond them waits for the next one.
  static constexpr std::size_t kMaxPending = 4;
  // Releases between two events of one stream: questions about releases newer than the
  // last event wait for the next one, so a loop that asks after every release records an
  // event per kEventSpacing releases, not per question.
  static constexpr std::uint64_t kEventSpacing = 64;

  Track& track(StreamId stream);
  void poll(Track& track);

  Backend& backend_;
  std::int64_t& errors_;
  std::vector<Track> tracks_;  // few streams: a linear search beats a map
};

}  // namespace vmm
