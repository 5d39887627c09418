"""Decode steps over a VirtualKVCache replayed from a CUDA graph (Note [Decode steps in a
graph]): the same tokens as eager decode and as DynamicCache, in fp32, padded batches
included; one graph recorded and every later step replayed; steps a graph cannot take run
eagerly; models it can never take are said once. On CPU the graph-mode operations run
eagerly each step (capture=False): the same arithmetic the graph records. On a GPU the
recorded graph replays over a reservation mapped only where the tokens are, so a read past
them would fault, not pass."""
from __future__ import annotations

import contextlib
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_models import prompt, tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from vmmalloc.integrations import VirtualKVCache, patched_generate  # noqa: E402
from vmmalloc.integrations.graph_decode import GraphDecoder, decoding_in_graphs, why_not  # noqa: E402
from vmmalloc.integrations.hf_compat import cache_kwargs  # noqa: E402

pytestmark = [pytest.mark.usefixtures("no_patch_left_behind"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


def greedy(model, ids, mask, cache, new_tokens):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          **cache_kwargs(cache))


def test_graph_steps_give_the_tokens_of_eager_decode(device):
    model = tiny_model("llama", device, max_positions=4096)
    ids, mask = prompt(3, 12, device)  # left padding: the graph's key mask must honour it
    new = 24
    ref = greedy(model, ids, mask, DynamicCache(config=model.config), new)
    eager = greedy(model, ids, mask, VirtualKVCache(model.config, max_length=200), new)
    cache = VirtualKVCache(model.config, max_length=200)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda")
    with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
        out = greedy(model, ids, mask, cache, new)
    assert torch.equal(out, eager) and torch.equal(out, ref)
    assert decoder.replays == new - 1, "every step after the prompt's came from the graph"
    assert decoder.recordings == (1 if device == "cuda" else 0)
    assert cache.get_seq_length() == ids.shape[1] + new - 1
    assert model.config._attn_implementation == "sdpa", "the graph attention is only for recording"


def decode(model, ids, mask, cache, new, decoder=None):
    """Greedy tokens and per-step logits, through `decoder` when given."""
    with contextlib.ExitStack() as stack:
        if decoder is not None:
            stack.enter_context(patched_generate(graphs=False))
            stack.enter_context(decoding_in_graphs(model, decoder))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **cache_kwargs(cache))
    return out.sequences, torch.stack(out.logits, dim=1).float()


def assert_decodes_alike(got, want, prompt_length):
    """fp32: equal tokens. bf16: equal logits within rounding up to the first step whose greedy
    token differs (two near-equal logits may swap there); the prompt's own step is eager in both."""
    (tokens, logits), (ref_tokens, ref_logits) = got, want
    new = logits.shape[1]
    differ = (tokens[:, prompt_length:] != ref_tokens[:, prompt_length:]).any(dim=0).nonzero()
    agree = int(differ[0]) if len(differ) else new
    assert agree >= 1, "the prompt's step is eager in both"
    upto = min(agree + 1, new)  # the steps up to the first differing token read the same tokens
    torch.testing.assert_close(logits[:, :upto], ref_logits[:, :upto], atol=5e-2, rtol=5e-2)
    return agree


def test_flash_row_spans_give_the_tokens_of_eager_decode_on_left_padded_prompts(device):
    """Note [Row spans for FlashAttention]. On the host the spans' reference runs (fp32: the
    tokens must be equal); on a GPU the varlen kernel, which takes bf16 (assert_decodes_alike)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model("llama", device, dtype=dtype, max_positions=4096)
    ids, mask = prompt(3, 12, device)
    new = 16
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=200), new)
    cache = VirtualKVCache(model.config, max_length=200)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda", attention="flash")
    out = decode(model, ids, mask, cache, new, decoder)
    assert decoder.kernels == {"flash": new - 1, "flex": 0}, decoder.kernels
    if device == "cpu":
        assert torch.equal(out[0], eager[0])
    else:
        assert_decodes_alike(out, eager, ids.shape[1])


def test_positions_mapped_past_the_tokens_are_zeros_for_the_graphs_attention(device, monkeypatch):
    """Note [Length block masks]: FlexAttention reads whole blocks, so the values past a row's
    tokens are multiplied by 0, and a recycled chunk may hold NaN there. Every page the cache
    maps is filled with NaN here before tokens are written; the graph steps must still give
    eager decode's tokens (they gave NaN logits on a GPU before the decoder zeroed them)."""
    from vmmalloc.integrations.kv_cache import VirtualKVLayer

    commit = VirtualKVLayer._commit

    def commit_over_old_contents(self, rows, stop, start):
        commit(self, rows, stop, start)
        for vt in self._buffers().tensors:
            vt.tensor[:rows, self.length:vt.stop].fill_(float("nan"))

    model = tiny_model("llama", device, max_positions=4096)
    ids, mask = prompt(2, 12, device, padded=False)
    mask[0, 4:6] = 0  # a hole: FlexAttention's mask serves, on either device
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=128), 8)
    monkeypatch.setattr(VirtualKVLayer, "_commit", commit_over_old_contents)
    cache = VirtualKVCache(model.config, max_length=128)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda")
    out = decode(model, ids, mask, cache, 8, decoder)
    assert decoder.kernels["flex"] == 7, decoder.kernels
    assert torch.isfinite(out[1]).all(), "a value past the tokens reached the attention's output"
    assert torch.equal(out[0], eager[0])
    # The same cache again after a reset: the new prompt maps the very span the last decode
    # left, over chunks that held anything; the first graph step must zero it again.
    cache.reset()
    again = decode(model, ids, mask, cache, 8, decoder)
    assert torch.isfinite(again[1]).all(), "a reset cache's recycled pages reached the attention"
    assert torch.equal(again[0], eager[0])


def test_rows_fill_whole_pages_so_flash_reads_any_max_length(device):
    """A reservation's rows of a page or more fill whole pages (KVBuffers.capacity_for): 18000
    positions of 256 B in fp32 (K and V of 2 heads of 16) would be 4.4 MiB, so the capacity
    grows to 24576 (6 MiB, address space only) and the rows are one run of positions that
    flash reads, with eager decode's tokens."""
    from vmmalloc.integrations.length_attention import row_positions

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model("llama", device, dtype=dtype, max_positions=40000)
    ids, mask = prompt(2, 12, device)
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=18000), 8)
    cache = VirtualKVCache(model.config, max_length=18000)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda", attention="flash")
    out = decode(model, ids, mask, cache, 8, decoder)
    keys = cache.layers[0]._buffers().keys
    position = 2 * 2 * 16 * keys.element_size()  # K and V of 2 heads of 16
    assert keys.shape[1] * position % (2 << 20) == 0 and keys.shape[1] >= 18000
    assert keys.shape[1] == (24576 if dtype == torch.float32 else 32768) and row_positions(keys) == keys.shape[1]
    assert decoder.kernels == {"flash": 7, "flex": 0}, decoder.kernels
    if device == "cpu":
        assert torch.equal(out[0], eager[0])
    else:
        assert_decodes_alike(out, eager, ids.shape[1])


def test_fused_small_kernels_give_the_tokens_of_eager_decode(device):
    """Note [Fused small kernels in graph steps]: the RMSNorms and SiLU gates run compiled in
    the graph's steps (2 layers x (2 norms + 1 MLP) + the final norm), with eager decode's
    tokens, and the modules get their own forwards back after each step."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model("llama", device, dtype=dtype, max_positions=4096)
    ids, mask = prompt(2, 12, device)
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=200), 8)
    cache = VirtualKVCache(model.config, max_length=200)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda", attention="flash", fuse_small_kernels=True)
    out = decode(model, ids, mask, cache, 8, decoder)
    assert decoder.fused_modules == 7 and decoder.replays == 7
    assert not any("forward" in m.__dict__ for m in model.modules()), "every module has its own forward back"
    if device == "cpu":
        assert torch.equal(out[0], eager[0])
        torch.testing.assert_close(out[1], eager[1], atol=1e-5, rtol=1e-5)
    else:
        assert_decodes_alike(out, eager, ids.shape[1])


def test_fused_kernels_that_fail_to_compile_leave_the_steps_in_graphs_unfused(device, monkeypatch):
    """Fusing is an optimisation of the same arithmetic: where the fused functions fail (no
    compiler for inductor, triton missing), the decoder says so once and its steps run the
    small kernels unfused, still through the graph path, with eager decode's tokens; the
    later steps do not try again."""
    import vmmalloc.integrations.graph_decode as graph_decode

    entered = []

    @contextlib.contextmanager
    def failing_fused(model):
        entered.append(1)
        norm = next(m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")

        def forward(hidden_states):
            raise RuntimeError(f"inductor: no working C++ compiler found ({device})")  # said once per text
        norm.forward = forward
        try:
            yield 1
        finally:
            del norm.forward

    monkeypatch.setattr(graph_decode, "fused_small_kernels", failing_fused)
    model = tiny_model("llama", device, max_positions=4096)
    ids, mask = prompt(2, 12, device)
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=200), 8)
    cache = VirtualKVCache(model.config, max_length=200)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda", attention="flash", fuse_small_kernels=True)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = decode(model, ids, mask, cache, 8, decoder)
    fusing = [str(w.message) for w in said if "small kernels" in str(w.message)]
    assert len(fusing) == 1 and "no working C++ compiler" in fusing[0] and "unfused" in fusing[0], fusing
    assert decoder.fuse_failed is not None and "no working C++ compiler" in decoder.fuse_failed
    assert len(entered) == 1, "fusing is tried once per decoder, not at every step"
    assert decoder.replays == 7 and decoder.fused_modules == 0 and not decoder.failed
    if device == "cpu":
        assert torch.equal(out[0], eager[0])
    else:
        assert_decodes_alike(out, eager, ids.shape[1])


def test_out_of_memory_in_a_fused_step_is_not_blamed_on_fusing(monkeypatch):
    """Out of memory in a fused step is the step's: it reaches the caller as an unfused one would, and
    fusing stays on for the next step."""
    import vmmalloc.integrations.graph_decode as graph_decode

    @contextlib.contextmanager
    def out_of_memory(model):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        yield 0

    monkeypatch.setattr(graph_decode, "fused_small_kernels", out_of_memory)
    model = tiny_model("llama", "cpu", max_positions=4096)
    ids, mask = prompt(2, 12, "cpu")
    cache = VirtualKVCache(model.config, max_length=200)
    decoder = GraphDecoder.of(model, cache, capture=False, attention="flash", fuse_small_kernels=True)
    with pytest.raises(torch.OutOfMemoryError):
        decode(model, ids, mask, cache, 4, decoder)
    assert decoder.fuse_failed is None


def test_a_new_decode_checks_its_mask_again_even_at_the_length_the_last_one_ended():
    """The padding verdict belongs to one decode: a second generate() on the same decoder whose
    prompt is exactly as long as the first decode ended, with a hole in its mask, must not
    inherit the first's "left padding only" and attend over the hole through flash."""
    model = tiny_model("llama", "cpu", max_positions=4096)
    ids, mask = prompt(2, 12, "cpu")
    cache = VirtualKVCache(model.config, max_length=128)
    decoder = GraphDecoder.of(model, cache, capture=False, attention="flash")
    decode(model, ids, mask, cache, 8, decoder)
    assert decoder.kernels == {"flash": 7, "flex": 0}
    cache.reset()
    ids2, mask2 = prompt(2, 12 + 7, "cpu", seed=3, padded=False)
    mask2[0, 3:9] = 0
    eager = decode(model, ids2, mask2, VirtualKVCache(model.config, max_length=128), 6)
    out = decode(model, ids2, mask2, cache, 6, decoder)
    assert torch.equal(out[0], eager[0])
    assert decoder.kernels == {"flash": 7, "flex": 5}, decoder.kernels


def test_key_buckets_cover_every_step_with_under_an_eighth_of_its_power_of_two_idle():
    from vmmalloc.integrations.graph_decode import key_bucket

    assert key_bucket(1, 32768) == 1024 and key_bucket(1024, 32768) == 1024
    assert key_bucket(1025, 32768) == 1280, "an eighth of 2048"
    assert key_bucket(16385, 32768) == 20480 and key_bucket(16448, 32768) == 20480
    assert key_bucket(30000, 30080) == 30080, "never past the reservation"
    assert key_bucket(100, 512) == 512
    for reach in range(1, 70000, 97):
        bucket = key_bucket(reach, 1 << 17)
        assert reach <= bucket and (reach <= 1024 or bucket - reach < (1 << (reach - 1).bit_length()) // 8), reach


def test_a_decode_crossing_a_key_bucket_records_the_next_and_keeps_both():
    """Note [Key splits sized by a bucket]: a prompt just under 1024 positions decodes into
    the 1280 bucket; each bucket has its own recorded step (its spans sized for it), both kept,
    and the tokens are eager decode's."""
    model = tiny_model("llama", "cpu", max_positions=4096)
    ids, mask = prompt(2, 1018, "cpu")
    eager = greedy(model, ids, mask, VirtualKVCache(model.config, max_length=2048), 12)
    cache = VirtualKVCache(model.config, max_length=2048)
    decoder = GraphDecoder.of(model, cache, capture=False, attention="flash")
    with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
        out = greedy(model, ids, mask, cache, 12)
    assert torch.equal(out, eager)
    assert decoder.kernels == {"flash": 11, "flex": 0}
    assert sorted(r.key_length for r in decoder._recorded.values()) == [1024, 1280]
    assert all(r.spans.max_length == r.key_length for r in decoder._recorded.values())


@pytest.mark.filterwarnings("ignore:vmmalloc. decode runs eagerly")
def test_a_flash_recording_that_fails_falls_back_to_flex_once_not_at_every_bucket():
    """On the host a recording fails (no CUDA): the flash step's failure marks flash failed for
    the shape, every bucket included, and the flex recording is tried once; eager decode's
    tokens throughout."""
    model = tiny_model("llama", "cpu", max_positions=4096)
    ids, mask = prompt(2, 1018, "cpu")
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=2048), 12)
    cache = VirtualKVCache(model.config, max_length=2048)
    decoder = GraphDecoder(model, cache, capture=True, attention="flash")
    out = decode(model, ids, mask, cache, 12, decoder)
    assert torch.equal(out[0], eager[0])
    tried = {(key[-2], key[-1]) for key in decoder.failed}
    assert tried == {(1024, "flash"), (None, "flash"), (0, "flex")}, tried
    assert decoder.recordings == decoder.replays == 0 and decoder.handed_back == 11


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_buckets_only_where_flash_splits_the_keys(kv_heads):
    """Note [Key splits sized by a bucket]: with 2 query heads per KV head a decode crossing
    from the 1024 bucket into 1280 records both; with as many KV heads as query heads flash
    does not split the keys, and one step (bucket 0) serves the whole decode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    ids, mask = prompt(2, 1018, "cpu")
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=2048), 12)
    cache = VirtualKVCache(model.config, max_length=2048)
    decoder = GraphDecoder.of(model, cache, capture=False, attention="flash")
    out = decode(model, ids, mask, cache, 12, decoder)
    assert torch.equal(out[0], eager[0])
    lengths = sorted(r.key_length for r in decoder._recorded.values())
    assert lengths == ([1024, 1280] if kv_heads == 2 else [cache.layers[0].graph_capacity]), lengths


def test_the_recorded_steps_are_kept_least_recently_used_first(monkeypatch):
    from vmmalloc.integrations import graph_decode

    monkeypatch.setattr(graph_decode, "_KEPT_GRAPHS", 2)
    model = tiny_model("llama", "cpu", max_positions=4096)
    cache = VirtualKVCache(model.config, max_length=64)
    decoder = GraphDecoder.of(model, cache, capture=False)
    ids, mask = prompt(2, 12, "cpu")
    cache.update(torch.zeros(2, 2, 12, 16), torch.zeros(2, 2, 12, 16), 0)
    first, second, third = (("a",) + (0, "flex")), (("b",) + (0, "flex")), (("c",) + (0, "flex"))
    decoder._recorded_for(first, 2)
    decoder._recorded_for(second, 2)
    decoder._recorded_for(first, 2)  # used again: now the most recent
    decoder._recorded_for(third, 2)
    assert list(decoder._recorded) == [first, third], "the least recently used (second) went"


def test_a_mask_with_holes_is_read_through_the_length_mask(device):
    """FlashAttention's spans are contiguous: a row whose mask has a hole after its first
    attended position decodes through FlexAttention's mask (bf16 on a GPU, where flash would
    otherwise serve), with eager decode's tokens (fp32) or logits (bf16)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model("llama", device, dtype=dtype, max_positions=4096)
    ids, mask = prompt(2, 12, device, padded=False)
    mask[0, 4:6] = 0  # a hole inside row 0
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=128), 8)
    cache = VirtualKVCache(model.config, max_length=128)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda", attention="auto" if device == "cuda" else "flash")
    out = decode(model, ids, mask, cache, 8, decoder)
    if device == "cpu":
        assert torch.equal(out[0], eager[0])
    else:
        assert_decodes_alike(out, eager, ids.shape[1])
    assert decoder.kernels == {"flash": 0, "flex": 7}, decoder.kernels


def test_a_second_call_on_the_same_cache_replays_the_same_graph(device):
    model = tiny_model("llama", device, max_positions=4096)
    ids, mask = prompt(2, 10, device)
    cache = VirtualKVCache(model.config, max_length=128)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda")
    with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
        first = greedy(model, ids, mask, cache, 8)
        cache.reset()  # the reservations stay, so the graph's addresses do
        second = greedy(model, ids, mask, cache, 8)
        with_compile_off = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                          disable_compile=True, **cache_kwargs(VirtualKVCache(model.config, 128)))
    assert torch.equal(first, second) and torch.equal(first, with_compile_off)
    assert GraphDecoder.of(model, cache, capture=device == "cuda") is decoder
    assert decoder.replays == 2 * 7 and decoder.recordings == (1 if device == "cuda" else 0)


def test_models_a_graph_cannot_take_are_named():
    assert why_not(tiny_model("llama"), VirtualKVCache(tiny_model("llama").config, 64)) is None
    mistral = tiny_model("mistral")
    assert "sliding-window" in why_not(mistral, VirtualKVCache(mistral.config, 64))
    assert "not a VirtualKVCache" in why_not(tiny_model("llama"), DynamicCache())
    eager = tiny_model("llama", attention="eager")
    assert "'eager'" in why_not(eager, VirtualKVCache(eager.config, 64))
    with pytest.raises(ValueError, match="sliding-window"):
        GraphDecoder(mistral, VirtualKVCache(mistral.config, 64))


def three_query_heads_per_kv_head(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(config).to(device).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_head_groups_flex_cannot_decode_go_through_flash_or_run_eagerly():
    """FlexAttention's decoding groups query heads over KV heads in powers of 2 only (Qwen2.5-7B
    has 7 per KV head); FlashAttention's spans take any grouping. Where flash can serve, the
    model decodes in graphs; a step that would need FlexAttention (a mask with holes) runs
    eagerly; the tokens are eager decode's either way."""
    model = three_query_heads_per_kv_head("cpu")
    reason = why_not(model, VirtualKVCache(model.config, 64))
    assert "power of 2" in reason and "FlashAttention" in reason, reason
    assert why_not(model, VirtualKVCache(model.config, 64), flash=True) is None
    for padded_with_holes in (False, True):
        ids, mask = prompt(3, 12, "cpu")
        if padded_with_holes:
            mask[2, 5] = 0
        eager = greedy(model, ids, mask, VirtualKVCache(model.config, max_length=64), 6)
        cache = VirtualKVCache(model.config, max_length=64)
        decoder = GraphDecoder.of(model, cache, capture=False, attention="flash")  # the spans' reference
        with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
            out = greedy(model, ids, mask, cache, 6)
        assert torch.equal(out, eager)
        assert decoder.kernels == {"flash": 0 if padded_with_holes else 5, "flex": 0}
        assert decoder.handed_back == (5 if padded_with_holes else 0), "the steps flex cannot take (the prompt is "\
            "transformers' own call)"


def test_the_graph_attention_outside_the_decoder_is_a_clear_error():
    from vmmalloc.integrations.graph_decode import graph_attention

    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="only inside vmmalloc's graph decoder"):
        graph_attention(torch.nn.Module(), q, q, q, None)


def test_the_graph_attention_refuses_what_its_kernels_do_not_apply():
    """A model passing logit soft-capping or attention sinks would get attention without
    them: the recording fails instead, and that shape decodes eagerly (said once)."""
    from vmmalloc.integrations.graph_decode import graph_attention
    from vmmalloc.integrations.length_attention import RowSpans

    q = torch.randn(1, 4, 1, 16)
    spans = RowSpans(1, 128, torch.device("cpu"))
    with pytest.raises(ValueError, match="does not apply softcap"):
        graph_attention(torch.nn.Module(), q, q, q, None, vmm_row_spans=spans, softcap=30.0)
    with pytest.raises(ValueError, match="does not apply s_aux"):
        graph_attention(torch.nn.Module(), q, q, q, None, vmm_row_spans=spans, s_aux=torch.zeros(4))


def test_on_the_host_the_patch_decodes_eagerly_and_says_nothing():
    model = tiny_model("llama")
    ids, mask = prompt(2, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patched_generate():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_graph_over_a_long_reservation_reads_only_the_mapped_pages(dtype):
    """Four pages a row reserved, the tokens in the first: the recorded attention must visit
    only the blocks within the lengths, or the replay faults on the unmapped pages. fp32
    attends through FlexAttention, bf16 through FlashAttention's row spans."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reserved = 65536 if dtype == "float32" else 131072  # four 2 MiB pages a row of 2 heads x 16 either way
    model = tiny_model("llama", "cuda", dtype=getattr(torch, dtype), max_positions=reserved)
    ids, mask = prompt(3, 12, "cuda")
    eager = decode(model, ids, mask, VirtualKVCache(model.config, max_length=reserved), 30)
    cache = VirtualKVCache(model.config, max_length=reserved)
    decoder = GraphDecoder.of(model, cache)
    out = decode(model, ids, mask, cache, 30, decoder)
    torch.cuda.synchronize()
    if dtype == "float32":
        assert torch.equal(out[0], eager[0])
    else:
        assert_decodes_alike(out, eager, ids.shape[1])
    assert decoder.kernels == ({"flash": 0, "flex": 29} if dtype == "float32" else {"flash": 29, "flex": 0})
    assert decoder.recordings == 1 and decoder.replays == 29
    assert cache.committed_bytes <= cache.reserved_bytes // 2, "most of the reservation stayed unmapped"


GENERATE_UNDER_VMMALLOC = """
import warnings
from hf_models import prompt, tiny_model
from vmmalloc.integrations import VirtualKVCache, patched_generate
from vmmalloc.integrations.hf_compat import cache_kwargs
vmmalloc.enable_vmm_allocator()
model = tiny_model("llama", "cuda", max_positions=8192)
ids, mask = prompt(3, 12, "cuda")
def greedy(cache=None, **kw):
    extra = cache_kwargs(cache) if cache is not None else {}
    return model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, **extra, **kw)
with patched_generate(graphs=False):
    eager = greedy()
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    with patched_generate():
        graphs = greedy()                      # the patch's own cache, decoded in graphs
        again = greedy()                       # its emptied cache kept: the same graph replayed
        from vmmalloc.integrations.generate_patch import _kept
        own = _kept[model][0].graph_decoder
        own_counts = (own.recordings, own.replays)
        cache = VirtualKVCache(model.config, max_length=4096)
        given = greedy(cache)                  # a cache the caller passes
        off = greedy(VirtualKVCache(model.config, max_length=4096), disable_compile=True)
decoder = cache.graph_decoder
torch.cuda.synchronize()
report(same=bool(torch.equal(eager, graphs) and torch.equal(eager, again) and torch.equal(eager, given)
                 and torch.equal(eager, off)), own=own_counts,
       replays=decoder.replays, recordings=decoder.recordings,
       said=[str(w.message) for w in said if "vmmalloc" in str(w.message)],
       pools=torch.cuda.memory_stats().get("vmm.private_pools", -1))
"""


@pytest.mark.gpu
def test_patched_generate_decodes_in_graphs_under_vmmalloc():
    """The drop-in path: VMMALLOC as torch's allocator (graphs recorded through the adapter),
    patch_generate()'s defaults, the patch's own cache and a given one; disable_compile
    turns it off; the tokens are eager decode's."""
    from test_torch_gpu import run

    import vmmalloc

    if not vmmalloc.cuda_available():
        pytest.skip(vmmalloc.cuda_unavailable_reason() or "no CUDA")
    import os

    tests_dir = os.path.dirname(__file__)
    r = run("import sys; sys.path.insert(0, " + repr(tests_dir) + ")\n" + GENERATE_UNDER_VMMALLOC)
    assert r["same"], r
    assert r["recordings"] == 1 and r["replays"] == 39, r
    assert r["own"] == [1, 2 * 39], "the patch's kept cache replayed its one graph in the second call"
    assert r["said"] == [], r


def test_the_attention_refuses_to_run_unfused_where_it_should_be_compiled():
    """Note [One length mask per shape]: were torch.compile to give up and run the Python, the
    unfused reference would read unmapped pages; it raises instead, and the decoder decodes
    eagerly."""
    from vmmalloc.integrations.graph_decode import CompiledAttentionFellBack, _fused_only

    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(CompiledAttentionFellBack, match="ran uncompiled"):
        _fused_only(q, q, q, None, None, False)


def test_decoders_of_one_shape_share_one_length_mask():
    from vmmalloc.integrations.graph_decode import _Recorded

    cpu = torch.device("cpu")
    a, b, c = (_Recorded(("a", 0, "flex"), 3, 256, cpu), _Recorded(("b", 0, "flex"), 3, 256, cpu),
               _Recorded(("c", 0, "flex"), 2, 256, cpu))
    assert a.mask is b.mask and a.key_mask is b.key_mask, "one compiled attention serves both"
    assert c.mask is not a.mask
    assert a.position is not b.position, "each graph has its own inputs"


@pytest.mark.gpu
def test_a_new_cache_of_the_same_shape_does_not_compile_the_attention_again():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "cuda", max_positions=4096)
    ids, mask = prompt(2, 10, "cuda")
    compiled = []
    for _ in range(3):
        cache = VirtualKVCache(model.config, max_length=512)
        decoder = GraphDecoder.of(model, cache)
        with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
            greedy(model, ids, mask, cache, 6)
        assert decoder.recordings == 1 and not decoder.failed
        compiled.append(sum(counters["stats"].values()))
    assert compiled[1] == compiled[2] == compiled[0], f"dynamo compiled again: {compiled}"



def test_steps_of_several_tokens_and_crops_run_eagerly_and_agree(device):
    """Prompt-lookup decoding verifies several candidate tokens per step and crops the cache
    back: the decoder hands such steps to the model (eager), and the tokens stay eager's."""
    model = tiny_model("llama", device, max_positions=4096)
    ids, mask = prompt(1, 16, device)
    ids = torch.cat([ids, ids[:, -8:], ids[:, -8:]], dim=1)  # repeats, so that lookups find candidates
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    eager = model.generate(ids, **kwargs, **cache_kwargs(VirtualKVCache(model.config, max_length=128)))
    cache = VirtualKVCache(model.config, max_length=128)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda")
    with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
        out = model.generate(ids, **kwargs, **cache_kwargs(cache))
    assert torch.equal(out, eager)
    import inspect

    from transformers.generation.utils import GenerationMixin

    # 5.17 verifies candidates by calling the model itself; later releases through the hook.
    if "model_forward" in inspect.getsource(GenerationMixin._assisted_decoding):
        assert decoder.replays > 0 and decoder.handed_back > 0, (decoder.replays, decoder.handed_back)
    else:
        assert decoder.replays == decoder.handed_back == 0


@pytest.mark.parametrize("lookahead", [True, False])
def test_every_block_a_replay_reads_is_mapped_when_pages_hold_no_whole_number_of_blocks(lookahead):
    """40 heads x 128 in bf16: a 2 MiB page holds 102.4 positions of K and V (Note [Keys and
    values share pages]), so page ends fall inside attention blocks; the mapped span must
    still reach the end of the last block read."""
    from vmmalloc.integrations.graph_decode import BLOCK
    from vmmalloc.integrations.kv_cache import VirtualKVLayer

    layer = VirtualKVLayer(4096, layer_index=0, num_layers=2, lookahead=lookahead)
    keys = torch.zeros(2, 40, 100, 128, dtype=torch.bfloat16)
    layer.update(keys, keys)
    k = layer._buffers()
    assert k.tokens_per_page == 102
    remaps = 0
    for i in range(1400):
        stop = layer.length + 1
        if i % 2:  # an eager one-token step between replays (prompt lookup does this)
            before = k.committed_bytes
            layer.update(keys[:, :, :1], keys[:, :, :1])
            remaps += k.committed_bytes < before
        else:
            layer.prepare_graph_step(2, stop, BLOCK)
            layer.finish_graph_step(stop)
        needed = min(layer.graph_capacity, -(-layer.length // BLOCK) * BLOCK)
        assert k.stop >= needed, f"at {layer.length}: mapped to {k.stop}, a replay reads to {needed}"
    assert remaps == 0, "an eager step gave back pages the next replay maps again"
    layer.free()


@pytest.mark.parametrize("lookahead", [True, False])
def test_preparing_a_step_maps_what_the_full_commit_would_also_when_it_skips_it(lookahead):
    """prepare_graph_step returns at once while what the last step mapped serves: the same
    mapping, step after step (eager steps, a crop and a reset between), as a layer that runs
    the whole commit every time."""
    from vmmalloc.integrations.graph_decode import BLOCK
    from vmmalloc.integrations.kv_cache import VirtualKVLayer

    fast, full = (VirtualKVLayer(4096, layer_index=1, num_layers=3, lookahead=lookahead) for _ in range(2))
    keys = torch.zeros(2, 40, 100, 128, dtype=torch.bfloat16)
    for layer in (fast, full):
        layer.update(keys, keys)
    for i in range(1200):
        for layer in (fast, full):
            if i == 700:
                layer.crop(150)
            elif i == 900:
                layer.reset()
                layer.update(keys, keys)
            elif i % 7 == 3:
                layer.update(keys[:, :, :1], keys[:, :, :1])  # an eager step between replays
            else:
                if layer is full:
                    layer._prepared = None  # the whole commit, every time
                stop = layer.length + 1
                layer.prepare_graph_step(2, stop, BLOCK)
                layer.finish_graph_step(stop)
        extent = [(kv.rows, kv.start, kv.stop) for kv in (fast._buffers(), full._buffers())]
        assert extent[0] == extent[1], f"step {i}: {extent}"
        assert fast.keys.shape[-2] == fast.length == full.values.shape[-2], "the views follow the steps"
    assert fast.fast_prepares > 500 and full.fast_prepares == 0, (fast.fast_prepares, full.fast_prepares)
    for layer in (fast, full):
        layer.free()
    assert fast.keys is None and fast.values is None, "a freed layer has no views"


def test_rows_packed_into_shared_pages_also_take_the_fast_path():
    """A short reservation (rows under 2 MiB) maps the whole of it for a graph step: every later
    step finds it mapped."""
    from vmmalloc.integrations.graph_decode import BLOCK
    from vmmalloc.integrations.kv_cache import VirtualKVLayer

    layer = VirtualKVLayer(300, lookahead=True)
    keys = torch.zeros(2, 2, 10, 16)
    layer.update(keys, keys)
    for _ in range(100):
        stop = layer.length + 1
        layer.prepare_graph_step(2, stop, BLOCK)
        layer.finish_graph_step(stop)
    assert layer._buffers().stop == layer.graph_capacity
    assert layer.fast_prepares == 99
    layer.free()


def test_a_model_whose_attention_may_bypass_the_interface_is_refused():
    model = tiny_model("llama")

    class Unannounced(type(model)):
        _supports_attention_backend = False

    model.__class__ = Unannounced
    assert "AttentionInterface" in why_not(model, VirtualKVCache(model.config, 64))


def test_moved_weights_change_the_fingerprint_the_graph_is_keyed_on():
    from vmmalloc.integrations.graph_decode import weights_fingerprint

    model = tiny_model("llama")
    cache = VirtualKVCache(model.config, 64)
    decoder = GraphDecoder.of(model, cache, capture=False)
    before = decoder.weights
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert weights_fingerprint(model) != before
    assert GraphDecoder.of(model, cache, capture=False) is decoder and decoder.weights != before
    ids, mask = prompt(1, 6)
    with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
        greedy(model, ids, mask, cache, 3)
    assert [r.key[2] for r in decoder._recorded.values()] == [weights_fingerprint(model)], \
        "the step was recorded for the weights where they are now"


def test_a_cache_decoded_through_its_decoder_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    model = tiny_model("llama")
    ids, mask = prompt(2, 10)
    gc.collect()
    gc.disable()
    try:
        cache = VirtualKVCache(model.config, max_length=64)
        decoder = GraphDecoder.of(model, cache, capture=False)
        with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
            greedy(model, ids, mask, cache, 6)
        assert decoder.replays == 5
        gone = weakref.ref(cache)
        del cache, decoder
        assert gone() is None, "no reference cycle through the recorded output"
    finally:
        gc.enable()


def test_replays_after_a_crop_read_the_cropped_cache(device):
    """Steps replayed, the cache cropped back (as assisted decoding does), steps replayed
    again: each step's logits equal those of the same steps decoded eagerly."""
    model = tiny_model("llama", device, max_positions=4096)
    ids, _ = prompt(2, 10, device, padded=False)

    def run(use_graphs):
        cache = VirtualKVCache(model.config, max_length=128)
        step = GraphDecoder.of(model, cache, capture=device == "cuda") if use_graphs else model
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            for n in range(12):
                if n == 6:
                    cache.crop(-3)
                length = cache.get_seq_length()
                out = step(input_ids=token, position_ids=torch.full((2, 1), length, device=device),
                           attention_mask=torch.ones(2, length + 1, dtype=torch.long, device=device),
                           use_cache=True, return_dict=True, **cache_kwargs(cache))
                logits.append(out.logits[:, -1].float())
                token = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits), step

    eager, _ = run(False)
    graphs, decoder = run(True)
    torch.testing.assert_close(graphs, eager, atol=1e-4, rtol=1e-4)
    assert decoder.replays == 12


def test_scores_and_logits_generate_returns_are_eager_decode_s(device):
    """generate() keeps each step's logits and scores: the decoder hands out a copy of the
    graph's logits, so a later replay does not overwrite what an earlier step returned."""
    model = tiny_model("llama", device, max_positions=4096)
    ids, mask = prompt(2, 10, device)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)
    eager = model.generate(ids, **kwargs, **cache_kwargs(VirtualKVCache(model.config, max_length=128)))
    cache = VirtualKVCache(model.config, max_length=128)
    decoder = GraphDecoder.of(model, cache, capture=device == "cuda")
    with patched_generate(graphs=False), decoding_in_graphs(model, decoder):
        out = model.generate(ids, **kwargs, **cache_kwargs(cache))
    assert torch.equal(out.sequences, eager.sequences) and decoder.replays == 7
    for ours, theirs in zip(out.logits + out.scores, eager.logits + eager.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
