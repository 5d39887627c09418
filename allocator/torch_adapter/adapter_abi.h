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

#define VMM_ADAPTER_ABI_VERSION 3

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

/* An event of the core's event log (allocator/core/event_log.hpp); kind is one of VMM_EVENT_*. */
enum vmm_event_kind {
  VMM_EVENT_ALLOC = 0,
  VMM_EVENT_FREE_REQUESTED = 1,
  VMM_EVENT_FREE_COMPLETED = 2,
  VMM_EVENT_GROW = 3,    /* physical chunks created: reserved += size */
  VMM_EVENT_RELEASE = 4, /* physical chunks given back: reserved -= size */
  VMM_EVENT_STITCH = 5,  /* a new virtual mapping over free chunks */
  VMM_EVENT_MAP = 6,     /* a KV page mapped into a virtual tensor */
  VMM_EVENT_UNMAP = 7,   /* a KV page given up */
  VMM_EVENT_OOM = 8      /* out of memory for `size` bytes; aux: the device's free bytes */
};

typedef struct vmm_event {
  uint32_t kind;
  uint64_t time_ns; /* std::chrono::steady_clock */
  uintptr_t addr;
  uint64_t size;
  uint64_t aux;
  uintptr_t stream;
} vmm_event;

/* A region of a snapshot (Note [Snapshot segments] in allocator/core/caching_allocator.hpp):
 * its blocks tile it in address order. */
enum vmm_segment_kind {
  VMM_SEGMENT_LARGE = 0,
  VMM_SEGMENT_SMALL = 1,
  VMM_SEGMENT_PAGES = 2,
  VMM_SEGMENT_FREE = 3
};
enum vmm_block_state { VMM_BLOCK_ACTIVE = 0, VMM_BLOCK_PENDING_FREE = 1, VMM_BLOCK_INACTIVE = 2 };

typedef struct vmm_snapshot_block {
  uintptr_t addr;
  size_t size;
  size_t requested;
  uint32_t state; /* vmm_block_state */
} vmm_snapshot_block;

typedef struct vmm_segment {
  uintptr_t base;
  size_t size;
  uintptr_t stream;
  uint32_t kind; /* vmm_segment_kind */
  vmm_pool_id pool;
  const vmm_snapshot_block* blocks; /* valid during the visit only */
  size_t block_count;
} vmm_segment;

typedef int (*vmm_stream_filter)(void* context, void* stream); /* non-zero: route it */
typedef void (*vmm_release_context)(void* context);
typedef void (*vmm_stat_visitor)(void* context, const char* key, int64_t value);
typedef void (*vmm_block_visitor)(void* context, const vmm_block* block);
typedef void (*vmm_pointer_visitor)(void* context, uintptr_t ptr);
typedef void (*vmm_event_visitor)(void* context, const vmm_event* event);
typedef void (*vmm_segment_visitor)(void* context, const vmm_segment* segment);

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

  /* Private pools (Note [Private pools] in allocator/core/private_pool.hpp). */
  int (*create_or_incref_pool)(int device, vmm_pool_id pool);
  /* The core owns `context` from here on and calls release(context) when the route ends
   * (or at once, if this call fails). */
  int (*begin_allocate_to_pool)(int device, vmm_pool_id pool, vmm_stream_filter filter, void* context,
                                vmm_release_context release);
  int (*end_allocate_to_pool)(int device, vmm_pool_id pool);
  int (*release_pool)(int device, vmm_pool_id pool);
  int (*pool_use_count)(int device, vmm_pool_id pool, int* out);
  int (*pool_allocations)(int device, vmm_pool_id pool, vmm_block_visitor visit, void* context);
  /* Frees every live allocation of the pool (each one reported to `freed`), then
   * allocates exactly `blocks`. */
  int (*restore_pool)(int device, vmm_pool_id pool, const vmm_block* blocks, size_t count,
                      vmm_pointer_visitor freed, void* context);

  /* Introspection. device_in_use: 1 once the device has an allocator, else 0. */
  int (*device_in_use)(int device);
  /* The event log of the device (created with capacity > 0): the last `capacity` events
   * from now on, 0 for off; the events kept so far are forgotten. */
  int (*record_events)(int device, size_t capacity);
  int (*events)(int device, vmm_event_visitor visit, void* context); /* oldest first */
  int (*segments)(int device, vmm_segment_visitor visit, void* context);
  /* allocated and reserved bytes now (torch's profiler reports them with every event). */
  int (*memory_totals)(int device, int64_t* allocated, int64_t* reserved);
  /* The size and device of a live allocation. */
  int (*allocation_info)(void* ptr, size_t* size, int* device);

  /* CUDA IPC (Note [Sharing memory between processes] in allocator/core/shared_memory.hpp).
   * share: the handle of the live allocation at ptr, copied into `buffer` when it fits in
   * `capacity` bytes (*length: its size either way; VMM_FAILED when it did not fit), and
   * ptr's offset in the range the handle maps. */
  int (*share)(void* ptr, char* buffer, size_t capacity, size_t* length, size_t* offset);
  /* 1 when `handle` was written by share (of any process), else 0. */
  int (*is_shared_handle)(const char* handle, size_t length);
  /* Maps the memory a handle describes on `device`: *base is its first byte; *token is
   * given to close_shared when the last user is gone. */
  int (*open_shared)(const char* handle, size_t length, int device, void** base, void** token);
  /* Unmaps and releases it (after the device's queued work); never fails: errors are
   * reported on stderr. */
  void (*close_shared)(void* token);
} vmm_adapter_api;

/* Exported by vmmalloc._C. */
const vmm_adapter_api* vmm_adapter_api_table(void);

#ifdef __cplusplus
}
#endif

#endif /* VMM_ADAPTER_ABI_H */
