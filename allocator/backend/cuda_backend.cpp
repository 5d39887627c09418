#include "backend/cuda_backend.hpp"

#include "backend/host_pinning.hpp"
#include "backend/process_descriptors.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <utility>

namespace vmm {
namespace {

// Released events beyond this many are destroyed rather than pooled, so a burst of
// outstanding events does not pin driver resources for the rest of the process.
constexpr std::size_t kMaxPooledEvents = 1024;

const cu::DriverApi& require_driver() {
  const cu::DriverApi* api = cu::driver_api();
  if (api == nullptr) throw BackendError(cu::driver_unavailable_reason());
  return *api;
}

std::string hex(std::uint64_t value) {
  char buffer[2 + 16 + 1];
  std::snprintf(buffer, sizeof buffer, "0x%llx", static_cast<unsigned long long>(value));
  return buffer;
}
std::string hex(const void* pointer) { return hex(reinterpret_cast<std::uintptr_t>(pointer)); }

std::string failure(int device, cu::CUresult result, const std::string& call) {
  return "cuda backend (device " + std::to_string(device) + "): " + call +
         " failed: " + cu::result_text(result);
}

// Throws BackendError for a failed driver call. `call` names the call and its arguments;
// it is only invoked on failure, so the hot path builds no strings.
template <class Call>
void check(int device, cu::CUresult result, Call&& call) {
  if (result != cu::CUDA_SUCCESS) throw BackendError(failure(device, result, call()));
}

cu::CUmemLocation device_location(int device) {
  cu::CUmemLocation location{};
  location.type = cu::CU_MEM_LOCATION_TYPE_DEVICE;
  location.id = device;
  return location;
}

cu::CUmemAccessDesc read_write(int device) {
  cu::CUmemAccessDesc access{};
  access.location = device_location(device);
  access.flags = cu::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  return access;
}

cu::CUmemAllocationProp chunk_prop(int device, bool shareable = false) {
  cu::CUmemAllocationProp prop{};  // unset fields must be zero
  prop.type = cu::CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes =
      shareable ? cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : cu::CU_MEM_HANDLE_TYPE_NONE;
  prop.location = device_location(device);
  return prop;
}

cu::CUevent as_event(EventId event) { return reinterpret_cast<cu::CUevent>(event); }
cu::CUstream as_stream(StreamId stream) { return reinterpret_cast<cu::CUstream>(stream); }

// Note [Primary context]
// PyTorch (through the CUDA runtime) works in each device's primary context, so our
// events, our stream handles and "stream 0" must resolve in that context: events can only
// be recorded on and waited for by streams of their own context, cuMemGetInfo and
// cuCtxSynchronize act on the current context's device, and a thread that never touched
// CUDA has no current context at all. So the backend retains the primary context for its
// lifetime and makes it current around each call that needs a context, then restores the
// caller's context (possibly none): leaving ours current would silently switch the
// runtime's current device in a thread working on another GPU. When the caller's context
// is already ours (the common case) this costs one cuCtxGetCurrent.
class ContextGuard {
 public:
  ContextGuard(const cu::DriverApi& api, cu::CUcontext context, int device) : api_(api) {
    check(device, api.cuCtxGetCurrent(&previous_), [] { return std::string("cuCtxGetCurrent()"); });
    if (previous_ == context) return;
    check(device, api.cuCtxSetCurrent(context),
          [&] { return "cuCtxSetCurrent(primary context " + hex(context) + ")"; });
    switched_ = true;
  }
  ~ContextGuard() {
    // Cannot fail for a context that was current a moment ago; nothing to do if it did.
    if (switched_) api_.cuCtxSetCurrent(previous_);
  }
  ContextGuard(const ContextGuard&) = delete;
  ContextGuard& operator=(const ContextGuard&) = delete;

 private:
  const cu::DriverApi& api_;
  cu::CUcontext previous_ = nullptr;
  bool switched_ = false;
};

}  // namespace

CudaBackend::CudaBackend(int device, bool shareable)
    : api_(require_driver()), device_(device), shareable_(shareable), access_{read_write(device)} {
  if (!shareable) unshareable_reason_ = "this backend was created with shareable=False";
  int count = 0;
  check(device_, api_.cuDeviceGetCount(&count), [] { return std::string("cuDeviceGetCount()"); });
  if (device_ < 0 || device_ >= count) {
    throw BackendError("cuda backend: device " + std::to_string(device_) +
                       " does not exist; this process sees " + std::to_string(count) + " CUDA device(s)" +
                       (count > 0 ? " (ordinals 0 to " + std::to_string(count - 1) + ")" : "") +
                       " after CUDA_VISIBLE_DEVICES.");
  }
  check(device_, api_.cuDeviceGet(&cu_device_, device_),
        [&] { return "cuDeviceGet(ordinal=" + std::to_string(device_) + ")"; });
  check(device_, api_.cuDeviceTotalMem_v2(&total_memory_, cu_device_),
        [] { return std::string("cuDeviceTotalMem_v2()"); });

  check(device_, api_.cuDevicePrimaryCtxRetain(&context_, cu_device_),
        [] { return std::string("cuDevicePrimaryCtxRetain()"); });
  // From here on a throw must give the retain back: a constructor that throws has no effect.
  try {
    ContextGuard guard(api_, context_, device_);
    const cu::CUmemAllocationProp prop = chunk_prop(device_);
    std::size_t granularity = 0;
    check(device_,
          api_.cuMemGetAllocationGranularity(&granularity, &prop, cu::CU_MEM_ALLOC_GRANULARITY_MINIMUM),
          [] { return std::string("cuMemGetAllocationGranularity(pinned, device, minimum)"); });
    // Chunks are created, mapped and aligned in kChunkSize units, which CUDA accepts
    // exactly when they are multiples of the granularity (2 MiB on our GPUs, docs/FACTS.md).
    if (granularity == 0 || kChunkSize % granularity != 0) {
      throw BackendError("cuda backend (device " + std::to_string(device_) +
                         "): the device's minimum allocation granularity is " + std::to_string(granularity) +
                         " bytes, which does not divide vmmalloc's " + std::to_string(kChunkSize) +
                         "-byte chunk size; this GPU is not supported.");
    }
  } catch (...) {
    api_.cuDevicePrimaryCtxRelease_v2(cu_device_);
    throw;
  }
}

CudaBackend::~CudaBackend() {
  // Never throws, and ignores driver errors: at process exit the driver may already be
  // shut down (CUDA_ERROR_DEINITIALIZED), and there is nothing left to release then.
  for (const auto& entry : exported_) close(entry.second.fd);
  try {
    std::lock_guard<std::mutex> lock(events_mutex_);
    if (!free_events_.empty()) {
      ContextGuard guard(api_, context_, device_);
      for (cu::CUevent event : free_events_) api_.cuEventDestroy_v2(event);
      free_events_.clear();
    }
  } catch (...) {
  }
  api_.cuDevicePrimaryCtxRelease_v2(cu_device_);
}

std::size_t CudaBackend::free_memory() const {
  ContextGuard guard(api_, context_, device_);  // cuMemGetInfo reports the current device
  std::size_t free = 0;
  std::size_t total = 0;
  check(device_, api_.cuMemGetInfo_v2(&free, &total), [] { return std::string("cuMemGetInfo_v2()"); });
  return free;
}

std::uintptr_t CudaBackend::reserve(std::size_t bytes) {
  if (bytes == 0 || bytes % kChunkSize != 0) {
    throw BackendError("cuda backend: reserve needs a non-zero multiple of 2 MiB, got " +
                       std::to_string(bytes) + " bytes");
  }
  ContextGuard guard(api_, context_, device_);
  cu::CUdeviceptr addr = 0;
  // Out of memory here means out of virtual address space, not device memory, so it is a
  // plain BackendError: releasing caches would not help.
  check(device_, api_.cuMemAddressReserve(&addr, bytes, kChunkSize, 0, 0),
        [&] { return "cuMemAddressReserve(bytes=" + std::to_string(bytes) + ")"; });
  return static_cast<std::uintptr_t>(addr);
}

void CudaBackend::unreserve(std::uintptr_t addr, std::size_t bytes) {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuMemAddressFree(addr, bytes),
        [&] { return "cuMemAddressFree(addr=" + hex(addr) + ", bytes=" + std::to_string(bytes) + ")"; });
}

ChunkHandle CudaBackend::create_chunk(std::size_t bytes) {
  if (bytes == 0 || bytes % kChunkSize != 0) {
    throw BackendError("cuda backend: create_chunk needs a non-zero multiple of 2 MiB, got " +
                       std::to_string(bytes) + " bytes");
  }
  ContextGuard guard(api_, context_, device_);
  cu::CUmemGenericAllocationHandle handle = 0;
  const bool shareable = shareable_.load(std::memory_order_relaxed);
  cu::CUmemAllocationProp prop = chunk_prop(device_, shareable);
  cu::CUresult result = api_.cuMemCreate(&handle, bytes, &prop, 0);
  if (shareable && (result == cu::CUDA_ERROR_NOT_SUPPORTED || result == cu::CUDA_ERROR_INVALID_VALUE)) {
    // A driver or system without POSIX descriptor export (some containers and vGPUs): the
    // chunk is made as before, and sharing it says why it cannot be.
    std::lock_guard<std::mutex> lock(exported_mutex_);
    if (shareable_.exchange(false)) {
      unshareable_reason_ =
          "the driver refused exportable memory (cuMemCreate with POSIX file "
          "descriptor handles: " +
          cu::result_text(result) + ")";
    }
    prop = chunk_prop(device_, false);
    result = api_.cuMemCreate(&handle, bytes, &prop, 0);
  }
  if (result == cu::CUDA_ERROR_OUT_OF_MEMORY) {
    throw DeviceOutOfMemory(failure(device_, result, "cuMemCreate(bytes=" + std::to_string(bytes) + ")"));
  }
  check(device_, result, [&] { return "cuMemCreate(bytes=" + std::to_string(bytes) + ")"; });
  // Nothing can fail after cuMemCreate succeeded, so no handle can leak. Keep it that way:
  // any check added below must release `handle` before throwing.
  return static_cast<ChunkHandle>(handle);
}

void CudaBackend::release_chunk(ChunkHandle chunk) {
  {
    std::lock_guard<std::mutex> lock(exported_mutex_);
    const auto it = exported_.find(chunk);
    if (it != exported_.end()) {
      close(it->second.fd);
      exported_.erase(it);
    }
  }
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuMemRelease(chunk), [&] { return "cuMemRelease(handle=" + hex(chunk) + ")"; });
}

void CudaBackend::map(std::uintptr_t addr, ChunkHandle chunk, std::size_t bytes) {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuMemMap(addr, bytes, 0, chunk, 0), [&] {
    return "cuMemMap(addr=" + hex(addr) + ", bytes=" + std::to_string(bytes) + ", handle=" + hex(chunk) + ")";
  });
}

void CudaBackend::unmap(std::uintptr_t addr, std::size_t bytes) {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuMemUnmap(addr, bytes),
        [&] { return "cuMemUnmap(addr=" + hex(addr) + ", bytes=" + std::to_string(bytes) + ")"; });
}

void CudaBackend::set_access(std::uintptr_t addr, std::size_t bytes) {
  ContextGuard guard(api_, context_, device_);
  std::lock_guard<std::mutex> lock(access_mutex_);
  check(device_, api_.cuMemSetAccess(addr, bytes, access_.data(), access_.size()), [&] {
    return "cuMemSetAccess(addr=" + hex(addr) + ", bytes=" + std::to_string(bytes) +
           ", read-write for this device and " + std::to_string(access_.size() - 1) + " peers)";
  });
}

bool CudaBackend::add_peer(int peer) {
  if (peer == device_) return false;
  {
    std::lock_guard<std::mutex> lock(access_mutex_);
    for (const auto& a : access_) {
      if (a.location.id == peer) return false;
    }
  }
  cu::CUdevice peer_device = 0;
  check(device_, api_.cuDeviceGet(&peer_device, peer),
        [&] { return "cuDeviceGet(ordinal=" + std::to_string(peer) + ")"; });
  int can_access = 0;
  check(device_, api_.cuDeviceCanAccessPeer(&can_access, peer_device, cu_device_), [&] {
    return "cuDeviceCanAccessPeer(device=" + std::to_string(peer) + ", peer=" + std::to_string(device_) + ")";
  });
  if (can_access == 0) return false;  // no P2P path: copies go through the host, no grant
  std::lock_guard<std::mutex> lock(access_mutex_);
  access_.push_back(read_write(peer));
  return true;
}

void CudaBackend::set_peer_access(std::uintptr_t addr, std::size_t bytes, int peer) {
  ContextGuard guard(api_, context_, device_);
  const cu::CUmemAccessDesc access = read_write(peer);
  check(device_, api_.cuMemSetAccess(addr, bytes, &access, 1), [&] {
    return "cuMemSetAccess(addr=" + hex(addr) + ", bytes=" + std::to_string(bytes) +
           ", read-write for peer device " + std::to_string(peer) + ")";
  });
}

std::vector<int> CudaBackend::peers() const {
  std::lock_guard<std::mutex> lock(access_mutex_);
  std::vector<int> out;
  for (std::size_t i = 1; i < access_.size(); ++i) out.push_back(access_[i].location.id);
  return out;
}

EventId CudaBackend::record_event(StreamId stream) {
  ContextGuard guard(api_, context_, device_);
  cu::CUevent event = nullptr;
  {
    std::lock_guard<std::mutex> lock(events_mutex_);
    if (!free_events_.empty()) {
      event = free_events_.back();
      free_events_.pop_back();
    }
  }
  if (event == nullptr) {
    check(device_, api_.cuEventCreate(&event, cu::CU_EVENT_DISABLE_TIMING),
          [] { return std::string("cuEventCreate(CU_EVENT_DISABLE_TIMING)"); });
  }
  const cu::CUresult result = api_.cuEventRecord(event, as_stream(stream));
  if (result != cu::CUDA_SUCCESS) {
    // No effect on failure: the event goes back to the pool it came from (or was made for).
    {
      std::lock_guard<std::mutex> lock(events_mutex_);
      if (free_events_.size() < kMaxPooledEvents) {
        free_events_.push_back(event);
        event = nullptr;
      }
    }
    if (event != nullptr) api_.cuEventDestroy_v2(event);
    throw BackendError(failure(device_, result, "cuEventRecord(stream=" + hex(stream) + ")"));
  }
  return reinterpret_cast<EventId>(event);
}

bool CudaBackend::event_done(EventId event) {
  ContextGuard guard(api_, context_, device_);
  const cu::CUresult result = api_.cuEventQuery(as_event(event));
  if (result == cu::CUDA_ERROR_NOT_READY) return false;
  check(device_, result, [&] { return "cuEventQuery(event=" + hex(event) + ")"; });
  return true;
}

void CudaBackend::stream_wait_event(StreamId stream, EventId event) {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuStreamWaitEvent(as_stream(stream), as_event(event), 0),
        [&] { return "cuStreamWaitEvent(stream=" + hex(stream) + ", event=" + hex(event) + ")"; });
}

bool CudaBackend::is_capturing(StreamId stream) {
  ContextGuard guard(api_, context_, device_);
  cu::CUstreamCaptureStatus status = cu::CU_STREAM_CAPTURE_STATUS_NONE;
  check(device_, api_.cuStreamIsCapturing(as_stream(stream), &status),
        [&] { return "cuStreamIsCapturing(stream=" + hex(stream) + ")"; });
  return status != cu::CU_STREAM_CAPTURE_STATUS_NONE;
}

void CudaBackend::wait_event(EventId event) {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuEventSynchronize(as_event(event)),
        [&] { return "cuEventSynchronize(event=" + hex(event) + ")"; });
}

int CudaBackend::relax_capture_mode() {
  cu::CUstreamCaptureMode mode = cu::CU_STREAM_CAPTURE_MODE_RELAXED;
  check(device_, api_.cuThreadExchangeStreamCaptureMode(&mode),
        [] { return std::string("cuThreadExchangeStreamCaptureMode(relaxed)"); });
  return static_cast<int>(mode);
}

void CudaBackend::restore_capture_mode(int mode) {
  auto previous = static_cast<cu::CUstreamCaptureMode>(mode);
  api_.cuThreadExchangeStreamCaptureMode(&previous);  // restoring what it was cannot fail
}

void CudaBackend::release_event(EventId event) {
  {
    std::lock_guard<std::mutex> lock(events_mutex_);
    if (free_events_.size() < kMaxPooledEvents) {
      // A pooled event may still be pending; the next cuEventRecord simply re-records it.
      free_events_.push_back(as_event(event));
      return;
    }
  }
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuEventDestroy_v2(as_event(event)),
        [&] { return "cuEventDestroy_v2(event=" + hex(event) + ")"; });
}

void CudaBackend::synchronize() {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuCtxSynchronize(), [] { return std::string("cuCtxSynchronize()"); });
}

void CudaBackend::copy_from_host(std::uintptr_t dst, const void* src, std::size_t bytes) {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuMemcpyHtoD_v2(dst, src, bytes), [&] {
    return "cuMemcpyHtoD_v2(dst=" + hex(dst) + ", src=" + hex(src) + ", bytes=" + std::to_string(bytes) + ")";
  });
}

bool CudaBackend::pin_host(void* address, std::size_t bytes) {
  return pin_host_memory(address, bytes, device_).empty();
}

void CudaBackend::unpin_host(void* address) { unpin_host_memory(address, device_); }

void CudaBackend::copy_to_host(void* dst, std::uintptr_t src, std::size_t bytes) {
  ContextGuard guard(api_, context_, device_);
  check(device_, api_.cuMemcpyDtoH_v2(dst, src, bytes), [&] {
    return "cuMemcpyDtoH_v2(dst=" + hex(dst) + ", src=" + hex(src) + ", bytes=" + std::to_string(bytes) + ")";
  });
}

void CudaBackend::copy_many_to_host(const std::vector<HostCopy>& copies) { copy_many(copies, true); }

void CudaBackend::copy_many_from_host(const std::vector<HostCopy>& copies) { copy_many(copies, false); }

// One stream per batch, created and destroyed here: a batch is a pause or a resume (seconds
// of copies), so the stream costs nothing against it and no stream outlives its batch. The
// stream does not wait for the legacy default stream; the caller has ordered the copies
// against the streams that use the memory (pause waited for their events, resume maps new
// memory no stream has used). Every copy issued is waited for before returning, also when
// one could not be issued, so no copy still runs on memory the caller then unmaps or frees.
void CudaBackend::copy_many(const std::vector<HostCopy>& copies, bool to_host) {
  if (copies.empty()) return;
  ContextGuard guard(api_, context_, device_);
  cu::CUstream stream = nullptr;
  check(device_, api_.cuStreamCreate(&stream, cu::kStreamNonBlocking),
        [] { return std::string("cuStreamCreate(CU_STREAM_NON_BLOCKING)"); });
  cu::CUresult failed = cu::CUDA_SUCCESS;
  std::string what;
  for (const HostCopy& c : copies) {
    failed = to_host ? api_.cuMemcpyDtoHAsync_v2(c.host, c.device, c.bytes, stream)
                     : api_.cuMemcpyHtoDAsync_v2(c.device, c.host, c.bytes, stream);
    if (failed != cu::CUDA_SUCCESS) {
      what = std::string(to_host ? "cuMemcpyDtoHAsync_v2" : "cuMemcpyHtoDAsync_v2") +
             "(device=" + hex(c.device) + ", host=" + hex(c.host) + ", bytes=" + std::to_string(c.bytes) +
             ")";
      break;
    }
  }
  cu::CUresult synced = api_.cuStreamSynchronize(stream);
  // A refused wait (not a dead context) could return with copies still running into memory
  // the caller frees or unmaps next: drain the whole device then, the one wait left.
  if (synced != cu::CUDA_SUCCESS && api_.cuCtxSynchronize() == cu::CUDA_SUCCESS) synced = cu::CUDA_SUCCESS;
  api_.cuStreamDestroy_v2(stream);  // work is done; a failure here leaks one stream at most
  check(device_, failed, [&] { return what; });
  check(device_, synced, [] { return std::string("cuStreamSynchronize(copy stream)"); });
}

Backend::SharedHandle CudaBackend::export_handle(ChunkHandle chunk, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(exported_mutex_);
  const auto it = exported_.find(chunk);
  if (it != exported_.end()) return it->second;
  raise_descriptor_limit();
  ContextGuard guard(api_, context_, device_);
  int fd = -1;
  const cu::CUresult result =
      api_.cuMemExportToShareableHandle(&fd, chunk, cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
  if (result != cu::CUDA_SUCCESS) {
    std::string why = failure(
        device_, result,
        "cuMemExportToShareableHandle(handle=" + hex(chunk) + ", bytes=" + std::to_string(bytes) + ")");
    why += unshareable_reason_.empty() ? "; if this process has many open files, raise the limit (ulimit -n)"
                                       : "; chunks are not exportable: " + unshareable_reason_;
    throw BackendError(why);
  }
  // Not inherited by children this process starts (os.system, subprocess): they would pin
  // the memory for their lifetime.
  fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
  const SharedHandle exported{fd, 0, ++exports_};
  exported_.emplace(chunk, exported);
  return exported;
}

ChunkHandle CudaBackend::import_handle(int fd, std::uint64_t offset, std::size_t bytes) {
  if (offset != 0) throw BackendError("cuda backend: import_handle of a CUDA handle needs offset 0");
  ContextGuard guard(api_, context_, device_);
  cu::CUmemGenericAllocationHandle handle = 0;
  check(device_,
        api_.cuMemImportFromShareableHandle(&handle, reinterpret_cast<void*>(static_cast<std::intptr_t>(fd)),
                                            cu::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        [&] {
          return "cuMemImportFromShareableHandle(fd=" + std::to_string(fd) +
                 ", bytes=" + std::to_string(bytes) + ")";
        });
  return static_cast<ChunkHandle>(handle);
}

}  // namespace vmm
