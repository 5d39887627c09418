"""PyTorch's memory introspection under vmmalloc's torch adapter (Note [Adapter history] in
allocator/torch_adapter/trace_recorder.h): torch's own functions, no Python patches, each
scenario compared with PyTorch's allocator running the same script in another child."""
from __future__ import annotations

from test_torch_gpu import pytestmark, run  # noqa: F401  (the GPU marks apply here too)

ON = "vmmalloc.enable_vmm_allocator()\n"

KEYS = """
x = torch.empty(3 << 20, device="cuda")
report(keys=sorted(k for k in torch.cuda.memory_stats() if not k.startswith("vmm.")),
       patched=torch.cuda.memory._snapshot.__module__)
"""


def test_memory_stats_has_every_key_native_has():
    native, ours = run(KEYS), run(ON + KEYS)
    assert ours["keys"] == native["keys"]
    assert ours["patched"] == native["patched"] == "torch.cuda.memory", "torch's own function, not a patch"


HISTORY = """
import pickle, tempfile
from vmmalloc import timeline
torch.cuda.memory._record_memory_history(max_entries=100000)   # stacks="all", context="all"

def make_weights_in_a_known_function():
    return torch.empty(3 << 20, device="cuda")

weights = make_weights_in_a_known_function()
torch.cuda.memory._set_memory_metadata("phase=forward")
tagged = torch.empty(1000, device="cuda")
torch.cuda.memory._set_memory_metadata("")
side = torch.cuda.Stream()
deferred = torch.empty(5 << 20, device="cuda")
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    deferred.mul_(2)
deferred.record_stream(side)
deferred_ptr = deferred.data_ptr()
del deferred
immediate = torch.empty(7 << 20, device="cuda")
immediate_ptr = immediate.data_ptr()
del immediate
torch.cuda.synchronize()
later = torch.empty(9 << 20, device="cuda")   # the allocator finishes deferred frees
snap = torch.cuda.memory._snapshot()
trace = snap["device_traces"][0]

def actions(ptr):  # a block's own events (PyTorch's segment_alloc may share its address)
    return [e["action"] for e in trace if e.get("addr") == ptr
            and e["action"] in ("alloc", "free_requested", "free_completed")][:3]

def names(frames):
    return [f["name"] for f in frames]

block = [b for s in snap["segments"] for b in s["blocks"]
         if b["address"] == weights.data_ptr() and b["state"] == "active_allocated"]
alloc = [e for e in trace if e["action"] == "alloc" and e["addr"] == weights.data_ptr()]
tag_entry = [e for e in trace if e["action"] == "alloc" and e["addr"] == tagged.data_ptr()][-1]
free_entry = [e for e in trace if e["action"] == "free_requested" and e["addr"] == immediate_ptr][0]
viz = torch.cuda._memory_viz
html_trace, html_segments = viz.trace_plot(snap), viz.segment_plot(snap)
flame = viz.memory(snap, format_flamegraph=lambda lines: lines)  # no flamegraph.pl download
with tempfile.NamedTemporaryFile(suffix=".pickle") as f:
    torch.cuda.memory._dump_snapshot(f.name)
    reloaded = pickle.load(open(f.name, "rb"))
tl = timeline.from_snapshot(snap)
augmented = torch.cuda.memory._snapshot(augment_with_fx_traces=True)
torch.cuda.memory._record_memory_history(enabled=None)
report(block_frames="make_weights_in_a_known_function" in names(block[0]["frames"]) if block else None,
       alloc_frames="make_weights_in_a_known_function" in names(alloc[-1]["frames"]) if alloc else None,
       free_frames=len(free_entry["frames"]) > 0,
       user_metadata=tag_entry.get("user_metadata"), untagged=alloc[-1].get("user_metadata") if alloc else None,
       deferred=actions(deferred_ptr), immediate=actions(immediate_ptr),
       html=len(html_trace) > 1000 and len(html_segments) > 1000, flame="make_weights" in flame,
       reloaded=len(reloaded["device_traces"][0]) > 0, timeline_peak=tl.peak_allocated,
       augmented=len(augmented["segments"]) > 0,
       enabled_after=torch._C._cuda_isHistoryEnabled() if hasattr(torch._C, "_cuda_isHistoryEnabled") else None,
       trace_keys=sorted(alloc[-1]) if alloc else [])
"""


def test_history_snapshot_has_frames_metadata_and_native_actions():
    native, ours = run(HISTORY), run(ON + HISTORY)
    for r in (native, ours):
        assert r["block_frames"] and r["alloc_frames"] and r["free_frames"], r
        assert r["user_metadata"] == "phase=forward" and not r["untagged"], r
        assert r["html"] and r["flame"] and r["reloaded"] and r["augmented"], r
        assert r["timeline_peak"] >= 12 << 20, r
    assert ours["deferred"] == native["deferred"] == ["alloc", "free_requested", "free_completed"]
    assert ours["immediate"] == native["immediate"] == ["alloc", "free_requested", "free_completed"]
    assert ours["trace_keys"] == native["trace_keys"]
    assert ours["enabled_after"] == native["enabled_after"]


PROFILER = """
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True) as prof:
    a = torch.randn(4 << 20, device="cuda")
    b = (a * 2).sum()
    del a
torch.cuda.synchronize()
memory_events = [e for e in prof.events() if e.device_memory_usage != 0]
report(events=len(memory_events), total=sum(e.device_memory_usage for e in memory_events),
       peak=max((e.device_memory_usage for e in memory_events), default=0))
"""


def test_torch_profiler_sees_allocations_and_frees():
    native, ours = run(PROFILER), run(ON + PROFILER)
    assert native["events"] > 0 and ours["events"] > 0, (native, ours)
    assert ours["peak"] >= 16 << 20 and native["peak"] >= 16 << 20
