"""The fragmentation benchmark's headroom search, against scripted probe outcomes: it must
find the largest batch that fits whatever the bound and the threshold, and it must not probe
more than the bracket needs (the quick suite's time budget depends on it)."""
from __future__ import annotations

import pytest

from bench import fragmentation


def scripted(largest_fitting: int):
    """A probe runner whose batches fit up to `largest_fitting`, and the batches it ran."""
    probed: list[int] = []

    def runner(system, args):
        probed.append(args["batch"])
        if args["batch"] <= largest_fitting:
            return {"ok": True}
        return {"ok": False, "oom_at_step": 0, "error": "CUDA out of memory", "stats_at_oom": {}}

    return probed, runner


@pytest.mark.parametrize("bound,largest", [(21, 21), (21, 18), (21, 10), (21, 11), (21, 3), (21, 0), (1, 1),
                                           (1, 0), (2, 1), (64, 63)])
def test_the_search_finds_the_largest_fitting_batch(bound, largest):
    probed, runner = scripted(largest)
    found = fragmentation.largest_batch("native", 16, 5, 1 << 30, bound, runner)
    assert found["largest_batch"] == largest, (found, probed)
    assert len(probed) == len(set(probed)), probed  # no batch is run twice
    assert all(b <= bound for b in probed), probed  # nothing above what live tensors allow
    assert found["probes"] == {str(b): b <= largest for b in sorted(probed)}


def test_a_bound_that_fits_costs_one_probe_and_native_like_gaps_about_five():
    probed, runner = scripted(21)
    fragmentation.largest_batch("vmmalloc", 16, 5, 1 << 30, 21, runner)
    assert probed == [21]
    probed, runner = scripted(18)
    fragmentation.largest_batch("native", 16, 5, 1 << 30, 21, runner)
    assert probed[:2] == [21, 10] and len(probed) <= 6, probed


def test_no_bound_means_nothing_fits_and_nothing_is_probed():
    probed, runner = scripted(5)
    assert fragmentation.largest_batch("native", 16, 5, 1 << 30, None, runner)["largest_batch"] == 0
    assert probed == []


@pytest.mark.parametrize("base,per_batch,wobble", [(10 << 30, 954_228_736, 0), (10 << 30, 954_228_736, 300 << 20),
                                                   (30 << 30, 1 << 30, 0), (1 << 30, 10 << 20, 0)])
def test_the_live_tensor_bound_is_confirmed_not_just_predicted(monkeypatch, base, per_batch, wobble):
    """Two batches predict the bound from a line; a peak off the line (wobble) must not
    change the answer, only cost measurements."""
    limit = 24 << 30
    measured: list[int] = []

    def peak(torch, model, optimizer, batch):
        measured.append(batch)
        return base + per_batch * batch + (wobble if batch % 2 else 0)

    monkeypatch.setattr(fragmentation, "peak_requested", peak)
    monkeypatch.setattr(fragmentation, "train_step", lambda *a: 0.0)
    found = fragmentation.live_bytes_bound(None, None, None, limit)
    fitting = [b for b in range(1, 257) if base + per_batch * b + (wobble if b % 2 else 0) <= limit]
    # the largest b such that every smaller batch fits too: peaks grow with the batch
    expected = max((b for b in fitting if all(c in fitting for c in range(1, b + 1))), default=None)
    assert found["largest_batch"] == expected, (found, measured)
    assert len(measured) == len(set(measured)) and len(measured) <= 6, measured


@pytest.mark.parametrize("batch", [1, 2, 7, 21, 40])
def test_the_headroom_loop_varies_shapes_and_ends_at_its_largest(batch):
    plan = fragmentation.headroom_loop(batch)
    assert plan[-1] == (batch, max(fragmentation.SEQS))
    assert all(1 <= b <= batch for b, _ in plan)
    assert plan == fragmentation.headroom_loop(batch)  # the same probe for every system
    if batch >= 7:
        assert len({b for b, _ in plan}) >= 3 and len({s for _, s in plan}) >= 3
