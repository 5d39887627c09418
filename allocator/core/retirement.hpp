// What the mapping cache and the virtual pages share about memory given up while the GPU
// may still use it (Note [Stream-ordered reuse], Note [KV pages]): an entry waits on an
// event, and only once the event completes is its memory unmapped.
#pragma once

#include <cstdint>
#include <exception>
#include <utility>
#include <vector>

#include "backend/backend.hpp"

namespace vmm {

// Runs a cleanup step that must not throw (rollback, retirement); a failure is counted in
// `errors` instead, and the step's effect is simply missing. Returns whether it succeeded.
template <typename F>
bool count_failure(std::int64_t& errors, F&& cleanup) noexcept {
  try {
    cleanup();
    return true;
  } catch (const std::exception&) {
    ++errors;
    return false;
  }
}

// For every entry whose `event` has completed (each one when `wait`: the caller synchronized
// the device; an event of 0 counts as completed), releases the event and calls
// finish(entry); the others stay, in order. A failing event query keeps the entry for the
// next call and is counted in `errors`.
template <typename Entry, typename Finish>
void finish_completed(std::vector<Entry>& entries, bool wait, Backend& backend, std::int64_t& errors,
                      Finish&& finish) {
  std::size_t kept = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    Entry& entry = entries[i];
    bool done = wait || entry.event == 0;
    if (!done) {
      try {
        done = backend.event_done(entry.event);
      } catch (const std::exception&) {
        ++errors;
      }
    }
    if (!done) {
      // Never self-move: an entry moved onto itself may come out empty.
      if (kept != i) entries[kept] = std::move(entry);
      ++kept;
      continue;
    }
    if (entry.event != 0) count_failure(errors, [&] { backend.release_event(entry.event); });
    finish(entry);
  }
  entries.resize(kept);
}

}  // namespace vmm
