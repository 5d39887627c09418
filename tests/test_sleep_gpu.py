"""Sleep and wake on a GPU (Note [Sleeping pools]): a model's weights tagged with backup, its
KV discarded, a CUDA graph captured before the pause replayed after the resume."""
from __future__ import annotations

from test_torch_gpu import pytestmark, run  # noqa: F401  (the GPU marks apply here too)

SLEEP = """
from vmmalloc import sleep_mode
vmmalloc.enable_vmm_allocator()
torch.manual_seed(0)
with sleep_mode.tagged("weights"):
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096)).cuda()
    big = torch.randn(512 << 20 >> 2, device="cuda")          # 512 MiB of weights-like data
with sleep_mode.tagged("kv"):
    kv = torch.zeros(256 << 20 >> 2, device="cuda")
x = torch.randn(64, 4096, device="cuda")
with torch.no_grad():
    before = model(x)
    static_in = x.clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(static_in)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        static_out = model(static_in)
checksum = float(big.double().sum())
torch.cuda.synchronize()
free0 = torch.cuda.mem_get_info()[0]
sleep_mode.pause("weights", backup=True)
sleep_mode.pause("kv", backup=False)
freed = torch.cuda.mem_get_info()[0] - free0
other = torch.ones(700 << 20 >> 2, device="cuda")              # something else uses the memory
other_sum = float(other.sum()); del other
torch.cuda.empty_cache()
sleep_mode.resume("weights"); sleep_mode.resume("kv")
with torch.no_grad():
    after = model(x)
    graph.replay()
torch.cuda.synchronize()
cycles_ok = True
base = torch.cuda.mem_get_info()[0]
for _ in range(100):
    sleep_mode.pause("weights"); sleep_mode.resume("weights")
leak = base - torch.cuda.mem_get_info()[0]
report(freed=freed, same=bool(torch.equal(before, after)), graph=bool(torch.equal(static_out, before)),
       checksum=checksum == float(big.double().sum()), other=other_sum == float(700 << 20 >> 2), leak=leak)
"""


def test_weights_sleep_with_backup_kv_discarded_and_a_graph_replays_after_wake():
    r = run(SLEEP)
    assert r["freed"] >= (512 + 256) << 20, r
    assert r["same"] and r["graph"] and r["checksum"] and r["other"], r
    assert abs(r["leak"]) <= 2 << 20, r
