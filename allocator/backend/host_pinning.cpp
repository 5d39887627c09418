#include "backend/host_pinning.hpp"

#include "backend/cuda_driver.hpp"

namespace vmm {
namespace {

// Runs `call` with `device`'s primary context current and restores the caller's context.
// The primary context is retained for the call only: PyTorch (the runtime) holds its own
// reference while it uses the device, so this costs two reference-count updates.
template <typename Call>
std::string with_primary_context(int device, const char* what, Call&& call) {
  const cu::DriverApi* api = cu::driver_api();
  if (api == nullptr) return cu::driver_unavailable_reason();
  auto fail = [&](const char* step, cu::CUresult r) {
    return std::string(what) + ": " + step + " failed with " + cu::result_text(r);
  };
  cu::CUdevice handle = 0;
  cu::CUresult r = api->cuDeviceGet(&handle, device);
  if (r != cu::CUDA_SUCCESS) return fail("cuDeviceGet", r);
  cu::CUcontext primary = nullptr;
  r = api->cuDevicePrimaryCtxRetain(&primary, handle);
  if (r != cu::CUDA_SUCCESS) return fail("cuDevicePrimaryCtxRetain", r);
  cu::CUcontext previous = nullptr;
  std::string error;
  r = api->cuCtxGetCurrent(&previous);
  if (r == cu::CUDA_SUCCESS && previous != primary) r = api->cuCtxSetCurrent(primary);
  if (r != cu::CUDA_SUCCESS) {
    error = fail("making the primary context current", r);
  } else {
    r = call(*api);
    if (r != cu::CUDA_SUCCESS) error = std::string(what) + " failed with " + cu::result_text(r);
    if (previous != primary) api->cuCtxSetCurrent(previous);  // was current a moment ago
  }
  api->cuDevicePrimaryCtxRelease_v2(handle);
  return error;
}

}  // namespace

std::string pin_host_memory(void* address, std::size_t bytes, int device) {
  return with_primary_context(device, "cuMemHostRegister", [&](const cu::DriverApi& api) {
    return api.cuMemHostRegister_v2(address, bytes, cu::kMemHostRegisterPortable);
  });
}

std::string unpin_host_memory(void* address, int device) {
  return with_primary_context(device, "cuMemHostUnregister",
                              [&](const cu::DriverApi& api) { return api.cuMemHostUnregister(address); });
}

}  // namespace vmm
