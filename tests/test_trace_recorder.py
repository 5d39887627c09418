"""The torch adapter's memory history (Note [Adapter history] in
allocator/torch_adapter/trace_recorder.h) on a machine without a GPU: the recorder is built
against the installed torch's c10 with a small driver (tests/native/trace_recorder_check.cpp)
that does what the adapter does around each core call, over host-backend devices. What torch
turns into its snapshot dict is checked here entry by entry; the GPU suite checks the dict
itself (tests/test_history_gpu.py)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmmalloc import _C

MiB = 1 << 20
NEVER, STATE, ALLOC, ALL = 0, 1, 2, 3
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from vmmalloc import torch_adapter

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    if not (Path(torch.__file__).parent / "include/c10/core/CachingDeviceAllocator.h").exists():
        pytest.skip("this torch ships no c10 allocator headers")
    out = tmp_path_factory.mktemp("trace") / "trace_recorder_check.so"
    command = torch_adapter.compile_command(torch, ROOT / "tests/native/trace_recorder_check.cpp", out,
                                            extra_includes=(ROOT / "allocator/torch_adapter",))
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    lib.check_configure.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_int]
    lib.check_malloc.restype = ctypes.c_void_p
    lib.check_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
    lib.check_free.argtypes = [ctypes.c_void_p]
    lib.check_set_user_metadata.argtypes = [ctypes.c_char_p]
    lib.check_push_compile_context.argtypes = [ctypes.c_char_p]
    lib.check_context_of.argtypes = [ctypes.c_size_t]
    lib.check_trace.restype = ctypes.c_size_t
    lib.check_trace.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    core = ctypes.CDLL(_C.__file__)
    core.vmm_adapter_api_table.restype = ctypes.c_void_p
    lib.table = core.vmm_adapter_api_table()
    core.vmm_record_stream.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.record_stream = core.vmm_record_stream
    return lib


class History:
    """The recorder over fresh host-backend devices (memory cap 32 MiB each)."""

    def __init__(self, lib):
        self.lib = lib

    def configure(self, enabled=True, when=ALL, max_entries=10_000, clear=True, skip=""):
        self.lib.check_configure(self.lib.table, int(enabled), when, max_entries, int(clear), skip.encode(), 2)

    def malloc(self, size, device=0, stream=5):
        status = ctypes.c_int()
        ptr = self.lib.check_malloc(size, device, stream, ctypes.byref(status))
        return ptr if status.value == 0 else status.value

    def free(self, ptr):
        assert self.lib.check_free(ptr) == 0

    def trace(self, device=0):
        size = self.lib.check_trace(device, None, 0)
        buf = ctypes.create_string_buffer(size)
        self.lib.check_trace(device, buf, size)
        entries = []
        for line in buf.value.decode().splitlines():
            action, addr, size, stream, context, compile_context, metadata, time_us = line.split(" ")
            entries.append({"action": action, "addr": int(addr), "size": int(size), "stream": int(stream),
                            "context": int(context), "compile_context": compile_context.replace("-", ""),
                            "user_metadata": metadata.replace("-", ""), "time_us": int(time_us)})
        return entries


@pytest.fixture
def history(check, host_devices):
    _C.configure("memory_cap:32MiB")
    h = History(check)
    h.configure(enabled=False)  # forget devices of earlier tests (the registry was reset)
    check.check_set_user_metadata(b"")
    yield h
    h.configure(enabled=False)


def of(trace, addr):
    return [(e["action"], e["size"], e["context"]) for e in trace if e["addr"] == addr and e["action"] != "oom"]


def test_frees_are_requested_then_completed_with_the_request_context_immediate_and_deferred(history):
    history.configure(when=ALL)
    small = history.malloc(1000)          # context 1
    large = history.malloc(20 * MiB)      # context 2
    assert history.lib.record_stream(large, 7) == 0
    history.free(small)                   # context 3: completes at once
    history.free(large)                   # context 4: waits for stream 7's work
    assert history.lib.check_context_of(large) == 0, "a freed block has no live context"
    later = history.malloc(100)           # context 5; processes the pending free
    trace = history.trace()
    # `later` may reuse the small block's address: its entry comes last there
    assert of(trace, small)[:3] == [("alloc", 1000, 1), ("free_requested", 1000, 3), ("free_completed", 1000, 3)]
    assert of(trace, large) == [("alloc", 20 * MiB, 2), ("free_requested", 20 * MiB, 4),
                                ("free_completed", 20 * MiB, 4)]
    assert of(trace, later)[-1] == ("alloc", 100, 5)
    assert history.lib.check_context_of(later) == 5
    # physical growth is segment_map at address 0: one 2 MiB chunk for the small segment, ten for 20 MiB
    grows = [e for e in trace if e["action"] == "segment_map"]
    assert [e["addr"] for e in grows] == [0] * len(grows)
    assert sum(e["size"] for e in grows) == 22 * MiB == _C.device_allocator(0).stats()["reserved_bytes.all.current"]
    assert [e["time_us"] for e in trace] == sorted(e["time_us"] for e in trace)
    assert abs(trace[-1]["time_us"] / 1e6 - time.time()) < 60, "times are unix microseconds, as torch's"
    history.free(later)


def test_record_context_levels_decide_which_entries_carry_stacks(history):
    history.configure(when=STATE)
    a = history.malloc(4096)
    assert history.lib.check_context_of(a) > 0, "state: live blocks keep their stacks"
    history.free(a)
    assert all(e["context"] == 0 for e in history.trace()), "state: no stacks in the trace"

    history.configure(when=ALLOC)
    b = history.malloc(4096)
    ctx = history.lib.check_context_of(b)
    history.free(b)
    assert of(history.trace(), b) == [("alloc", 4096, ctx), ("free_requested", 4096, ctx),
                                      ("free_completed", 4096, ctx)], "alloc: frees carry the allocation's stack"

    history.configure(when=NEVER)
    c = history.malloc(4096)
    assert history.lib.check_context_of(c) == 0
    history.free(c)
    assert [a for a, _, _ in of(history.trace(), c)] == ["alloc", "free_requested", "free_completed"]


def test_user_metadata_and_compile_context_stamp_entries(history):
    history.configure()
    a = history.malloc(512)
    history.lib.check_set_user_metadata(b"step=7")
    history.lib.check_push_compile_context(b"forward")
    b = history.malloc(512)
    history.lib.check_pop_compile_context()
    history.free(b)
    history.free(a)
    entries = {(e["addr"], e["action"]): e for e in history.trace() if e["addr"] in (a, b)}
    assert entries[(a, "alloc")]["user_metadata"] == "" and entries[(a, "alloc")]["compile_context"] == ""
    assert entries[(b, "alloc")]["user_metadata"] == "step=7"
    assert entries[(b, "alloc")]["compile_context"] == "forward"
    assert entries[(b, "free_requested")]["compile_context"] == "", "popped before the free"
    assert entries[(a, "free_completed")]["user_metadata"] == "step=7", "a completion carries its request's"


def test_out_of_memory_is_an_oom_entry_with_the_device_free_bytes(history):
    history.configure()
    assert history.malloc(64 * MiB) == 1  # VMM_OUT_OF_MEMORY
    ooms = [e for e in history.trace() if e["action"] == "oom"]
    assert len(ooms) == 1 and ooms[0]["size"] == 64 * MiB
    assert ooms[0]["addr"] == 64 * MiB, "addr is the device's free memory, as torch's OOM entries"


def test_max_entries_keeps_the_newest_and_skip_actions_drop_kinds(history):
    history.configure(max_entries=4)
    ptrs = [history.malloc(256) for _ in range(6)]
    for p in ptrs:
        history.free(p)
    trace = history.trace()
    assert len(trace) == 4
    assert [(e["action"], e["addr"]) for e in trace[-2:]] == [("free_requested", ptrs[-1]), ("free_completed", ptrs[-1])]

    history.configure(skip="segment_map,free_requested")
    p = history.malloc(3 * MiB)
    history.free(p)
    assert [e["action"] for e in history.trace()] == ["alloc", "free_completed"]


def test_turning_history_off_forgets_it_and_stops_the_core_log(history):
    history.configure()
    p = history.malloc(256)
    assert _C.device_allocator(0).event_capacity > 0
    history.configure(enabled=False)
    assert history.lib.check_is_on() == 0
    assert history.trace() == [] and _C.device_allocator(0).event_capacity == 0
    history.free(p)
    history.configure()
    q = history.malloc(256)
    history.free(q)
    assert [e["action"] for e in history.trace() if e["addr"] == q] == ["alloc", "free_requested", "free_completed"]


def test_devices_are_followed_from_their_first_allocation(history):
    history.configure()
    assert not _C.device_allocator_exists(1), "turning history on creates no allocator"
    p = history.malloc(256, device=1)
    history.free(p)
    assert [e["action"] for e in history.trace(device=1) if e["addr"] == p] == \
        ["alloc", "free_requested", "free_completed"]
    assert all(e["addr"] != p for e in history.trace(device=0))


def test_the_core_log_alone_gives_a_trace_without_stacks(history):
    """VMMALLOC_CONF=history:N turns on the core's log only; torch's snapshot still has every
    alloc and free, from the core."""
    _C.device_allocator(0).record_events(1000)
    p = history.malloc(4096)
    history.free(p)
    assert of(history.trace(), p) == [("alloc", 4096, 0), ("free_requested", 4096, 0), ("free_completed", 4096, 0)]
    _C.device_allocator(0).record_events(0)


def test_a_full_ring_reconfigured_without_clearing_keeps_the_newest(history):
    history.configure(max_entries=4, skip="segment_map,free_completed")
    ptrs = [history.malloc(256 << 10) for _ in range(6)]   # six allocs: the ring wraps
    history.configure(max_entries=4, clear=False, skip="segment_map,free_completed")
    newest = history.malloc(300 << 10)
    trace = [e for e in history.trace() if e["action"] == "alloc"]
    assert [e["addr"] for e in trace] == ptrs[3:] + [newest], "the oldest record is the one overwritten"
    for p in ptrs + [newest]:
        history.free(p)


def test_torchs_default_max_entries_still_logs_the_cores_events(history):
    """torch.cuda.memory._record_memory_history() passes max_entries=sys.maxsize: the
    adapter's records grow as PyTorch's do, the core's ring is capped (it is allocated up
    front), and completions still come from it."""
    import sys

    history.configure(max_entries=sys.maxsize)
    p = history.malloc(4096)
    assert 0 < _C.device_allocator(0).event_capacity <= 1 << 20
    history.free(p)
    assert [a for a, _, _ in of(history.trace(), p)] == ["alloc", "free_requested", "free_completed"]
