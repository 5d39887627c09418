"""The allocator battery: randomized sequences of allocations, frees, stitches and
empty_cache, checked against a reference model. Runs on every backend (see conftest)."""
from __future__ import annotations

import hypothesis.strategies as st
from conftest import MiB, pattern
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import vmmalloc

CHUNK = vmmalloc.CHUNK_SIZE

# Sizes straddle every boundary the allocator has: tiny, 512-byte rounding, the 1 MiB
# small/large split, and multi-chunk blocks that must be stitched.
SIZES = st.one_of(
    st.integers(0, 4096),
    st.integers(4097, 1 * MiB),
    st.integers(1 * MiB + 1, 3 * CHUNK),
    st.sampled_from([CHUNK, 2 * CHUNK, 5 * CHUNK, 10 * CHUNK]),
)


def expected_size(size: int) -> int:
    """The reference model's rounding: 512 B in the small pool, 2 MiB chunks above 1 MiB."""
    if size <= vmmalloc.SMALL_REQUEST_LIMIT:
        return max(512, -(-size // 512) * 512)
    return -(-size // CHUNK) * CHUNK


def make_machine(kind, capacity: int, conf: str):
    class AllocatorMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.alloc = kind.allocator(capacity, conf)
            self.be = self.alloc.backend
            self.live: dict[int, tuple[int, int, int]] = {}  # ptr -> (requested, tag, stream)
            self.tag = 0

        @rule(size=SIZES, stream=st.sampled_from([0, 1]))
        def allocate(self, size, stream):
            try:
                ptr = self.alloc.allocate(size, stream)
            except vmmalloc.OutOfMemoryError as error:
                # Legitimate only when the chunks under live data plus the chunks this
                # request needs exceed the capacity: stitching leaves no other excuse.
                live_chunks = {c for p in self.live for c in self.alloc.chunk_ids(p)}
                needed = 1 if size <= vmmalloc.SMALL_REQUEST_LIMIT else expected_size(size) // CHUNK
                assert len(live_chunks) + needed > capacity // CHUNK, (
                    f"OOM with {len(live_chunks)} live chunks of {capacity // CHUNK}: {error}")
                assert error.stats["num_ooms"] >= 1
                return
            if size == 0:  # no memory for 0 bytes, as PyTorch's allocator gives
                assert ptr == 0
                return
            assert ptr != 0
            assert self.alloc.allocation_size(ptr) == expected_size(size)
            end = ptr + max(size, 1)
            for other, (osize, _, _) in self.live.items():
                assert end <= other or other + max(osize, 1) <= ptr, "live allocations overlap"
            self.tag += 1
            if size:
                self.be.write(ptr, pattern(self.tag, size))
            self.live[ptr] = (size, self.tag, stream)

        @precondition(lambda self: self.live)
        @rule(data=st.data())
        def free(self, data):
            ptr = data.draw(st.sampled_from(sorted(self.live)))
            self.check_contents(ptr)
            del self.live[ptr]
            self.alloc.deallocate(ptr)

        @precondition(lambda self: self.live)
        @rule(data=st.data(), stream=st.sampled_from([1, 2]))
        def record_stream(self, data, stream):
            ptr = data.draw(st.sampled_from(sorted(self.live)))
            self.alloc.record_stream(ptr, stream)

        @rule()
        def empty_cache(self):
            self.alloc.empty_cache()
            stats = self.alloc.stats()
            live_chunks = {c for p in self.live for c in self.alloc.chunk_ids(p)}
            assert stats["reserved_bytes.all.current"] == len(live_chunks) * CHUNK

        def check_contents(self, ptr):
            size, tag, _ = self.live[ptr]
            if size:
                assert self.be.read(ptr, size) == pattern(tag, size), f"contents of {ptr:#x} changed"

        @invariant()
        def statistics_match_model(self):
            stats = self.alloc.stats()
            assert stats["allocation.all.current"] == len(self.live)
            assert stats["allocated_bytes.all.current"] == sum(expected_size(s) for s, _, _ in self.live.values())
            assert stats["requested_bytes.all.current"] == sum(s for s, _, _ in self.live.values())
            assert stats["reserved_bytes.all.current"] == stats["vmm.chunks.current"] * CHUNK
            assert stats["reserved_bytes.all.current"] <= capacity
            allocated, active = stats["allocated_bytes.all.current"], stats["active_bytes.all.current"]
            assert allocated <= active <= stats["reserved_bytes.all.current"]
            assert stats["vmm.backend_errors"] == 0

        def teardown(self):
            for ptr in list(self.live):
                self.check_contents(ptr)
                self.alloc.deallocate(ptr)
            self.alloc.empty_cache()
            stats = self.alloc.stats()
            assert stats["reserved_bytes.all.current"] == 0
            assert stats["vmm.cached_mappings.current"] == 0
            assert stats["active_bytes.all.current"] == 0

    return AllocatorMachine


def run_machine(kind, capacity, conf, examples):
    run_state_machine_as_test(
        make_machine(kind, capacity, conf),
        settings=settings(max_examples=examples, stateful_step_count=40, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )


def test_random_sequences_keep_contents_and_statistics(kind):
    run_machine(kind, 64 * MiB, "", examples=60)


def test_random_sequences_under_tight_cap_with_evictions(kind):
    # Few cached mappings and little memory: stitching, eviction and OOM retry all run.
    run_machine(kind, 24 * MiB, "max_cached_mappings:3", examples=60)


def test_random_sequences_without_stitching(kind):
    run_machine(kind, 48 * MiB, "stitching:false", examples=30)
