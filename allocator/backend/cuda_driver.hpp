// The part of the CUDA driver API that vmmalloc uses, declared here and loaded at run time.
//
// Note [No build-time CUDA dependency]
// The extension must build and import on machines with no CUDA toolkit and no driver (CI
// runs the host backend there). So nothing here includes <cuda.h>, and nothing links
// libcuda or the CUDA runtime: driver_api() dlopens libcuda.so.1 on first use. The
// declarations below copy cuda.h's ABI (layouts, enum values, function signatures) for
// 64-bit Linux; tests/native/cuda_layout_check.cpp static_asserts them against a toolkit's
// cuda.h and must be rebuilt whenever this file changes.
//
// Names follow cuda.h so that code reads like CUDA code, inside vmm::cu so that the two
// can share a translation unit. Members whose cuda.h name is a macro for a versioned
// symbol (cuMemGetInfo -> cuMemGetInfo_v2, ...) carry the versioned name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace vmm {
namespace cu {

// The driver ABI these declarations (and the function pointers resolved for them) follow:
// the `cudaVersion` argument of cuGetProcAddress. See Note [Resolving driver symbols].
constexpr int kDriverApiVersion = 12000;

// Only the codes vmmalloc tests for; any other value the driver returns is still valid
// (the underlying type is fixed) and is described by result_text().
enum CUresult : int {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_DEINITIALIZED = 4,
  CUDA_ERROR_STUB_LIBRARY = 34,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_NOT_READY = 600,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_UNKNOWN = 999,
};

using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUmemGenericAllocationHandle = unsigned long long;
using cuuint64_t = std::uint64_t;

struct CUctx_st;
struct CUstream_st;
struct CUevent_st;
using CUcontext = CUctx_st*;
using CUstream = CUstream_st*;
using CUevent = CUevent_st*;

enum CUmemAllocationType : int {
  CU_MEM_ALLOCATION_TYPE_INVALID = 0x0,
  CU_MEM_ALLOCATION_TYPE_PINNED = 0x1,
};

enum CUmemAllocationHandleType : int {
  CU_MEM_HANDLE_TYPE_NONE = 0x0,
  CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1,
};

enum CUmemLocationType : int {
  CU_MEM_LOCATION_TYPE_INVALID = 0x0,
  CU_MEM_LOCATION_TYPE_DEVICE = 0x1,
};

enum CUmemAccess_flags : int {
  CU_MEM_ACCESS_FLAGS_PROT_NONE = 0x0,
  CU_MEM_ACCESS_FLAGS_PROT_READ = 0x1,
  CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3,
};

enum CUmemAllocationGranularity_flags : int {
  CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0,
  CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1,
};

enum CUstreamCaptureStatus : int {
  CU_STREAM_CAPTURE_STATUS_NONE = 0,
  CU_STREAM_CAPTURE_STATUS_ACTIVE = 1,
  CU_STREAM_CAPTURE_STATUS_INVALIDATED = 2,
};

enum CUstreamCaptureMode : int {
  CU_STREAM_CAPTURE_MODE_GLOBAL = 0,
  CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1,
  CU_STREAM_CAPTURE_MODE_RELAXED = 2,
};

enum CUevent_flags : int {
  CU_EVENT_DEFAULT = 0x0,
  CU_EVENT_BLOCKING_SYNC = 0x1,
  CU_EVENT_DISABLE_TIMING = 0x2,
};

// cuMemHostRegister's flag for memory pinned for every context (a macro in cuda.h).
constexpr unsigned int kMemHostRegisterPortable = 0x01;
constexpr unsigned int kStreamNonBlocking = 0x01;  // CU_STREAM_NON_BLOCKING

enum CUdriverProcAddress_flags : int {
  CU_GET_PROC_ADDRESS_DEFAULT = 0,
  CU_GET_PROC_ADDRESS_LEGACY_STREAM = 1 << 0,
  CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM = 1 << 1,
};

enum CUdriverProcAddressQueryResult : int {
  CU_GET_PROC_ADDRESS_SUCCESS = 0,
  CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND = 1,
  CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT = 2,
};

struct CUmemLocation {
  CUmemLocationType type;
  int id;
};

// All fields not set must be zero (the driver rejects garbage in win32HandleMetaData and
// allocFlags), so value-initialise: `CUmemAllocationProp prop{};`.
struct CUmemAllocationProp {
  CUmemAllocationType type;
  CUmemAllocationHandleType requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};

struct CUmemAccessDesc {
  CUmemLocation location;
  CUmemAccess_flags flags;
};

// Entry points resolved from libcuda.so.1. Each member has the signature of the cuda.h
// function of the same name (for the versioned names, of that exact version).
struct DriverApi {
  CUresult (*cuGetErrorName)(CUresult error, const char** str);
  CUresult (*cuGetErrorString)(CUresult error, const char** str);
  CUresult (*cuInit)(unsigned int flags);

  CUresult (*cuDeviceGet)(CUdevice* device, int ordinal);
  CUresult (*cuDeviceGetCount)(int* count);
  CUresult (*cuDeviceCanAccessPeer)(int* can_access, CUdevice device, CUdevice peer_device);
  CUresult (*cuDeviceTotalMem_v2)(std::size_t* bytes, CUdevice device);
  CUresult (*cuMemGetInfo_v2)(std::size_t* free, std::size_t* total);

  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext* context, CUdevice device);
  CUresult (*cuDevicePrimaryCtxRelease_v2)(CUdevice device);
  CUresult (*cuCtxGetCurrent)(CUcontext* context);
  CUresult (*cuCtxSetCurrent)(CUcontext context);
  CUresult (*cuCtxSynchronize)();

  CUresult (*cuMemGetAllocationGranularity)(std::size_t* granularity, const CUmemAllocationProp* prop,
                                            CUmemAllocationGranularity_flags option);
  CUresult (*cuMemAddressReserve)(CUdeviceptr* ptr, std::size_t size, std::size_t alignment, CUdeviceptr addr,
                                  unsigned long long flags);
  CUresult (*cuMemAddressFree)(CUdeviceptr ptr, std::size_t size);
  CUresult (*cuMemCreate)(CUmemGenericAllocationHandle* handle, std::size_t size,
                          const CUmemAllocationProp* prop, unsigned long long flags);
  CUresult (*cuMemRelease)(CUmemGenericAllocationHandle handle);
  CUresult (*cuMemMap)(CUdeviceptr ptr, std::size_t size, std::size_t offset,
                       CUmemGenericAllocationHandle handle, unsigned long long flags);
  CUresult (*cuMemUnmap)(CUdeviceptr ptr, std::size_t size);
  CUresult (*cuMemSetAccess)(CUdeviceptr ptr, std::size_t size, const CUmemAccessDesc* desc,
                             std::size_t count);
  CUresult (*cuMemExportToShareableHandle)(void* shareable_handle, CUmemGenericAllocationHandle handle,
                                           CUmemAllocationHandleType type, unsigned long long flags);
  CUresult (*cuMemImportFromShareableHandle)(CUmemGenericAllocationHandle* handle, void* os_handle,
                                             CUmemAllocationHandleType type);

  CUresult (*cuEventCreate)(CUevent* event, unsigned int flags);
  CUresult (*cuEventRecord)(CUevent event, CUstream stream);
  CUresult (*cuEventQuery)(CUevent event);
  CUresult (*cuEventSynchronize)(CUevent event);
  CUresult (*cuEventDestroy_v2)(CUevent event);
  CUresult (*cuStreamWaitEvent)(CUstream stream, CUevent event, unsigned int flags);
  CUresult (*cuStreamIsCapturing)(CUstream stream, CUstreamCaptureStatus* status);
  CUresult (*cuThreadExchangeStreamCaptureMode)(CUstreamCaptureMode* mode);

  CUresult (*cuMemcpyHtoD_v2)(CUdeviceptr dst, const void* src, std::size_t bytes);
  CUresult (*cuMemcpyDtoH_v2)(void* dst, CUdeviceptr src, std::size_t bytes);
  CUresult (*cuMemcpyHtoDAsync_v2)(CUdeviceptr dst, const void* src, std::size_t bytes, CUstream stream);
  CUresult (*cuMemcpyDtoHAsync_v2)(void* dst, CUdeviceptr src, std::size_t bytes, CUstream stream);
  CUresult (*cuStreamCreate)(CUstream* stream, unsigned int flags);
  CUresult (*cuStreamSynchronize)(CUstream stream);
  CUresult (*cuStreamDestroy_v2)(CUstream stream);

  CUresult (*cuMemHostRegister_v2)(void* p, std::size_t bytesize, unsigned int flags);
  CUresult (*cuMemHostUnregister)(void* p);
};

// The driver, loaded and initialised (cuInit) on first call; thread-safe, never throws.
// Null when CUDA is unavailable; then driver_unavailable_reason() says why.
const DriverApi* driver_api() noexcept;

// Empty when driver_api() is non-null; otherwise one sentence for the user, starting
// "CUDA is unavailable: ". Loads the driver if that has not happened yet.
std::string driver_unavailable_reason();
// Empty when libcuda and every entry point vmmalloc needs were found; otherwise why not.
// Unlike the two above it never calls cuInit (Note [Lazy driver start] in cuda_driver.cpp).
std::string driver_library_reason();

// "CUDA_ERROR_OUT_OF_MEMORY (out of memory)", from the driver when it is loaded, else
// "CUresult 2".
std::string result_text(CUresult result);

}  // namespace cu
}  // namespace vmm
