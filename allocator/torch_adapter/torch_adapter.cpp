// The torch adapter: vmmalloc as torch's CUDAAllocator, so that torch's own functions, from
// Python and from C++, reach vmmalloc where CUDAPluggableAllocator's C hooks cannot: CUDA
// graph pools and graph-tree checkpoints, torch.cuda.MemPool, device statistics, OOM
// observers, cacheInfo (cuDNN benchmarking).
//
// Built against the running torch on first use and cached (vmmalloc.torch_adapter), since
// torch's C++ ABI changes between releases; vmmalloc._C links neither torch nor CUDA. It
// holds no allocation policy: every call goes to the core through the C table of
// adapter_abi.h.
//
// Note [Adapter over the pluggable allocator]
// The adapter subclasses torch::cuda::CUDAPluggableAllocator rather than implementing
// CUDAAllocator from scratch: the base implements every method torch adds in a release
// (with an error or a no-op), so one source builds against torch 2.11 to 2.13, whose
// interfaces differ (2.13 adds markCaptureBegin/End, attachOomRejectionObserver,
// allocateWithAddress, ...). Every method overridden here has the same signature in 2.11
// and 2.13 (checked by compiling against both). What it overrides replaces the base's
// bookkeeping as well: the base keeps a locked map of every allocation, the adapter keeps
// none (a DataPtr's context is its pointer, and the core finds the pointer's device).
// Memory history and snapshots: trace_recorder.h (Note [Adapter history]); CUDA IPC:
// ipc_handles.h (Note [Adapter IPC]). Left to the base, which raises "does not yet
// support": allocator trace trackers, OOM-rejection observers.
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "adapter_abi.h"
#include "ipc_handles.h"
#include "trace_recorder.h"

namespace {

namespace cca = c10::cuda::CUDACachingAllocator;
using PluggableBase = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;

const vmm_adapter_api* core = nullptr;

vmm_pool_id pool_of(c10::MempoolId_t id) { return {id.first, id.second}; }

// A failed core call, as torch's exception: torch.OutOfMemoryError or RuntimeError.
void check(int status) {
  if (status == VMM_OK) return;
  const std::string message = core->last_error();
  if (status == VMM_OUT_OF_MEMORY) TORCH_CHECK_WITH(OutOfMemoryError, false, message);
  TORCH_CHECK(false, message);
}

// Leaked on purpose, as the core's registry: tensors are freed during interpreter teardown,
// after static destructors have run, and their frees still reach it.
vmm_torch::TraceRecorder& history = *new vmm_torch::TraceRecorder(&core);
// Leaked for the same reason: receivers' tensors die during teardown too.
vmm_torch::IpcHandles& ipc = *new vmm_torch::IpcHandles(&core);

// torch's memory profiler (torch.profiler with profile_memory=True) learns of every
// allocation and free with the totals after it, as from PyTorch's allocator.
void report_to_profiler(void* ptr, int64_t delta, int device) {
  int64_t allocated = 0, reserved = 0;
  if (core->memory_totals(device, &allocated, &reserved) != VMM_OK) return;
  c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(allocated), static_cast<size_t>(reserved),
                                   c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
}

// Frees `ptr`; `checked`: a pointer vmmalloc does not hold is an error status, else it is
// reported on stderr and ignored (deleters must not throw).
// The history and the profiler are told on a best-effort basis: a failure there (out of
// host memory, an error from torch's recorder) is reported once and never stops the free.
int free_block(void* ptr, bool checked) {
  if (C10_UNLIKELY(history.on() || c10::memoryProfilingEnabled())) {
    size_t size = 0;
    int device = 0;
    const bool known = core->allocation_info(ptr, &size, &device) == VMM_OK;
    try {
      if (known && history.on()) history.record_free(ptr, size, device);
    } catch (const std::exception& e) {
      TORCH_WARN_ONCE("vmmalloc: recording a free in the memory history failed: ", e.what());
    }
    int status = VMM_OK;
    if (checked)
      status = core->deallocate_checked(ptr);
    else
      core->deallocate(ptr);
    try {
      if (known && status == VMM_OK && c10::memoryProfilingEnabled()) {
        report_to_profiler(ptr, -static_cast<int64_t>(size), device);
      }
    } catch (const std::exception& e) {
      TORCH_WARN_ONCE("vmmalloc: reporting a free to torch's profiler failed: ", e.what());
    }
    return status;
  }
  if (checked) return core->deallocate_checked(ptr);
  core->deallocate(ptr);
  return VMM_OK;
}

// A DataPtr's deleter: never throws (a bad free is reported on stderr and ignored).
void delete_block(void* ptr) {
  if (ptr != nullptr) free_block(ptr, false);
}

// A pool's live set, as a graph tree's checkpoint keeps it (Note [Private pools]).
struct PoolState final : cca::AllocatorState {
  c10::DeviceIndex device = 0;
  c10::MempoolId_t pool{0, 0};
  std::vector<vmm_block> blocks;
};

void collect_block(void* context, const vmm_block* block) {
  static_cast<std::vector<vmm_block>*>(context)->push_back(*block);
}

std::vector<vmm_block> pool_blocks(c10::DeviceIndex device, c10::MempoolId_t pool) {
  std::vector<vmm_block> blocks;
  check(core->pool_allocations(device, pool_of(pool), collect_block, &blocks));
  return blocks;
}

int run_filter(void* context, void* stream) {
  try {
    return (*static_cast<std::function<bool(cudaStream_t)>*>(context))(static_cast<cudaStream_t>(stream)) ? 1
                                                                                                          : 0;
  } catch (...) {
    return 0;  // a filter that cannot answer routes nothing
  }
}

void drop_filter(void* context) { delete static_cast<std::function<bool(cudaStream_t)>*>(context); }

// Statistics: the core reports PyTorch's key names; DeviceStats holds the same figures.
struct StatsFiller {
  c10::CachingDeviceAllocator::DeviceStats* stats;
};

void fill_stat(void* context, const char* key, int64_t value) {
  auto& s = *static_cast<StatsFiller*>(context)->stats;
  const std::string name = key;
  const auto dot = name.find('.');
  const std::string head = name.substr(0, dot);
  const std::string rest = dot == std::string::npos ? "" : name.substr(dot + 1);
  if (rest.empty()) {
    if (head == "num_alloc_retries")
      s.num_alloc_retries = value;
    else if (head == "num_ooms")
      s.num_ooms = value;
    else if (head == "num_sync_all_streams")
      s.num_sync_all_streams = value;
    else if (head == "num_device_alloc")
      s.num_device_alloc = value;
    else if (head == "num_device_free")
      s.num_device_free = value;
    else if (head == "max_split_size")
      s.max_split_size = value;
    return;
  }
  c10::CachingDeviceAllocator::StatArray* array = nullptr;
  if (head == "allocation")
    array = &s.allocation;
  else if (head == "segment")
    array = &s.segment;
  else if (head == "active")
    array = &s.active;
  else if (head == "inactive_split")
    array = &s.inactive_split;
  else if (head == "allocated_bytes")
    array = &s.allocated_bytes;
  else if (head == "reserved_bytes")
    array = &s.reserved_bytes;
  else if (head == "active_bytes")
    array = &s.active_bytes;
  else if (head == "inactive_split_bytes")
    array = &s.inactive_split_bytes;
  else if (head == "requested_bytes")
    array = &s.requested_bytes;
  c10::CachingDeviceAllocator::Stat* stat = nullptr;
  std::string metric = rest;
  if (array != nullptr) {
    const auto second = rest.find('.');
    if (second == std::string::npos) return;
    const std::string which = rest.substr(0, second);
    metric = rest.substr(second + 1);
    if (which == "all")
      stat = &(*array)[0];
    else if (which == "small_pool")
      stat = &(*array)[1];
    else if (which == "large_pool")
      stat = &(*array)[2];
  } else if (head == "oversize_allocations") {
    stat = &s.oversize_allocations;
  } else if (head == "oversize_segments") {
    stat = &s.oversize_segments;
  }
  if (stat == nullptr) return;
  if (metric == "current")
    stat->current = value;
  else if (metric == "peak")
    stat->peak = value;
  else if (metric == "allocated")
    stat->allocated = value;
  else if (metric == "freed")
    stat->freed = value;
}

// A snapshot's segments in torch's form (blocks tile a segment, in address order, as torch's
// conversion expects); a pool id other than (0, 0) keeps that pool's segments only.
struct SegmentCollector {
  cca::SnapshotInfo* info;
  c10::MempoolId_t pool;
  int device;
};

void collect_segment(void* context, const vmm_segment* s) {
  auto& c = *static_cast<SegmentCollector*>(context);
  const bool every_pool = c.pool.first == 0 && c.pool.second == 0;
  if (!every_pool && (s->pool.first != c.pool.first || s->pool.second != c.pool.second)) return;
  c10::CachingDeviceAllocator::SegmentInfo segment;
  segment.device = static_cast<c10::DeviceIndex>(c.device);
  segment.address = s->base;
  segment.total_size = s->size;
  segment.stream = reinterpret_cast<void*>(s->stream);
  segment.is_large = s->kind != VMM_SEGMENT_SMALL;
  segment.is_expandable = s->kind == VMM_SEGMENT_PAGES || s->kind == VMM_SEGMENT_FREE;
  segment.owner_private_pool_id = {s->pool.first, s->pool.second};
  for (size_t i = 0; i < s->block_count; ++i) {
    const vmm_snapshot_block& b = s->blocks[i];
    c10::CachingDeviceAllocator::BlockInfo block;
    block.size = b.size;
    block.requested_size = b.requested;
    block.allocated = b.state == VMM_BLOCK_ACTIVE;
    block.active = b.state != VMM_BLOCK_INACTIVE;
    if (block.active) block.context_when_allocated = history.context_of(b.addr);
    segment.requested_size += b.requested;
    if (block.allocated) segment.allocated_size += b.size;
    if (block.active) segment.active_size += b.size;
    segment.blocks.push_back(std::move(block));
  }
  if (s->kind == VMM_SEGMENT_LARGE && !segment.blocks.empty()) {
    segment.context_when_allocated = segment.blocks.front().context_when_allocated;
  }
  c.info->segments.push_back(std::move(segment));
}

void record_freed(void* context, uintptr_t ptr) {
  static_cast<std::vector<void*>*>(context)->push_back(reinterpret_cast<void*>(ptr));
}

class VmmAllocator final : public PluggableBase {
 public:
  VmmAllocator()
      : PluggableBase(
            [](size_t size, int device, cudaStream_t stream) {
              return malloc_on(size, static_cast<c10::DeviceIndex>(device), stream);
            },
            [](void* ptr, size_t, int, cudaStream_t) { delete_block(ptr); }) {}

  static void* malloc_on(size_t size, c10::DeviceIndex device, cudaStream_t stream) {
    const bool traced = history.on();
    std::shared_ptr<c10::GatheredContext> context;
    if (C10_UNLIKELY(traced)) context = history.begin_allocation(device);
    void* out = nullptr;
    const int status = core->allocate(size, device, stream, &out);
    if (status == VMM_OUT_OF_MEMORY) notify_oom(device, size);
    check(status);
    try {
      if (C10_UNLIKELY(traced)) {
        history.record_alloc(device, out, size, reinterpret_cast<uintptr_t>(stream), std::move(context));
      }
      if (C10_UNLIKELY(c10::memoryProfilingEnabled())) {
        size_t bytes = size;
        core->allocation_size(out, &bytes);
        report_to_profiler(out, static_cast<int64_t>(bytes), device);
      }
    } catch (...) {
      core->deallocate(out);  // the caller gets the error, not a block nobody owns
      throw;
    }
    return out;
  }

  c10::DataPtr allocate(size_t size) override {
    const c10::DeviceIndex device = c10::cuda::current_device();
    // As PyTorch's allocator: no memory for 0 bytes, and a deleter that accepts null.
    void* ptr =
        size == 0 ? nullptr : malloc_on(size, device, c10::cuda::getCurrentCUDAStream(device).stream());
    return {ptr, ptr, &delete_block, c10::Device(c10::DeviceType::CUDA, device)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }
  void* raw_alloc(size_t nbytes) override {
    if (nbytes == 0) return nullptr;
    const c10::DeviceIndex device = c10::cuda::current_device();
    return malloc_on(nbytes, device, c10::cuda::getCurrentCUDAStream(device).stream());
  }
  void* raw_alloc_with_stream(size_t nbytes, cudaStream_t stream) override {
    if (nbytes == 0) return nullptr;
    return malloc_on(nbytes, c10::cuda::current_device(), stream);
  }
  // Called directly (graph trees, torch._C._cuda_cudaCachingAllocator_raw_delete): a bad
  // pointer is an error here, as in PyTorch.
  void raw_delete(void* ptr) override {
    if (ptr != nullptr) check(free_block(ptr, true));
  }

  void setMemoryFraction(double fraction, c10::DeviceIndex device) override {
    check(core->set_memory_fraction(device, fraction));
  }
  double getMemoryFraction(c10::DeviceIndex device) override {
    double fraction = 1.0;
    check(core->memory_fraction(device, &fraction));
    return fraction;
  }
  // A private pool gives its memory back by itself once released and empty (Note
  // [Private pools]), so emptying one is nothing to do.
  void emptyCache(c10::MempoolId_t pool) override {
    if (pool.first == 0 && pool.second == 0) check(core->empty_cache());
  }
  std::vector<cca::StreamSegmentSize> getExpandableSegmentSizes(c10::DeviceIndex) override {
    return {};  // vmmalloc has no expandable segments
  }
  void cacheInfo(c10::DeviceIndex device, size_t* largestBlock) override {
    check(core->largest_free_block(device, largestBlock));
  }
  void* getBaseAllocation(void* ptr, size_t* size) override {
    // Every allocation is its own base: blocks are never handed out in pieces.
    if (size != nullptr && core->allocation_size(ptr, size) != VMM_OK) *size = 0;
    return ptr;
  }
  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    // As PyTorch's allocator: memory it did not allocate is left alone.
    if (ptr.get() == nullptr || ptr.get_deleter() != &delete_block) return;
    check(core->record_stream(ptr.get(), stream.stream()));
  }

  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    c10::CachingDeviceAllocator::DeviceStats stats;
    StatsFiller filler{&stats};
    check(core->stats(device, fill_stat, &filler));
    return stats;
  }
  void resetAccumulatedStats(c10::DeviceIndex device) override {
    check(core->reset_accumulated_stats(device));
  }
  void resetPeakStats(c10::DeviceIndex device) override { check(core->reset_peak_stats(device)); }
  // ---- Memory history and snapshots (Note [Adapter history]) ----
  bool isHistoryEnabled() override { return history.on(); }
  void recordHistory(bool enabled, cca::CreateContextFn context_recorder, size_t alloc_trace_max_entries,
                     cca::RecordContext when, bool clearHistory,
                     const std::vector<std::string>& skip_actions) override {
    history.configure(enabled, context_recorder, alloc_trace_max_entries, when, clearHistory, skip_actions);
    history.follow_devices_in_use(c10::cuda::device_count());
  }
  void recordAnnotation(const std::vector<std::pair<std::string, std::string>>& md) override {
    history.record_annotation(c10::cuda::current_device(), md);
  }
  void pushCompileContext(std::string& md) override { history.push_compile_context(md); }
  void popCompileContext() override { history.pop_compile_context(); }
  void setUserMetadata(const std::string& metadata) override { history.set_user_metadata(metadata); }
  std::string getUserMetadata() override { return history.user_metadata(); }

  cca::SnapshotInfo snapshot(c10::MempoolId_t mempool_id, bool include_traces) override {
    cca::SnapshotInfo info{};
    info.config_metadata.max_split_size = std::numeric_limits<size_t>::max();  // no split limit
    info.config_metadata.last_allocator_settings = "vmmalloc";
    const int devices = c10::cuda::device_count();
    SegmentCollector collector{&info, mempool_id, 0};
    for (int device = 0; device < devices; ++device) {
      collector.device = device;
      check(core->segments(device, collect_segment, &collector));
    }
    if (include_traces) {
      for (int device = 0; device < devices; ++device) info.device_traces.push_back(history.trace(device));
      info.external_annotations = history.annotations();
    }
    return info;
  }

  // ---- Private pools: CUDA graphs, graph trees, MemPool (Note [Private pools]) ----
  void beginAllocateToPool(c10::DeviceIndex device, c10::MempoolId_t pool,
                           std::function<bool(cudaStream_t)> filter) override {
    auto* context = new std::function<bool(cudaStream_t)>(std::move(filter));
    check(core->begin_allocate_to_pool(device, pool_of(pool), run_filter, context, drop_filter));
  }
  void endAllocateToPool(c10::DeviceIndex device, c10::MempoolId_t pool) override {
    check(core->end_allocate_to_pool(device, pool_of(pool)));
  }
  // Runs in ~MemPool and ~CUDAGraph: it must not throw.
  void releasePool(c10::DeviceIndex device, c10::MempoolId_t pool) override {
    if (core->release_pool(device, pool_of(pool)) != VMM_OK) {
      TORCH_WARN("vmmalloc: releasing pool (", pool.first, ", ", pool.second,
                 ") failed: ", core->last_error());
    }
  }
  int getPoolUseCount(c10::DeviceIndex device, c10::MempoolId_t pool) override {
    int count = 0;
    check(core->pool_use_count(device, pool_of(pool), &count));
    return count;
  }
  void createOrIncrefPool(c10::DeviceIndex device, c10::MempoolId_t pool,
                          std::shared_ptr<cca::CUDAAllocator> allocator) override {
    TORCH_CHECK(allocator == nullptr || allocator.get() == this,
                "vmmalloc: torch.cuda.MemPool(allocator=...) with another allocator is not "
                "supported under vmmalloc, which serves every pool from its own chunks (this "
                "covers torch.cuda._use_uvm and NCCL-allocated pools too). Use MemPool() "
                "without an allocator, or run without VMMALLOC=1.");
    check(core->create_or_incref_pool(device, pool_of(pool)));
  }
  // Not refused: MemPool's constructor calls it after taking a pool reference that a
  // throw would leak. vmmalloc's out-of-memory retry releases the main cache only.
  void setUseOnOOM(c10::DeviceIndex, c10::MempoolId_t, bool use_on_oom) override {
    if (use_on_oom) {
      TORCH_WARN_ONCE(
          "vmmalloc: MemPool(use_on_oom=True) has no effect under vmmalloc: a request "
          "outside the pool is never served from the pool's memory.");
    }
  }
  void setNoSplit(c10::DeviceIndex, c10::MempoolId_t) override {
    // vmmalloc never splits a large block; small blocks are split as in every pool.
  }
  bool checkPoolLiveAllocations(c10::DeviceIndex device, c10::MempoolId_t pool,
                                const std::unordered_set<void*>& expected) override {
    const std::vector<vmm_block> blocks = pool_blocks(device, pool);
    if (blocks.size() != expected.size()) return false;
    return std::all_of(blocks.begin(), blocks.end(), [&](const vmm_block& b) {
      return expected.count(reinterpret_cast<void*>(b.ptr)) != 0;
    });
  }
  std::shared_ptr<cca::AllocatorState> getCheckpointState(c10::DeviceIndex device,
                                                          c10::MempoolId_t pool) override {
    auto state = std::make_shared<PoolState>();
    state->device = device;
    state->pool = pool;
    state->blocks = pool_blocks(device, pool);
    return state;
  }
  cca::CheckpointDelta setCheckpointPoolState(c10::DeviceIndex device,
                                              std::shared_ptr<cca::AllocatorState> as) override {
    auto state = std::dynamic_pointer_cast<PoolState>(as);
    TORCH_CHECK(state != nullptr, "vmmalloc: a checkpoint state vmmalloc did not make");
    TORCH_CHECK(state->device == device, "vmmalloc: a checkpoint of device ", state->device,
                " restored on device ", device);
    cca::CheckpointDelta delta;
    const uint64_t began_ns = vmm_torch::steady_ns();
    check(core->restore_pool(device, pool_of(state->pool), state->blocks.data(), state->blocks.size(),
                             record_freed, &delta.ptrs_freed));
    if (history.on()) {
      std::vector<vmm_torch::TraceRecorder::Made> made;
      for (const vmm_block& b : state->blocks) made.push_back({b.ptr, b.requested, b.stream});
      history.record_restore(device, began_ns, delta.ptrs_freed, made);
    }
    for (const vmm_block& b : state->blocks) {
      void* ptr = reinterpret_cast<void*>(b.ptr);
      delta.dataptrs_allocd.emplace_back(ptr, ptr, &delete_block, c10::Device(c10::DeviceType::CUDA, device));
    }
    return delta;
  }

  // ---- CUDA IPC (Note [Adapter IPC]) ----
  cca::ShareableHandle shareIpcHandle(void* ptr) override { return ipc.share(ptr); }
  std::shared_ptr<void> getIpcDevPtr(std::string handle) override {
    return ipc.open(handle, c10::cuda::current_device());
  }

  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> lock(observers_mutex());
    observers().push_back(std::move(observer));
  }

  std::string name() override { return "vmmalloc"; }

 private:
  static std::mutex& observers_mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<cca::OutOfMemoryObserver>& observers() {
    static std::vector<cca::OutOfMemoryObserver> v;
    return v;
  }
  // As PyTorch's allocator: each observer learns of an out-of-memory request before it is
  // raised, with the memory it would have taken (whole 2 MiB chunks; a small request takes a
  // 2 MiB segment, as PyTorch's small pool does) and the device's total and free memory.
  static void notify_oom(c10::DeviceIndex device, size_t size) {
    constexpr size_t kChunk = size_t{2} << 20;
    size = (size + kChunk - 1) / kChunk * kChunk;
    std::vector<cca::OutOfMemoryObserver> copy;
    {
      std::lock_guard<std::mutex> lock(observers_mutex());
      copy = observers();
    }
    if (copy.empty()) return;
    size_t total = 0, free_bytes = 0;
    if (core->device_memory(device, &total, &free_bytes) != VMM_OK) total = free_bytes = 0;
    for (const auto& observer : copy) observer(device, size, total, free_bytes);
  }
};

}  // namespace

// Makes vmmalloc torch's CUDA allocator. Returns 0, or 1 with a message in `error`.
extern "C" __attribute__((visibility("default"))) int vmm_torch_adapter_install(const vmm_adapter_api* api,
                                                                                char* error,
                                                                                size_t error_size) {
  const auto fail = [&](const std::string& message) {
    if (error_size > 0) {
      std::strncpy(error, message.c_str(), error_size - 1);
      error[error_size - 1] = '\0';
    }
    return 1;
  };
  if (api == nullptr || api->abi_version != VMM_ADAPTER_ABI_VERSION ||
      api->struct_size < sizeof(vmm_adapter_api)) {
    return fail(
        "vmmalloc's torch adapter was built for another version of vmmalloc._C; "
        "delete the adapter cache (VMMALLOC_CACHE) and run again");
  }
  try {
    core = api;
    auto allocator = std::make_shared<VmmAllocator>();
    torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(allocator);
    // changeCurrentAllocator leaves c10's allocator registry on the native allocator, which
    // torch.accelerator.* (getDeviceAllocator) reaches: register vmmalloc there too.
    c10::SetAllocator(c10::DeviceType::CUDA, allocator.get(), /*priority=*/1);
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}
