#include "backend/cuda_driver.hpp"

#include <dlfcn.h>

#include <string>

namespace vmm {
namespace cu {
namespace {

constexpr const char* kLibrary = "libcuda.so.1";
constexpr const char* kHostHint = " The host backend works without one.";

using GetProcAddressV2 = CUresult (*)(const char* symbol, void** fn, int cuda_version, cuuint64_t flags,
                                      CUdriverProcAddressQueryResult* status);
using GetProcAddressV1 = CUresult (*)(const char* symbol, void** fn, int cuda_version, cuuint64_t flags);

struct Driver {
  DriverApi api{};      // every entry point found, even when loading failed later
  bool loaded = false;  // the library and all its entry points found (no cuInit yet)
  bool usable = false;  // loaded, and cuInit succeeded
  std::string reason;   // why not loaded, or not usable
};

// Note [Resolving driver symbols]
// libcuda exports several ABI versions of some functions (cuMemGetInfo and cuMemGetInfo_v2,
// cuEventRecord and cuEventRecord_ptsz, ...). cuGetProcAddress takes the base name and a
// CUDA version and returns the variant with that version's ABI: with kDriverApiVersion
// (12.0) that is cuMemGetInfo_v2, cuDeviceTotalMem_v2, cuDevicePrimaryCtxRelease_v2,
// cuEventDestroy_v2, cuStreamDestroy_v2, cuMemcpy{HtoD,DtoH}{,Async}_v2 and
// cuMemHostRegister_v2, the signatures DriverApi declares, and a newer driver keeps
// returning them for 12000. CU_GET_PROC_ADDRESS_LEGACY_STREAM picks
// the variants in which stream 0 is the legacy default stream, as in PyTorch (built
// without per-thread default streams) and in the plain exported symbols.
// cuGetProcAddress_v2 exists from driver 12.0 and cuGetProcAddress from 11.3; if neither
// finds a symbol we fall back to dlsym of the exported, explicitly versioned name.
class Resolver {
 public:
  explicit Resolver(void* library) : library_(library) {
    v2_ = reinterpret_cast<GetProcAddressV2>(dlsym(library, "cuGetProcAddress_v2"));
    if (v2_ == nullptr) {
      v1_ = reinterpret_cast<GetProcAddressV1>(dlsym(library, "cuGetProcAddress"));
    }
  }

  template <class Fn>
  bool operator()(Fn& slot, const char* base_name, const char* exported_name) const {
    void* fn = lookup(base_name, exported_name);
    slot = reinterpret_cast<Fn>(fn);
    return fn != nullptr;
  }

 private:
  void* lookup(const char* base_name, const char* exported_name) const {
    void* fn = nullptr;
    if (v2_ != nullptr) {
      CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
      if (v2_(base_name, &fn, kDriverApiVersion, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &status) ==
              CUDA_SUCCESS &&
          status == CU_GET_PROC_ADDRESS_SUCCESS && fn != nullptr) {
        return fn;
      }
    } else if (v1_ != nullptr) {
      if (v1_(base_name, &fn, kDriverApiVersion, CU_GET_PROC_ADDRESS_LEGACY_STREAM) == CUDA_SUCCESS &&
          fn != nullptr) {
        return fn;
      }
    }
    return dlsym(library_, exported_name);
  }

  void* library_;
  GetProcAddressV2 v2_ = nullptr;
  GetProcAddressV1 v1_ = nullptr;
};

std::string describe(const DriverApi& api, CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (api.cuGetErrorName == nullptr || api.cuGetErrorName(result, &name) != CUDA_SUCCESS) {
    name = nullptr;
  }
  if (api.cuGetErrorString == nullptr || api.cuGetErrorString(result, &text) != CUDA_SUCCESS) {
    text = nullptr;
  }
  std::string out = name != nullptr ? name : "CUresult " + std::to_string(static_cast<int>(result));
  if (text != nullptr) out += std::string(" (") + text + ")";
  return out;
}

// Opens the library and resolves every entry point; calls nothing in the driver.
void load_into(Driver& d) {
  dlerror();  // clear a stale error, so the one we report is dlopen's
  // Never dlclosed: function pointers into it outlive any owner, up to process exit.
  void* library = dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* error = dlerror();
    d.reason = std::string("CUDA is unavailable: ") + kLibrary + " could not be loaded (" +
               (error != nullptr ? error : "unknown error") +
               "); vmmalloc's cuda backend needs an NVIDIA driver." + kHostHint;
    return;
  }

  const Resolver resolve(library);
  const char* missing = nullptr;
  auto need = [&](auto& slot, const char* base_name, const char* exported_name) {
    if (!resolve(slot, base_name, exported_name) && missing == nullptr) missing = exported_name;
  };
  DriverApi& a = d.api;
  need(a.cuGetErrorName, "cuGetErrorName", "cuGetErrorName");
  need(a.cuGetErrorString, "cuGetErrorString", "cuGetErrorString");
  need(a.cuInit, "cuInit", "cuInit");
  need(a.cuDeviceGet, "cuDeviceGet", "cuDeviceGet");
  need(a.cuDeviceGetCount, "cuDeviceGetCount", "cuDeviceGetCount");
  need(a.cuDeviceCanAccessPeer, "cuDeviceCanAccessPeer", "cuDeviceCanAccessPeer");
  need(a.cuDeviceTotalMem_v2, "cuDeviceTotalMem", "cuDeviceTotalMem_v2");
  need(a.cuMemGetInfo_v2, "cuMemGetInfo", "cuMemGetInfo_v2");
  need(a.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain");
  need(a.cuDevicePrimaryCtxRelease_v2, "cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2");
  need(a.cuCtxGetCurrent, "cuCtxGetCurrent", "cuCtxGetCurrent");
  need(a.cuCtxSetCurrent, "cuCtxSetCurrent", "cuCtxSetCurrent");
  need(a.cuCtxSynchronize, "cuCtxSynchronize", "cuCtxSynchronize");
  need(a.cuMemGetAllocationGranularity, "cuMemGetAllocationGranularity", "cuMemGetAllocationGranularity");
  need(a.cuMemAddressReserve, "cuMemAddressReserve", "cuMemAddressReserve");
  need(a.cuMemAddressFree, "cuMemAddressFree", "cuMemAddressFree");
  need(a.cuMemCreate, "cuMemCreate", "cuMemCreate");
  need(a.cuMemRelease, "cuMemRelease", "cuMemRelease");
  need(a.cuMemMap, "cuMemMap", "cuMemMap");
  need(a.cuMemUnmap, "cuMemUnmap", "cuMemUnmap");
  need(a.cuMemSetAccess, "cuMemSetAccess", "cuMemSetAccess");
  need(a.cuMemExportToShareableHandle, "cuMemExportToShareableHandle", "cuMemExportToShareableHandle");
  need(a.cuMemImportFromShareableHandle, "cuMemImportFromShareableHandle", "cuMemImportFromShareableHandle");
  need(a.cuEventCreate, "cuEventCreate", "cuEventCreate");
  need(a.cuEventRecord, "cuEventRecord", "cuEventRecord");
  need(a.cuEventQuery, "cuEventQuery", "cuEventQuery");
  need(a.cuEventSynchronize, "cuEventSynchronize", "cuEventSynchronize");
  need(a.cuEventDestroy_v2, "cuEventDestroy", "cuEventDestroy_v2");
  need(a.cuStreamWaitEvent, "cuStreamWaitEvent", "cuStreamWaitEvent");
  need(a.cuStreamIsCapturing, "cuStreamIsCapturing", "cuStreamIsCapturing");
  need(a.cuThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode",
       "cuThreadExchangeStreamCaptureMode");
  need(a.cuMemcpyHtoD_v2, "cuMemcpyHtoD", "cuMemcpyHtoD_v2");
  need(a.cuMemcpyDtoH_v2, "cuMemcpyDtoH", "cuMemcpyDtoH_v2");
  need(a.cuMemcpyHtoDAsync_v2, "cuMemcpyHtoDAsync", "cuMemcpyHtoDAsync_v2");
  need(a.cuMemcpyDtoHAsync_v2, "cuMemcpyDtoHAsync", "cuMemcpyDtoHAsync_v2");
  need(a.cuStreamCreate, "cuStreamCreate", "cuStreamCreate");
  need(a.cuStreamSynchronize, "cuStreamSynchronize", "cuStreamSynchronize");
  need(a.cuStreamDestroy_v2, "cuStreamDestroy", "cuStreamDestroy_v2");
  need(a.cuMemHostRegister_v2, "cuMemHostRegister", "cuMemHostRegister_v2");
  need(a.cuMemHostUnregister, "cuMemHostUnregister", "cuMemHostUnregister");
  if (missing != nullptr) {
    d.reason = std::string("CUDA is unavailable: the NVIDIA driver's ") + kLibrary + " has no " + missing +
               "; vmmalloc's cuda backend needs a driver with CUDA virtual memory management"
               " (CUDA 11.0 or newer)." +
               kHostHint;
    return;
  }

  d.loaded = true;
}

void init_into(Driver& d) {
  const CUresult result = d.api.cuInit(0);
  if (result != CUDA_SUCCESS) {
    d.reason = "CUDA is unavailable: cuInit failed with " + describe(d.api, result) +
               "; vmmalloc's cuda backend needs a working NVIDIA driver and GPU." + kHostHint;
    return;
  }
  d.usable = true;
}

Driver load() noexcept {
  Driver d;
  try {
    load_into(d);
  } catch (...) {  // std::bad_alloc while building a message; driver_api() must not throw
    d.loaded = false;
  }
  return d;
}

// Note [Lazy driver start]
// Loading resolves symbols only; cuInit runs on the first
// question that needs the driver working (a cuda backend, cuda_unavailable_reason), so
// that importing vmmalloc or enabling it, under VMMALLOC=1 at `import torch` too, leaves
// CUDA uninitialized, as PyTorch guarantees for `import torch` (a process forked then can
// still use CUDA, and CUDA_VISIBLE_DEVICES set afterwards still applies).
Driver& loaded_driver() noexcept {
  static Driver d = load();  // thread-safe one-time initialisation
  return d;
}

const Driver& driver() noexcept {
  static const bool initialized = [] {
    Driver& d = loaded_driver();
    if (d.loaded) {
      try {
        init_into(d);
      } catch (...) {
        d.usable = false;
      }
    }
    return true;
  }();
  (void)initialized;
  return loaded_driver();
}

std::string reason_of(const Driver& d) {
  if (d.reason.empty()) return "CUDA is unavailable: loading the NVIDIA driver failed.";
  return d.reason;
}

}  // namespace

const DriverApi* driver_api() noexcept {
  const Driver& d = driver();
  return d.usable ? &d.api : nullptr;
}

std::string driver_unavailable_reason() {
  const Driver& d = driver();
  return d.usable ? std::string() : reason_of(d);
}

std::string driver_library_reason() {
  const Driver& d = loaded_driver();
  return d.loaded ? std::string() : reason_of(d);
}

std::string result_text(CUresult result) { return describe(loaded_driver().api, result); }

}  // namespace cu
}  // namespace vmm
