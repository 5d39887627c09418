"""Decode steps of a VirtualKVCache replayed from a CUDA graph (Note [Decode steps in a graph]
in integrations/kv_cache.py; the plan and its bound: bench/NOTES.md, "KV decode in CUDA graphs").

A decode step is launch-bound: a 32-layer model launches about a thousand kernels per token.
GraphDecoder records one step's kernels once and replays them for every later step, on the
same fixed virtual addresses. What changes from step to step lives in device tensors the
graph reads: the token and its position, the write position of the new K/V, the lengths and
the padding the attention honours (Note [Length block masks]). Pages are mapped on the host
between replays, exactly as in eager decode, so the memory committed still follows the tokens.

generate() reaches it through transformers' own hook for a compiled decode step: while the
patched generate() runs (integrations/generate_patch.py), the model's ``get_compiled_call``
returns the decoder instead of a torch.compile'd forward. A step the decoder cannot replay
(more than one new token, inputs a graph cannot take) runs eagerly; a model it can never
replay (why_not) is said once, and its generate() runs eagerly throughout.

OffloadedKVCache decodes eagerly: between its layers the host decides which layer's K/V to
prefetch into which ring slot and waits on the copies' events (integrations/offload_ring.py),
and a graph of the whole step would freeze one step's decisions. Recording its resident
layers alone would need the model cut at layer boundaries into graphs of its own; not built.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vmmalloc.integrations.fused_steps import fused_small_kernels
from vmmalloc.integrations.hf_compat import given_cache, layer_windows
from vmmalloc.integrations.length_attention import (
    LengthMask,
    RowSpans,
    attend_row_spans,
    is_left_padding_only,
    left_padding,
    row_positions,
)

NAME = "vmm_graph"  # the attention implementation a recorded step runs under
# What a decode step may pass besides these makes the decoder run it eagerly.
_STEP_INPUTS = {"input_ids", "attention_mask", "position_ids", "past_key_values", "cache", "use_cache",
                "return_dict", "logits_to_keep"}
BLOCK = 128  # key positions per block of the graph attention (the reservation is a multiple of it)
_attention_calls = [0]  # graph_attention's calls in a warm-up step: every layer must make one
_said: set[str] = set()


def say_once(reason: str, prefix: str = "vmmalloc: decode runs eagerly, not in CUDA graphs: ") -> None:
    """Warns once per reason in a process (by default, that decode runs eagerly)."""
    if reason not in _said:
        _said.add(reason)
        warnings.warn(prefix + reason, stacklevel=3)


class CompiledAttentionFellBack(RuntimeError):
    """torch.compile ran the graph attention's Python instead of its fused kernel (dynamo
    disabled, or its recompile limit reached): the unfused reference would read every
    reserved position, unmapped pages included, so it is refused instead."""


def _unfused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any, scale: float | None,
             enable_gqa: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    assert isinstance(out, torch.Tensor)  # no auxiliary outputs were asked for
    return out


def _fused_only(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any, scale: float | None,
                enable_gqa: bool) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # a constant True where compiled: this branch is traced away
        raise CompiledAttentionFellBack(
            "vmmalloc: the graph attention ran uncompiled (torch.compile fell back to eager: dynamo disabled "
            "or its recompile limit hit); decoding eagerly instead")
    return _unfused(query, key, value, block_mask, scale, enable_gqa)


@functools.cache
def _flex(device_type: str) -> Callable[..., torch.Tensor]:
    """FlexAttention, compiled for the GPU (its fused kernels skip unlisted blocks) and never
    run unfused there; on the host its unfused reference (the CPU tests, buffers mapped in full)."""
    if device_type == "cuda":
        return torch.compile(_fused_only, dynamic=False, fullgraph=True)
    return _unfused


def graph_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                    vmm_length_mask: LengthMask | None = None, vmm_row_spans: RowSpans | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract over the whole reservation: query
    ``[B, Hq, 1, D]``, key/value ``[B, Hkv, capacity, D]``, read within `vmm_row_spans`
    (FlashAttention, Note [Row spans for FlashAttention]) or `vmm_length_mask` (FlexAttention)."""
    if vmm_length_mask is None and vmm_row_spans is None:
        raise RuntimeError(f"the {NAME!r} attention runs only inside vmmalloc's graph decoder (GraphDecoder)")
    _attention_calls[0] += 1
    if dropout:
        raise ValueError(f"the {NAME!r} attention is for inference; dropout {dropout} was asked for")
    # What neither kernel here applies: a recording that meets one fails, and that shape decodes eagerly.
    unsupported = [name for name in _UNSUPPORTED_ATTENTION_ARGUMENTS if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"the {NAME!r} attention does not apply {', '.join(unsupported)}")
    if vmm_row_spans is not None:  # the reservation's own layout, [B, capacity, Hkv, D]
        return attend_row_spans(query, key.transpose(1, 2), value.transpose(1, 2), vmm_row_spans, scaling), None
    assert vmm_length_mask is not None
    out = _flex(query.device.type)(query, key, value, vmm_length_mask.block_mask, scaling, query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


_UNSUPPORTED_ATTENTION_ARGUMENTS = ("softcap", "s_aux", "sliding_window")


def flash_reads(keys: torch.Tensor) -> str | None:
    """Why FlashAttention's varlen kernel cannot read a reservation like `keys` (None: it can)."""
    return _flash_reads(keys.device, keys.dtype, keys.shape[-1])


@functools.cache
def _flash_reads(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if device.type != "cuda":
        return "not on a GPU"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} keys (FlashAttention takes fp16 and bf16)"
    if head_dim % 8 or head_dim > 256:
        return f"head dimension {head_dim} (FlashAttention takes multiples of 8 up to 256)"
    if not torch.backends.cuda.is_flash_attention_available() or torch.cuda.get_device_capability(device) < (8, 0):
        return "this torch or GPU has no FlashAttention kernels"
    return None


def register_graph_attention() -> str:
    """Registers :func:`graph_attention` under :data:`NAME`, with no mask function: a model
    under it builds no mask (the lengths and padding are the LengthMask's)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, graph_attention)
    return NAME


def why_not(model: Any, cache: Any, flash: bool | None = None) -> str | None:
    """Why the decode steps of `model` over `cache` can never be replayed (None: they can).
    `flash`: whether the steps may attend through FlashAttention (None: where the model's
    dtype and device allow it), which takes any number of query heads per KV head."""
    from vmmalloc.integrations.kv_cache import VirtualKVCache

    if not isinstance(cache, VirtualKVCache):
        return f"the cache is a {type(cache).__name__}, not a VirtualKVCache"
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "vmm_sdpa", NAME):
        return f"the model's attention is {config._attn_implementation!r}; graphs need 'sdpa'"
    if any(window is not None for window in layer_windows(config)):
        return "the model has sliding-window layers (their pages before the window are given back)"
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return "the config names no num_attention_heads"
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        return f"{heads} query heads do not group over {kv_heads} key/value heads"
    groups = head_groups(config)
    if groups & (groups - 1):
        if flash is None:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            flash = _flash_reads(model.device, model.dtype, head_dim) is None
        if not flash:
            return (f"{heads} query heads over {kv_heads} key/value heads: FlexAttention's decoding needs a power of "
                    "2, and FlashAttention, which does not, needs fp16 or bf16 on a GPU")
    if getattr(config, "sub_configs", None) or config.is_encoder_decoder:
        return "the model is not a plain decoder"
    if not getattr(type(model), "_supports_attention_backend", False):
        # Its attention may not go through transformers' interface: given the whole
        # reservation, it would read unmapped pages.
        return f"{type(model).__name__} does not declare that its attention goes through AttentionInterface"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return f"its quantization ({type(quantizer).__name__}) cannot be compiled"
    placed = set(getattr(model, "hf_device_map", {}).values())
    if placed & {"cpu", "disk"}:
        return "parts of it are offloaded to the CPU or the disk"
    if len(placed) > 1:
        return "it is split across several devices (one graph records one device's work)"
    return None


def head_groups(config: Any) -> int:
    """Query heads per key/value head."""
    heads = config.num_attention_heads
    return heads // (getattr(config, "num_key_value_heads", None) or heads)


# Note [One length mask per shape]
# torch.compile keys its compiled attention on the mask it is given, its mask function and
# the tensors that function reads included: a new LengthMask per cache would compile again
# for every generate() call (about 2 s each, seen on an H200) until the recompile limit, after
# which the attention would run unfused. So the decoders of one shape (batch, reserved
# length, block, device) share one mask and its padding tensor. Each step rewrites both
# before its replay, which is safe while the steps of one device run one at a time, as
# generate() calls in one thread do.
_masks: dict[tuple[int, int, int, torch.device], tuple[LengthMask, torch.Tensor]] = {}


def _shared_mask(batch: int, capacity: int, block: int, device: torch.device) -> tuple[LengthMask, torch.Tensor]:
    key = (batch, capacity, block, device)
    if key not in _masks:
        key_mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        _masks[key] = (LengthMask(torch.ones(batch, dtype=torch.int32, device=device), capacity, block=block,
                                  key_mask=key_mask), key_mask)
    return _masks[key]


# Note [Key splits sized by a bucket]
# FlashAttention's decode path splits each row's keys across SMs by the key length it is
# told (max_k), not by the lengths it reads: told the whole reservation, the splits past the
# tokens have nothing to do and the others do all of it. Measured on an H200 at 16K held of a
# 32K reservation (the patch reserves powers of two): 7.6 ms of a 15.0 ms step, against
# 4.7 ms for the same keys told 17K (bench/NOTES.md, "KV decode in CUDA graphs"). So a flash
# step is recorded for a bucket of key lengths, the reach of the step rounded up to an eighth
# of its power of two (never above the reservation): a step reads at most its bucket, so the
# splits cover every key it holds, and fewer than an eighth of that power of two lie past its
# reach (under a fifth of the keys the splits are sized for). A decode crossing into
# the next bucket records that bucket's graph once; the decoder keeps the _KEPT_GRAPHS used
# last, enough for every bucket up to 64K positions (49), so that a kept cache's next
# generate() replays them all again. Where query heads do not group over KV heads the
# kernel does not split the keys, and one graph (bucket 0: the reservation) serves all.
#
# Note [One pool for a decoder's graphs]
# Those graphs record into one memory pool, so their memory is about one step's, not one
# step's per bucket. Sharing is safe here: the graphs of a decoder replay one at a time,
# each replay's outputs are copied (_Recorded.output) before any other graph runs, and each
# graph's own outputs stay referenced (_Recorded.fields), so no later recording is given
# their memory; what one graph uses only inside its replay, another may use too.
_KEPT_GRAPHS = 48


def key_bucket(reach: int, capacity: int) -> int:
    """The key length a step that reads `reach` positions is recorded for (Note [Key splits
    sized by a bucket]): `reach` rounded up to an eighth of its power of two, at least 1024,
    at most `capacity`."""
    if reach <= 1024:
        return min(1024, capacity)
    step = (1 << (reach - 1).bit_length()) // 8
    return min(-(-reach // step) * step, capacity)


class _Recorded:
    """One recorded step: its graph, the static inputs it reads and the output it writes.

    It keeps the output's other fields but not the cache: the cache holds its decoder, which
    holds this, and a reference back would make a cycle that only the garbage collector ends."""

    def __init__(self, key: tuple, batch: int, capacity: int, device: torch.device,
                 row_positions: int | None = None) -> None:
        self.key = key
        self.batch = batch
        self.kernel = key[-1]  # "flash" (RowSpans) or "flex" (LengthMask)
        self.key_length = key[-2] or capacity  # what flash's splits are sized by (its bucket)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # where the new token's K/V go
        self.mask: LengthMask | None = None
        self.key_mask: torch.Tensor | None = None
        self.spans: RowSpans | None = None
        self.starts: torch.Tensor | None = None  # left padding per row (flash)
        if self.kernel == "flash":
            self.spans = RowSpans(batch, capacity, device, max_length=self.key_length, row_positions=row_positions)
            self.starts = torch.zeros(batch, dtype=torch.int32, device=device)
        else:
            self.mask, self.key_mask = _shared_mask(batch, capacity, BLOCK, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output_class: Any = None
        self.fields: dict[str, Any] = {}
        self.cache_field: str | None = None

    def keep_output(self, output: Any, cache: Any) -> None:
        """Keeps what the step's output holds, the cache excepted."""
        self.output_class = output.__class__
        self.cache_field = next((name for name, value in output.items() if value is cache), None)
        self.fields = {name: value for name, value in output.items() if name != self.cache_field}

    def output(self, cache: Any) -> Any:
        """This step's output, its tensors copied (the next replay overwrites the graph's)."""
        fields = {name: value.clone() if isinstance(value, torch.Tensor) else value
                  for name, value in self.fields.items()}
        if self.cache_field is not None:
            fields[self.cache_field] = cache
        return self.output_class(**fields)


class GraphDecoder:
    """Runs one-token decode steps of `model` over `cache` as CUDA graph replays.

    Called as the model is, with the inputs generate() prepares for a step; returns what the
    model returns. Steps it cannot replay run the model eagerly: prompts and steps of several
    tokens, inputs a graph cannot take, and every step of a shape whose recording failed
    (said once). One generate() at a time per device (Note [One length mask per shape]).

    Args:
        model: a transformers decoder on a CUDA device (held weakly).
        cache: the VirtualKVCache the steps decode over (held weakly: it holds the decoder).
        capture: record and replay a graph (False: run the step's graph-mode operations
            eagerly every step, the same arithmetic, for machines without a GPU).
        attention: the kernel a step reads the K/V with: "auto" (FlashAttention's varlen
            kernel where it can read the cache and the padding is on the left, Note [Row
            spans for FlashAttention]; FlexAttention otherwise), "flash" (where it cannot
            read them: on the host, its reference; else as "auto") or "flex".
        fuse_small_kernels: the steps run the model's RMSNorms and SiLU gates compiled by
            inductor (Note [Fused small kernels in graph steps]); the first recording then
            compiles them (seconds).
    """

    def __init__(self, model: Any, cache: Any, capture: bool = True, attention: str = "auto",
                 fuse_small_kernels: bool = False) -> None:
        if attention not in ("auto", "flash", "flex"):
            raise ValueError(f"GraphDecoder: attention must be 'auto', 'flash' or 'flex', not {attention!r}")
        host_flash = attention == "flash" and not capture  # the spans' reference, off the GPU
        reason = why_not(model, cache, flash=False if attention == "flex" else True if host_flash else None)
        if reason is not None:
            raise ValueError(f"vmmalloc: cannot decode in CUDA graphs: {reason}")
        groups = head_groups(model.config)
        self._flex_groups = not groups & (groups - 1)  # FlexAttention's decoding can group these heads
        # FlashAttention splits the keys only where query heads group over KV heads (its decode
        # path swaps the groups into the query length): only then do buckets size anything.
        self._splits = groups > 1
        self._model = weakref.ref(model)
        self._cache = weakref.ref(cache)
        self.capture = capture
        self.attention = attention
        self.fuse_small_kernels = fuse_small_kernels
        self.fused_modules = 0  # modules the last step ran fused
        # Why fusing failed, once it has: the steps then run the small kernels unfused (in
        # graphs still), since fusing is only an optimisation of the same arithmetic.
        self.fuse_failed: str | None = None
        self.kernels: dict[str, int] = {"flash": 0, "flex": 0}  # steps served by each
        # (batch, length, layer 0's eager epoch) the next step of this decode has: any eager
        # change of the cache in between (a prompt, a reset, a crop) ends the decode.
        self._continues: tuple[int, int, int] | None = None
        self._padding_only = False  # the mask of this decode is left padding alone (checked once per decode)
        self.replays = 0      # steps served from a graph (or its eager stand-in)
        self.handed_back = 0  # steps run by the model itself (prompts, several tokens, other inputs)
        self.recordings = 0   # graphs recorded
        self._recorded: dict[tuple, _Recorded] = {}  # by key, least recently used first (at most _KEPT_GRAPHS)
        self._pool: Any = None  # the memory pool every graph of this decoder records into (one at a time)
        self.failed: dict[tuple, str] = {}  # shapes whose recording failed, and why
        self.weights = weights_fingerprint(model)
        register_graph_attention()

    @classmethod
    def of(cls, model: Any, cache: Any, capture: bool = True, attention: str = "auto",
           fuse_small_kernels: bool = False) -> GraphDecoder:
        """The decoder `cache` keeps for `model` (made on first use): its graph outlives one
        generate() call while the cache's buffers and the model's weights stay where they are
        (checked here, once per call: a graph reads them at the addresses it recorded)."""
        decoder = getattr(cache, "graph_decoder", None)
        if (not isinstance(decoder, cls) or decoder._model() is not model or decoder.capture != capture
                or decoder.attention != attention or decoder.fuse_small_kernels != fuse_small_kernels):
            decoder = cls(model, cache, capture, attention, fuse_small_kernels)
            cache.graph_decoder = decoder
        else:
            decoder.weights = weights_fingerprint(model)
        return decoder

    @property
    def cache(self) -> Any:
        """The cache the steps decode over."""
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the cache this GraphDecoder served is gone")
        return cache

    # ----- one step ------------------------------------------------------------------

    def __call__(self, **inputs: Any) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model this GraphDecoder served is gone")
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if (given_cache(inputs) is not self.cache or ids is None or ids.dim() != 2 or ids.shape[1] != 1
                or not set(inputs) <= _STEP_INPUTS or not inputs.get("use_cache", True)):
            return self._eagerly(model, inputs)  # a prompt, several tokens, or inputs a graph cannot take
        layers = self.cache.layers
        length, batch = layers[0].get_seq_length(), ids.shape[0]
        if (length == 0 or length + 1 > layers[0].max_length or batch != layers[0].batch_size
                or (mask is not None and (mask.dim() != 2 or mask.shape[1] < length + 1))):
            return self._eagerly(model, inputs)  # the model's own checks and errors, or another mask shape
        kernel = self._kernel(mask, batch, length)
        shape = (batch, inputs.get("logits_to_keep"), self.weights,
                 tuple(p for layer in layers for p in layer.graph_buffers()))
        if kernel == "flash" and shape + (None, "flash") in self.failed:
            kernel = "flex"  # flash could not be recorded for this shape (at any bucket): the other kernel
        bucket = key_bucket(length + 1, layers[0].graph_capacity) if kernel == "flash" and self._splits else 0
        key = shape + (bucket, kernel)
        if key in self.failed or (key[-1] == "flex" and not self._flex_groups):
            return self._eagerly(model, inputs)  # (the latter: a mask with holes, over heads flex cannot group)
        self._map_pages(batch, length + 1)
        recorded = self._recorded_for(key, batch)
        self._set_inputs(recorded, inputs, length)
        cache_key = "cache" if "cache" in inputs else "past_key_values"
        if not self.capture:
            self._unfused_after_failure(lambda: self._run_step(model, recorded, cache_key))
        elif recorded.graph is None:
            try:
                self._unfused_after_failure(lambda: self._record(model, recorded, cache_key))
            except Exception as error:  # noqa: BLE001 (any failure to record: decode this shape eagerly)
                # The warm-up wrote this step's K/V at its position, as the eager step does again.
                self.failed[key] = f"recording the decode step failed: {error}"
                if kernel == "flash":  # its cause is the model's, not the bucket's: flex from now on
                    self.failed[shape + (None, "flash")] = self.failed[key]
                del self._recorded[key]
                say_once(self.failed[key])
                return self._eagerly(model, inputs)
        else:
            recorded.graph.replay()
        for layer in layers:
            layer.finish_graph_step(length + 1)
        self.replays += 1
        self.kernels[recorded.kernel] += 1
        self._continues = (batch, length + 1, layers[0].eager_epoch)
        return recorded.output(self.cache)

    def _run_step(self, model: Any, recorded: _Recorded, cache_key: str) -> None:
        """The step's graph-mode operations run eagerly (no capture)."""
        with self._graph_mode(model, recorded):
            recorded.keep_output(self._step(model, recorded, cache_key), self.cache)

    def _unfused_after_failure(self, attempt: Callable[[], None]) -> None:
        """`attempt` (a recording, or a step run without capture); where it fails with the
        small kernels fused, fusing is turned off for this decoder (said once) and `attempt`
        runs once more, unfused: a step written again at its position writes the same K/V."""
        fused = self.fuse_small_kernels and self.fuse_failed is None
        try:
            attempt()
        except Exception as error:  # noqa: BLE001 (inductor, triton or a compiler missing, or a recompile refused)
            if not fused or isinstance(error, torch.OutOfMemoryError):
                raise  # (out of memory is the step's, not the fusing's: the caller's fallback)
            self.fuse_failed = f"{type(error).__name__}: {error}"
            self.fused_modules = 0
            say_once(f"fusing the decode step's small kernels failed ({self.fuse_failed}); "
                     "its graphs run them unfused", prefix="vmmalloc: ")
            attempt()

    def _kernel(self, mask: torch.Tensor | None, batch: int, length: int) -> str:
        """The attention kernel for a step at `length` (Note [Row spans for FlashAttention])."""
        if self.attention == "flex":
            return "flex"
        first = self.cache.layers[0]
        kv = first._buffers()
        keys = kv.keys
        if flash_reads(keys) is not None and not (self.attention == "flash" and keys.device.type != "cuda"):
            return "flex"
        rows_apart = row_positions(keys)
        if rows_apart is None or row_positions(kv.values) != rows_apart:
            return "flex"  # the buffers do not read as one run of positions, K and V alike
        if not RowSpans.fit(batch, rows_apart):
            return "flex"  # the row offsets would overflow the kernel's int32 sequence starts
        if mask is None:
            return "flash"
        if self._continues != (batch, length, first.eager_epoch):
            # A new decode (or one resumed after eager steps): generate() extends the mask with
            # ones from here on, so its padding is checked once (one host sync) per decode.
            self._padding_only = is_left_padding_only(mask[:, :length + 1])
        return "flash" if self._padding_only else "flex"

    def _eagerly(self, model: Any, inputs: dict[str, Any]) -> Any:
        self.handed_back += 1
        return model(**inputs)

    def _map_pages(self, batch: int, stop: int) -> None:
        """The pages every layer's replay reads for `stop` positions, mapped on the host."""
        # Asked of every layer at every step, not remembered: an eager step between replays
        # (a crop, a prompt, a reset) may have given pages back. A layer whose mapped pages
        # serve returns at once (VirtualKVLayer.prepare_graph_step).
        for layer in self.cache.layers:
            layer.prepare_graph_step(batch, stop, BLOCK)

    def _set_inputs(self, recorded: _Recorded, inputs: dict[str, Any], length: int) -> None:
        recorded.input_ids.copy_(inputs["input_ids"])
        positions = inputs.get("position_ids")
        if positions is not None:
            recorded.position_ids.copy_(positions[:, -1:])
        else:
            recorded.position_ids.fill_(length)
        recorded.position.fill_(length)
        mask = inputs.get("attention_mask")  # [batch, length + 1] or more (checked by the caller)
        if recorded.starts is not None:  # flash: the padding is on the left (the caller checked)
            if mask is not None:
                recorded.starts.copy_(left_padding(mask[:, :length + 1]))
            else:
                recorded.starts.zero_()
            return
        assert recorded.key_mask is not None
        if mask is not None:
            recorded.key_mask[:, :length + 1].copy_(mask[:, :length + 1])
        else:
            recorded.key_mask[:, :length + 1].fill_(True)

    # ----- recording -----------------------------------------------------------------

    def _recorded_for(self, key: tuple, batch: int) -> _Recorded:
        r = self._recorded.pop(key, None)
        if r is not None:
            self._recorded[key] = r  # the most recently used last
            return r
        while len(self._recorded) >= _KEPT_GRAPHS:
            del self._recorded[next(iter(self._recorded))]  # the least recently used
        first = self.cache.layers[0]
        kv = first._buffers()
        self._recorded[key] = r = _Recorded(key, batch, first.graph_capacity, kv.device, row_positions(kv.keys))
        return r

    def _step(self, model: Any, recorded: _Recorded, cache_key: str) -> Any:
        """The operations of one step, all on the device: what the graph records."""
        lengths = (recorded.position + 1).expand(recorded.batch)
        logits_to_keep = recorded.key[1]
        kwargs: dict[str, Any] = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        if recorded.spans is not None:
            assert recorded.starts is not None
            recorded.spans.update(lengths.to(torch.int32), recorded.starts)
            kwargs["vmm_row_spans"] = recorded.spans
        else:
            assert recorded.mask is not None
            recorded.mask.update(lengths)
            kwargs["vmm_length_mask"] = recorded.mask
        return model(input_ids=recorded.input_ids, position_ids=recorded.position_ids, attention_mask=None,
                     use_cache=True, return_dict=True, **{cache_key: self.cache}, **kwargs)

    @contextlib.contextmanager
    def _graph_mode(self, model: Any, recorded: _Recorded) -> Iterator[None]:
        """The model under the graph attention, the layers writing at the device position."""
        config, layers = model.config, self.cache.layers
        saved = config._attn_implementation
        config._attn_implementation = NAME
        for layer in layers:
            layer.graph_position = recorded.position
        try:
            with contextlib.ExitStack() as fused:
                if self.fuse_small_kernels and self.fuse_failed is None:
                    self.fused_modules = fused.enter_context(fused_small_kernels(model))
                yield
        finally:
            config._attn_implementation = saved
            for layer in layers:
                layer.graph_position = None

    def _record(self, model: Any, recorded: _Recorded, cache_key: str) -> None:
        """Records the step's graph and replays it once for this step's output."""
        layers = len(self.cache.layers)
        with self._graph_mode(model, recorded):
            side = torch.cuda.Stream(recorded.input_ids.device)
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):  # warm-up: compiles FlexAttention, fills lazy state
                    for _ in range(2):
                        _attention_calls[0] = 0
                        self._step(model, recorded, cache_key)
                        # A check after the fact (the real guard is why_not's AttentionInterface
                        # declaration): a layer that attended by itself was given the whole
                        # reservation, which on a GPU faults first.
                        if _attention_calls[0] != layers:
                            raise RuntimeError(f"{_attention_calls[0]} of the model's {layers} attention layers "
                                               "went through transformers' attention interface")
            finally:
                # Whatever happened, the warm-up's kernels come before anything the current
                # stream does next (an eager step that maps or unmaps pages after a failure).
                torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):  # Note [One pool for a decoder's graphs]
                output = self._step(model, recorded, cache_key)
            if self._pool is None:
                self._pool = graph.pool()
        recorded.keep_output(output, self.cache)
        graph.replay()  # recording ran nothing: this step's output comes from the first replay
        recorded.graph = graph
        self.recordings += 1


def weights_fingerprint(model: Any) -> int:
    """A hash of where the model's parameters and buffers are: a recorded graph reads them
    there, so a model moved or given new weights (load_state_dict(assign=True), a merged
    adapter) must be recorded again."""
    return hash(tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))


@contextlib.contextmanager
def decoding_in_graphs(model: Any, decoder: GraphDecoder) -> Iterator[None]:
    """generate() calls on `model` in this block decode through `decoder` (Note [Decode in
    graphs under the patch] in integrations/generate_patch.py): transformers' hook for a
    compiled decode step, answered on the model instance, ``disable_compile`` honoured. What
    the instance had under those names before comes back afterwards (nested blocks too)."""
    hooks = {"get_compiled_call": lambda compile_config=None: decoder,
             "_valid_auto_compile_criteria": lambda model_kwargs, generation_config: not generation_config.disable_compile}
    saved = {name: model.__dict__[name] for name in hooks if name in model.__dict__}
    for name, hook in hooks.items():
        setattr(model, name, hook)
    try:
        yield
    finally:
        for name in hooks:
            if name in saved:
                setattr(model, name, saved[name])
            else:
                model.__dict__.pop(name, None)
