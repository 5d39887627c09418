// DLPack (the legacy, unversioned ABI every torch release reads) for exporting raw device
// or host memory as a 1-D uint8 tensor. Only the structs the exporter fills are declared;
// their layout is DLPack's, which is frozen.
#pragma once

#include <cstdint>

namespace vmm::dlpack {

enum DeviceType : std::int32_t { kCPU = 1, kCUDA = 2 };

struct Device {
  std::int32_t device_type;
  std::int32_t device_id;
};

struct DataType {
  std::uint8_t code;  // 1: unsigned int
  std::uint8_t bits;
  std::uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  DataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // null: compact row-major
  std::uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

// A capsule with this name is a DLPack export not yet consumed; consumers rename it.
constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

}  // namespace vmm::dlpack
