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

from typing import Any

import torch

from vmmalloc.integrations.hf_compat import crop_to_removal
from vmmalloc.integrations.kv_cache import VirtualKVLayer, VirtualLayersCache
from vmmalloc.integrations.offload_ring import RING_SLOTS, Ring
from vmmalloc.integrations.pinned_host import HostBuffer, check_host_memory
from vmmalloc.sizes import parse_bytes
from vmmalloc.virtual_tensor import CHUNK_SIZE


def _host_capacity(max_length: int, held: int, stop: int) -> int:
    """Positions a host buffer gets when `stop` must fit and `held` fit before: grows by half
    (one copy of what is held) up to max_length, so a cache given the exact length
    allocates once."""
    return min(max_length, max(stop, held + held // 2, stop + 256))


class OffloadedKVLayer(VirtualKVLayer):
    """A full-attention layer that is either resident (a VirtualKVLayer) or offloaded: held in
    host memory, computed in a ring slot. The cache decides which (Note [Which layers stay]),
    and drives an offloaded layer's update through its ring (offload_ring.py): the layer
    knows its host buffer and the ring buffer it is handed, nothing of the cache."""

    def __init__(self, max_length: int, **kwargs: Any) -> None:
        super().__init__(max_length, None, **kwargs)
        self.offloaded = False
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

    def host_rows(self) -> torch.Tensor:
        """The host buffer as ``[capacity, width]`` (Note [One copy per layer])."""
        assert self.host is not None and self.host.tensor is not None, "the layer holds no host buffer"
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

    def position_bytes(self) -> int:
        return self.width * torch.empty((), dtype=self.dtype).element_size()

    def _ensure_capacity(self, stop: int) -> None:
        """Host room for `stop` positions (_host_capacity)."""
        if stop <= self.capacity and self.host is not None:
            return
        capacity = _host_capacity(self.max_length, self.capacity, stop)
        host = HostBuffer(capacity * self.position_bytes(), self.device)
        if self.host is not None:
            self.host.wait()
            if self.length:
                host.tensor[:self.length * self.position_bytes()].copy_(
                    self.host.tensor[:self.length * self.position_bytes()])
            self.host.close()
        self.host, self.capacity = host, capacity
        self._host_layout = (self.width, self.dtype)

    # ----- CacheLayerMixin -------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.offloaded:
            raise RuntimeError("an offloaded layer is updated by its OffloadedKVCache, which moves it through the ring")
        return super().update(key_states, value_states, *args, **kwargs)

    def begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[int, int]:
        """Checks that new states continue the layer and makes host room for them; returns
        the positions [before, after) they take."""
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
        return before, after

    def write(self, rows: torch.Tensor, before: int, after: int, key_states: torch.Tensor,
              value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new states at [before, after) of `rows` (a ring buffer holding the layer's
        first `before` positions); returns K and V over all of them."""
        self.keys, self.values = self._views(rows, after)
        self.keys[:, :, before:after].copy_(key_states)
        self.values[:, :, before:after].copy_(value_states)
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
        assert self.host is not None, "a layer with tokens has a host buffer"
        self.host.wait()
        stop = self.length
        rows = self.host_rows()[:stop].view(stop, self.batch_size, -1)
        regrouped = rows.index_select(1, index)
        if len(index) == self.batch_size:
            rows.copy_(regrouped)
        else:
            self._drop_host()
            self.batch_size = len(index)
            self._ensure_capacity(stop)
            self.host_rows()[:stop].copy_(regrouped.view(stop, -1))
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


class OffloadedKVCache(VirtualLayersCache):
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
        self.kv_budget = parse_bytes(kv_budget, "kv_budget")

        def make_layer(length: int, window: int | None, **common: Any) -> VirtualKVLayer:
            if window is None:
                return OffloadedKVLayer(length, **common)
            return VirtualKVLayer(length, window, **common)

        super().__init__(config, make_layer, max_length, max_batch_size, lookahead)
        self._plan: tuple | None = None
        self.ring = Ring(self.max_length)

    # Copy counters and the fetch timings (benchmarks set copy_times to a list) are the ring's.
    @property
    def bytes_to_device(self) -> int:
        return self.ring.bytes_to_device

    @property
    def bytes_to_host(self) -> int:
        return self.ring.bytes_to_host

    @property
    def copy_times(self) -> list | None:
        return self.ring.copy_times

    @copy_times.setter
    def copy_times(self, value: list | None) -> None:
        self.ring.copy_times = value

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
        whole pages per row, with the pages a layer maps ahead; K and V share them where their
        head sizes agree (Note [Keys and values share pages]), else each has its own."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        v_dim = v_head_dim or head_dim
        runs = [head_dim + v_dim] if v_dim == head_dim else [head_dim, v_dim]
        total = 0
        for dims in runs:
            position = kv_heads * dims * itemsize
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
        self.ring.start(key_states.device, len(offloaded))
        for rank, i in enumerate(offloaded):
            self._offloadable(i).set_offloaded(True, rank % RING_SLOTS)
        for i in full[len(full) - keep:]:
            self._offloadable(i).set_offloaded(False)
        self._plan = key

    def _offloadable(self, index: int) -> OffloadedKVLayer:
        layer = self.layers[index]
        assert isinstance(layer, OffloadedKVLayer), f"layer {index} uses a sliding window and always stays"
        return layer

    # ----- Cache -----------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if isinstance(layer, OffloadedKVLayer) and all(
                other.length == 0 for other in self.layers if isinstance(other, OffloadedKVLayer)):
            self._make_plan(key_states, value_states)  # a new sequence: the plan may change
        self.ring.release_others(layer)
        if isinstance(layer, OffloadedKVLayer) and layer.offloaded:
            before, after = layer.begin_update(key_states, value_states)
            slot = self.ring.slot_for(layer, layer.slot_index)
            self.ring.load(layer, slot, before, after)
            keys, values = layer.write(slot.rows(), before, after, key_states, value_states)
            self.ring.send_new_tokens(layer, slot, before, after)
        else:
            keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if self.ring.slots:
            self.ring.prefetch(self._following(layer_idx))
        return keys, values

    def _following(self, index: int) -> list[tuple[OffloadedKVLayer, int]]:
        """The offloaded layers in the order they compute after layer `index` (wrapping to
        the next step), with their slot indices."""
        order = self.offloaded_layers
        following = [i for i in order if i > index] + [i for i in order if i <= index]
        return [(layer, layer.slot_index) for layer in map(self._offloadable, following)]

    def crop(self, tokens_to_remove: Any) -> None:
        super().crop(tokens_to_remove)
        self.ring.crop()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.ring.invalidate()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.ring.invalidate()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.ring.invalidate()

    def reset(self) -> None:
        super().reset()
        self.ring.invalidate()

    @property
    def committed_bytes(self) -> int:
        """Device bytes mapped under the resident layers and the ring now."""
        return super().committed_bytes + self.ring.committed_bytes

    @property
    def reserved_bytes(self) -> int:
        """Device virtual address space reserved for KV."""
        return super().reserved_bytes + self.ring.reserved_bytes

    @property
    def host_bytes(self) -> int:
        """Host memory held for offloaded layers."""
        return sum(getattr(layer, "host_bytes", 0) for layer in self.layers)

    def free(self) -> None:
        """Gives all device and host memory back now."""
        self.ring.drop()
        super().free()
        self._plan = None
