"""CUDA graphs, torch.compile(mode="reduce-overhead"), static-cache generate and
torch.cuda.MemPool under vmmalloc's torch adapter (Note [Private pools]), each compared with
PyTorch's own allocator running the same script in another child process."""
from __future__ import annotations

import pytest
from test_torch_gpu import pytestmark, run  # noqa: F401  (the GPU marks apply here too)

ON = "vmmalloc.enable_vmm_allocator()\n"

CAPTURE = """
torch.manual_seed(0)
x = torch.randn(4096, device="cuda")
w = torch.randn(4096, device="cuda")
torch.cuda.synchronize()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):  # warm up, as PyTorch's docs say
    for _ in range(2):
        (x * w).relu().sum()
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    tmp = torch.empty(8 << 20, device="cuda")   # 32 MiB freed inside the capture
    tmp.fill_(3.0)
    y = (x * w).relu() + tmp[:4096]
    del tmp
    small = y * 0.5
# Eager work that would reuse memory freed in the capture, were it not the graph's.
eager = [torch.full((8 << 20,), 7.0, device="cuda") for _ in range(3)]
x.copy_(torch.randn(4096, device="cuda"))
graph.replay()
torch.cuda.synchronize()
expected = (x * w).relu() + 3.0
report(ok=bool(torch.allclose(y, expected)), small=bool(torch.allclose(small, expected * 0.5)),
       eager_intact=all(bool((e == 7.0).all()) for e in eager),
       pools=torch.cuda.memory_stats().get("vmm.private_pools", -1))
"""


def test_capture_with_allocations_replays_correctly_after_eager_reuse():
    native = run(CAPTURE)
    ours = run(ON + CAPTURE)
    for r in (native, ours):
        assert r["ok"] and r["small"] and r["eager_intact"], r
    assert ours["pools"] == 1
    assert "without its torch adapter" not in ours["_stderr"]


SHARED_POOL = """
pool = torch.cuda.graph_pool_handle()
a = torch.randn(1 << 20, device="cuda")
g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
with torch.cuda.graph(g1, pool=pool):
    t = a * 2
    out1 = t + 1
    del t
with torch.cuda.graph(g2, pool=pool):
    t2 = out1 * 3
    out2 = t2 - 1
    del t2
for _ in range(3):
    a.copy_(torch.randn(1 << 20, device="cuda"))
    g1.replay()
    g2.replay()
torch.cuda.synchronize()
ok = bool(torch.allclose(out2, (a * 2 + 1) * 3 - 1))
free_before = torch.cuda.mem_get_info()[0]
reserved_before = torch.cuda.memory_reserved()
del g1, g2, out1, out2
import gc; gc.collect()
torch.cuda.empty_cache()
report(ok=ok, reserved_before=reserved_before, reserved_after=torch.cuda.memory_reserved(),
       freed=torch.cuda.mem_get_info()[0] - free_before)
"""


def test_graphs_sharing_a_pool_and_releasing_it():
    native = run(SHARED_POOL)
    ours = run(ON + SHARED_POOL)
    for r in (native, ours):
        assert r["ok"], r
        assert r["reserved_after"] < r["reserved_before"], "the pool's memory goes back"
    assert ours["freed"] > 0


GRAPHED_CALLABLES = """
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).cuda()
x = torch.randn(32, 256, device="cuda", requires_grad=True)
graphed = torch.cuda.make_graphed_callables(model, (x,))
losses = []
for step in range(4):
    g = torch.Generator(device="cuda").manual_seed(step)
    inp = torch.randn(32, 256, device="cuda", generator=g, requires_grad=True)
    out = graphed(inp)
    loss = out.pow(2).mean()
    loss.backward()
    losses.append(loss.item())
grad = float(sum(p.grad.double().abs().sum() for p in model.parameters()))
report(losses=losses, grad=grad)
"""


def test_make_graphed_callables_forward_and_backward_match_native():
    native = run(GRAPHED_CALLABLES)
    ours = run(ON + GRAPHED_CALLABLES)
    assert ours["losses"] == native["losses"]
    assert ours["grad"] == pytest.approx(native["grad"], rel=1e-6)


COMPILED = """
import torch._dynamo
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128)).cuda()
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
train = torch.compile(model, mode="reduce-overhead")

@torch.compile(mode="reduce-overhead")
def evaluate(x):
    return model(x).square().mean()

losses, evals = [], []
for step in range(6):
    g = torch.Generator(device="cuda").manual_seed(step)
    x = torch.randn(64, 128, device="cuda", generator=g)
    loss = train(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    with torch.no_grad():  # a second path of the tree, in between training steps
        evals.append(evaluate(x).item())
    # A second input shape: another graph of the same tree.
    with torch.no_grad():
        evals.append(evaluate(torch.randn(32, 128, device="cuda", generator=g)).item())
stats = torch.cuda.memory_stats()
report(losses=losses, evals=evals, reserved=torch.cuda.max_memory_reserved(),
       allocated=torch.cuda.max_memory_allocated(),
       pools=stats.get("vmm.private_pools", -1),
       counters={k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k})
"""


def test_compile_reduce_overhead_training_and_a_two_path_tree_match_native():
    native = run(COMPILED)
    ours = run(ON + COMPILED)
    assert ours["losses"] == pytest.approx(native["losses"], rel=1e-5)
    assert ours["evals"] == pytest.approx(native["evals"], rel=1e-5)
    assert ours["pools"] >= 1, "the graph tree's memory is a private pool"
    assert "does not yet support" not in ours["_stderr"]
    assert ours["counters"].get("cudagraph_skips", 0) == native["counters"].get("cudagraph_skips", 0) == 0


STATIC_GENERATE = """
import sys
sys.path.insert(0, "tests")
from hf_models import tiny_model, prompt
model = tiny_model("llama", device="cuda", layers=2, max_positions=256)
ids, mask = prompt(batch=2, length=12, device="cuda", padded=False)
with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         cache_implementation="static")
    again = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                           cache_implementation="static")
report(tokens=out.tolist(), again=again.tolist(),
       pools=torch.cuda.memory_stats().get("vmm.private_pools", -1))
"""


def test_static_cache_generate_compiles_and_matches_native():
    pytest.importorskip("transformers")
    native = run(STATIC_GENERATE)
    ours = run(ON + STATIC_GENERATE)
    assert ours["tokens"] == native["tokens"]
    assert ours["again"] == native["again"] == native["tokens"]
    assert ours["pools"] >= 1, "decode ran in CUDA graphs"


MEMPOOL = """
base_free = torch.cuda.mem_get_info()[0]
pool = torch.cuda.MemPool()
with torch.cuda.use_mem_pool(pool):
    a = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty(1000, dtype=torch.uint8, device="cuda")
outside = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
segments = pool.snapshot()
in_pool = sorted(s["address"] for s in segments for blk in s["blocks"] if blk["state"] == "active_allocated")
addresses = [a.data_ptr(), b.data_ptr()]
holds = all(any(s["address"] <= p < s["address"] + s["total_size"] for s in segments) for p in addresses)
outside_in_pool = any(s["address"] <= outside.data_ptr() < s["address"] + s["total_size"] for s in segments)
use_count = pool.use_count()
a.fill_(1); b.fill_(2)
ok = bool((a == 1).all()) and bool((b == 2).all())
del a, b, outside
del pool
import gc; gc.collect()
torch.cuda.empty_cache()
report(ok=ok, holds=holds, outside_in_pool=outside_in_pool, use_count=use_count,
       kept=base_free - torch.cuda.mem_get_info()[0], reserved=torch.cuda.memory_reserved())
"""


def test_mempool_routes_allocations_and_gives_memory_back():
    native = run(MEMPOOL)
    ours = run(ON + MEMPOOL)
    for r in (native, ours):
        assert r["ok"] and r["holds"] and not r["outside_in_pool"], r
    assert ours["use_count"] == native["use_count"]
    assert ours["reserved"] == 0, "the pool's memory went back once the MemPool and its tensors were gone"
    assert ours["kept"] <= max(native["kept"], 0) + (4 << 20), (ours, native)


THREADED_CAPTURE = """
import threading
x = torch.randn(1 << 20, device="cuda")
graph = torch.cuda.CUDAGraph()
started, done = threading.Event(), threading.Event()
eager = []
def other_thread():
    started.wait()
    with torch.cuda.stream(torch.cuda.Stream()):
        for _ in range(8):
            eager.append(torch.full((1 << 20,), 5.0, device="cuda"))
        torch.cuda.current_stream().synchronize()
    done.set()
worker = threading.Thread(target=other_thread)
worker.start()
with torch.cuda.graph(graph, capture_error_mode="thread_local"):
    started.set()
    done.wait(timeout=60)
    y = x * 2
worker.join()
graph.replay()
torch.cuda.synchronize()
pool_segments = [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) != (0, 0)]
in_pool = [e.data_ptr() for e in eager
           if any(s["address"] <= e.data_ptr() < s["address"] + s["total_size"] for s in pool_segments)]
report(ok=bool(torch.allclose(y, x * 2)), eager_ok=all(bool((e == 5.0).all()) for e in eager),
       eager_in_pool=len(in_pool), pools=len({tuple(s["segment_pool_id"]) for s in pool_segments}))
"""


def test_eager_allocations_of_another_thread_during_capture_stay_out_of_the_graph_pool():
    ours = run(ON + THREADED_CAPTURE)
    assert ours["ok"] and ours["eager_ok"]
    assert ours["eager_in_pool"] == 0
    assert ours["pools"] == 1


OOM_OBSERVER = """
calls = []
torch._C._cuda_attach_out_of_memory_observer(lambda *args: calls.append(args))
torch.cuda.set_per_process_memory_fraction(0.05)
try:
    torch.empty(int(0.2 * torch.cuda.get_device_properties(0).total_memory), dtype=torch.uint8, device="cuda")
    kind = "none"
except torch.OutOfMemoryError:
    kind = "torch.OutOfMemoryError"
after = float(torch.ones(16, device="cuda").sum())
report(kind=kind, calls=len(calls), args=[int(a) for a in calls[0]] if calls else [], after=after)
"""


def test_out_of_memory_observers_are_called_once_per_oom():
    ours = run(ON + OOM_OBSERVER)
    native = run(OOM_OBSERVER)
    for r in (native, ours):
        assert r["kind"] == "torch.OutOfMemoryError" and r["calls"] == 1 and r["after"] == 16.0, r
    device, requested, total, free = ours["args"]
    assert device == 0 and requested == native["args"][1] and total > 0 and free > 0


CUDNN_BENCHMARK = """
torch.backends.cudnn.benchmark = True   # asks the allocator for cacheInfo
conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda()
y = conv(torch.randn(8, 16, 64, 64, device="cuda"))
stats_keys = sorted(torch.cuda.memory_stats())
report(shape=list(y.shape), keys=len(stats_keys),
       cpp_stats=torch._C._cuda_memoryStats(0)["allocated_bytes"]["all"]["current"] > 0)
"""


def test_cudnn_benchmark_and_cpp_stat_callers_reach_vmmalloc():
    ours = run(ON + CUDNN_BENCHMARK)
    assert ours["shape"] == [8, 32, 64, 64]
    assert ours["cpp_stats"]
