// The receiver's side of memory another process shared (Note [Sharing memory between
// processes] in core/shared_memory.hpp): its descriptors taken from the sender, imported and
// mapped into this process. Beside the core, not in it: it holds no allocator state and
// needs the process primitives of backend/process_descriptors.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.hpp"
#include "core/caching_allocator.hpp"
#include "core/shared_memory.hpp"

namespace vmm {

// The handle another process opens the live allocation at `ptr` with (Note [Sharing memory
// between processes]), naming this process by pid and start time; *offset: ptr's offset in
// what it maps. With share_with_any_process, lets processes of this user take the
// descriptors it lists (backend/process_descriptors.hpp). Throws as CachingAllocator::share.
std::string share_handle(CachingAllocator& allocator, std::uintptr_t ptr, std::size_t* offset);

// Grants `peer` the mappings open on `backend` (a device that became a peer later: Note
// [Peers are the devices in use]). Failures are reported on stderr.
void grant_shared_mappings(const Backend& backend, int peer);

// The receiver's view of shared memory: on construction every piece's descriptor is taken
// from the sender, imported, and mapped back to back into a new range, granted to this
// device and its peers (and peers added later: grant_shared_mappings); on destruction all of
// it is undone. The constructor throws BackendError or std::invalid_argument and then leaves
// nothing behind.
class SharedMapping {
 public:
  SharedMapping(std::shared_ptr<Backend> backend, const SharedDescription& description);
  ~SharedMapping();  // never throws: failures are reported on stderr
  SharedMapping(const SharedMapping&) = delete;
  SharedMapping& operator=(const SharedMapping&) = delete;

  std::uintptr_t base() const { return base_; }
  std::size_t bytes() const { return bytes_; }

 private:
  friend void grant_shared_mappings(const Backend& backend, int peer);
  // wait_for_device: synchronize before unmapping (work may still read the range).
  void undo(bool wait_for_device) noexcept;

  std::shared_ptr<Backend> backend_;
  std::uintptr_t base_ = 0;
  std::size_t bytes_ = 0;
  std::vector<std::pair<ChunkHandle, std::size_t>> handles_;  // imported, in mapping order
  std::size_t mapped_ = 0;                                    // bytes mapped from base_, whole handles
};

}  // namespace vmm
