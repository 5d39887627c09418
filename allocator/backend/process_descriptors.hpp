// Descriptors of another process, copied into this one: how a receiver takes the file
// descriptors a sender exported its physical handles as (Note [Shared handles] in
// backend.hpp). pidfd_open + pidfd_getfd (Linux 5.6), as PyTorch's expandable segments do,
// so that no socket or helper process is needed: the handle names the sender's pid and
// descriptor numbers.
//
// pidfd_getfd needs ptrace access to the sender (PTRACE_MODE_ATTACH_REALCREDS): the same
// user, and no Yama ptrace_scope, seccomp profile (containers) or missing CAP_SYS_PTRACE
// forbidding it. Where it is forbidden the error says which of those to look at. The handle
// carries the sender's start time beside its pid, so a pid reused by another process after
// the sender exited is refused rather than read.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vmm {

class ProcessDescriptors {
 public:
  // Opens process `pid`, which started at `start_time` (process_start_time; 0: not
  // checked). Throws BackendError (ENOSYS: the kernel is too old; ESRCH, or another start
  // time: the process has exited, its pid maybe reused).
  ProcessDescriptors(int pid, std::uint64_t start_time);
  ~ProcessDescriptors();
  ProcessDescriptors(const ProcessDescriptors&) = delete;
  ProcessDescriptors& operator=(const ProcessDescriptors&) = delete;

  // A new descriptor of this process (close-on-exec) for descriptor `fd` of that process;
  // the caller closes it. Throws BackendError naming the cause (EPERM: ptrace policy; EBADF:
  // the sender closed it, i.e. released the memory).
  int take(int fd) const;

 private:
  int pid_;
  int pidfd_;
};

// When process `pid` started, in clock ticks since boot (/proc/<pid>/stat, field 22); 0 when
// that cannot be read. Never throws.
std::uint64_t process_start_time(int pid) noexcept;

// Where Yama's ptrace_scope is 1, lets every process of this user take this process's
// descriptors (prctl PR_SET_PTRACER_ANY), once. Scope 0 needs nothing, scopes 2 and 3 cannot
// be relaxed by a process. Never throws.
void allow_any_process_to_take_descriptors() noexcept;

// Raises this process's soft limit on open descriptors to its hard limit, once: a sender
// keeps one descriptor open per exported handle (a 16 GiB tensor of 16 MiB handles is
// 1024, the usual soft limit). Never throws; a refused raise leaves the limit as it was.
void raise_descriptor_limit() noexcept;

}  // namespace vmm
