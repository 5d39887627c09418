"""OffloadedKVCache (LayerKV) against transformers' DynamicCache: the same tokens under every
GPU budget from no layer to all layers, beam search, sampling, assisted decoding, reuse; KV
memory within the budget plus the ring; copies only where layers are offloaded; clear errors.
Runs on CPU (host backend, in CI) and on CUDA (GPU suite)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_models import prompt, tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import vmmalloc  # noqa: E402
from vmmalloc.integrations import (  # noqa: E402
    OffloadedKVCache,
    patched_generate,
    pinned_host,  # noqa: E402
)
from vmmalloc.integrations.hf_compat import cache_kwargs, output_cache  # noqa: E402
from vmmalloc.sizes import parse_bytes  # noqa: E402
from vmmalloc.virtual_tensor import allocator_for  # noqa: E402

CHUNK = vmmalloc.CHUNK_SIZE
KINDS = ["llama", "qwen2", "mistral"]


# `device` and `no_patch_left_behind` are in conftest.py, shared with the other cache tests.
pytestmark = pytest.mark.usefixtures("no_patch_left_behind")


def full_layers(model) -> int:
    from vmmalloc.integrations.hf_compat import layer_windows

    return sum(1 for window in layer_windows(model.config) if window is None)


def budget_for(model, layers: int, batch: int, max_length: int) -> int:
    """The budget that keeps `layers` full-attention layers resident."""
    probe = OffloadedKVCache(model.config, kv_budget=0, max_length=max_length)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return layers * probe.layer_bytes(batch, cfg.num_key_value_heads, head_dim, model.dtype)


def generate_both(model, ids, mask, resident: int, **kwargs):
    max_length = ids.shape[1] + kwargs.get("max_new_tokens", 20) + 8
    rows = ids.shape[0] * kwargs.get("num_beams", 1)
    torch.manual_seed(5)
    ref = model.generate(ids, attention_mask=mask, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)
    torch.manual_seed(5)
    cache = OffloadedKVCache(model.config, kv_budget=budget_for(model, resident, rows, max_length),
                             max_length=max_length)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), **kwargs)
    return ref, out, cache


# ----- the same tokens -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_dynamic_cache_under_every_budget(device, kind):
    model = tiny_model(kind, device, layers=4)
    ids, mask = prompt(3, 12, device)
    full = full_layers(model)
    for resident in range(full + 1):
        ref, out, cache = generate_both(model, ids, mask, resident, max_new_tokens=20, do_sample=False)
        assert torch.equal(ref, out), f"{resident} resident layers"
        assert len(cache.resident_layers) == resident + (len(cache.layers) - full)
        offloaded = full - resident
        assert cache.offloaded_layers == list(range(offloaded)), "the first full-attention layers go to the host"
        if offloaded == 0:  # degenerates to VirtualKVCache: nothing copied, nothing on the host
            assert cache.bytes_to_device == cache.bytes_to_host == cache.host_bytes == 0
            assert cache.ring.slots == []
        else:
            # every generated token but the last goes to the host once, per offloaded layer
            assert cache.bytes_to_host > 0 and cache.host_bytes > 0
            assert len(cache.ring.slots) == min(2, offloaded)
            # a ring that holds every offloaded layer never fetches
            assert (cache.bytes_to_device == 0) == (offloaded <= 2)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_eager_attention_reads_the_ring_views(device, kind):
    model = tiny_model(kind, device, layers=4, attention="eager")
    ids, mask = prompt(2, 10, device)
    ref, out, _ = generate_both(model, ids, mask, 0, max_new_tokens=12, do_sample=False)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("resident", [0, 1])
def test_beam_search_matches_dynamic_cache(device, kind, resident):
    model = tiny_model(kind, device, layers=4)
    ids, mask = prompt(2, 10, device)
    ref, out, cache = generate_both(model, ids, mask, resident, max_new_tokens=12, num_beams=3, do_sample=False)
    assert torch.equal(ref, out)


def test_sampling_matches_dynamic_cache(device):
    model = tiny_model("llama", device, layers=4)
    ids, mask = prompt(2, 10, device)
    ref, out, _ = generate_both(model, ids, mask, 1, max_new_tokens=16, do_sample=True, top_k=20)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("kind,layers", [("llama", 4), ("qwen2", 2)])
def test_assisted_decoding_crops_and_matches(device, kind, layers):
    # (qwen2 with 4 layers and 60 tokens makes transformers 5.17's own assistant, on its own
    # DynamicCache, fail a sliding-window mask; test_kv_cache's sizes do not.)
    model = tiny_model(kind, device, layers=layers)
    assistant = tiny_model(kind, device, seed=3, layers=1)
    ids, mask = prompt(1, 12, device, padded=False)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False)
    with patched_generate("offload", kv_budget=0):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False, assistant_model=assistant)
    assert torch.equal(ref, out)


def test_cache_reuse_and_continuation(device):
    model = tiny_model("llama", device, layers=4)
    ids, mask = prompt(2, 12, device)
    cache = OffloadedKVCache(model.config, kv_budget=budget_for(model, 1, 2, 64), max_length=64)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))
    hosts = [id(cache.layers[i].host) for i in cache.offloaded_layers]
    cache.reset()
    assert cache.get_seq_length() == 0
    again = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(first, again)
    assert [id(cache.layers[i].host) for i in cache.offloaded_layers] == hosts, "reset keeps the host buffers"
    ref_cache = DynamicCache(config=model.config)
    ref_first = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(ref_cache))
    more = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], dim=1)
    ref = model.generate(ref_first, attention_mask=more, max_new_tokens=5, do_sample=False, **cache_kwargs(ref_cache))
    out = model.generate(again, attention_mask=more, max_new_tokens=5, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(ref, out)


def test_host_buffers_grow_without_a_known_length(device):
    """Without the real max_length the host copy grows by half as tokens come, keeping them."""
    model = tiny_model("llama", device, layers=3, max_positions=4096)
    ids, mask = prompt(2, 12, device)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=300, do_sample=False)
    cache = OffloadedKVCache(model.config, kv_budget=0)  # max_length: max_position_embeddings
    out = model.generate(ids, attention_mask=mask, max_new_tokens=300, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(ref, out)
    assert all(cache.layers[i].capacity < 4096 for i in cache.offloaded_layers)


# ----- memory ----------------------------------------------------------------------------


def test_kv_memory_stays_within_the_budget_plus_the_ring(device):
    model = tiny_model("llama", device, layers=6, max_positions=4096)
    ids, mask = prompt(4, 1500, device, padded=False)
    pages = allocator_for(torch.device(device))
    peaks = {}
    for resident in (0, 2, 6):
        gc.collect()
        budget = budget_for(model, resident, 4, 1600)
        layer = budget_for(model, 1, 4, 1600)
        cache = OffloadedKVCache(model.config, kv_budget=budget, max_length=1600)
        base = pages.stats()["vmm.kv_mapped_bytes.current"]
        pages.reset_peak_stats()
        model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, **cache_kwargs(cache))
        peak = pages.stats()["vmm.kv_mapped_bytes.peak"] - base
        peaks[resident] = peak
        assert peak <= budget + 2 * layer, f"{resident} resident: {peak} bytes of KV mapped at the peak"
        cache.free()
    assert peaks[0] < peaks[2] < peaks[6], peaks


def test_ring_keeps_its_pages_from_step_to_step(device):
    model = tiny_model("llama", device, layers=4)
    ids, mask = prompt(2, 12, device)
    cache = OffloadedKVCache(model.config, kv_budget=0, max_length=200)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **cache_kwargs(cache))
    slots = [slot.buffer for slot in cache.ring.slots]
    pages = allocator_for(torch.device(device))
    mapped = pages.stats()["vmm.kv_mapped_bytes.allocated"]
    more = torch.ones_like(first)
    model.generate(first, attention_mask=more, max_new_tokens=30, do_sample=False, **cache_kwargs(cache))
    assert [slot.buffer for slot in cache.ring.slots] == slots
    # 2 slots x (batch 2 x 2 heads x 32 values x 4 bytes) x 200 positions fit in one page each
    assert pages.stats()["vmm.kv_mapped_bytes.allocated"] == mapped, "no page mapped while decoding"


# ----- errors ----------------------------------------------------------------------------


def test_running_out_of_host_memory_is_a_clear_error_and_the_cache_recovers(device, monkeypatch):
    model = tiny_model("llama", device, layers=4)
    ids, mask = prompt(2, 12, device)
    cache = OffloadedKVCache(model.config, kv_budget=0, max_length=64)
    monkeypatch.setattr(pinned_host, "available_host_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match="offloading 4 KV layers needs .* GB of host memory and 0.00 GB is available"):
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **cache_kwargs(cache))
    monkeypatch.undo()
    cache.reset()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(ref, out)


def test_generate_past_max_length_is_a_clear_error(device):
    model = tiny_model("llama", device, layers=2)
    ids, mask = prompt(1, 12, device, padded=False)
    cache = OffloadedKVCache(model.config, kv_budget=0, max_length=16)
    with pytest.raises(ValueError, match="reserved 16 positions per sequence"):
        model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))


def test_byte_counts_and_budget_options():
    assert parse_bytes("8GiB") == 8 << 30 and parse_bytes("512 MB") == 512 * 10**6 and parse_bytes(4096) == 4096
    for bad in ("8 gigs", "-1", float("inf"), True):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        OffloadedKVCache(model.config, kv_budget="lots")
    from vmmalloc.integrations import patch_generate

    with pytest.raises(ValueError, match="the offload cache needs a GPU budget for KV"):
        patch_generate("offload")
    with pytest.raises(ValueError, match="kv_budget is an option of the offload cache"):
        patch_generate("vmm", kv_budget="1GiB")


def test_patch_generate_offers_the_offloading_cache(device):
    model = tiny_model("llama", device, layers=4)
    ids, mask = prompt(2, 8, device)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with patched_generate("offload", kv_budget="0"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True)
    assert isinstance(output_cache(out), OffloadedKVCache)
    assert output_cache(out).offloaded_layers == [0, 1, 2, 3]
    assert torch.equal(ref, out.sequences)


def test_environment_selects_the_offloading_cache_and_its_budget():
    code = ("import transformers\nfrom vmmalloc.integrations import generate_patch as g\n"
            "print(g._state['cache'], g._state['options'])\n")
    env = {k: v for k, v in os.environ.items() if k != "VMMALLOC"}
    env.update(VMMALLOC_HF_CACHE="offload", VMMALLOC_KV_BUDGET="2GiB")
    with warnings.catch_warnings():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "offload {'kv_budget': 2147483648}"
    missing = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True,
                             env={**env, "VMMALLOC_KV_BUDGET": ""})
    assert missing.returncode != 0 and "VMMALLOC_HF_CACHE=offload needs VMMALLOC_KV_BUDGET" in missing.stderr
    bad = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True,
                         env={**env, "VMMALLOC_KV_BUDGET": "much"})
    assert bad.returncode != 0 and "VMMALLOC_KV_BUDGET: cannot read 'much'" in bad.stderr
    stray = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True,
                           env={**env, "VMMALLOC_HF_CACHE": "vmm"})
    assert stray.returncode != 0 and "is the budget of VMMALLOC_HF_CACHE=offload" in stray.stderr


# ----- GPU only: pinned memory, its fallback, real sizes ---------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_copies_are_pinned_and_unpinnable_memory_falls_back_with_a_warning(monkeypatch):
    model = tiny_model("llama", "cuda", layers=4)
    ids, mask = prompt(2, 12, "cuda")
    ref, out, cache = generate_both(model, ids, mask, 0, max_new_tokens=10, do_sample=False)
    assert torch.equal(ref, out)
    assert all(cache.layers[i].host.pinned for i in cache.offloaded_layers)
    monkeypatch.setattr(vmmalloc._C, "pin_host_memory", lambda *args: "CUDA_ERROR_OUT_OF_MEMORY (simulated)")
    monkeypatch.setattr(pinned_host, "_warned_unpinned", False)
    with pytest.warns(RuntimeWarning, match="could not page-lock host memory .*simulated"):
        ref, out, cache = generate_both(model, ids, mask, 0, max_new_tokens=10, do_sample=False)
    assert torch.equal(ref, out)
    assert not any(cache.layers[i].host.pinned for i in cache.offloaded_layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_long_prompt_in_bf16_matches_dynamic_cache_on_gpu():
    """Pages of real size (1 KiB a position and row) and the bf16 kernels, all layers offloaded
    but one, against DynamicCache; KV on the GPU stays within one layer plus the ring."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
                         attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 256, (2, 6000), device="cuda")
    mask = torch.ones_like(ids)
    pages = allocator_for(torch.device("cuda"))
    base = pages.stats()["vmm.kv_mapped_bytes.current"]
    pages.reset_peak_stats()
    ref, out, cache = generate_both(model, ids, mask, 1, max_new_tokens=24, do_sample=False)
    assert torch.equal(ref, out)
    assert cache.offloaded_layers == [0, 1, 2, 3, 4]
    layer = budget_for(model, 1, 2, 6032)
    assert pages.stats()["vmm.kv_mapped_bytes.peak"] - base <= 3 * layer
