#include "backend/process_descriptors.hpp"

#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>

#include "backend/backend.hpp"

// Older C libraries lack the names; the numbers are the same on every architecture that
// has the unified syscall table (x86_64 and aarch64 included).
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

namespace vmm {
namespace {

std::string too_old(const char* call) {
  return std::string("vmmalloc: opening memory shared by another process needs the ") + call +
         " system call (Linux 5.6 or newer), which this kernel does not have";
}

}  // namespace

ProcessDescriptors::ProcessDescriptors(int pid, std::uint64_t start_time) : pid_(pid) {
  const std::string exited = "vmmalloc: the process that shared this memory (pid " + std::to_string(pid) +
                             ") has exited; a sender must stay alive until its receivers have opened "
                             "what it sent";
  pidfd_ = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd_ < 0) {
    const int err = errno;
    if (err == ENOSYS) throw BackendError(too_old("pidfd_open"));
    if (err == ESRCH) throw BackendError(exited);
    throw BackendError("vmmalloc: pidfd_open(" + std::to_string(pid) + ") failed: " + std::strerror(err));
  }
  // The pidfd names whichever process has the pid now: the start time tells the sender from
  // a later process given its pid. Read after the open, so the process it names cannot have
  // been replaced in between.
  if (start_time != 0 && process_start_time(pid) != start_time) {
    close(pidfd_);
    throw BackendError(exited + " (another process has its pid now)");
  }
}

ProcessDescriptors::~ProcessDescriptors() { close(pidfd_); }

int ProcessDescriptors::take(int fd) const {
  const int got = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd_, fd, 0));
  if (got >= 0) return got;
  const int err = errno;
  const std::string which = "descriptor " + std::to_string(fd) + " of process " + std::to_string(pid_);
  if (err == ENOSYS) throw BackendError(too_old("pidfd_getfd"));
  if (err == EPERM) {
    throw BackendError(
        "vmmalloc: not permitted to take " + which +
        " (pidfd_getfd: Operation not permitted). Opening memory another process shared needs "
        "ptrace access to it: run both processes as the same user, and check the kernel's Yama "
        "policy (/proc/sys/kernel/yama/ptrace_scope: 0 allows it; 1 allows it when the sender is a "
        "descendant of the receiver, or when the sender runs vmmalloc with share_with_any_process on, "
        "the default; 2 and 3 need CAP_SYS_PTRACE) and, in a container, its seccomp profile and "
        "CAP_SYS_PTRACE. PyTorch's expandable segments share memory the same way and need the same.");
  }
  if (err == EBADF) {
    throw BackendError("vmmalloc: " + which +
                       " is not open: the sender has released the memory it shared (a tensor "
                       "must stay alive in the sender until every receiver has opened it)");
  }
  if (err == EMFILE || err == ENFILE) {
    throw BackendError("vmmalloc: taking " + which +
                       " failed: too many open files; raise the "
                       "limit (ulimit -n)");
  }
  throw BackendError("vmmalloc: pidfd_getfd of " + which + " failed: " + std::strerror(err));
}

std::uint64_t process_start_time(int pid) noexcept {
  try {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    // Field 2, the command, is in parentheses and may hold spaces: count from its end.
    const std::size_t close_paren = text.rfind(')');
    if (close_paren == std::string::npos) return 0;
    std::istringstream fields(text.substr(close_paren + 1));
    std::string field;
    for (int i = 3; i <= 22; ++i) {
      if (!(fields >> field)) return 0;
    }
    return std::stoull(field);
  } catch (...) {
    return 0;
  }
}

void allow_any_process_to_take_descriptors() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    std::ifstream scope("/proc/sys/kernel/yama/ptrace_scope");
    int value = 0;
    if (scope >> value && value == 1) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
  });
}

void raise_descriptor_limit() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= limit.rlim_max) return;
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  });
}

}  // namespace vmm
