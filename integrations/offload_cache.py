"""OffloadedKVCache: layer-by-layer KV offloading with prefetch (LayerKV) on vmmalloc's memory.

Given a GPU budget for KV, as many full-attention layers as the budget holds stay resident
(VirtualKVLayer: they grow in place, no copies); the others live in host memory and pass
through a ring of two GPU layer buffers while they compute. A budget that holds every layer
makes this VirtualKVCache, with no copies at all.

Note [One copy per layer]
An offloaded layer's K and V sit in one host buffer, position-major: position p holds
K then V of every row, ``[batch, kv_heads, head_dim + v_head_dim]``. The first L positions
of a layer are then one contiguous block, and a step moves a layer to the GPU in one copy;
the ring buffers have the same layout, so the attention reads strided views of them
(only the last dimension is contiguous, which SDPA and flash-attn accept: docs/FACTS.md).

Note [The ring and its events]
Slot s of the ring holds offloaded layer i when i's rank among the offloaded layers is s
modulo the ring size, so consecutive offloaded layers alternate slots and the next layer is
fetched (host to device, on a copy stream) while the current one computes. No call waits for
the whole device; every order is an event:
- a layer's compute waits for its fetch;
- the copy that sends a layer's new tokens to the host (device to host, a second copy
  stream, so the two directions overlap) waits for the compute that wrote them;
- a slot is overwritten (by a fetch, or by a prompt's K/V) only after the attention that read
  it and the device-to-host copy that read its new tokens. The attention of layer i is
  known to be queued when the cache is next updated for any layer: that update records an
  event on the compute stream, and the slot's next writer waits for it;
- the host reads or rewrites its buffers (beam reordering, batch changes, growth) only after
  the copies using them are done (HostBuffer fences).
Only the new tokens of a step travel to the host, never the whole layer.

Note [Prefill is layer-wise]
A prompt's K/V for an offloaded layer are written into the layer's ring slot, attended to,
and sent to the host from there, before the slot is reused two offloaded layers later. So
GPU KV never exceeds the resident layers plus the ring during a prompt whose full KV would
not fit, and the first token does not wait for memory for every layer.

Note [Which layers stay]
The first full-attention layers are the offloaded ones. At the end of a decode step the
resident layers compute while both ring slots already fetch the next step's first two
layers, so the copy stream keeps busy across the step boundary (it is the bottleneck:
a layer's copy takes milliseconds, its compute a fraction of one). Sliding-window layers
always stay: their KV is bounded by the window.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.cache_utils import Cache

from vmmalloc.integrations.hf_compat import crop_to_removal, layer_windows, text_config
from vmmalloc.integrations.kv_cache import VirtualKVLayer
from vmmalloc.integrations.pinned_host import HostBuffer, check_host_memory
from vmmalloc.sizes import parse_bytes
from vmmalloc.virtual_tensor import CHUNK_SIZE, VirtualTensor

RING_SLOTS = 2


def _host_capacity(max_length: int, held: int, stop: int) -> int:
    """Positions a host buffer gets when `stop` must fit and `held` fit before: grows by half
    (one copy of what is held) up to max_length, so a cache given the exact length
    allocates once."""
    return min(max_length, max(stop, held + held // 2, stop + 256))


class _Copier:
    """The copy streams and events of Note [The ring and its events]; on the host backend
    every copy is synchronous and there is nothing to order."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.to_device = torch.cuda.Stream(device) if self.cuda else None
        self.to_host = torch.cuda.Stream(device) if self.cuda else None

    def mark(self, stream: Any = None) -> Any:
        """An event after the work queued so far on `stream` (the compute stream by default)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def wait(self, *events: Any, stream: Any = None) -> None:
        """Makes `stream` (the compute stream by default) wait for `events` (None: done)."""
        if not self.cuda:
            return
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        for event in events:
            if event is not None:
                stream.wait_event(event)

    def on(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()


class _Slot:
    """One ring buffer: ``[max_length, width]`` positions of one offloaded layer."""

    def __init__(self, max_length: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = VirtualTensor((1, max_length, width), dtype, device)
        self.owner: OffloadedKVLayer | None = None
        self.valid = 0            # positions of the owner that match its host copy
        self.fetched: Any = None  # event: the fetch into the slot is done
        self.busy = False         # the owner's attention may still be queued after its last update
        self.released: Any = None  # event: the owner's attention is done (recorded once not busy)
        self.sent: Any = None      # event: the copy of the owner's new tokens to the host is done

    def ensure(self, stop: int) -> None:
        """Maps pages up to `stop` positions (and a page beyond); never gives pages back, so
        the chunks stay with the ring from layer to layer."""
        vt = self.buffer
        if stop > vt.stop:
            per_page = vt.tokens_per_page
            vt.commit(1, min(vt.shape[1], -(-(stop + 1) // per_page) * per_page))

    def rows(self) -> torch.Tensor:
        return self.buffer.tensor[0]


class OffloadedKVLayer(VirtualKVLayer):
    """A full-attention layer that is either resident (a VirtualKVLayer) or offloaded: held in
    host memory, computed in a ring slot. The cache decides which (Note [Which layers stay])."""

    def __init__(self, max_length: int, **kwargs: Any) -> None:
        super().__init__(max_length, None, **kwargs)
        self.offloaded = False
        self.cache: OffloadedKVCache | None = None
        self.slot_index = 0
        self.host: HostBuffer | None = None
        self.capacity = 0  # positions the host buffer holds
        self.heads = self.k_dim = self.v_dim = 0
        self.sent: Any = None  # event: this layer's last copy to the host is done
        self._host_layout: tuple = ()  # (width, dtype) the host buffer was laid out for

    # ----- mode ------------------------------------------------------------------------

    def set_offloaded(self, offloaded: bool, slot_index: int = 0) -> None:
        """Switches mode; the memory of the other mode goes back (the layer must be empty)."""
        if offloaded != self.offloaded:
            self.free()
        self.offloaded = offloaded
        self.slot_index = slot_index

    @property
    def width(self) -> int:
        """Elements of one position (every row's K and V)."""
        return self.batch_size * self.heads * (self.k_dim + self.v_dim)

    def _host_rows(self) -> torch.Tensor:
        return self.host.tensor.view(self.dtype).view(self.capacity, self.width)

    def _views(self, rows: torch.Tensor, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[batch, heads, stop, dim]`` over positions [0, stop) of a position-major
        buffer (Note [One copy per layer])."""
        per_row = rows[:stop].view(stop, self.batch_size, self.heads * (self.k_dim + self.v_dim))
        split = self.heads * self.k_dim
        keys = per_row[..., :split].unflatten(-1, (self.heads, self.k_dim)).permute(1, 2, 0, 3)
        values = per_row[..., split:].unflatten(-1, (self.heads, self.v_dim)).permute(1, 2, 0, 3)
        return keys, values

    # ----- host memory -----------------------------------------------------------------

    def _start(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.batch_size, self.heads, _, self.k_dim = key_states.shape
        self.v_dim = value_states.shape[-1]
        if value_states.shape[1] != self.heads:
            raise ValueError(f"keys have {self.heads} heads and values {value_states.shape[1]}; the offloading "
                             "cache needs as many of each")
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.host is not None and self._host_layout != (self.width, self.dtype):
            self._drop_host()
        self.length = 0
        self.is_initialized = True

    def _position_bytes(self) -> int:
        return self.width * torch.empty((), dtype=self.dtype).element_size()

    def _ensure_capacity(self, stop: int) -> None:
        """Host room for `stop` positions (_host_capacity)."""
        if stop <= self.capacity and self.host is not None:
            return
        capacity = _host_capacity(self.max_length, self.capacity, stop)
        host = HostBuffer(capacity * self._position_bytes(), self.device)
        if self.host is not None:
            self.host.wait()
            if self.length:
                host.tensor[:self.length * self._position_bytes()].copy_(
                    self.host.tensor[:self.length * self._position_bytes()])
            self.host.close()
        self.host, self.capacity = host, capacity
        self._host_layout = (self.width, self.dtype)

    # ----- CacheLayerMixin -------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.offloaded:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized or (self.length == 0 and not self._same_shape(key_states, value_states)):
            self._start(key_states, value_states)
        elif not self._same_shape(key_states, value_states):
            raise ValueError(
                f"the cache holds {self.length} tokens of batch {self.batch_size}; new states of shape "
                f"{tuple(key_states.shape)} do not continue them (reset() the cache first)")
        before = self.length
        after = before + key_states.shape[-2]
        if after > self.max_length:
            raise ValueError(
                f"OffloadedKVCache reserved {self.max_length} positions per sequence and this update needs "
                f"{after}; create it with a larger max_length")
        self._ensure_capacity(after)
        copier = self.cache._copier
        slot = self.cache._ring_slot(self)
        self.cache._load(self, slot, before)
        slot.ensure(after)
        rows = slot.rows()
        self.keys, self.values = self._views(rows, after)
        self.keys[:, :, before:after].copy_(key_states)
        self.values[:, :, before:after].copy_(value_states)
        written = copier.mark()
        copier.wait(written, stream=copier.to_host)
        with copier.on(copier.to_host):
            self._host_rows()[before:after].copy_(rows[before:after], non_blocking=True)
        self.sent = slot.sent = copier.mark(copier.to_host)
        if self.sent is not None:
            self.host.fence("to_host", self.sent)
        self.cache.bytes_to_host += (after - before) * self._position_bytes()
        slot.valid = after
        self.length = after
        return self.keys, self.values

    def _same_shape(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        b, h, _, d = key_states.shape
        return (self.is_initialized and (b, h, d, value_states.shape[-1]) == (self.batch_size, self.heads, self.k_dim,
                                                                              self.v_dim)
                and key_states.dtype == self.dtype and key_states.device == self.device)

    def reset(self) -> None:
        if not self.offloaded:
            return super().reset()
        if self.host is not None:
            self.host.wait()
        self.length = 0
        self.keys = self.values = None
        self.record_past = False
        self._record_from = 0

    def free(self) -> None:
        if self.host is not None:
            self.host.close()
            self.host = None
        self.capacity = 0
        super().free()
        self.heads = self.k_dim = self.v_dim = 0

    def crop(self, tokens_to_remove: Any) -> None:
        if not self.offloaded:
            return super().crop(tokens_to_remove)
        if not self.is_initialized:
            return
        self.length -= crop_to_removal(tokens_to_remove, self.length)
        self.keys = self.values = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.offloaded:
            return super().reorder_cache(beam_idx)
        if self.length:
            self._regroup(beam_idx.to("cpu"))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.offloaded:
            return super().batch_repeat_interleave(repeats)
        if self.length == 0:
            self.batch_size *= repeats
            self._drop_host()
            return
        self._regroup(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.offloaded:
            return super().batch_select_indices(indices)
        if self.length == 0:
            self.batch_size = len(indices)
            self._drop_host()
            return
        self._regroup(indices.to("cpu"))

    def _drop_host(self) -> None:
        if self.host is not None:
            self.host.close()
        self.host, self.capacity = None, 0

    def _regroup(self, index: torch.Tensor) -> None:
        """Row r becomes row index[r], on the host copy (after the copies using it)."""
        self.host.wait()
        stop = self.length
        rows = self._host_rows()[:stop].view(stop, self.batch_size, -1)
        regrouped = rows.index_select(1, index)
        if len(index) == self.batch_size:
            rows.copy_(regrouped)
        else:
            self._drop_host()
            self.batch_size = len(index)
            self._ensure_capacity(stop)
            self._host_rows()[:stop].copy_(regrouped.view(stop, -1))
        self.keys = self.values = None

    @property
    def committed_bytes(self) -> int:
        return 0 if self.offloaded else super().committed_bytes

    @property
    def reserved_bytes(self) -> int:
        return 0 if self.offloaded else super().reserved_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory this layer holds."""
        return self.host.nbytes if self.host is not None and self.host.tensor is not None else 0


class OffloadedKVCache(Cache):
    """A transformers Cache that keeps KV within a GPU budget, offloading whole layers to
    (pinned) host memory and prefetching each before it computes (LayerKV).

    Args:
        config: the model's config.
        kv_budget: GPU bytes for KV (int, or a string such as ``"8GiB"``). The layers that
            fit stay resident; the others go through a ring of two GPU layer buffers, which
            come on top of the budget.
        max_length: positions per sequence (prompt plus new tokens); by default the config's
            ``max_position_embeddings``. It sizes a layer for the budget, so pass the real
            one (the patched generate() does).
        max_batch_size, lookahead: as for :class:`~vmmalloc.integrations.VirtualKVCache`
            (resident layers).

    Which layers stay is decided at the first update, from the batch and the K/V shapes:
    ``resident_layers`` and ``offloaded_layers`` say the outcome. ``bytes_to_device`` and
    ``bytes_to_host`` count the bytes copied.
    """

    def __init__(self, config: Any, kv_budget: int | str, max_length: int | None = None,
                 max_batch_size: int | None = None, lookahead: bool = True) -> None:
        windows = layer_windows(config)
        if max_length is None:
            max_length = getattr(text_config(config), "max_position_embeddings", None)
            if max_length is None:
                raise ValueError("the config has no max_position_embeddings; pass max_length")
        self.kv_budget = parse_bytes(kv_budget, "kv_budget")
        layers: list[VirtualKVLayer] = []
        for i, window in enumerate(windows):
            common = dict(max_batch_size=max_batch_size, layer_index=i, num_layers=len(windows), lookahead=lookahead)
            if window is None:
                layer = OffloadedKVLayer(max_length, **common)
                layer.cache = self
            else:
                layer = VirtualKVLayer(max_length, window, **common)
            layers.append(layer)
        super().__init__(layers=layers)
        self.max_length = int(max_length)
        self._plan: tuple | None = None
        self._copier: _Copier | None = None
        self._ring: list[_Slot] = []
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        # Set to a list to collect (start, end) timing events of every fetch (benchmarks).
        self.copy_times: list | None = None

    # ----- the plan --------------------------------------------------------------------

    @property
    def offloaded_layers(self) -> list[int]:
        """Indices of the layers kept in host memory (empty until the first update)."""
        return [i for i, layer in enumerate(self.layers) if getattr(layer, "offloaded", False)]

    @property
    def resident_layers(self) -> list[int]:
        """Indices of the layers whose KV stays on the device."""
        return [i for i, layer in enumerate(self.layers) if not getattr(layer, "offloaded", False)]

    def layer_bytes(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    v_head_dim: int | None = None) -> int:
        """The most device memory one resident full-attention layer takes at max_length:
        whole pages per row for K and V, with the pages a layer maps ahead."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = 0
        for dim in (head_dim, v_head_dim or head_dim):
            position = kv_heads * dim * itemsize
            per_page = max(1, CHUNK_SIZE // position)
            total += batch * -(-(self.max_length + 2 * per_page) // per_page) * CHUNK_SIZE
        return total

    def _make_plan(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, tokens, head_dim = key_states.shape
        key = (batch, heads, head_dim, value_states.shape[-1], key_states.dtype, key_states.device)
        if self._plan is not None and self._plan == key:
            return
        full = [i for i, layer in enumerate(self.layers) if isinstance(layer, OffloadedKVLayer)]
        per_layer = self.layer_bytes(batch, heads, head_dim, key_states.dtype, value_states.shape[-1])
        keep = min(len(full), self.kv_budget // per_layer)
        offloaded = full[:len(full) - keep]
        if offloaded:
            position = batch * heads * (head_dim + value_states.shape[-1]) * key_states.element_size()
            check_host_memory(len(offloaded) * position * _host_capacity(self.max_length, 0, tokens),
                              f"offloading {len(offloaded)} KV layers")
        self._drop_ring()
        for rank, i in enumerate(offloaded):
            self.layers[i].set_offloaded(True, rank % RING_SLOTS)
        for i in full[len(full) - keep:]:
            self.layers[i].set_offloaded(False)
        self._copier = _Copier(key_states.device) if offloaded else None
        self._plan = key

    # ----- the ring --------------------------------------------------------------------

    def _drop_ring(self) -> None:
        for slot in self._ring:  # the copy streams may still use it; the compute stream is ordered by free()
            for event in (slot.fetched, slot.sent):
                if event is not None:
                    event.synchronize()
            slot.buffer.free()
        self._ring = []

    def _invalidate_ring(self) -> None:
        """Forgets what the slots hold (the host copies changed); a slot still busy is
        released after the work queued so far, as in _release_others."""
        self._release_others(None)
        for slot in self._ring:
            slot.owner, slot.valid = None, 0

    def _ring_slot(self, layer: OffloadedKVLayer) -> _Slot:
        width = layer.width
        if self._ring and self._ring[0].buffer.shape[2] != width:
            self._drop_ring()  # the batch changed
        if not self._ring:
            count = min(RING_SLOTS, len(self.offloaded_layers))
            self._ring = [_Slot(self.max_length, width, layer.dtype, layer.device) for _ in range(count)]
        return self._ring[layer.slot_index % len(self._ring)]

    def _load(self, layer: OffloadedKVLayer, slot: _Slot, before: int) -> None:
        """Makes `slot` hold `layer`'s first `before` positions for the compute stream, and
        marks it busy with the layer (Note [The ring and its events])."""
        copier = self._copier
        if slot.owner is not layer or slot.valid < before:
            if before:
                self._fetch(layer, slot)
            else:  # a prompt: the compute stream writes the slot itself
                copier.wait(slot.released, slot.sent)
                slot.owner, slot.valid, slot.fetched = layer, 0, None
        copier.wait(slot.fetched)
        slot.busy = True

    def _fetch(self, layer: OffloadedKVLayer, slot: _Slot) -> None:
        """Queues the copy of `layer`'s positions into `slot` on the host-to-device stream."""
        copier = self._copier
        stop = layer.length
        copier.wait(slot.released, slot.sent, layer.sent, stream=copier.to_device)
        slot.ensure(stop)
        timing = self.copy_times is not None and copier.cuda
        with copier.on(copier.to_device):
            if timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            slot.rows()[:stop].copy_(layer._host_rows()[:stop], non_blocking=True)
            if timing:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.copy_times.append((start, end))
        slot.fetched = copier.mark(copier.to_device)
        if slot.fetched is not None:
            layer.host.fence("to_device", slot.fetched)
        slot.owner, slot.valid, slot.sent = layer, stop, None
        self.bytes_to_device += stop * layer._position_bytes()

    def _release_others(self, layer: Any) -> None:
        """Slots busy with other layers are free once the work queued so far is done: their
        attention is in it."""
        mark = None
        for slot in self._ring:
            if slot.busy and slot.owner is not layer:
                mark = mark if mark is not None else self._copier.mark()
                slot.busy, slot.released = False, mark

    def _prefetch_after(self, index: int) -> None:
        """Fetches the next offloaded layers, in the order they compute (wrapping to the next
        step), into slots that are free, stopping at the first that is not."""
        order = self.offloaded_layers
        following = [i for i in order if i > index] + [i for i in order if i <= index]
        claimed: list[_Slot] = []  # slots holding a layer needed sooner than the next candidate
        for i in following[:len(self._ring)]:
            layer = self.layers[i]
            if not layer.is_initialized or layer.length == 0 or layer.host is None:
                return
            slot = self._ring_slot(layer)
            if any(slot is other for other in claimed):
                return
            claimed.append(slot)
            if slot.owner is layer and slot.valid >= layer.length:
                continue
            if slot.busy:
                return
            self._fetch(layer, slot)

    # ----- Cache -----------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if isinstance(layer, OffloadedKVLayer) and all(
                other.length == 0 for other in self.layers if isinstance(other, OffloadedKVLayer)):
            self._make_plan(key_states, value_states)  # a new sequence: the plan may change
        if self._ring:
            self._release_others(layer)
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if self._ring:
            self._prefetch_after(layer_idx)
        return keys, values

    def crop(self, tokens_to_remove: Any) -> None:
        super().crop(tokens_to_remove)
        for slot in self._ring:
            if slot.owner is not None:
                slot.valid = min(slot.valid, slot.owner.length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._invalidate_ring()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._invalidate_ring()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._invalidate_ring()

    def reset(self) -> None:
        super().reset()
        self._invalidate_ring()

    @property
    def committed_bytes(self) -> int:
        """Device bytes mapped under the resident layers and the ring now."""
        return (sum(layer.committed_bytes for layer in self.layers)
                + sum(slot.buffer.committed_bytes for slot in self._ring))

    @property
    def reserved_bytes(self) -> int:
        """Device virtual address space reserved for KV."""
        return (sum(layer.reserved_bytes for layer in self.layers)
                + sum(slot.buffer.reserved_bytes for slot in self._ring))

    @property
    def host_bytes(self) -> int:
        """Host memory held for offloaded layers."""
        return sum(getattr(layer, "host_bytes", 0) for layer in self.layers)

    def free(self) -> None:
        """Gives all device and host memory back now."""
        self._drop_ring()
        for layer in self.layers:
            layer.free()
        self._plan = None
