#include "core/event_log.hpp"

namespace vmm {

// Lower-case names, PyTorch's where its snapshots have the same event.
const char* event_kind_name(EventKind kind) {
  switch (kind) {
    case EventKind::kAlloc:
      return "alloc";
    case EventKind::kFreeRequested:
      return "free_requested";
    case EventKind::kFreeCompleted:
      return "free_completed";
    case EventKind::kGrow:
      return "grow";
    case EventKind::kRelease:
      return "release";
    case EventKind::kStitch:
      return "stitch";
    case EventKind::kMap:
      return "map";
    case EventKind::kUnmap:
      return "unmap";
    case EventKind::kOom:
      return "oom";
  }
  return "unknown";
}

}  // namespace vmm
