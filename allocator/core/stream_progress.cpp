#include "core/stream_progress.hpp"

#include <exception>

#include "core/retirement.hpp"

namespace vmm {

StreamProgress::Track& StreamProgress::track(StreamId stream) {
  for (Track& t : tracks_) {
    if (t.stream == stream) return t;
  }
  tracks_.push_back(Track{stream, 0, {}});
  return tracks_.back();
}

// Stream order: once an event is not done, none recorded after it on that stream is.
void StreamProgress::poll(Track& t) {
  std::size_t done = 0;
  for (; done < t.pending.size(); ++done) {
    bool finished = false;
    try {
      finished = backend_.event_done(t.pending[done].event);
    } catch (const std::exception&) {
      ++errors_;
    }
    if (!finished) break;
    t.finished = t.pending[done].release;
    count_failure(errors_, [&] { backend_.release_event(t.pending[done].event); });
  }
  t.pending.erase(t.pending.begin(), t.pending.begin() + static_cast<std::ptrdiff_t>(done));
}

bool StreamProgress::finished(StreamId stream, std::uint64_t release, std::uint64_t now) {
  Track& t = track(stream);
  if (t.finished >= release) return true;
  if (t.pending.empty() || t.pending.back().release < release) {
    // No event answers this yet. Record one, spaced: a question about the latest releases,
    // asked again and again, must not cost an event each time.
    const bool spaced = t.pending.empty() || now - t.pending.back().release >= kEventSpacing;
    if (!spaced || t.pending.size() == kMaxPending) return false;
    try {
      t.pending.reserve(t.pending.size() + 1);
      const EventId event = backend_.record_event(stream);
      t.pending.push_back(Pending{now, event});
      ++events_recorded;
    } catch (const std::exception&) {
      ++errors_;  // not known, as if the event were still in flight
      return false;
    }
  }
  poll(t);  // a stream with nothing queued is done at once
  return t.finished >= release;
}

void StreamProgress::forget() {
  for (Track& t : tracks_) {
    for (const Pending& p : t.pending) count_failure(errors_, [&] { backend_.release_event(p.event); });
  }
  tracks_.clear();
}

}  // namespace vmm
