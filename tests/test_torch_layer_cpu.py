"""The torch-facing layer on a machine without a GPU: the C ABI torch loads (driven through
ctypes on the host backend), option handling, VMMALLOC=1 start-up, the OOM glue build."""
from __future__ import annotations

import ctypes
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import vmmalloc
from vmmalloc import _C, torch_allocator, torch_memory_api

MiB = 1 << 20


@pytest.fixture
def abi(host_devices):
    """vmm_* functions of the extension, with per-device allocators on the host backend."""
    _C.configure("memory_cap:32MiB")
    lib = ctypes.CDLL(_C.__file__)
    lib.vmm_malloc.restype = ctypes.c_void_p
    lib.vmm_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.vmm_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.vmm_set_memory_fraction.argtypes = [ctypes.c_double, ctypes.c_int]
    lib.vmm_record_stream.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.vmm_base_alloc.restype = ctypes.c_void_p
    lib.vmm_base_alloc.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    yield lib


def test_abi_serves_each_device_from_its_own_allocator(abi):
    a = abi.vmm_malloc(5 * MiB, 0, None)
    b = abi.vmm_malloc(3 * MiB, 1, None)
    assert a and b
    assert _C.device_allocator(0).stats()["allocated_bytes.all.current"] == 6 * MiB
    assert _C.device_allocator(1).stats()["allocated_bytes.all.current"] == 4 * MiB
    assert _C.device_allocator(1).backend.device == 1
    size = ctypes.c_size_t(0)
    assert abi.vmm_base_alloc(a, ctypes.byref(size)) == a
    assert size.value == 6 * MiB
    abi.vmm_free(a, 5 * MiB, 0, None)
    abi.vmm_free(b, 3 * MiB, 1, None)
    assert _C.device_allocator(0).stats()["allocated_bytes.all.current"] == 0


def test_abi_memory_fraction_and_empty_cache(abi):
    abi.vmm_set_memory_fraction(0.25, 0)
    assert _C.device_allocator(0).memory_cap == 16 * MiB
    p = abi.vmm_malloc(10 * MiB, 0, None)
    abi.vmm_free(p, 10 * MiB, 0, None)
    assert _C.device_allocator(0).stats()["reserved_bytes.all.current"] == 10 * MiB
    abi.vmm_empty_cache()
    assert _C.device_allocator(0).stats()["reserved_bytes.all.current"] == 0


def test_abi_record_stream_defers_reuse(abi):
    p = abi.vmm_malloc(4 * MiB, 0, None)
    abi.vmm_record_stream(p, ctypes.c_void_p(2))
    abi.vmm_free(p, 4 * MiB, 0, None)
    stats = _C.device_allocator(0).stats()
    assert stats["allocated_bytes.all.current"] == 0
    assert stats["active_bytes.all.current"] == 4 * MiB


def test_abi_free_of_unknown_pointer_does_not_raise(abi, capfd):
    abi.vmm_malloc(100, 0, None)  # the device allocator exists
    abi.vmm_free(ctypes.c_void_p(0x1234000), 512, 0, None)
    assert "does not hold" in capfd.readouterr().err


def test_configure_refuses_new_options_once_memory_was_allocated(abi):
    p = abi.vmm_malloc(100, 0, None)
    with pytest.raises(RuntimeError, match="cannot change once memory was allocated"):
        _C.configure("memory_cap:8MiB")
    abi.vmm_free(p, 100, 0, None)


def test_build_conf_merges_keywords_over_the_environment_string():
    conf = torch_allocator.build_conf({"memory_cap": "2GiB", "stitching": False}, "memory_fraction:0.5,reuse_ratio:1.5")
    assert conf == "reuse_ratio:1.5,memory_cap:2GiB,stitching:false"
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        torch_allocator.build_conf({"colour": 1})
    with pytest.raises(ValueError, match="'max_cached_mappings'"):
        torch_allocator.build_conf({}, "max_cached_mappings:zero")


def test_nested_stats_round_trip_through_torch_flattening():
    flat = {"allocated_bytes.all.current": 5, "num_ooms": 1, "vmm.chunks.peak": 3}
    nested = torch_memory_api.nested(flat)
    assert nested["allocated_bytes"]["all"]["current"] == 5
    assert nested["vmm"]["chunks"]["peak"] == 3
    assert nested["num_ooms"] == 1


@pytest.mark.skipif(vmmalloc.cuda_available(), reason="CUDA is available: the GPU suite covers enabling")
def test_enable_without_cuda_says_why():
    code = "import vmmalloc\ntry:\n    vmmalloc.enable_vmm_allocator()\nexcept RuntimeError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "CUDA is unavailable" in out


def test_autostart_pth_is_installed_and_cheap_when_unset():
    paths = [Path(p) / "vmmalloc-autostart.pth" for p in site.getsitepackages() + [site.getusersitepackages()]]
    installed = [p for p in paths if p.exists()]
    assert installed, f"vmmalloc-autostart.pth not found in {paths}"
    assert "VMMALLOC" in installed[0].read_text()
    env = {k: v for k, v in os.environ.items() if k != "VMMALLOC"}
    out = subprocess.run([sys.executable, "-c", "import sys; print('vmmalloc' in sys.modules)"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "False", "with VMMALLOC unset nothing of vmmalloc may load"


def test_autostart_arms_on_vmmalloc_1_and_rejects_unknown_values():
    code = "import sys; print('vmmalloc._autostart' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "VMMALLOC": "1"}, check=True).stdout
    assert out.strip() == "True"
    bad = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                         env={**os.environ, "VMMALLOC": "maybe"})
    assert bad.returncode != 0
    assert "VMMALLOC='maybe' is not understood" in bad.stderr


def test_torch_glue_builds_against_the_installed_torch(tmp_path, monkeypatch):
    import torch

    from vmmalloc import torch_glue

    monkeypatch.setenv("VMMALLOC_CACHE", str(tmp_path))
    library = torch_glue.build(torch)
    assert library.exists()
    assert ctypes.CDLL(str(library)).vmm_torch_throw_oom
    assert torch_glue.build(torch) == library  # cached
