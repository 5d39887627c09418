// Page-locking ("pinning") host memory that the caller allocated, so that copies between it
// and a GPU run at the bus's full rate and asynchronously to the host (docs/FACTS.md: 55 GB/s
// each way on an H200). Used by the offloading KV cache for its host copy of the layers.
//
// Note [Pinning through the driver, not the runtime]
// The CUDA runtime remembers the last failed call per thread and PyTorch reads that state
// after launching kernels (cudaGetLastError), so a failed cudaHostRegister would surface as
// a spurious error in an unrelated kernel launch. Driver calls leave that state alone, so a
// failed pin here is reported once, to the caller, and nowhere else.
#pragma once

#include <cstddef>
#include <string>

namespace vmm {

// Pins [address, address + bytes) for every context (CU_MEMHOSTREGISTER_PORTABLE), with
// `device`'s primary context current during the call. Returns "" on success, otherwise
// why not (the driver's error, or why CUDA is unavailable); nothing is pinned then.
std::string pin_host_memory(void* address, std::size_t bytes, int device);

// Undoes pin_host_memory for the range starting at `address`. Returns "" or the error.
std::string unpin_host_memory(void* address, int device);

}  // namespace vmm
