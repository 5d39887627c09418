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


KV_CACHE = """
from transformers import LlamaConfig
from vmmalloc import sleep_mode
from vmmalloc.integrations.kv_cache import VirtualKVCache
vmmalloc.enable_vmm_allocator()
config = LlamaConfig(num_hidden_layers=4, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                     max_position_embeddings=32768)
cache = VirtualKVCache(config, max_length=32768)
sleep_mode.attach("cache", cache)
torch.manual_seed(0)
keys = torch.randn(2, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
for layer in range(4):
    cache.update(keys, keys * 2, layer)
pointers = [cache.layers[i].keys.data_ptr() for i in range(4)]
committed = sum(vt.committed_bytes for layer in cache.layers for vt in layer.virtual_tensors())
torch.cuda.synchronize()
free0 = torch.cuda.mem_get_info()[0]
sleep_mode.pause("cache", backup=True)
freed = torch.cuda.mem_get_info()[0] - free0
other = torch.full((committed // 4,), 3.0, device="cuda")    # the freed memory, used by something else
other_ok = bool((other == 3.0).all()); del other
torch.cuda.empty_cache()
sleep_mode.resume("cache")
restored = all(torch.equal(cache.layers[i].keys[:, :, :8192], keys) and
               torch.equal(cache.layers[i].values[:, :, :8192], keys * 2) for i in range(4))
same_pointers = [cache.layers[i].keys.data_ptr() for i in range(4)] == pointers
cache.update(keys[:, :, :16], keys[:, :, :16], 0)               # decoding goes on after the wake
sleep_mode.pause("cache", backup=False)
discarded_free = torch.cuda.mem_get_info()[0] - free0
sleep_mode.resume("cache")
torch.cuda.synchronize()
report(committed=committed, freed=freed, other=other_ok, restored=restored, same_pointers=same_pointers,
       length=cache.get_seq_length(), discarded_free=discarded_free)
"""


def test_a_virtual_kv_cache_under_a_tag_gives_its_pages_back_and_restores_them():
    r = run(KV_CACHE)
    assert r["committed"] >= 4 * 2 * (2 * 8 * 8192 * 128 * 2), r
    assert r["freed"] >= r["committed"] - (8 << 20), r
    assert r["discarded_free"] >= r["committed"] - (8 << 20), r
    assert r["other"] and r["restored"] and r["same_pointers"], r
    assert r["length"] == 8192 + 16, r
