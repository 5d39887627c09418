"""The torch adapter: vmmalloc as torch's CUDA allocator object, built against the running torch.

``torch.cuda.memory.CUDAPluggableAllocator`` lets a C allocator serve malloc and free and
five hooks; CUDA graph pools, graph-tree checkpoints, ``torch.cuda.MemPool``, device
statistics for C++ callers, OOM observers and ``cacheInfo`` are out of its reach (they
raise "CUDAPluggableAllocator does not yet support ..."). The adapter
(``allocator/torch_adapter/torch_adapter.cpp``) implements them over vmmalloc's core, and
raises ``torch.OutOfMemoryError`` itself. It needs torch's C++ headers and libraries, which
vmmalloc's own extension must not link, so it is compiled on first use (about 15 s, once
per torch build) and cached under ``$VMMALLOC_CACHE`` (default ``~/.cache/vmmalloc``).
Build it ahead of time with ``python -m vmmalloc.torch_adapter``.

Without a C++ compiler, torch's CUDA headers or libtorch_cuda, vmmalloc falls back to the
plain pluggable allocator and says once what that leaves out.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
from pathlib import Path

SOURCE_NAMES = ("torch_adapter.cpp", "adapter_abi.h", "trace_recorder.h")
# VMMALLOC_TORCH_ADAPTER=0 keeps the plain pluggable allocator (comparisons, fallbacks).
DISABLE_VARIABLE = "VMMALLOC_TORCH_ADAPTER"


class AdapterUnavailable(RuntimeError):
    """The adapter cannot be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
    """Where built adapters are kept: ``$VMMALLOC_CACHE``, else ``~/.cache/vmmalloc``."""
    root = os.environ.get("VMMALLOC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vmmalloc")
    return Path(root)


def source_dir() -> Path:
    """The adapter's sources: in a checkout allocator/torch_adapter, in a wheel vmmalloc/torch_adapter."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "torch_adapter", here.parent / "allocator" / "torch_adapter"):
        if all((candidate / name).is_file() for name in SOURCE_NAMES):
            return candidate
    raise AdapterUnavailable("the torch adapter's sources are not installed with vmmalloc "
                             "(reinstall vmmalloc)")


def cuda_include_dirs(torch_module) -> list[Path]:
    """Directories that hold cuda_runtime_api.h: CUDA_HOME, /usr/local/cuda, NVIDIA's wheels."""
    candidates: list[Path] = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append(Path(os.environ[variable]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    site = Path(torch_module.__file__).resolve().parent.parent
    candidates += sorted(site.glob("nvidia/*/include")) + sorted(site.glob("nvidia/cu*/include"))
    return [c for c in candidates if (c / "cuda_runtime_api.h").is_file()][:1]


def compile_command(torch_module, source: Path, output: Path, syntax_only: bool = False,
                    extra_includes: tuple[Path, ...] = ()) -> list[str]:
    """The compiler call that builds the adapter against `torch_module`."""
    torch_dir = Path(torch_module.__file__).resolve().parent
    abi = int(torch_module._C._GLIBCXX_USE_CXX11_ABI)
    includes = [*extra_includes, torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
                *cuda_include_dirs(torch_module), source.parent]
    command = [os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{path}" for path in includes), str(source)]
    if syntax_only:
        return [*command, "-fsyntax-only"]
    lib = torch_dir / "lib"
    # CUDAPluggableAllocator and changeCurrentAllocator live in libtorch_cuda (2.11, 2.13).
    libraries = [name for name in ("torch_cuda", "c10_cuda", "torch", "c10")
                 if (lib / f"lib{name}.so").exists()]
    return [*command, "-shared", f"-L{lib}", *(f"-l{name}" for name in libraries),
            f"-Wl,-rpath,{lib}", "-o", str(output)]


def build(torch_module) -> Path:
    """Compiles the adapter for this torch (cached); returns the library's path.

    Raises AdapterUnavailable, naming the cause, when torch has no CUDA libraries or the
    compiler fails.
    """
    torch_dir = Path(torch_module.__file__).resolve().parent
    if not (torch_dir / "lib" / "libtorch_cuda.so").exists():
        raise AdapterUnavailable(f"torch {torch_module.__version__} has no CUDA libraries (libtorch_cuda.so)")
    sources = source_dir()
    digest = hashlib.sha256()
    for path in sorted(sources.iterdir()):  # every source: a header change must rebuild too
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{torch_module.__version__}{torch_dir}{torch_module._C._GLIBCXX_USE_CXX11_ABI}".encode())
    target = cache_dir() / f"torch_adapter-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = compile_command(torch_module, sources / "torch_adapter.cpp", partial)
    print(f"vmmalloc: building the torch adapter for torch {torch_module.__version__} "
          f"(once, about 15 s; cached in {target.parent})", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise AdapterUnavailable(f"no C++ compiler ({command[0]}: {error}); install one, or set CXX") from None
    if result.returncode != 0:
        raise AdapterUnavailable(f"building the torch adapter failed:\n{' '.join(command)}\n{result.stderr[-3000:]}")
    os.replace(partial, target)  # atomic: concurrent ranks never load a half-written file
    return target


def install(torch_module) -> None:
    """Makes vmmalloc torch's CUDA allocator through the adapter (before CUDA is initialized).

    Raises AdapterUnavailable when the adapter cannot be built or loaded, RuntimeError when
    torch refuses the swap.
    """
    from vmmalloc import _C

    library = ctypes.CDLL(str(build(torch_module)))
    core = ctypes.CDLL(_C.__file__)
    core.vmm_adapter_api_table.restype = ctypes.c_void_p
    library.vmm_torch_adapter_install.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    error = ctypes.create_string_buffer(2048)
    if library.vmm_torch_adapter_install(core.vmm_adapter_api_table(), error, len(error)) != 0:
        raise RuntimeError(error.value.decode(errors="replace"))


def wanted() -> bool:
    """Whether VMMALLOC_TORCH_ADAPTER allows the adapter (default: yes)."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() not in ("0", "false", "off", "no")


if __name__ == "__main__":  # build ahead of time: python -m vmmalloc.torch_adapter
    import torch

    print(build(torch))
