/* The C interface between vmmalloc's core (the extension vmmalloc._C, which exports
 * vmm_adapter_api_table) and the torch adapter (torch_adapter.cpp, built against the
 * running torch). Plain C so that the two sides share no C++ types, exceptions or
 * standard-library layout: the core never sees torch, the adapter never sees the core's
 * classes.
 *
 * Every function but deallocate returns a vmm_status; on failure last_error() holds the
 * message (per thread) until the next call of this thread fails. Pool ids are torch's
 * MempoolId_t. Streams are cudaStream_t values. */
#ifndef VMM_ADAPTER_ABI_H
#define VMM_ADAPTER_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VMM_ADAPTER_ABI_VERSION 1

enum vmm_status { VMM_OK = 0, VMM_OUT_OF_MEMORY = 1, VMM_FAILED = 2 };

typedef struct vmm_pool_id {
  uint64_t first;
  uint64_t second;
} vmm_pool_id;

/* A live allocation of a pool: what it holds, what was asked for, its stream. */
typedef struct vmm_block {
  uintptr_t ptr;
  size_t size;
  size_t requested;
  uintptr_t stream;
} vmm_block;

typedef int (*vmm_stream_filter)(void* context, void* stream); /* non-zero: route it */
typedef void (*vmm_release_context)(void* context);
typedef void (*vmm_stat_visitor)(void* context, const char* key, int64_t value);
typedef void (*vmm_block_visitor)(void* context, const vmm_block* block);
typedef void (*vmm_pointer_visitor)(void* context, uintptr_t ptr);

typedef struct vmm_adapter_api {
  uint32_t abi_version; /* VMM_ADAPTER_ABI_VERSION */
  uint32_t struct_size; /* sizeof(vmm_adapter_api) */
  const char* (*last_error)(void);

  /* Never stores null: out of memory is VMM_OUT_OF_MEMORY, with PyTorch's message. */
  int (*allocate)(size_t size, int device, void* stream, void** out);
  /* Frees a pointer of any device; a pointer vmmalloc does not hold is reported on stderr
   * and ignored (it runs inside deleters, which must not throw). */
  void (*deallocate)(void* ptr);
  /* The same, for direct callers: a pointer vmmalloc does not hold is VMM_FAILED. */
  int (*deallocate_checked)(void* ptr);
  int (*record_stream)(void* ptr, void* stream);
  int (*allocation_size)(void* ptr, size_t* out);

  /* Queries of a device vmmalloc has not used yet answer as for an empty allocator and
   * create none (an allocator makes its device a peer of the others in use). */
  int (*empty_cache)(void); /* every device's main arena */
  int (*set_memory_fraction)(int device, double fraction);
  int (*memory_fraction)(int device, double* out);
  int (*largest_free_block)(int device, size_t* out);
  int (*device_memory)(int device, size_t* total, size_t* free_bytes);

  int (*stats)(int device, vmm_stat_visitor visit, void* context);
  int (*reset_peak_stats)(int device);
  int (*reset_accumulated_stats)(int device);
  int (*history_enabled)(int device); /* 1 or 0 */

  /* Private pools (Note [Private pools] in allocator/private_pool.hpp). */
  int (*create_or_incref_pool)(int device, vmm_pool_id pool);
  /* The core owns `context` from here on and calls release(context) when the route ends
   * (or at once, if this call fails). */
  int (*begin_allocate_to_pool)(int device, vmm_pool_id pool, vmm_stream_filter filter,
                                void* context, vmm_release_context release);
  int (*end_allocate_to_pool)(int device, vmm_pool_id pool);
  int (*release_pool)(int device, vmm_pool_id pool);
  int (*pool_use_count)(int device, vmm_pool_id pool, int* out);
  int (*pool_allocations)(int device, vmm_pool_id pool, vmm_block_visitor visit, void* context);
  /* Frees every live allocation of the pool (each one reported to `freed`), then
   * allocates exactly `blocks`. */
  int (*restore_pool)(int device, vmm_pool_id pool, const vmm_block* blocks, size_t count,
                      vmm_pointer_visitor freed, void* context);
} vmm_adapter_api;

/* Exported by vmmalloc._C. */
const vmm_adapter_api* vmm_adapter_api_table(void);

#ifdef __cplusplus
}
#endif

#endif /* VMM_ADAPTER_ABI_H */
