"""Note [Streams before stitches]: a request takes memory that needs no GPU-side wait first,
grows within the slack next, and reuses another stream's memory (behind a wait) last; the
plain policy (cross_stream_reuse:always) reuses any stream's memory. Each test runs on each
backend (see conftest); streams 1 and 2 are valid handles on CUDA too."""
from __future__ import annotations

import pytest
from conftest import MiB

import vmmalloc


def test_growth_within_the_slack_comes_before_another_streams_memory(kind):
    alloc = kind.allocator(64 * MiB, conf="growth_slack:1")
    a = alloc.allocate(8 * MiB, stream=1)
    alloc.deallocate(a)
    b = alloc.allocate(8 * MiB, stream=2)
    stats = alloc.stats()
    assert b != a, "stream 1's mapping was taken although growing within the slack needed no wait"
    assert stats["vmm.cross_stream_waits"] == 0
    assert stats["num_device_alloc"] == 8  # four chunks for each stream
    alloc.deallocate(b)
    assert alloc.allocate(8 * MiB, stream=1) == a  # each stream keeps its own mapping


def test_another_streams_memory_serves_behind_a_wait_when_growth_would_pass_the_slack(kind):
    alloc = kind.allocator(64 * MiB)  # default slack: 4% of 8 MiB is less than a chunk
    a = alloc.allocate(8 * MiB, stream=1)
    alloc.deallocate(a)
    b = alloc.allocate(8 * MiB, stream=2)
    stats = alloc.stats()
    assert b == a
    assert stats["vmm.cross_stream_waits"] == 1
    assert stats["vmm.cross_stream_fallbacks"] == 1
    assert stats["reserved_bytes.all.peak"] == 8 * MiB


def test_another_streams_memory_serves_when_the_cap_refuses_growth(kind):
    alloc = kind.allocator(64 * MiB, conf="growth_slack:1,memory_cap:8MiB")
    a = alloc.allocate(8 * MiB, stream=1)
    alloc.deallocate(a)
    assert alloc.allocate(8 * MiB, stream=2) == a
    stats = alloc.stats()
    assert stats["num_alloc_retries"] == 0, "the refused growth must not release the caches"
    assert stats["num_ooms"] == 0


@pytest.mark.parametrize("policy", ["last_resort", "always"])
def test_a_mapping_whose_chunks_another_stream_used_since_needs_a_wait(kind, policy):
    # X and Y are stream 1's mappings; their chunks are then stitched into one mapping used
    # on stream 2 (growth refused by the cap). X's index entry still says stream 1, but its
    # chunks were last used on stream 2.
    alloc = kind.allocator(64 * MiB, conf=f"growth_slack:1,memory_cap:16MiB,cross_stream_reuse:{policy}")
    keep = alloc.allocate(8 * MiB, stream=1)
    x = alloc.allocate(4 * MiB, stream=1)
    y = alloc.allocate(4 * MiB, stream=1)
    alloc.deallocate(x)
    alloc.deallocate(y)
    xy = alloc.allocate(8 * MiB, stream=2)
    assert alloc.stats()["vmm.stitches"] == 1
    alloc.deallocate(xy)
    alloc.set_memory_cap(64 * MiB)
    waits = alloc.stats()["vmm.cross_stream_waits"]

    again = alloc.allocate(4 * MiB, stream=1)

    new_waits = alloc.stats()["vmm.cross_stream_waits"] - waits
    if policy == "always":
        assert again in (x, y) and new_waits == 1
    else:
        assert again not in (x, y, xy), "a mapping of stream 1 was reused over chunks stream 2 used last"
        assert new_waits == 0
    alloc.deallocate(again)
    alloc.deallocate(keep)


def test_the_policy_is_validated_and_reported():
    assert vmmalloc.parse_config("")["cross_stream_reuse"] == "last_resort"
    assert vmmalloc.parse_config("cross_stream_reuse:always")["cross_stream_reuse"] == "always"
    with pytest.raises(ValueError, match="cross_stream_reuse.*last_resort or always"):
        vmmalloc.parse_config("cross_stream_reuse:sometimes")


def test_host_time_is_counted_only_with_host_timing():
    for conf, counted in (("", False), ("host_timing:true", True)):
        alloc = vmmalloc.Allocator(vmmalloc.HostBackend(64 * MiB), conf)
        for _ in range(3):
            alloc.deallocate(alloc.allocate(4 * MiB))
        assert (alloc.stats()["vmm.host_time_ns"] > 0) == counted, conf


def test_a_partly_used_mapping_keeps_its_tails_stream(kind):
    # Note [Foreign streams]: stream 2 reuses the first half of stream 1's mapping (behind a
    # wait: the cap refuses growth); the other half was last used on stream 1, so when the
    # whole mapping is wanted on stream 2 later, growing within the slack comes first.
    alloc = kind.allocator(64 * MiB, conf="growth_slack:1,memory_cap:8MiB")
    a = alloc.allocate(8 * MiB, stream=1)
    alloc.deallocate(a)
    half = alloc.allocate(4 * MiB, stream=2)
    assert half == a
    assert alloc.stats()["vmm.cross_stream_waits"] == 1
    alloc.deallocate(half)
    alloc.set_memory_cap(64 * MiB)

    whole = alloc.allocate(8 * MiB, stream=2)

    assert whole != a, "stream 1's half was handed out as if stream 2 had used it last"
    assert alloc.stats()["vmm.cross_stream_waits"] == 1
    alloc.deallocate(whole)
