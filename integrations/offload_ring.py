"""The ring of GPU layer buffers that offloaded KV layers compute in (Note [The ring and its
events] in offload_cache.py), with its copy streams. The cache drives it, as transformers'
Cache.update drives offloading; a layer only hands over its own host buffer.

What the ring needs of a layer (OffloadedKVLayer): ``length``, ``width``, ``dtype``,
``device``, ``host`` (its HostBuffer), ``host_rows()`` (the buffer as ``[capacity, width]``),
``position_bytes()``, ``is_initialized``, and ``sent`` (the event of its last copy to the host),
which the ring sets.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from vmmalloc.virtual_tensor import VirtualTensor

RING_SLOTS = 2


class Copier:
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


class RingSlot:
    """One ring buffer: ``[max_length, width]`` positions of one offloaded layer."""

    def __init__(self, max_length: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = VirtualTensor((1, max_length, width), dtype, device)
        self.owner: Any = None     # the layer whose positions it holds
        self.valid = 0             # positions of the owner that match its host copy
        self.fetched: Any = None   # event: the fetch into the slot is done
        self.busy = False          # the owner's attention may still be queued after its last update
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


class Ring:
    """The slots, the copier and the copy counters of one cache. Empty (no slots, no
    streams) until `start` is called with the offloaded layers' device."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.slots: list[RingSlot] = []
        self.copier: Copier | None = None
        self.offloaded = 0  # offloaded layers: the slot count is at most this
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        # Set to a list to collect (start, end) timing events of every fetch (benchmarks).
        self.copy_times: list | None = None

    def start(self, device: torch.device | None, offloaded: int) -> None:
        """A new plan: `offloaded` layers go through the ring (0: no ring at all)."""
        self.drop()
        self.offloaded = offloaded
        self.copier = Copier(device) if offloaded and device is not None else None

    def _copier(self) -> Copier:
        assert self.copier is not None, "the ring is used before a plan with offloaded layers"
        return self.copier

    def drop(self) -> None:
        """Frees the slots (the copy streams may still use them: waited for here; the compute
        stream is ordered by free())."""
        for slot in self.slots:
            for event in (slot.fetched, slot.sent):
                if event is not None:
                    event.synchronize()
            slot.buffer.free()
        self.slots = []

    def invalidate(self) -> None:
        """Forgets what the slots hold (the host copies changed); a slot still busy is
        released after the work queued so far, as in release_others."""
        self.release_others(None)
        for slot in self.slots:
            slot.owner, slot.valid = None, 0

    def slot_for(self, layer: Any, slot_index: int) -> RingSlot:
        width = layer.width
        if self.slots and self.slots[0].buffer.shape[2] != width:
            self.drop()  # the batch changed
        if not self.slots:
            count = min(RING_SLOTS, self.offloaded)
            self.slots = [RingSlot(self.max_length, width, layer.dtype, layer.device) for _ in range(count)]
        return self.slots[slot_index % len(self.slots)]

    def load(self, layer: Any, slot: RingSlot, before: int, after: int) -> None:
        """Makes `slot` hold `layer`'s first `before` positions for the compute stream, with
        room for `after`, and marks it busy with the layer (Note [The ring and its events])."""
        copier = self._copier()
        if slot.owner is not layer or slot.valid < before:
            if before:
                self.fetch(layer, slot)
            else:  # a prompt: the compute stream writes the slot itself
                copier.wait(slot.released, slot.sent)
                slot.owner, slot.valid, slot.fetched = layer, 0, None
        copier.wait(slot.fetched)
        slot.busy = True
        slot.ensure(after)

    def fetch(self, layer: Any, slot: RingSlot) -> None:
        """Queues the copy of `layer`'s positions into `slot` on the host-to-device stream."""
        copier = self._copier()
        stop = layer.length
        copier.wait(slot.released, slot.sent, layer.sent, stream=copier.to_device)
        slot.ensure(stop)
        timing = self.copy_times is not None and copier.cuda
        with copier.on(copier.to_device):
            if timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            slot.rows()[:stop].copy_(layer.host_rows()[:stop], non_blocking=True)
            if timing and self.copy_times is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.copy_times.append((start, end))
        slot.fetched = copier.mark(copier.to_device)
        if slot.fetched is not None:
            layer.host.fence("to_device", slot.fetched)
        slot.owner, slot.valid, slot.sent = layer, stop, None
        self.bytes_to_device += stop * layer.position_bytes()

    def send_new_tokens(self, layer: Any, slot: RingSlot, before: int, after: int) -> None:
        """Copies positions [before, after) the compute stream wrote into `slot` to the layer's
        host buffer, on the device-to-host stream, after that write."""
        copier = self._copier()
        rows = slot.rows()
        written = copier.mark()
        copier.wait(written, stream=copier.to_host)
        with copier.on(copier.to_host):
            layer.host_rows()[before:after].copy_(rows[before:after], non_blocking=True)
        layer.sent = slot.sent = copier.mark(copier.to_host)
        if layer.sent is not None:
            layer.host.fence("to_host", layer.sent)
        self.bytes_to_host += (after - before) * layer.position_bytes()
        slot.valid = after

    def release_others(self, layer: Any) -> None:
        """Slots busy with other layers are free once the work queued so far is done: their
        attention is in it."""
        mark = None
        for slot in self.slots:
            if slot.busy and slot.owner is not layer:
                mark = mark if mark is not None else self._copier().mark()
                slot.busy, slot.released = False, mark

    def prefetch(self, following: Sequence[tuple[Any, int]]) -> None:
        """Fetches the next offloaded layers (with their slot indices, in the order they
        compute) into slots that are free, stopping at the first that is not."""
        claimed: list[RingSlot] = []  # slots holding a layer needed sooner than the next candidate
        for layer, slot_index in following[:len(self.slots)]:
            if not layer.is_initialized or layer.length == 0 or layer.host is None:
                return
            slot = self.slot_for(layer, slot_index)
            if any(slot is other for other in claimed):
                return
            claimed.append(slot)
            if slot.owner is layer and slot.valid >= layer.length:
                continue
            if slot.busy:
                return
            self.fetch(layer, slot)

    def crop(self) -> None:
        for slot in self.slots:
            if slot.owner is not None:
                slot.valid = min(slot.valid, slot.owner.length)

    @property
    def committed_bytes(self) -> int:
        return sum(slot.buffer.committed_bytes for slot in self.slots)

    @property
    def reserved_bytes(self) -> int:
        return sum(slot.buffer.reserved_bytes for slot in self.slots)
