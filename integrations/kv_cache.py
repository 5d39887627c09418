"""VirtualKVCache: a Hugging Face Cache whose K/V grow in place inside reserved virtual
ranges (vAttention), drawing 2 MiB pages from the same chunk pool as every tensor.

Per layer, K and V are ``[max_batch, max_length, kv_heads, head_dim]`` virtual tensors
(flash-attn's layout). ``update()`` writes the new tokens in place and returns
``[batch, kv_heads, seq, head_dim]`` transposed views: no torch.cat, no copy of earlier
tokens, and memory committed follows the tokens held, not the maximum length.

Note [Views stay valid until the next change]
The K/V that update() returns are views of the buffers. They stay valid until the cache
changes shape (crop, batch selection, reset, free): pages the cache no longer needs go back
to the pool, and a view kept across such a change may then point at unmapped memory.
Models never keep them; callers who do should copy.

Note [Pages mapped ahead, staggered by layer]
Mapping a page costs about 35 us on an idle GPU (docs/FACTS.md; about 130 us measured in a
decode step on an H200). If every layer mapped its next page at the same token, that decode
step would map layers x batch pages at once (K and V share a row's pages: Note [Keys and
values share pages]; 256 pages, about 9-33 ms, for an 8B model at batch 8) and stand out as
a spike. So each layer keeps a lead of mapped
positions beyond its tokens and extends it by a page when the lead falls below a threshold
that differs per layer (an even share of a page): the pages of a boundary are mapped a
layer at a time, spread over the tokens before it. The cost is at most two pages per row
beyond the tokens held.

Note [Decode steps in a graph]
A one-token decode step can be replayed from a CUDA graph (integrations/graph_decode.py):
the buffers never move, so the step's kernels can be recorded once. Inside a graph nothing
on the host runs, so the layer's graph mode splits its work: the page mapping and the
length bookkeeping happen on the host between replays (GraphDecoder, as in eager decode:
the lead of Note [Pages mapped ahead, staggered by layer] maps a page before a token needs
it), and update() only writes the new token at a device-held position and returns views of
the whole reservation (``graph_capacity`` positions, a multiple of 128 whose rows fill whole
pages), which the graph's attention reads within the device-held lengths (Note [Length block
masks]). The layer's
``is_compileable`` stays False: transformers' own torch.compile path would trace update()
and its page mapping into a compiled graph, where mapping cannot happen.

Note [Left padding costs no memory]
A batch of prompts of different lengths reaches the cache padded on the left to the longest.
Given where each row's tokens start (set_padding; the patched generate() sets it from the
attention mask), the layer commits those positions as padding (Note [Padding positions] in
vmmalloc/virtual_tensor.py): every page holding only padding shares one chunk, so KV memory
follows the tokens held, not batch x the longest prompt. The mask that made the padding hides
it from every attention, eager or in a graph, so no computation weighs what those positions
hold. A reorder of rows by a device index (beam search, batch selection) moves each row's
padding with it: the index is read on the host once for all layers (rows_on_host: one sync a
step, and none while every row has the same padding).

Note [Sliding windows stay contiguous]
A sliding-window layer keeps the full-length buffer, so its window is one contiguous view;
the pages wholly before the window are unmapped as it moves on. While generate() records
the past (assisted decoding may crop back), pages are kept from where recording began.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vmmalloc.integrations.hf_compat import crop_to_removal, layer_windows, text_config
from vmmalloc.integrations.kv_buffers import KVBuffers
from vmmalloc.virtual_tensor import VirtualTensor

# The last row index rows_on_host read, per thread (generate() calls in threads reorder by
# indices of their own): every layer of a step reorders by the same tensor.
_last_rows = threading.local()


def rows_on_host(index: torch.Tensor) -> list[int]:
    """``index.tolist()``, read once while the same unchanged tensor reorders every layer."""
    last = getattr(_last_rows, "memo", None)  # (weak ref to the index, its version, its rows)
    if last is not None and last[0]() is index and last[1] == index._version:
        return last[2]
    rows = [int(i) for i in index.tolist()]
    _last_rows.memo = (weakref.ref(index), index._version, rows)
    return rows


class VirtualKVLayer(CacheLayerMixin):
    """One attention layer's K/V in virtual memory, side by side (Note [Keys and values share
    pages]): full attention, or a sliding window when ``sliding_window`` is set."""

    is_compileable = False
    is_croppable = True

    def __init__(self, max_length: int, sliding_window: int | None = None, *, max_batch_size: int | None = None,
                 layer_index: int = 0, num_layers: int = 1, lookahead: bool = True, **kwargs: Any) -> None:
        self._views_stale = False  # finish_graph_step defers the views to their first read
        super().__init__()
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.max_length = int(max_length)
        self.sliding_window = None if sliding_window is None else int(sliding_window)
        self.is_sliding = self.sliding_window is not None
        self.max_batch_size = max_batch_size
        self.lookahead = lookahead
        self._stagger = (layer_index % num_layers + 1) / num_layers  # Note [Pages mapped ahead, staggered by layer]
        self.length = 0       # tokens seen, absolute
        self.batch_size = 0   # rows in use
        self.padding: tuple[int, ...] | None = None  # Note [Left padding costs no memory]
        self.record_past = False
        self._record_from = 0  # first position kept while recording the past
        self._kv: KVBuffers | None = None
        # Note [Decode steps in a graph]: positions reserved (KVBuffers.capacity_for, once the
        # first update shows a position's size), and the device-held position update() writes
        # at while a graph is recorded (None: eager).
        self.graph_capacity = -(-self.max_length // 128) * 128
        self.graph_position: torch.Tensor | None = None
        self.graph_block = 0  # the block a graph's attention reads in, once graph steps ran (0: none)
        # What the last prepare_graph_step left mapped: (buffers' extent, first and last stop it serves).
        self._prepared: tuple[tuple[int, int, int], int, int] | None = None
        self.fast_prepares = 0  # steps prepare_graph_step found mapped already
        # Counts the changes made outside replayed steps (updates, resets, crops, batch changes,
        # frees): a graph decoder's decode ends at any of them.
        self.eager_epoch = 0

    # ----- the buffers ---------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        rows = max(batch, self.max_batch_size or 0)
        self.dtype, self.device = key_states.dtype, key_states.device
        self._free_buffers()
        key_inner, value_inner = (heads, head_dim), (value_states.shape[1], value_states.shape[-1])
        self.graph_capacity = KVBuffers.capacity_for(self.max_length, key_inner, value_inner, key_states.dtype,
                                                     value_states.dtype)
        self._kv = KVBuffers(rows, self.graph_capacity, key_inner, value_inner, key_states.dtype, key_states.device,
                             value_states.dtype)
        self.is_initialized = True
        self.length = 0
        self.batch_size = batch
        self._set_views(0)

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        kv = self._kv
        return (kv is not None and not kv.freed and key_states.dtype == kv.dtype
                and value_states.dtype == kv.value_dtype and key_states.device == kv.device
                and key_states.shape[0] <= kv.key_shape[0]
                and tuple(key_states.shape[1:2]) + tuple(key_states.shape[3:]) == kv.key_shape[2:]
                and tuple(value_states.shape[1:2]) + tuple(value_states.shape[3:]) == kv.value_shape[2:])

    def _buffers(self) -> KVBuffers:
        """The K/V buffers of an initialized layer."""
        assert self._kv is not None, "the layer has no buffers before its first update"
        return self._kv

    def _free_buffers(self) -> None:
        if self._kv is not None:
            self._kv.free()
        self._kv = None
        self.keys = self.values = None
        self._views_stale = False
        self._prepared = None  # it described the buffers just freed

    def free(self) -> None:
        """Gives every page and both reservations back; the layer starts afresh on next use."""
        self.eager_epoch += 1
        self._free_buffers()
        self.is_initialized = False
        self.length = self.batch_size = self.graph_block = 0
        self.padding = None

    def _window_start(self, length: int) -> int:
        """First position the attention of a new token at `length` reads."""
        if self.sliding_window is None:
            return 0
        return max(length - self.sliding_window + 1, 0)

    def _commit(self, rows: int, stop: int, start: int) -> None:
        """Backs [start, stop) of `rows` rows, with the lead of Note [Pages mapped ahead, staggered
        by layer]. Once graph steps ran (graph_block set), also up to `stop` rounded up to a
        block, the most a replay reads, within the whole reservation: eager steps between
        replays (prompt lookup, crops) then keep the pages the next replay needs."""
        kv = self._buffers()
        limit, reach = self.max_length, stop
        if self.graph_block:
            limit = self.graph_capacity
            reach = min(limit, -(-stop // self.graph_block) * self.graph_block)
        page = kv.tokens_per_page
        keep_from = min(start, self._record_from) if self.record_past else start
        lead = self._lead(page)
        target = max(reach, min(limit, -(-(stop + lead) // page) * page) if lead else stop)
        starts = self.padding if self.padding is not None and len(self.padding) == rows else None
        same = (all(r == rows and a // page == keep_from // page and b == kv.stop for r, a, b in kv.spans)
                and kv.holds_row_starts(starts))
        if same and reach <= kv.stop and -(-kv.stop // page) <= -(-target // page):
            if kv.stop >= min(stop + lead, limit):
                return  # the same pages serve: enough lead, nothing to give back
        kv.commit(rows, target, keep_from, starts)

    def _lead(self, page: int) -> int:
        """Positions mapped beyond the tokens (Note [Pages mapped ahead, staggered by layer])."""
        return max(1, int(page * self._stagger)) if self.lookahead else 0

    def _set_views(self, start: int) -> None:
        rows, stop = self.batch_size, self.length
        kv = self._buffers()
        self.keys = kv.keys[:rows, start:stop].transpose(1, 2)
        self.values = kv.values[:rows, start:stop].transpose(1, 2)
        self._views_stale = False  # only once both are made (a sleeping buffer raises above)

    # The K/V views over the tokens held. A replayed step only moves the length (the graph
    # wrote the K/V), so finish_graph_step marks the views stale and the first read makes
    # them: two views per layer and step cost more host time than the rest of a step's
    # bookkeeping, and generate() reads none of them between replays.
    @property
    def keys(self) -> torch.Tensor | None:
        if self._views_stale:
            self._set_views(0)  # graph steps attend from position 0 (no sliding windows)
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:
        if self._views_stale:
            self._set_views(0)
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value

    # ----- CacheLayerMixin -----------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph_position is not None:
            return self._graph_update(key_states, value_states)
        self.eager_epoch += 1
        if not self.is_initialized or not self._fits(key_states, value_states):
            if self.is_initialized and self.length > 0:
                raise ValueError(
                    f"the cache holds {self.length} tokens of batch {self.batch_size}; new states of shape "
                    f"{tuple(key_states.shape)} do not continue them (reset() the cache first)")
            self.lazy_initialization(key_states, value_states)
        batch, before = key_states.shape[0], self.length
        if before > 0 and batch != self.batch_size:
            raise ValueError(f"the cache holds batch {self.batch_size}, update() got batch {batch}")
        after = before + key_states.shape[-2]
        if after > self.max_length:
            raise ValueError(
                f"VirtualKVCache reserved {self.max_length} positions per sequence and this update "
                f"needs {after}; create it with a larger max_length")
        start = self._window_start(before)
        self.batch_size = batch
        self._commit(batch, after, start)
        kv = self._buffers()
        kv.keys[:batch, before:after].copy_(key_states.transpose(1, 2))
        kv.values[:batch, before:after].copy_(value_states.transpose(1, 2))
        self.length = after
        self._set_views(start)
        return self.keys, self.values

    def _graph_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Note [Decode steps in a graph]: writes the new token at graph_position by device
        operations alone and returns the whole reservation; the host state is the decoder's."""
        assert self.graph_position is not None
        kv = self._buffers()
        batch = key_states.shape[0]
        keys, values = kv.keys[:batch], kv.values[:batch]
        keys.index_copy_(1, self.graph_position, key_states.transpose(1, 2))
        values.index_copy_(1, self.graph_position, value_states.transpose(1, 2))
        return keys.transpose(1, 2), values.transpose(1, 2)

    def prepare_graph_step(self, batch: int, stop: int, block: int) -> None:
        """Maps what a graph-replayed step writing position ``stop - 1`` reads, before the
        replay: its attention visits whole blocks of `block` positions, so the span mapped
        reaches ``stop`` rounded up to a block (pages need not hold a whole number of blocks:
        2 MiB holds 102.4 positions of K and V of 40 heads x 128 in bf16), with the eager path's lead."""
        self.batch_size = batch
        self.graph_block = block
        kv = self._buffers()
        prepared = self._prepared
        if prepared is not None and prepared[0] == self._extent(batch, block) and prepared[1] <= stop <= prepared[2]:
            self.fast_prepares += 1
            return  # what the last step mapped serves this one (its extent unchanged since)
        asked = stop
        if kv.rows_share_pages:
            # Rows packed into shared pages (a short reservation): a block read past a row's
            # span could reach an unmapped page, so the whole reservation is mapped (< 2 MiB a row).
            stop = self.graph_capacity
        self._commit(batch, stop, 0)
        # Note [Length block masks]: what is mapped past the tokens reads as zeros, since
        # FlexAttention weighs a masked position's value by a probability of 0 and a recycled
        # chunk may hold NaN bit patterns (0 x NaN is NaN). Nothing past the tokens was written.
        held = min(self.length, kv.stop)
        if kv.stop > held:
            kv.zero(batch, held, kv.stop)
        # The stops _commit would return early for, the mapping as it is now: every later stop
        # whose block end and lead stay within the mapped span. A mapping's extent is the
        # buffers' count of commits, through which alone their spans change: any commit since
        # (an eager step, a crop, a reset and a new prompt over the same span, a sleep) changes
        # it, so the zeroing above runs again; new buffers drop _prepared.
        limit = self.graph_capacity
        through = limit if kv.stop >= limit else min(kv.stop // block * block, kv.stop - self._lead(kv.tokens_per_page))
        self._prepared = (self._extent(batch, block), asked, through)

    def _extent(self, batch: int, block: int) -> tuple[int, int, int]:
        """What a graph step's mapping depends on: the step's shape and the buffers' commits."""
        return batch, block, self._buffers().commits

    def finish_graph_step(self, stop: int) -> None:
        """The host's record of a replayed step: the layer holds `stop` positions now."""
        self.length = stop
        self._views_stale = True

    def graph_buffers(self) -> tuple[int, int]:
        """The addresses a recorded graph wrote to (it must be recorded again when they change)."""
        kv = self._buffers()
        return kv.keys.data_ptr(), kv.values.data_ptr()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        start = self._window_start(self.length)
        return self.length + query_length - start, start

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.sliding_window if self.sliding_window is not None else -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.18 calls it
        return self.get_max_length()

    def reset(self) -> None:
        """Forgets the tokens and gives their pages back; the reservations stay (warm)."""
        self.eager_epoch += 1
        if self._kv is not None and not self._kv.freed:
            self._kv.commit(0, 0)
        self.length = self.batch_size = 0
        self.padding = None
        if self._kv is not None and not self._kv.freed:
            self._set_views(0)
        self.record_past = False
        self._record_from = 0

    def activate_past_recording(self, **kwargs: Any) -> None:
        # transformers passes options meant for recurrent layers (recurrent_states_to_keep,
        # 5.25); an attention layer keeps every past token, so it has none to take.
        self.record_past = True
        self._record_from = self._window_start(self.length)

    def set_padding(self, starts: list[int] | tuple[int, ...] | None) -> None:
        """Row b's first ``starts[b]`` positions are left padding, never attended to (Note
        [Left padding costs no memory]); None: no padding. Set before the first tokens.

        Raises:
            ValueError: once the layer holds tokens, or for a start outside [0, max_length].
        """
        if self.length > 0:
            raise ValueError(f"set_padding: the layer holds {self.length} tokens already; set the padding "
                             "before the prompt (or reset() the cache first)")
        if starts is not None:
            starts = tuple(int(s) for s in starts)
            if any(not 0 <= s <= self.max_length for s in starts):
                raise ValueError(f"set_padding: each start must be in [0, {self.max_length}], got {list(starts)}")
        self.padding = starts

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.eager_epoch += 1
        if self.length == 0:
            return
        start = self._window_start(self.length)
        kv = self._buffers()
        saved = kv.gather_rows(self.batch_size, start, self.length, beam_idx.to(self.device))
        padding = self._padding_of_rows(beam_idx)
        if padding != self.padding:
            before, self.padding = self.padding, padding
            try:
                self._commit(self.batch_size, self.length, start)
            except BaseException:
                self.padding = before  # the rows were not reordered: their padding stays theirs
                raise
        kv.put_rows(saved, start, self.length)

    def _padding_of_rows(self, index: torch.Tensor) -> tuple[int, ...] | None:
        """The padding once row r is row index[r] (Note [Left padding costs no memory])."""
        if self.padding is None or len(set(self.padding)) <= 1:
            return None if self.padding is None else (self.padding[0] if self.padding else 0,) * len(index)
        return tuple(self.padding[i] for i in rows_on_host(index))

    def crop(self, tokens_to_remove: Any) -> None:
        self.eager_epoch += 1
        if not self.is_initialized:
            return
        removed = crop_to_removal(tokens_to_remove, self.length)
        if removed == 0:
            return
        length = self.length - removed
        start = self._window_start(length)
        if start < self._buffers().start:
            raise RuntimeError(
                f"cannot crop {removed} tokens of a sliding-window layer: positions from {start} were already "
                "given back; generate() records the past (activate_past_recording) before it crops")
        self.length = length
        self._commit(self.batch_size, length, start)
        self._set_views(start)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.eager_epoch += 1
        if self.padding is not None:
            self.padding = tuple(s for s in self.padding for _ in range(repeats))
        if self.length == 0:
            self.batch_size *= repeats
            return
        index = torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats)
        self._gather_rows(index)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.eager_epoch += 1
        self.padding = self._padding_of_rows(indices)
        if self.length == 0:
            self.batch_size = len(indices)
            return
        self._gather_rows(indices.to(self.device))

    def _gather_rows(self, index: torch.Tensor) -> None:
        """Row r of the result is row index[r] now (beam expansion, batch selection)."""
        rows, start = len(index), self._window_start(self.length)
        kv = self._buffers()
        saved = kv.gather_rows(self.batch_size, start, self.length, index)
        if rows > kv.key_shape[0]:  # more rows than reserved: new buffers, one copy
            self._kv = kv.with_rows(rows)
            kv.free()
            self._prepared = None
        self.batch_size = rows
        self._commit(rows, self.length, start)
        self._buffers().put_rows(saved, start, self.length)
        self._set_views(start)

    def offload(self) -> None:
        raise NotImplementedError("VirtualKVCache keeps K/V on the device; use the offloading cache instead")

    def prefetch(self) -> None:
        raise NotImplementedError("VirtualKVCache keeps K/V on the device; use the offloading cache instead")

    def virtual_tensors(self) -> list[VirtualTensor]:
        """The layer's live buffers (what vmmalloc.sleep_mode puts to sleep)."""
        return [] if self._kv is None or self._kv.freed else list(self._kv.tensors)

    @property
    def committed_bytes(self) -> int:
        return 0 if self._kv is None else self._kv.committed_bytes

    @property
    def reserved_bytes(self) -> int:
        return 0 if self._kv is None else self._kv.reserved_bytes


class VirtualLayersCache(Cache):
    """What VirtualKVCache and OffloadedKVCache share: one layer per layer of the config,
    made by ``make_layer(max_length, window, **common)`` (window: the layer's sliding window,
    None for full attention), and the memory figures and free() over all of them."""

    def __init__(self, config: Any, make_layer: Callable[..., CacheLayerMixin], max_length: int | None,
                 max_batch_size: int | None, lookahead: bool) -> None:
        windows = layer_windows(config)
        if max_length is None:
            max_length = getattr(text_config(config), "max_position_embeddings", None)
            if max_length is None:
                raise ValueError("the config has no max_position_embeddings; pass max_length")
        layers = [make_layer(max_length, window, max_batch_size=max_batch_size, layer_index=i,
                             num_layers=len(windows), lookahead=lookahead)
                  for i, window in enumerate(windows)]
        super().__init__(layers=layers)
        self.max_length = int(max_length)
        # Its GraphDecoder (integrations/graph_decode.py), whose recorded graph lives as long
        # as the cache's buffers; free() drops it with them.
        self.graph_decoder: Any = None

    @property
    def committed_bytes(self) -> int:
        """Bytes of memory mapped under all layers' K/V now."""
        return sum(layer.committed_bytes for layer in self.layers)

    @property
    def reserved_bytes(self) -> int:
        """Bytes of virtual address space reserved for all layers' K/V."""
        return sum(layer.reserved_bytes for layer in self.layers)

    def free(self) -> None:
        """Gives all memory and reservations back now (rather than when collected)."""
        self.graph_decoder = None
        for layer in self.layers:
            layer.free()


class VirtualKVCache(VirtualLayersCache):
    """A transformers Cache whose K/V grow in place in virtual memory (vAttention).

    Args:
        config: the model's config: layer count and which layers use a sliding window.
        max_length: positions reserved per sequence (prompt plus new tokens); by default
            the config's ``max_position_embeddings``. Reserving is nearly free: only
            positions holding tokens get memory.
        max_batch_size: rows reserved; by default the batch of the first update.
        lookahead: map pages ahead of the tokens, staggered by layer, so that no decode step
            pays for a page boundary (Note [Pages mapped ahead, staggered by layer]).

    Works with generate(): pass it as ``cache`` (``past_key_values`` before transformers
    5.24), or let
    :func:`vmmalloc.integrations.patch_generate` do so.
    """

    def __init__(self, config: Any, max_length: int | None = None, max_batch_size: int | None = None,
                 lookahead: bool = True) -> None:
        super().__init__(config, VirtualKVLayer, max_length, max_batch_size, lookahead)

    def set_padding(self, starts: Sequence[int] | torch.Tensor | None) -> None:
        """Row b's first ``starts[b]`` positions are left padding that no attention reads with
        any weight (Note [Left padding costs no memory]): pages holding only padding cost no
        memory of their own. None: no padding. Set before the prompt; reset() clears it.

        Raises:
            ValueError: once the cache holds tokens, or for a start outside [0, max_length].
        """
        if isinstance(starts, torch.Tensor):
            starts = starts.tolist()
        for layer in self.layers:
            layer.set_padding(None if starts is None else tuple(starts))
