"""The torch-facing layer on a machine without a GPU: the C ABI torch loads (driven through
ctypes on the host backend), option handling, VMMALLOC=1 start-up, the torch adapter's build."""
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


def test_torch_adapter_compiles_against_the_installed_torchs_headers(tmp_path):
    """The adapter (Note [Adapter over the pluggable allocator]) against this torch's C++
    interface, syntax only: a CPU build of torch ships the headers but not libtorch_cuda,
    nor the one header CUDA builds generate (c10/cuda/impl/cuda_cmake_macros.h), which is
    stubbed here. A GPU machine builds and loads it for real (tests/test_graphs_gpu.py)."""
    import shutil

    import torch

    from vmmalloc import torch_adapter

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    include = Path(torch.__file__).parent / "include"
    if not (include / "torch/csrc/cuda/CUDAPluggableAllocator.h").exists():
        pytest.skip("this torch ships no CUDA allocator headers")
    if not torch_adapter.cuda_include_dirs(torch):
        pytest.skip("no CUDA runtime headers (cuda_runtime_api.h) on this machine")
    stub = tmp_path / "c10/cuda/impl/cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    source = torch_adapter.source_dir() / "torch_adapter.cpp"
    command = torch_adapter.compile_command(torch, source, tmp_path / "unused.so", syntax_only=True,
                                            extra_includes=(tmp_path,))
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_torch_adapter_says_why_it_cannot_be_built_without_torch_cuda(tmp_path, monkeypatch):
    import torch

    from vmmalloc import torch_adapter

    if (Path(torch.__file__).parent / "lib" / "libtorch_cuda.so").exists():
        pytest.skip("this torch has CUDA libraries")
    monkeypatch.setenv("VMMALLOC_CACHE", str(tmp_path))
    with pytest.raises(torch_adapter.AdapterUnavailable, match="no CUDA libraries"):
        torch_adapter.build(torch)
    assert not list(tmp_path.iterdir()), "nothing half-built is left behind"


def test_the_adapter_table_is_exported_with_its_version():
    from vmmalloc import _C

    lib = ctypes.CDLL(_C.__file__)
    lib.vmm_adapter_api_table.restype = ctypes.POINTER(ctypes.c_uint32)
    header = lib.vmm_adapter_api_table()
    source = (Path(__file__).parent.parent / "allocator/torch_adapter/adapter_abi.h").read_text()
    version = int(source.split("#define VMM_ADAPTER_ABI_VERSION")[1].split()[0])
    assert header[0] == version
    assert header[1] >= 8 * 20, "struct_size covers the table's function pointers"


class _PoolId(ctypes.Structure):
    _fields_ = [("first", ctypes.c_uint64), ("second", ctypes.c_uint64)]


class _Block(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_size_t), ("size", ctypes.c_size_t), ("requested", ctypes.c_size_t),
                ("stream", ctypes.c_size_t)]


_FILTER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_RELEASE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_BLOCK_VISITOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Block))
_POINTER_VISITOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)


class _Event(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("time_ns", ctypes.c_uint64), ("addr", ctypes.c_size_t),
                ("size", ctypes.c_uint64), ("aux", ctypes.c_uint64), ("stream", ctypes.c_size_t)]


class _SnapshotBlock(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_size_t), ("size", ctypes.c_size_t), ("requested", ctypes.c_size_t),
                ("state", ctypes.c_uint32)]


class _Segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_size_t), ("size", ctypes.c_size_t), ("stream", ctypes.c_size_t),
                ("kind", ctypes.c_uint32), ("pool", _PoolId), ("blocks", ctypes.POINTER(_SnapshotBlock)),
                ("block_count", ctypes.c_size_t)]


_EVENT_VISITOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Event))
_SEGMENT_VISITOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Segment))


class _Table(ctypes.Structure):
    """adapter_abi.h's vmm_adapter_api, field for field."""

    _fields_ = [
        ("abi_version", ctypes.c_uint32), ("struct_size", ctypes.c_uint32),
        ("last_error", ctypes.CFUNCTYPE(ctypes.c_char_p)),
        ("allocate", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_void_p))),
        ("deallocate", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
        ("deallocate_checked", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)),
        ("record_stream", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)),
        ("allocation_size", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t))),
        ("empty_cache", ctypes.CFUNCTYPE(ctypes.c_int)),
        ("set_memory_fraction", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_double)),
        ("memory_fraction", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double))),
        ("largest_free_block", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t))),
        ("device_memory", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t),
                                           ctypes.POINTER(ctypes.c_size_t))),
        ("stats", ctypes.c_void_p), ("reset_peak_stats", ctypes.c_void_p),
        ("reset_accumulated_stats", ctypes.c_void_p),
        ("create_or_incref_pool", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _PoolId)),
        ("begin_allocate_to_pool", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _PoolId, _FILTER,
                                                    ctypes.c_void_p, _RELEASE)),
        ("end_allocate_to_pool", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _PoolId)),
        ("release_pool", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _PoolId)),
        ("pool_use_count", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _PoolId, ctypes.POINTER(ctypes.c_int))),
        ("pool_allocations", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _PoolId, _BLOCK_VISITOR, ctypes.c_void_p)),
        ("restore_pool", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _PoolId, ctypes.POINTER(_Block),
                                          ctypes.c_size_t, _POINTER_VISITOR, ctypes.c_void_p)),
        ("device_in_use", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)),
        ("record_events", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_size_t)),
        ("events", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _EVENT_VISITOR, ctypes.c_void_p)),
        ("segments", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _SEGMENT_VISITOR, ctypes.c_void_p)),
        ("memory_totals", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                                           ctypes.POINTER(ctypes.c_int64))),
        ("allocation_info", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_int))),
        ("share", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                   ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))),
        ("is_shared_handle", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)),
        ("open_shared", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
                                         ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p))),
        ("close_shared", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
    ]


def adapter_table():
    """vmmalloc._C's vmm_adapter_api_table(), as a ctypes structure."""
    lib = ctypes.CDLL(_C.__file__)
    lib.vmm_adapter_api_table.restype = ctypes.POINTER(_Table)
    return lib.vmm_adapter_api_table()


def test_the_adapter_table_serves_pools_and_reports_failures_as_statuses(host_devices):
    """What the torch adapter calls, driven through ctypes on host-backend devices: statuses
    instead of exceptions, out of memory told apart, a route's filter called with the stream
    and its context released when the route ends."""
    from vmmalloc import _C

    _C.configure("memory_cap:32MiB")
    table = adapter_table().contents
    assert table.struct_size == ctypes.sizeof(_Table)
    out = ctypes.c_void_p()
    assert table.allocate(4 * MiB, 0, None, ctypes.byref(out)) == 0 and out.value
    eager = out.value
    assert table.allocate(64 * MiB, 0, None, ctypes.byref(out)) == 1  # VMM_OUT_OF_MEMORY
    assert b"out of memory. Tried to allocate 64.00 MiB" in table.last_error()
    size = ctypes.c_size_t()
    assert table.allocation_size(eager, ctypes.byref(size)) == 0 and size.value == 4 * MiB
    assert table.allocation_size(12345, ctypes.byref(size)) == 2  # VMM_FAILED
    assert b"not a live allocation" in table.last_error()
    assert table.deallocate_checked(12345) == 2 and b"does not hold" in table.last_error()
    fraction = ctypes.c_double()
    assert table.memory_fraction(5, ctypes.byref(fraction)) == 0 and fraction.value == 1.0
    assert not _C.device_allocator_exists(5), "a query of an unused device creates no allocator"

    pool = _PoolId(3, 4)
    seen, released = [], []
    filter_fn = _FILTER(lambda context, stream: seen.append(stream) or int(stream == 77))
    release_fn = _RELEASE(lambda context: released.append(context))
    assert table.begin_allocate_to_pool(0, pool, filter_fn, 1234, release_fn) == 0
    assert table.allocate(2 * MiB, 0, 77, ctypes.byref(out)) == 0
    in_pool = out.value
    assert table.allocate(2 * MiB, 0, 78, ctypes.byref(out)) == 0
    not_in_pool = out.value
    assert seen == [77, 78]
    assert table.end_allocate_to_pool(0, pool) == 0
    assert released == [1234], "the core released the filter's context with the route"
    blocks = []
    visit = _BLOCK_VISITOR(lambda context, block: blocks.append(block.contents.ptr))
    assert table.pool_allocations(0, pool, visit, None) == 0
    assert blocks == [in_pool]
    count = ctypes.c_int()
    assert table.pool_use_count(0, pool, ctypes.byref(count)) == 0 and count.value == 1
    freed = []
    wanted = (_Block * 1)(_Block(in_pool, 2 * MiB, 2 * MiB, 77))
    record = _POINTER_VISITOR(lambda context, ptr: freed.append(ptr))
    assert table.restore_pool(0, pool, wanted, 1, record, None) == 0
    assert freed == [in_pool]
    for ptr in (in_pool, not_in_pool, eager):
        table.deallocate(ptr)
    assert table.release_pool(0, pool) == 0
    assert _C.device_allocator(0).stats()["vmm.private_pools"] == 0
    assert _C.device_allocator(0).stats()["allocated_bytes.all.current"] == 0


def test_the_adapter_table_serves_events_segments_and_totals(host_devices):
    """What the adapter's history and profiler reports read (Note [Adapter history])."""
    _C.configure("memory_cap:32MiB")
    table = adapter_table().contents
    assert table.device_in_use(0) == 0
    assert table.record_events(0, 0) == 0 and table.device_in_use(0) == 0, "turning off creates nothing"
    seen: list[tuple] = []
    on_event = _EVENT_VISITOR(lambda context, e: seen.append((e.contents.kind, e.contents.addr, e.contents.size)))
    assert table.events(3, on_event, None) == 0 and seen == [] and table.device_in_use(3) == 0
    assert table.record_events(0, 100) == 0 and table.device_in_use(0) == 1
    out = ctypes.c_void_p()
    assert table.allocate(1000, 0, None, ctypes.byref(out)) == 0
    small = out.value
    assert table.allocate(5 * MiB, 0, None, ctypes.byref(out)) == 0
    large = out.value
    assert table.allocate(64 * MiB, 0, None, ctypes.byref(out)) == 1
    table.deallocate(small)
    assert table.events(0, on_event, None) == 0
    kinds = [kind for kind, _, _ in seen]
    # alloc 0, free_requested 1, free_completed 2, grow 3, oom 8 (adapter_abi.h)
    assert kinds.count(3) == 2 and (0, small, 1024) in seen and (0, large, 6 * MiB) in seen
    assert 8 in kinds and (1, small, 1024) in seen and (2, small, 1024) in seen
    allocated, reserved = ctypes.c_int64(), ctypes.c_int64()
    assert table.memory_totals(0, ctypes.byref(allocated), ctypes.byref(reserved)) == 0
    assert (allocated.value, reserved.value) == (6 * MiB, 8 * MiB)
    size, device = ctypes.c_size_t(), ctypes.c_int()
    assert table.allocation_info(large, ctypes.byref(size), ctypes.byref(device)) == 0
    assert (size.value, device.value) == (6 * MiB, 0)
    assert table.allocation_info(small, ctypes.byref(size), ctypes.byref(device)) == 2
    segments: list[tuple] = []

    def on_segment(context, s):
        s = s.contents
        blocks = [(s.blocks[i].addr, s.blocks[i].size, s.blocks[i].state) for i in range(s.block_count)]
        segments.append((s.base, s.size, s.kind, blocks))

    visit = _SEGMENT_VISITOR(on_segment)
    assert table.segments(0, visit, None) == 0
    assert (large, 6 * MiB, 0, [(large, 6 * MiB, 0)]) in segments  # VMM_SEGMENT_LARGE, VMM_BLOCK_ACTIVE
    assert sum(size for _, size, _, _ in segments) == reserved.value, "regions add up to reserved"
    for _base, size, _, blocks in segments:
        assert sum(b[1] for b in blocks) == size, "blocks tile their region"
    table.deallocate(large)


@pytest.mark.skipif(vmmalloc.cuda_available(), reason="CUDA is available: the GPU suite covers enabling")
def test_vmmalloc_1_without_a_gpu_warns_once_and_the_script_runs():
    code = "import torch\nprint(float(torch.ones(3).sum()))\n"
    proc = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", code], capture_output=True,
                          text=True, env={**os.environ, "VMMALLOC": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3.0"
    assert proc.stderr.count("vmmalloc is inactive") == 1, proc.stderr


def test_a_key_repeated_in_vmmalloc_conf_is_refused_everywhere():
    with pytest.raises(ValueError, match="key 'memory_cap' is given twice"):
        torch_allocator.build_conf({}, "memory_cap:1GiB,memory_cap:2GiB")
    with pytest.raises(ValueError, match="key 'memory_cap' is given twice"):
        _C.parse_config("memory_cap:1GiB,memory_cap:2GiB")
    assert torch_allocator.build_conf({"memory_cap": "2GiB"}, "memory_cap:1GiB") == "memory_cap:2GiB", \
        "a keyword still overrides the environment"
