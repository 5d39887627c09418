"""A tiny shared library, built against the running torch, that raises
torch.OutOfMemoryError from inside vmmalloc's allocator.

torch turns a C++ ``c10::OutOfMemoryError`` into ``torch.OutOfMemoryError``; throwing one
needs torch's headers and libc10, which vmmalloc's own extension must not link. So this
one function is compiled on first use (about a second) and cached per torch version.
Without a C++ compiler, out of memory still raises, as a RuntimeError with the same
message.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

SOURCE = r"""
#include <c10/util/Exception.h>
#include <cstddef>
extern "C" __attribute__((visibility("default")))
void vmm_torch_throw_oom(const char* message, std::size_t, int) {
  TORCH_CHECK_WITH(OutOfMemoryError, false, message);
}
"""

_loaded: ctypes.CDLL | None = None


def cache_dir() -> Path:
    root = os.environ.get("VMMALLOC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vmmalloc")
    return Path(root)


def build(torch_module) -> Path:
    """Compiles the glue for this torch (cached); returns the library's path."""
    torch_dir = Path(torch_module.__file__).parent
    abi = int(torch_module._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(f"{SOURCE}{torch_module.__version__}{torch_dir}{abi}".encode()).hexdigest()[:16]
    target = cache_dir() / f"torch_glue-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = target.with_suffix(".cpp")
    source.write_text(SOURCE)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    compiler = os.environ.get("CXX", "c++")
    command = [compiler, "-O1", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               f"-I{torch_dir / 'include'}", str(source), f"-L{torch_dir / 'lib'}", "-lc10",
               f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building vmmalloc's torch glue failed:\n{' '.join(command)}\n{result.stderr[-2000:]}")
    os.replace(partial, target)  # atomic: concurrent ranks never load a half-written file
    return target


def install_oom_handler(torch_module) -> bool:
    """Makes vmmalloc raise torch.OutOfMemoryError; returns False (with a warning) when the
    glue cannot be built, in which case OOM raises RuntimeError."""
    global _loaded
    from vmmalloc import _C

    if _loaded is None:
        try:
            _loaded = ctypes.CDLL(str(build(torch_module)))
        except (OSError, RuntimeError) as error:
            warnings.warn(f"vmmalloc: out of memory will raise RuntimeError, not torch.OutOfMemoryError: {error}",
                          stacklevel=3)
            return False
    address = ctypes.cast(_loaded.vmm_torch_throw_oom, ctypes.c_void_p).value
    _C.set_oom_handler(address)
    return True


if __name__ == "__main__":  # build ahead of time: python -m vmmalloc.torch_glue
    import torch

    print(build(torch))
    sys.exit(0)
