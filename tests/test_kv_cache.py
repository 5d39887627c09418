"""VirtualTensor, VirtualKVCache, the attention function and patch_generate() against
transformers' own caches: the same tokens, memory that follows the tokens, pages that go
back to the pool. Runs on CPU (host backend, in CI) and on CUDA (GPU suite)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_models import prompt, tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import vmmalloc  # noqa: E402
from vmmalloc.integrations import (  # noqa: E402
    VirtualKVCache,
    patch_generate,
    patched_generate,
    unpatch_generate,
    virtual_sdpa_attention,
)
from vmmalloc.integrations.hf_compat import cache_kwargs, output_cache  # noqa: E402
from vmmalloc.integrations.kv_cache import VirtualKVLayer  # noqa: E402
from vmmalloc.virtual_tensor import VirtualTensor, allocator_for  # noqa: E402

CHUNK = vmmalloc.CHUNK_SIZE
KINDS = ["llama", "qwen2", "mistral"]


# `device` and `no_patch_left_behind` are in conftest.py, shared with the other cache tests.
pytestmark = pytest.mark.usefixtures("no_patch_left_behind")


def kv_stats(device: str) -> dict:
    return allocator_for(torch.device(device)).stats()


def generate_both(model, ids, mask, **kwargs):
    """generate() with transformers' DynamicCache and with VirtualKVCache, same seed."""
    torch.manual_seed(5)
    ref = model.generate(ids, attention_mask=mask, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)
    torch.manual_seed(5)
    cache = VirtualKVCache(model.config, max_length=ids.shape[1] + kwargs.get("max_new_tokens", 20) + 8)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), **kwargs)
    return ref, out, cache


# ----- VirtualTensor ------------------------------------------------------------------


def test_virtual_tensor_grows_in_place_and_gives_pages_back(device):
    vt = VirtualTensor((2, 4096, 8, 64), torch.float16, device)  # 1 KiB a position: 2048 a page
    assert vt.tokens_per_page == 2048 and vt.row_stride == 2 * CHUNK
    vt.commit(2, 100)
    vt.tensor[:2, :100] = 3.0
    first = vt.tensor[:2, :100].clone()
    pointer = vt.tensor.data_ptr()
    vt.commit(2, 3000)  # grows into a second page per row: nothing moves
    assert vt.tensor.data_ptr() == pointer
    assert torch.equal(vt.tensor[:2, :100], first)
    assert vt.committed_bytes == 4 * CHUNK
    base = kv_stats(device)["vmm.kv_mapped_bytes.current"]
    vt.commit(1, 100)
    assert vt.committed_bytes == CHUNK
    assert kv_stats(device)["vmm.kv_mapped_bytes.current"] == base - 3 * CHUNK
    vt.free()
    gc.collect()
    assert kv_stats(device)["vmm.kv_mapped_bytes.current"] == base - 4 * CHUNK


def test_failed_commit_keeps_the_old_span_and_its_data():
    small = vmmalloc.Allocator(vmmalloc.HostBackend(8 << 20))
    vt = VirtualTensor((1, 8192, 8, 64), torch.float32, "cpu", allocator=small)  # 2 KiB a position
    vt.commit(1, 1024)
    vt.tensor[:1, :1024] = 3.0
    with pytest.raises(torch.OutOfMemoryError):
        vt.commit(1, 8192)
    assert (vt.rows, vt.start, vt.stop) == (1, 0, 1024), "the old span is still mapped"
    assert vt.committed_bytes == CHUNK
    assert float(vt.tensor[:1, :1024].sum()) == 3.0 * 1024 * 8 * 64
    vt.commit(1, 2048)
    vt.tensor[:1, :2048] = 1.0
    assert float(vt.tensor[:1, :2048].sum()) == 2048 * 8 * 64


def test_virtual_tensor_bad_use_is_a_clear_error(device):
    vt = VirtualTensor((2, 100, 4), torch.float32, device)
    with pytest.raises(ValueError, match="reserves at most 2 rows and 100 positions"):
        vt.commit(2, 101)
    with pytest.raises(ValueError, match="positive sizes"):
        VirtualTensor((0, 10), torch.float32, device)
    vt.free()
    with pytest.raises(RuntimeError, match="was freed"):
        vt.commit(1, 1)
    with pytest.raises(RuntimeError, match="was freed"):
        _ = vt.tensor


def test_row_starts_share_the_padding_pages(device):
    """Note [Padding positions]: pages holding only a row's padding cost no memory of their own."""
    vt = VirtualTensor((3, 8192, 8, 64), torch.float16, device)  # 1 KiB a position: 2048 a page
    vt.commit(3, 5000, row_starts=[4100, 0, 2048])
    assert vt.committed_bytes == (1 + 3 + 2) * CHUNK  # row 0: page 2; row 1: pages 0-2; row 2: 1-2
    assert kv_stats(device)["vmm.kv_padding_pages"] == 3
    for row, start in enumerate([4100, 0, 2048]):
        vt.tensor[row, start:5000] = row + 1.0
    vt.tensor[:3, :2048].zero_()  # padding stays writable (here: rows 0 and 2 share its pages)
    for row, start in enumerate([4100, 0, 2048]):
        assert float(vt.tensor[row, max(start, 2048):5000].float().mean()) == row + 1.0
    vt.sleep()
    vt.wake()  # the padding is kept across sleep
    assert vt.row_starts == (4100, 0, 2048) and vt.committed_bytes == 6 * CHUNK
    with pytest.raises(ValueError, match="one position in \\[0, 8192\\] for each of the 3 rows"):
        vt.commit(3, 5000, row_starts=[0, 0])
    vt.free()
    gc.collect()
    assert kv_stats(device)["vmm.kv_padding_pages"] == 0


def test_padding_of_another_dtype_never_reads_this_ones_bytes(device):
    """Note [Padding positions]: each dtype has its own filler; float32 bytes read as
    bfloat16 (their low halves) can be NaN, which a mask weighs into NaN."""
    base = kv_stats(device)["allocated_bytes.all.current"]
    wide = VirtualTensor((2, 4096, 8, 64), torch.float32, device)  # 2 KiB a position: 1024 a page
    narrow = VirtualTensor((2, 8192, 8, 64), torch.bfloat16, device)  # 1 KiB: 2048 a page
    wide.commit(2, 2048, row_starts=[1024, 0])  # row 0: page 0 padding
    narrow.commit(2, 4096, row_starts=[2048, 0])  # row 0: page 0 padding
    assert kv_stats(device)["vmm.kv_padding_pages"] == 2
    assert kv_stats(device)["allocated_bytes.all.current"] - base == (3 + 3 + 2) * CHUNK, "a filler each"
    wide.tensor[0, :1024] = float("nan")  # what a float32 padding write may hold, seen as float32
    assert not narrow.tensor[0, :2048].isnan().any(), "bfloat16 padding reads no float32 bytes"
    wide.free()
    narrow.free()


def test_a_commit_that_fails_in_the_driver_forgets_its_span(device):
    """After a driver failure what is mapped is unknown: the tensor forgets its span, so the
    next commit of the same span goes to the allocator (which maps what is missing)."""
    from vmmalloc._C import testing

    backend = (vmmalloc.HostBackend(64 << 20) if device == "cpu" else vmmalloc.CudaBackend(0))
    faulty = testing.FaultInjectionBackend(backend)
    alloc = vmmalloc.Allocator(faulty, "memory_cap:64MiB")
    vt = VirtualTensor((1, 8192, 8, 64), torch.float16, device, allocator=alloc)
    vt.commit(1, 2048)
    faulty.fail("map", skip=0, count=1)
    with pytest.raises(vmmalloc.BackendError):
        vt.commit(1, 6000)
    assert (vt.rows, vt.start, vt.stop) == (0, 0, 0)
    vt.commit(1, 6000)
    assert vt.committed_bytes == 3 * CHUNK and (vt.rows, vt.stop) == (1, 6000)
    vt.free()


def test_freed_kv_pages_serve_the_next_allocation(device):
    alloc = allocator_for(torch.device(device))
    vt = VirtualTensor((1, 8192, 8, 64), torch.float32, device)  # 2 KiB a position
    vt.commit(1, 8192)  # 8 pages
    chunks = alloc.stats()["vmm.chunks.current"]
    vt.free()
    gc.collect()
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    ptr = alloc.allocate(16 << 20, stream)  # 8 chunks: the pages just given back
    assert alloc.stats()["vmm.chunks.current"] == chunks
    alloc.deallocate(ptr)


# ----- the cache against transformers' ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_matches_dynamic_cache(device, kind):
    model = tiny_model(kind, device)
    ids, mask = prompt(3, 12, device)  # left padding, prompt longer than the sliding window
    ref, out, cache = generate_both(model, ids, mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(ref, out)
    assert cache.get_seq_length() == ids.shape[1] + 24 - 1


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_eager_attention_reads_the_views_too(device, kind):
    model = tiny_model(kind, device, attention="eager")
    ids, mask = prompt(3, 12, device)
    ref, out, _ = generate_both(model, ids, mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(ref, out)
    with patched_generate():  # an eager model keeps its attention under the patch
        patched = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(ref, patched)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_matches_dynamic_cache(device, kind):
    model = tiny_model(kind, device)
    ids, mask = prompt(2, 10, device)
    ref, out, _ = generate_both(model, ids, mask, max_new_tokens=16, num_beams=3, do_sample=False)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_sampling_matches_dynamic_cache(device, kind):
    model = tiny_model(kind, device)
    ids, mask = prompt(2, 10, device)
    ref, out, _ = generate_both(model, ids, mask, max_new_tokens=16, do_sample=True, top_k=20)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("kind", KINDS)
def test_assisted_decoding_crops_and_matches(device, kind):
    model = tiny_model(kind, device)
    assistant = tiny_model(kind, device, seed=3, layers=1)
    ids, mask = prompt(1, 12, device, padded=False)
    torch.manual_seed(0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False)
    # The assistant's own generate() calls are patched too: they must keep the cache that
    # transformers gives them (sized for the whole run), not get one sized for a draft.
    with patched_generate():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False, assistant_model=assistant)
    assert torch.equal(ref, out)


def test_left_padding_costs_no_memory_and_changes_no_token(device):
    """Note [Left padding costs no memory]: a batch of prompts of different lengths, padded
    on the left, maps only the pages its tokens need, and decodes what DynamicCache does."""
    model = tiny_model("llama", device, hidden=1024)  # K and V of 2 heads of 256: 512 positions a page
    ids, mask = prompt(3, 1300, device, padded=False)
    for row, pad in enumerate([1100, 600]):  # row 0 pads 2 whole pages, row 1 one
        ids[row, :pad], mask[row, :pad] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref = model.generate(ids, **kwargs, **cache_kwargs(DynamicCache(config=model.config)))
    plain = VirtualKVCache(model.config, max_length=1320, lookahead=False)
    padded = VirtualKVCache(model.config, max_length=1320, lookahead=False)
    padded.set_padding([1100, 600, 0])
    assert torch.equal(model.generate(ids, **kwargs, **cache_kwargs(plain)), ref)
    assert torch.equal(model.generate(ids, **kwargs, **cache_kwargs(padded)), ref)
    layers = len(padded.layers)
    assert plain.committed_bytes == 9 * layers * CHUNK  # 1305 positions: 3 pages a row
    assert padded.committed_bytes == 6 * layers * CHUNK, "3 pages a layer of padding are shared"
    assert kv_stats(device)["vmm.kv_padding_pages"] == 3 * layers
    with pytest.raises(ValueError, match="holds 1305 tokens already"):
        padded.set_padding(None)
    padded.reset()  # a reset forgets the padding with the tokens
    assert all(layer.padding is None for layer in padded.layers)
    plain.free()
    padded.free()
    # The patched generate() learns the padding from the attention mask.
    with patched_generate(lookahead=False):
        out = model.generate(ids, **kwargs, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    made = output_cache(out)
    assert [layer.padding for layer in made.layers] == [(1100, 600, 0)] * layers
    assert made.committed_bytes == 6 * layers * CHUNK
    made.free()


def test_cache_reuse_across_generate_calls(device):
    model = tiny_model("qwen2", device)
    ids, mask = prompt(2, 12, device)
    cache = VirtualKVCache(model.config, max_length=64)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))
    reserved = cache.reserved_bytes
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.committed_bytes == 0
    assert cache.reserved_bytes == reserved, "reset keeps the reservations"
    again = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(first, again)
    # Continuing a generation from the cache, as with DynamicCache.
    ref_cache = DynamicCache(config=model.config)
    ref_first = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               **cache_kwargs(ref_cache))
    more = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], dim=1)
    ref = model.generate(ref_first, attention_mask=more, max_new_tokens=5, do_sample=False,
                         **cache_kwargs(ref_cache))
    out = model.generate(again, attention_mask=more, max_new_tokens=5, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(ref, out)


def test_generate_past_the_reservation_is_a_clear_error(device):
    model = tiny_model("llama", device)
    ids, mask = prompt(1, 12, device, padded=False)
    cache = VirtualKVCache(model.config, max_length=16)
    with pytest.raises(ValueError, match="reserved 16 positions per sequence"):
        model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))


# ----- the layer: memory follows tokens, batch operations --------------------------------


def reference_cat(chunks):
    return torch.cat(chunks, dim=-2)


@pytest.mark.parametrize("lookahead", [False, True])
def test_committed_memory_follows_the_tokens(device, lookahead):
    # 8 heads x 64 x fp32, K and V side by side (Note [Keys and values share pages]): 4 KiB a
    # position, 512 positions a page; rows are padded to pages.
    layer = VirtualKVLayer(max_length=8192, layer_index=1, num_layers=4, lookahead=lookahead)
    g = torch.Generator().manual_seed(0)
    keys = []
    for step, new in enumerate([700, 1, 400, 1, 1, 1500, 1]):
        k = torch.randn(2, 8, new, 64, generator=g).to(device)
        out_k, out_v = layer.update(k, k * 2)
        keys.append(k)
        held = sum(x.shape[-2] for x in keys)
        assert torch.equal(out_k, reference_cat(keys)) and torch.equal(out_v, reference_cat(keys) * 2)
        pages = -(-held // 512)
        per_row = layer.committed_bytes // (2 * CHUNK)  # two rows, each one run of K and V pages
        if lookahead:
            assert pages <= per_row <= pages + 2, (step, held, per_row)
        else:
            assert per_row == pages, (step, held, per_row)
    layer.crop(-2000)
    assert layer.get_seq_length() == held - 2000
    assert torch.equal(layer.keys, reference_cat(keys)[..., : held - 2000, :])
    assert layer.committed_bytes // (2 * CHUNK) <= -(-(held - 2000) // 512) + (2 if lookahead else 0)
    layer.free()
    assert layer.committed_bytes == 0


def test_a_reservations_rows_fill_whole_pages_once_they_reach_a_page():
    from vmmalloc.integrations.kv_buffers import KVBuffers

    bf16, fp32 = torch.bfloat16, torch.float32
    # 8B shape: K and V of 8 heads of 128 in bf16, 4 KiB a position, 512 a page
    assert KVBuffers.capacity_for(20000, (8, 128), (8, 128), bf16) == 20480
    # 40 heads of 128 (no grouped query heads): 20 KiB a position; 512 of them fill 5 pages
    assert KVBuffers.capacity_for(20000, (40, 128), (40, 128), bf16) == 20480
    assert KVBuffers.capacity_for(18000, (2, 16), (2, 16), fp32) == 24576  # 256 B: 8192 a page
    assert KVBuffers.capacity_for(200, (2, 16), (2, 16), fp32) == 256, "rows under a page are packed"
    # K and V apart (head sizes differ): each reservation's rows fill whole pages
    c = KVBuffers.capacity_for(5000, (2, 192), (2, 128), bf16)
    assert c >= 5000 and c % 128 == 0 and c * 768 % (2 << 20) == 0 and c * 512 % (2 << 20) == 0


def test_a_commit_that_fails_on_the_values_is_made_again(device, monkeypatch):
    """K and V of different head sizes keep two reservations (Note [Keys and values share
    pages]); out of memory while V grows, after K grew, must not leave the layer believing V
    is mapped: the next update commits V again and the tokens read back whole."""
    from transformers.cache_utils import DynamicLayer

    from vmmalloc import virtual_tensor as vt_module

    ours, ref = VirtualKVLayer(max_length=8192, lookahead=False), DynamicLayer()
    k, v = torch.randn(2, 2, 600, 16).to(device), torch.randn(2, 2, 600, 8).to(device)
    for layer in (ours, ref):
        layer.update(k, v)
    assert len(ours.virtual_tensors()) == 2
    commit, calls = vt_module.VirtualTensor.commit, []

    def values_out_of_memory(self, rows, stop, start=0, row_starts=None):
        calls.append(self)
        if len(calls) == 2:  # K's commit went through; V's fails
            raise torch.OutOfMemoryError("injected: V could not grow")
        return commit(self, rows, stop, start, row_starts)

    more_k, more_v = torch.randn(2, 2, 3000, 16).to(device), torch.randn(2, 2, 3000, 8).to(device)
    monkeypatch.setattr(vt_module.VirtualTensor, "commit", values_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        ours.update(more_k, more_v)
    monkeypatch.setattr(vt_module.VirtualTensor, "commit", commit)
    assert ours.get_seq_length() == 600, "the failed update added nothing"
    out_k, out_v = ours.update(more_k, more_v)
    assert all(vt.stop >= 3600 for vt in ours.virtual_tensors()), "V's pages were mapped this time"
    ref_k, ref_v = ref.update(more_k, more_v)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)


def test_sliding_window_layer_gives_back_pages_behind_the_window(device):
    layer = VirtualKVLayer(max_length=16384, sliding_window=1500, lookahead=False)
    g = torch.Generator().manual_seed(0)
    keys = []
    for new in [1000, 600, 1, 3000, 1, 1]:
        k = torch.randn(1, 8, new, 64, generator=g).to(device)
        before = layer.get_seq_length()
        kv_length, kv_offset = layer.get_mask_sizes(new)
        out_k, _ = layer.update(k, k)
        keys.append(k)
        full = reference_cat(keys)
        assert kv_offset == max(before - 1500 + 1, 0) and kv_length == before + new - kv_offset
        assert torch.equal(out_k, full[..., kv_offset:, :])
        first_page, last_page = kv_offset // 512, (before + new - 1) // 512  # K and V: 512 positions a page
        assert layer.committed_bytes == (last_page - first_page + 1) * CHUNK


def test_batch_select_and_repeat_match_dynamic_layer(device):
    from transformers.cache_utils import DynamicLayer

    ours, ref = VirtualKVLayer(max_length=64), DynamicLayer()
    k = torch.randn(3, 2, 5, 16).to(device)
    for layer in (ours, ref):
        layer.update(k, -k)
    for op, arg in [("batch_repeat_interleave", 2), ("batch_select_indices", torch.tensor([5, 0, 3])),
                    ("reorder_cache", torch.tensor([2, 2, 0]))]:
        for layer in (ours, ref):
            getattr(layer, op)(arg.to(device) if isinstance(arg, torch.Tensor) else arg)
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values), op
    step = torch.randn(3, 2, 1, 16).to(device)
    assert torch.equal(ours.update(step, step)[0], ref.update(step, step)[0])


# ----- the attention function -----------------------------------------------------------


@pytest.mark.parametrize("q_len,kv_len,masked", [(1, 40, False), (1, 40, True), (7, 7, False), (7, 7, True),
                                                 (3, 40, False)])
def test_attention_on_strided_views_matches_sdpa_on_copies(device, q_len, kv_len, masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

    buffer = torch.randn(2, 64, 2, 32, device=device)  # [batch, max_len, kv_heads, head_dim]
    key = buffer[:, :kv_len].transpose(1, 2)  # strided, like the cache's views
    value = (buffer[:, :kv_len] * 0.5).transpose(1, 2)
    query = torch.randn(2, 8, q_len, 32, device=device)
    mask = None
    if masked:
        mask = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        mask[0, ..., :3] = False  # left padding of the first row
    ours, _ = virtual_sdpa_attention(Module(), query, key, value, mask, scaling=0.2)
    if mask is None and 1 < q_len != kv_len:  # what the bottom-right causal alignment means
        mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    ref, _ = sdpa_attention_forward(Module(), query, key.contiguous(), value.contiguous(), mask, scaling=0.2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


# ----- patch_generate -------------------------------------------------------------------


def test_patch_generate_uses_the_virtual_cache_and_respects_a_given_one(device):
    model = tiny_model("llama", device)
    ids, mask = prompt(2, 8, device)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert type(output_cache(ref)) is DynamicCache
    patch_generate()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert isinstance(output_cache(out), VirtualKVCache)
    assert torch.equal(ref.sequences, out.sequences)
    assert model.config._attn_implementation == "sdpa", "the attention swap is undone after generate()"
    mine = DynamicCache(config=model.config)
    given = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **cache_kwargs(mine),
                           return_dict_in_generate=True)
    assert output_cache(given) is mine
    unpatch_generate()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert type(output_cache(plain)) is DynamicCache



def attention_used(model, **generate_kwargs) -> set:
    """The attention implementations the first layer ran under during one generate()."""
    seen: set = set()
    attention = model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda module, args: seen.add(module.config._attn_implementation))
    try:
        model.generate(**generate_kwargs)
    finally:
        handle.remove()
    return seen


def test_a_given_vmmalloc_cache_gets_the_attention_function_and_other_caches_do_not(device):
    from vmmalloc.integrations import OffloadedKVCache
    from vmmalloc.integrations.attention import NAME

    model = tiny_model("llama", device, layers=3)
    ids, mask = prompt(2, 8, device)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref = model.generate(**common)
    with patched_generate(graphs=False):  # on a GPU, recorded decode steps use the graph attention
        for cache in (VirtualKVCache(model.config, max_length=32),
                      OffloadedKVCache(model.config, kv_budget=1, max_length=32)):  # every layer offloaded
            assert attention_used(model, **cache_kwargs(cache), **common) == {NAME}, type(cache).__name__
            cache.reset()
            assert torch.equal(model.generate(**cache_kwargs(cache), **common), ref), type(cache).__name__
        assert attention_used(model, **cache_kwargs(DynamicCache(config=model.config)), **common) == {"sdpa"}
    with patched_generate(attention=False, graphs=False):  # eager steps on transformers' own sdpa
        assert attention_used(model, **cache_kwargs(VirtualKVCache(model.config, max_length=32)), **common) == {"sdpa"}
    assert attention_used(model, **cache_kwargs(VirtualKVCache(model.config, max_length=32)), **common) == {"sdpa"}, \
        "no patch, no swap"
    assert model.config._attn_implementation == "sdpa"

def test_patch_respects_settings_passed_in_a_generation_config(device):
    from transformers import GenerationConfig, StaticCache

    model = tiny_model("llama", device)
    ids, mask = prompt(2, 8, device)
    patch_generate()
    config = GenerationConfig(max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)
    assert isinstance(output_cache(out), StaticCache)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)
    assert output_cache(out) is None


def test_patch_leaves_models_with_other_layer_types_to_transformers(device, monkeypatch):
    from vmmalloc.integrations import hf_compat

    model = tiny_model("llama", device)
    ids, mask = prompt(2, 8, device)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)

    def unsupported(config):
        raise ValueError("layer 0 is 'linear_attention'")

    monkeypatch.setattr(hf_compat, "layer_windows", unsupported)
    patch_generate()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert type(output_cache(out)) is DynamicCache
    assert torch.equal(out.sequences, ref)


def test_patched_generate_context_manager_and_bad_cache_name():
    with pytest.raises(ValueError, match="unknown vmmalloc cache 'paged'; allowed: vmm"):
        patch_generate("paged")
    from vmmalloc.integrations import is_patched

    with patched_generate():
        assert is_patched()
    assert not is_patched()


def test_vmmalloc_hf_cache_env_patches_generate_at_import():
    code = ("import transformers\nfrom transformers.generation.utils import GenerationMixin\n"
            "print(getattr(GenerationMixin.generate, '__vmmalloc_patched__', False))\n")
    env = {**os.environ, "VMMALLOC_HF_CACHE": "vmm"}
    env.pop("VMMALLOC", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"
    bad = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True,
                         env={**env, "VMMALLOC_HF_CACHE": "fast"})
    assert bad.returncode != 0
    assert "VMMALLOC_HF_CACHE='fast' is not understood; allowed: vmm" in bad.stderr


# ----- GPU only: long context, real attention kernels ------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_long_context_generate_matches_dynamic_cache_on_gpu(kind):
    model = tiny_model(kind, "cuda", max_positions=20000)
    ids, mask = prompt(2, 16384, "cuda")
    ref, out, cache = generate_both(model, ids, mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ref, out)
    # K and V side by side (Note [Keys and values share pages]) of 2 rows x 16K positions x
    # (2 or 1) heads x 16 dims x fp32, in whole pages plus at most two pages of lead per row.
    heads = model.config.num_key_value_heads
    item = 2 * heads * 16 * 4
    layers = model.config.num_hidden_layers
    held = ids.shape[1] + 11
    window = getattr(model.config, "sliding_window", None)
    pages = -(-(min(held, window or held) * item) // CHUNK) + 1
    assert cache.committed_bytes <= layers * 2 * (pages + 2) * CHUNK


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("q_len,masked", [(1, False), (1, True), (512, False)])
def test_attention_on_strided_bf16_views_uses_real_kernels(q_len, masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

    kv_len = 4096 if q_len == 1 else q_len
    buffer = torch.randn(4, 8192, 8, 128, device="cuda", dtype=torch.bfloat16)
    key, value = buffer[:, :kv_len].transpose(1, 2), (buffer[:, :kv_len] * 0.5).transpose(1, 2)
    query = torch.randn(4, 32, q_len, 128, device="cuda", dtype=torch.bfloat16)
    mask = None
    if masked:
        mask = torch.ones(4, 1, q_len, kv_len, dtype=torch.bool, device="cuda")
        mask[1, ..., :100] = False
    ours, _ = virtual_sdpa_attention(Module(), query, key, value, mask, scaling=128 ** -0.5)
    ref, _ = sdpa_attention_forward(Module(), query.float(), key.float().contiguous(), value.float().contiguous(),
                                    mask, scaling=128 ** -0.5)
    torch.testing.assert_close(ours.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cache", ["vmm", "offload"])
def test_a_cache_the_patch_made_gives_its_memory_back_when_generate_returns(device, cache):
    """Note [A cache the patch made]: no garbage collection needed, and back-to-back calls of
    different lengths do not stack up their KV. Decoding in graphs (the GPU), the emptied
    cache is kept for the model's next call: its reservations stay, no page does, and the
    patch's end frees it."""
    import gc

    model = tiny_model("llama", device, layers=3)
    options = {"kv_budget": "0"} if cache == "offload" else {}
    gc.collect()
    gc.disable()  # a reference cycle would keep the memory until a collection: none here
    try:
        before = kv_stats(device)["allocated_bytes.all.current"]
        ranges_kept = 3 if (cache, device) == ("vmm", "cuda") else 0  # one K/V reservation a layer
        with patched_generate(cache, **options):
            for length in (8, 40, 16):
                ids, mask = prompt(2, length, device)
                model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
                assert kv_stats(device)["allocated_bytes.all.current"] == before
                assert kv_stats(device)["vmm.virtual_ranges"] == ranges_kept
            kept = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  return_dict_in_generate=True)
        assert kv_stats(device)["vmm.kv_mapped_bytes.current"] > 0, "a cache handed to the caller keeps its KV"
        output_cache(kept).free()
        assert kv_stats(device)["vmm.virtual_ranges"] == 0, "the patch's end freed the kept cache"
    finally:
        gc.enable()


def test_patched_generate_raises_no_deprecation_warning_of_this_transformers():
    """The patch hands generate() its cache under the name the installed transformers takes
    (``cache`` from 5.24, ``past_key_values`` before), so nothing warns."""
    import warnings

    from vmmalloc.integrations.hf_compat import generate_cache_kwarg

    model = tiny_model("llama", layers=2)
    ids, mask = prompt(batch=2, length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with patched_generate("vmm"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                       **cache_kwargs(VirtualKVCache(model.config, max_length=16)))
    assert generate_cache_kwarg() in ("cache", "past_key_values")
