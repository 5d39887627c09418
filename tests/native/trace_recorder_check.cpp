// Drives the torch adapter's TraceRecorder (allocator/torch_adapter/trace_recorder.h) on a
// machine without a GPU: built by tests/test_trace_recorder.py against the installed torch's
// c10 and loaded into the test's process with ctypes, over vmmalloc's C table on host-backend
// devices. Each function does what the adapter does around the same core call, so the
// merged trace is the one a GPU run gives torch. A context is a numbered GatheredContext.
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "adapter_abi.h"
#include "trace_recorder.h"

namespace {

const vmm_adapter_api* core = nullptr;
std::unique_ptr<vmm_torch::TraceRecorder> recorder;
int contexts_made = 0;

struct NumberedContext final : c10::GatheredContext {
  explicit NumberedContext(int n) : number(n) {}
  int number;
};

std::shared_ptr<c10::GatheredContext> make_context() {
  return std::make_shared<NumberedContext>(++contexts_made);
}

int number_of(const std::shared_ptr<c10::GatheredContext>& context) {
  auto* numbered = dynamic_cast<NumberedContext*>(context.get());
  return numbered != nullptr ? numbered->number : 0;
}

const char* action_name(c10::CachingDeviceAllocator::TraceEntry::Action action) {
  using A = c10::CachingDeviceAllocator::TraceEntry::Action;
  switch (action) {
    case A::ALLOC:
      return "alloc";
    case A::FREE_REQUESTED:
      return "free_requested";
    case A::FREE_COMPLETED:
      return "free_completed";
    case A::SEGMENT_ALLOC:
      return "segment_alloc";
    case A::SEGMENT_FREE:
      return "segment_free";
    case A::SEGMENT_MAP:
      return "segment_map";
    case A::SEGMENT_UNMAP:
      return "segment_unmap";
    case A::SNAPSHOT:
      return "snapshot";
    case A::OOM:
      return "oom";
  }
  return "?";
}

}  // namespace

#define CHECK_EXPORT extern "C" __attribute__((visibility("default")))

// when: 0 never, 1 state, 2 alloc, 3 all (torch's RecordContext). skip: comma-separated.
CHECK_EXPORT void check_configure(const vmm_adapter_api* api, int enabled, int when, size_t max_entries,
                                  int clear, const char* skip, int device_count) {
  if (recorder == nullptr) {
    core = api;
    recorder = std::make_unique<vmm_torch::TraceRecorder>(&core);
  }
  std::vector<std::string> skipped;
  std::string names = skip;
  for (size_t at = 0; at < names.size();) {
    const size_t comma = names.find(',', at);
    skipped.push_back(names.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    at = comma == std::string::npos ? names.size() : comma + 1;
  }
  recorder->configure(enabled != 0, &make_context, max_entries,
                      static_cast<c10::CachingDeviceAllocator::RecordContext>(when), clear != 0, skipped);
  recorder->follow_devices_in_use(device_count);
}

// As VmmAllocator::malloc_on. Returns the pointer, or 0 when the core refused (status in *status).
CHECK_EXPORT void* check_malloc(size_t size, int device, uintptr_t stream, int* status) {
  std::shared_ptr<c10::GatheredContext> context;
  const bool traced = recorder->on();
  if (traced) context = recorder->begin_allocation(device);
  void* out = nullptr;
  *status = core->allocate(size, device, reinterpret_cast<void*>(stream), &out);
  if (*status != VMM_OK) return nullptr;
  if (traced) recorder->record_alloc(device, out, size, stream, std::move(context));
  return out;
}

// As free_block in torch_adapter.cpp.
CHECK_EXPORT int check_free(void* ptr) {
  size_t size = 0;
  int device = 0;
  const bool known = core->allocation_info(ptr, &size, &device) == VMM_OK;
  if (known && recorder->on()) recorder->record_free(ptr, size, device);
  return core->deallocate_checked(ptr);
}

CHECK_EXPORT void check_set_user_metadata(const char* metadata) { recorder->set_user_metadata(metadata); }
CHECK_EXPORT void check_push_compile_context(const char* md) { recorder->push_compile_context(md); }
CHECK_EXPORT void check_pop_compile_context() { recorder->pop_compile_context(); }
CHECK_EXPORT int check_is_on() { return recorder != nullptr && recorder->on() ? 1 : 0; }
CHECK_EXPORT int check_context_of(uintptr_t addr) { return number_of(recorder->context_of(addr)); }

// The device's trace, one line per entry: action addr size stream context compile_context
// user_metadata time_us (empty strings as "-"). Returns the bytes needed.
CHECK_EXPORT size_t check_trace(int device, char* out, size_t capacity) {
  std::string text;
  for (const auto& e : recorder->trace(device)) {
    char line[512];
    std::snprintf(line, sizeof(line), "%s %zu %zu %zu %d %s %s %lld\n", action_name(e.action_), e.addr_,
                  e.size_, reinterpret_cast<size_t>(e.stream_), number_of(e.context_),
                  e.compile_context_.empty() ? "-" : e.compile_context_.c_str(),
                  e.user_metadata_.empty() ? "-" : e.user_metadata_.c_str(),
                  static_cast<long long>(e.time_.t_));
    text += line;
  }
  if (capacity > 0) {
    std::strncpy(out, text.c_str(), capacity - 1);
    out[capacity - 1] = '\0';
  }
  return text.size() + 1;
}
