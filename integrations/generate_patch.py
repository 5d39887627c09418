"""patch_generate(): every ``model.generate()`` given no cache uses vmmalloc's KV cache.

A cache the caller passes (``cache``, ``past_key_values`` before transformers 5.24, or
``cache_implementation``) is always
respected, as are ``use_cache=False`` and models whose caches are not plain decoder caches
(encoder-decoder models). A caller's own VirtualKVCache or OffloadedKVCache still gets
vmmalloc's attention function (Note [A given vmmalloc cache]). The patch wraps
``transformers.GenerationMixin.generate`` once per process; ``unpatch_generate()``
restores it.

Note [A given vmmalloc cache]
The attention swap belongs to the cache, not to who built it: transformers' "sdpa" picks
cuDNN attention on Hopper, which builds an execution plan for every new key length
(Note [No cuDNN attention while decoding]); under offloading that CPU time starved the copy
engine for ~90 ms of each 330 ms decode step (bench/NOTES.md, offloading, 10). Any other
cache the caller passes runs generate() untouched.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

from vmmalloc.integrations.hf_compat import generate_cache_kwarg, given_cache, output_cache

CACHES = ("vmm", "offload")
_state: dict[str, Any] = {"original": None, "cache": None, "options": {}, "attention": True, "graphs": True,
                         "graph_attention": "auto", "graph_fuse": False}
# A model's emptied cache and the options it was made with, kept for its next generate()
# (Note [A cache the patch made]).
_kept: weakref.WeakKeyDictionary[Any, tuple[Any, dict[str, Any]]] = weakref.WeakKeyDictionary()
# Positions reserved beyond generate()'s max_length (virtual space only, no memory).
_RESERVE_MARGIN = 64


def _check_cache(cache: str, options: dict[str, Any]) -> None:
    if cache not in CACHES:
        raise ValueError(f"unknown vmmalloc cache {cache!r}; allowed: {', '.join(CACHES)}")
    if cache == "offload":
        if options.get("kv_budget") is None:
            raise ValueError("the offload cache needs a GPU budget for KV: patch_generate('offload', "
                             "kv_budget='8GiB') (or VMMALLOC_KV_BUDGET=8GiB with VMMALLOC_HF_CACHE=offload)")
        from vmmalloc.sizes import parse_bytes

        parse_bytes(options["kv_budget"], "kv_budget")
    elif "kv_budget" in options:
        raise ValueError(f"kv_budget is an option of the offload cache, not of {cache!r}")


def patch_generate(cache: str = "vmm", *, attention: bool = True, graphs: bool = True, graph_attention: str = "auto",
                   graph_fuse: bool = False, **options: Any) -> None:
    """Makes ``generate()`` use vmmalloc's cache whenever it is given none.

    Args:
        cache: ``"vmm"``: :class:`~vmmalloc.integrations.VirtualKVCache`; ``"offload"``:
            :class:`~vmmalloc.integrations.OffloadedKVCache`, which needs ``kv_budget``.
        attention: while generating, models on ``"sdpa"`` attention use
            :func:`~vmmalloc.integrations.attention.virtual_sdpa_attention`, which reads the
            virtual buffers with no copy.
        graphs: decode steps of a ``VirtualKVCache`` on a GPU are replayed from a CUDA graph
            (Note [Decode in graphs under the patch]); False, or ``disable_compile=True`` in
            the generation config, decodes eagerly.
        graph_attention: the kernel those steps attend with: ``"auto"`` (FlashAttention's
            varlen kernel for fp16/bf16 caches padded on the left, FlexAttention otherwise),
            ``"flash"`` or ``"flex"`` (:class:`~vmmalloc.integrations.graph_decode.GraphDecoder`).
        graph_fuse: those steps run the model's RMSNorms and SiLU gates compiled by inductor
            (Note [Fused small kernels in graph steps]; not yet measured on a GPU, so off).
        **options: passed to the cache (``max_batch_size``, ``lookahead``; ``kv_budget``
            for ``"offload"``: GPU bytes for KV, an int or a string such as ``"8GiB"``).

    Calling it again replaces the settings; the patch is applied once.
    """
    _check_cache(cache, options)
    if graph_attention not in ("auto", "flash", "flex"):
        raise ValueError(f"patch_generate: graph_attention must be 'auto', 'flash' or 'flex', not {graph_attention!r}")
    from transformers.generation.utils import GenerationMixin

    _state.update(cache=cache, options=dict(options), attention=attention, graphs=graphs,
                  graph_attention=graph_attention, graph_fuse=bool(graph_fuse))
    if _state["original"] is not None:
        return
    original = GenerationMixin.generate

    @functools.wraps(original)
    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _generate(original, self, args, kwargs)

    generate.__vmmalloc_patched__ = True  # type: ignore[attr-defined]
    _state["original"] = original
    GenerationMixin.generate = generate


def unpatch_generate() -> None:
    """Restores transformers' own ``generate()`` (no effect when not patched)."""
    original = _state["original"]
    if original is None:
        return
    from transformers.generation.utils import GenerationMixin

    GenerationMixin.generate = original
    _state.update(original=None, cache=None, options={})
    while _kept:
        _, (cache, _) = _kept.popitem()
        cache.free()


def is_patched() -> bool:
    """Whether ``generate()`` is patched now."""
    return _state["original"] is not None


@contextlib.contextmanager
def patched_generate(cache: str = "vmm", **options: Any) -> Iterator[None]:
    """``with patched_generate(): model.generate(...)``: the patch for one block only (an
    outer patch, if any, is restored afterwards)."""
    saved = dict(_state)
    was_patched = is_patched()
    patch_generate(cache, **options)
    try:
        yield
    finally:
        if was_patched:
            _state.update(cache=saved["cache"], options=saved["options"], attention=saved["attention"],
                          graphs=saved["graphs"], graph_attention=saved["graph_attention"],
                          graph_fuse=saved["graph_fuse"])
        else:
            unpatch_generate()


def _setting(model: Any, kwargs: dict[str, Any], name: str, default: Any = None) -> Any:
    """A generation setting as generate() will see it: keyword, else the generation_config
    passed, else the model's."""
    if name in kwargs:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, default)


def _uses_own_cache(model: Any, kwargs: dict[str, Any]) -> bool:
    """Whether generate() should run untouched: the caller chose a cache, or none is used,
    or this is an assistant model drafting for another generate() (which owns and sizes the
    assistant's cache), or the model's cache is not a plain decoder cache."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    return (given_cache(kwargs) is not None or _setting(model, kwargs, "cache_implementation") is not None
            or _setting(model, kwargs, "use_cache", True) is False or _setting(model, kwargs, "is_assistant", False)
            or model.config.is_encoder_decoder or (supports is not None and not supports()))


def _reserved_length(model: Any, args: tuple, kwargs: dict[str, Any]) -> int:
    """Prompt plus the most tokens generate() may add, within the model's positions."""
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if inputs is None and kwargs.get("inputs_embeds") is not None:
        inputs = kwargs["inputs_embeds"]
    prompt = int(inputs.shape[1]) if inputs is not None and getattr(inputs, "ndim", 0) >= 2 else 0
    new = _setting(model, kwargs, "max_new_tokens")
    total = prompt + int(new) if new is not None else int(_setting(model, kwargs, "max_length") or 0)
    return max(total, prompt + 1) + _RESERVE_MARGIN


def _generate(original: Any, model: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    from vmmalloc.integrations.hf_compat import layer_windows
    from vmmalloc.integrations.kv_cache import VirtualKVCache
    from vmmalloc.integrations.offload_cache import OffloadedKVCache

    if isinstance(given_cache(kwargs), (VirtualKVCache, OffloadedKVCache)):
        _pad_from_mask(given_cache(kwargs), model, kwargs)
        return _with_attention(original, model, args, kwargs)  # Note [A given vmmalloc cache]
    if _uses_own_cache(model, kwargs):
        return original(model, *args, **kwargs)
    try:
        layer_windows(model.config)
    except ValueError:  # layer types the virtual cache does not implement: transformers' own
        return original(model, *args, **kwargs)
    cache_class = OffloadedKVCache if _state["cache"] == "offload" else VirtualKVCache
    max_length = _reserved_length(model, args, kwargs)
    graphs = cache_class is VirtualKVCache and _state["graphs"] and model.device.type == "cuda"
    if graphs:
        # Reserved to a power of two: the graph's attention is compiled for the reservation's
        # length, so calls of nearby lengths share one compiled kernel (virtual space only).
        max_length = 1 << (max_length - 1).bit_length()
    cache = _take_kept_cache(model, max_length) if graphs else None
    if cache is None:
        cache = cache_class(model.config, max_length=max_length, **_state["options"])
    kwargs.pop("past_key_values", None)  # given as None: one name only, the one this release takes
    kwargs.pop("cache", None)
    kwargs[generate_cache_kwarg()] = cache
    try:
        _pad_from_mask(cache, model, kwargs)
        out = _with_attention(original, model, args, kwargs)
    except BaseException:
        cache.free()
        raise
    # Note [A cache the patch made]
    # Its memory goes back when generate() returns, unless the output hands the cache to the
    # caller (return_dict_in_generate): the cache's layers and container refer to each other,
    # so without this only the garbage collector would give it back, and back-to-back calls
    # stacked up their KV. Decoding in graphs, the patch keeps the emptied cache for the
    # model's next call (reset(): every page goes back; the reservations stay, and so does the
    # pool its decoder's graphs share, one decode step's activations and each graph's logits:
    # Note [One pool for a decoder's graphs]), so that the graphs recorded on its buffers are
    # replayed again instead of recorded anew. unpatch_generate() frees it.
    if output_cache(out) is not cache:
        if graphs and cache.graph_decoder is not None:  # a graph to keep (none for a model graphs cannot take)
            cache.reset()
            previous = _kept.pop(model, None)  # a concurrent call's: one kept cache per model
            if previous is not None:
                previous[0].free()
            _kept[model] = (cache, dict(_state["options"]))
        else:
            cache.free()
    return out


def _pad_from_mask(cache: Any, model: Any, kwargs: dict[str, Any]) -> None:
    """An empty VirtualKVCache learns the prompt's left padding from generate()'s attention
    mask (Note [Left padding costs no memory]), each row repeated as generate() expands it
    for beams or returned sequences; a mask with holes, or right padding, leaves it unpadded."""
    from vmmalloc.integrations.kv_cache import VirtualKVCache
    from vmmalloc.integrations.length_attention import is_left_padding_only, left_padding

    mask = kwargs.get("attention_mask")
    if not isinstance(cache, VirtualKVCache) or cache.get_seq_length() > 0:
        return
    if mask is None or getattr(mask, "ndim", 0) != 2 or not is_left_padding_only(mask):
        cache.set_padding(None)
        return
    starts = left_padding(mask).tolist()
    # generate() expands the prompt's rows (repeat_interleave) by this before the prompt runs.
    expand = max(int(_setting(model, kwargs, "num_beams", 1) or 1),
                 int(_setting(model, kwargs, "num_return_sequences", 1) or 1))
    cache.set_padding([s for s in starts for _ in range(expand)] if any(starts) else None)


def _take_kept_cache(model: Any, max_length: int) -> Any:
    """The model's kept cache if it reserves `max_length` under today's options (taken: a
    concurrent call makes its own), else None (a kept cache that does not fit is freed)."""
    kept = _kept.pop(model, None)
    if kept is None:
        return None
    cache, options = kept
    if cache.max_length >= max_length and options == _state["options"]:
        return cache
    cache.free()
    return None


def _with_attention(original: Any, model: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """generate() with vmmalloc's attention function where the patch's settings allow it."""
    from vmmalloc.integrations.attention import register_attention

    # Only a plain decoder's attention is swapped: on composite configs transformers' setter
    # would rewrite every sub-model's choice (a vision tower's too).
    swap = (_state["attention"] and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and not getattr(model.config, "sub_configs", None))
    if not swap:
        return _with_graphs(original, model, args, kwargs)
    model.config._attn_implementation = register_attention()
    try:
        return _with_graphs(original, model, args, kwargs)
    finally:
        model.config._attn_implementation = "sdpa"


# Note [Decode in graphs under the patch]
# transformers picks the forward of its decode steps once per generate() call:
# get_compiled_call(compile_config) when _valid_auto_compile_criteria says so, else the
# model itself (5.17 to 5.24 alike). For a VirtualKVCache on a GPU the patch answers both on
# the model instance for the length of the call: the criteria say yes unless the generation
# config sets disable_compile, and the "compiled call" is the cache's GraphDecoder, which
# replays one-token steps from a CUDA graph and runs anything else eagerly. The prompt always
# runs eagerly (transformers' _prefill calls the model itself).
def _with_graphs(original: Any, model: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    from vmmalloc.integrations.graph_decode import GraphDecoder, decoding_in_graphs, say_once, why_not
    from vmmalloc.integrations.kv_cache import VirtualKVCache

    cache = given_cache(kwargs)
    if not _state["graphs"] or not isinstance(cache, VirtualKVCache) or model.device.type != "cuda":
        return original(model, *args, **kwargs)  # graphs are a VirtualKVCache's, on a GPU: nothing to say
    reason = why_not(model, cache, flash=False if _state["graph_attention"] == "flex" else None)
    if reason is not None:
        say_once(reason)
        return original(model, *args, **kwargs)
    decoder = GraphDecoder.of(model, cache, attention=_state["graph_attention"], fuse_small_kernels=_state["graph_fuse"])
    with decoding_in_graphs(model, decoder):
        return original(model, *args, **kwargs)
