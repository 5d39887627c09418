// Compile-time proof that cuda_driver.hpp matches a CUDA toolkit's cuda.h: struct sizes
// and member offsets, enum values, and the exact signature of every DriverApi entry point.
// Nothing runs; it compiles or it does not. Build it whenever cuda_driver.hpp changes:
//   g++ -std=c++17 -Iallocator -I/usr/local/cuda/include tests/native/cuda_layout_check.cpp -o /tmp/x
#include <cuda.h>

#include <cstddef>
#include <type_traits>
#include <utility>

#include "backend/cuda_driver.hpp"

namespace ours = vmm::cu;

#define SAME_VALUE(N) static_assert(static_cast<long long>(ours::N) == static_cast<long long>(::N), #N)

#define SAME_SIZE(T) static_assert(sizeof(ours::T) == sizeof(::T), "sizeof " #T)

// Offset and exact type of a member (nested members allowed: allocFlags.usage).
#define MEMBER_TYPE(S, M) std::remove_reference<decltype(std::declval<S&>().M)>::type
#define SAME_MEMBER(S, M)                                                                            \
  static_assert(offsetof(ours::S, M) == offsetof(::S, M) &&                                          \
                    std::is_same<ToCuda<MEMBER_TYPE(ours::S, M)>::type, MEMBER_TYPE(::S, M)>::value, \
                #S "::" #M)

// ToCuda rewrites a type built from our declarations into the same type built from
// cuda.h's (enum for enum, struct for struct, pointers and const preserved), so struct
// members and DriverApi entry points can be required to have exactly cuda.h's types.
template <class T>
struct ToCuda {
  using type = T;
};
template <class T>
struct ToCuda<T*> {
  using type = typename ToCuda<T>::type*;
};
template <class T>
struct ToCuda<const T> {
  using type = const typename ToCuda<T>::type;
};
template <class R, class... Args>
struct ToCuda<R (*)(Args...)> {
  using type = typename ToCuda<R>::type (*)(typename ToCuda<Args>::type...);
};
#define MAP(T)             \
  template <>              \
  struct ToCuda<ours::T> { \
    using type = ::T;      \
  }
MAP(CUresult);
MAP(CUmemAllocationType);
MAP(CUmemAllocationHandleType);
MAP(CUmemLocationType);
MAP(CUmemAccess_flags);
MAP(CUmemAllocationGranularity_flags);
MAP(CUevent_flags);
MAP(CUstreamCaptureStatus);
MAP(CUstreamCaptureMode);
MAP(CUdriverProcAddressQueryResult);
MAP(CUmemLocation);
MAP(CUmemAllocationProp);
MAP(CUmemAccessDesc);
MAP(CUctx_st);
MAP(CUstream_st);
MAP(CUevent_st);
#undef MAP

// Scalar typedefs: identical types, not merely the same size (unsigned long long and
// uint64_t are distinct types on Linux even though both are 64-bit).
static_assert(std::is_same<ours::CUdevice, ::CUdevice>::value, "CUdevice");
static_assert(std::is_same<ours::CUdeviceptr, ::CUdeviceptr>::value, "CUdeviceptr");
static_assert(std::is_same<ours::CUmemGenericAllocationHandle, ::CUmemGenericAllocationHandle>::value,
              "CUmemGenericAllocationHandle");
static_assert(std::is_same<ours::cuuint64_t, ::cuuint64_t>::value, "cuuint64_t");

// Enums: same size, same values.
SAME_SIZE(CUresult);
SAME_VALUE(CUDA_SUCCESS);
SAME_VALUE(CUDA_ERROR_INVALID_VALUE);
SAME_VALUE(CUDA_ERROR_OUT_OF_MEMORY);
SAME_VALUE(CUDA_ERROR_NOT_INITIALIZED);
SAME_VALUE(CUDA_ERROR_DEINITIALIZED);
SAME_VALUE(CUDA_ERROR_STUB_LIBRARY);
SAME_VALUE(CUDA_ERROR_NO_DEVICE);
SAME_VALUE(CUDA_ERROR_INVALID_DEVICE);
SAME_VALUE(CUDA_ERROR_INVALID_CONTEXT);
SAME_VALUE(CUDA_ERROR_INVALID_HANDLE);
SAME_VALUE(CUDA_ERROR_NOT_FOUND);
SAME_VALUE(CUDA_ERROR_NOT_READY);
SAME_VALUE(CUDA_ERROR_NOT_SUPPORTED);
SAME_VALUE(CUDA_ERROR_UNKNOWN);

SAME_SIZE(CUmemAllocationType);
SAME_VALUE(CU_MEM_ALLOCATION_TYPE_INVALID);
SAME_VALUE(CU_MEM_ALLOCATION_TYPE_PINNED);

SAME_SIZE(CUmemAllocationHandleType);
SAME_VALUE(CU_MEM_HANDLE_TYPE_NONE);
SAME_VALUE(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);

SAME_SIZE(CUmemLocationType);
SAME_VALUE(CU_MEM_LOCATION_TYPE_INVALID);
SAME_VALUE(CU_MEM_LOCATION_TYPE_DEVICE);

SAME_SIZE(CUmemAccess_flags);
SAME_VALUE(CU_MEM_ACCESS_FLAGS_PROT_NONE);
SAME_VALUE(CU_MEM_ACCESS_FLAGS_PROT_READ);
SAME_VALUE(CU_MEM_ACCESS_FLAGS_PROT_READWRITE);

SAME_SIZE(CUmemAllocationGranularity_flags);
SAME_VALUE(CU_MEM_ALLOC_GRANULARITY_MINIMUM);
SAME_VALUE(CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);

SAME_SIZE(CUevent_flags);
SAME_VALUE(CU_EVENT_DEFAULT);
SAME_VALUE(CU_EVENT_BLOCKING_SYNC);
SAME_VALUE(CU_EVENT_DISABLE_TIMING);
static_assert(ours::kMemHostRegisterPortable == CU_MEMHOSTREGISTER_PORTABLE,
              "CU_MEMHOSTREGISTER_PORTABLE differs");
SAME_VALUE(CU_STREAM_CAPTURE_STATUS_NONE);
SAME_VALUE(CU_STREAM_CAPTURE_STATUS_ACTIVE);
SAME_VALUE(CU_STREAM_CAPTURE_STATUS_INVALIDATED);
SAME_VALUE(CU_STREAM_CAPTURE_MODE_GLOBAL);
SAME_VALUE(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
SAME_VALUE(CU_STREAM_CAPTURE_MODE_RELAXED);

SAME_SIZE(CUdriverProcAddress_flags);
SAME_VALUE(CU_GET_PROC_ADDRESS_DEFAULT);
SAME_VALUE(CU_GET_PROC_ADDRESS_LEGACY_STREAM);
SAME_VALUE(CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM);

SAME_SIZE(CUdriverProcAddressQueryResult);
SAME_VALUE(CU_GET_PROC_ADDRESS_SUCCESS);
SAME_VALUE(CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
SAME_VALUE(CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT);

// Structs: size, alignment, every member's offset.
SAME_SIZE(CUmemLocation);
static_assert(alignof(ours::CUmemLocation) == alignof(::CUmemLocation), "alignof CUmemLocation");
SAME_MEMBER(CUmemLocation, type);
SAME_MEMBER(CUmemLocation, id);

SAME_SIZE(CUmemAllocationProp);
static_assert(alignof(ours::CUmemAllocationProp) == alignof(::CUmemAllocationProp),
              "alignof CUmemAllocationProp");
SAME_MEMBER(CUmemAllocationProp, type);
SAME_MEMBER(CUmemAllocationProp, requestedHandleTypes);
SAME_MEMBER(CUmemAllocationProp, location);
SAME_MEMBER(CUmemAllocationProp, win32HandleMetaData);
// allocFlags is an unnamed struct on both sides: its size here, its members below.
static_assert(offsetof(ours::CUmemAllocationProp, allocFlags) ==
                      offsetof(::CUmemAllocationProp, allocFlags) &&
                  sizeof(ours::CUmemAllocationProp::allocFlags) == sizeof(::CUmemAllocationProp::allocFlags),
              "CUmemAllocationProp::allocFlags");
SAME_MEMBER(CUmemAllocationProp, allocFlags.compressionType);
SAME_MEMBER(CUmemAllocationProp, allocFlags.gpuDirectRDMACapable);
SAME_MEMBER(CUmemAllocationProp, allocFlags.usage);
SAME_MEMBER(CUmemAllocationProp, allocFlags.reserved);

SAME_SIZE(CUmemAccessDesc);
static_assert(alignof(ours::CUmemAccessDesc) == alignof(::CUmemAccessDesc), "alignof CUmemAccessDesc");
SAME_MEMBER(CUmemAccessDesc, location);
SAME_MEMBER(CUmemAccessDesc, flags);

// Signatures. `cuda_name` is spelt as cuda.h's macros leave it (cuMemGetInfo_v2 is declared
// through the cuMemGetInfo macro), so &::cuda_name is the function of that exact ABI version.
#define SAME_SIGNATURE(member, cuda_name)                                                           \
  static_assert(                                                                                    \
      std::is_same<ToCuda<decltype(ours::DriverApi::member)>::type, decltype(&::cuda_name)>::value, \
      "signature of DriverApi::" #member " differs from cuda.h's " #cuda_name)

SAME_SIGNATURE(cuGetErrorName, cuGetErrorName);
SAME_SIGNATURE(cuGetErrorString, cuGetErrorString);
SAME_SIGNATURE(cuInit, cuInit);
SAME_SIGNATURE(cuDeviceGet, cuDeviceGet);
SAME_SIGNATURE(cuDeviceGetCount, cuDeviceGetCount);
SAME_SIGNATURE(cuDeviceCanAccessPeer, cuDeviceCanAccessPeer);
SAME_SIGNATURE(cuDeviceTotalMem_v2, cuDeviceTotalMem_v2);
SAME_SIGNATURE(cuMemGetInfo_v2, cuMemGetInfo_v2);
SAME_SIGNATURE(cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain);
SAME_SIGNATURE(cuDevicePrimaryCtxRelease_v2, cuDevicePrimaryCtxRelease_v2);
SAME_SIGNATURE(cuCtxGetCurrent, cuCtxGetCurrent);
SAME_SIGNATURE(cuCtxSetCurrent, cuCtxSetCurrent);
SAME_SIGNATURE(cuCtxSynchronize, cuCtxSynchronize);
SAME_SIGNATURE(cuMemGetAllocationGranularity, cuMemGetAllocationGranularity);
SAME_SIGNATURE(cuMemAddressReserve, cuMemAddressReserve);
SAME_SIGNATURE(cuMemAddressFree, cuMemAddressFree);
SAME_SIGNATURE(cuMemCreate, cuMemCreate);
SAME_SIGNATURE(cuMemRelease, cuMemRelease);
SAME_SIGNATURE(cuMemMap, cuMemMap);
SAME_SIGNATURE(cuMemUnmap, cuMemUnmap);
SAME_SIGNATURE(cuMemSetAccess, cuMemSetAccess);
SAME_SIGNATURE(cuMemExportToShareableHandle, cuMemExportToShareableHandle);
SAME_SIGNATURE(cuMemImportFromShareableHandle, cuMemImportFromShareableHandle);
SAME_SIGNATURE(cuEventCreate, cuEventCreate);
SAME_SIGNATURE(cuEventRecord, cuEventRecord);
SAME_SIGNATURE(cuEventQuery, cuEventQuery);
SAME_SIGNATURE(cuEventSynchronize, cuEventSynchronize);
SAME_SIGNATURE(cuEventDestroy_v2, cuEventDestroy_v2);
SAME_SIGNATURE(cuStreamWaitEvent, cuStreamWaitEvent);
SAME_SIGNATURE(cuStreamIsCapturing, cuStreamIsCapturing);
SAME_SIGNATURE(cuThreadExchangeStreamCaptureMode, cuThreadExchangeStreamCaptureMode);
SAME_SIGNATURE(cuMemcpyHtoD_v2, cuMemcpyHtoD_v2);
SAME_SIGNATURE(cuMemcpyDtoH_v2, cuMemcpyDtoH_v2);
SAME_SIGNATURE(cuMemHostRegister_v2, cuMemHostRegister_v2);
SAME_SIGNATURE(cuMemHostUnregister, cuMemHostUnregister);

// cuda_driver.cpp's private typedef for cuGetProcAddress_v2, restated. (cuda.h declares the
// 4-argument cuGetProcAddress, our fallback for pre-12.0 drivers, only in an internal section.)
using OurGetProcAddressV2 = ours::CUresult (*)(const char*, void**, int, ours::cuuint64_t,
                                               ours::CUdriverProcAddressQueryResult*);
static_assert(std::is_same<ToCuda<OurGetProcAddressV2>::type, decltype(&::cuGetProcAddress_v2)>::value,
              "signature of cuGetProcAddress_v2");

// The ABI version we ask cuGetProcAddress for must not be newer than the headers checked.
static_assert(ours::kDriverApiVersion <= CUDA_VERSION, "kDriverApiVersion newer than cuda.h");

int main() {}
