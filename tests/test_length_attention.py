"""Attention over reserved buffers within per-row lengths held on the device (Note [Length
block masks]): equal to SDPA over each row's first `length` positions, the mask following its
lengths tensor when that changes in place, and bad arguments named. The fused kernel's
skipping of unlisted blocks (what keeps unmapped pages unread) is the GPU suite's to show;
here FlexAttention runs unfused, so the buffers are dense."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmmalloc.integrations.length_attention import (
    LengthMask,
    RowSpans,
    attend_row_spans,
    attend_within_lengths,
    is_left_padding_only,
    left_padding,
)

# The unfused reference is what these tests compare (see the docstring).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference(query, keys, values, lengths):
    rows = [F.scaled_dot_product_attention(query[b:b + 1], keys[b:b + 1, :, :n], values[b:b + 1, :, :n],
                                           enable_gqa=query.shape[1] != keys.shape[1])
            for b, n in enumerate(lengths.tolist())]
    return torch.cat(rows)


@pytest.mark.parametrize("lengths", [[1, 128, 129, 511], [256, 3, 400, 512]])
def test_each_row_attends_to_its_first_length_positions(lengths):
    torch.manual_seed(0)
    batch, q_heads, kv_heads, dim, capacity = 4, 8, 2, 32, 512
    query = torch.randn(batch, q_heads, 1, dim)
    keys, values = torch.randn(batch, kv_heads, capacity, dim), torch.randn(batch, kv_heads, capacity, dim)
    held = torch.tensor(lengths)
    out = attend_within_lengths(query, keys, values, LengthMask(held, capacity))
    torch.testing.assert_close(out, reference(query, keys, values, held), atol=1e-5, rtol=1e-5)


def test_one_mask_follows_the_lengths_it_is_updated_with():
    torch.manual_seed(1)
    query = torch.randn(2, 4, 1, 16)
    keys, values = torch.randn(2, 4, 512, 16), torch.randn(2, 4, 512, 16)
    held = torch.tensor([10, 130])
    mask = LengthMask(held, 512)
    addresses = (mask.lengths.data_ptr(), mask.block_mask.kv_num_blocks.data_ptr())
    for _ in range(4):
        held += 61  # a few decode steps later, across block boundaries
        mask.update(held)
        out = attend_within_lengths(query, keys, values, mask)
        torch.testing.assert_close(out, reference(query, keys, values, held), atol=1e-5, rtol=1e-5)
    assert (mask.lengths.data_ptr(), mask.block_mask.kv_num_blocks.data_ptr()) == addresses, "rewritten in place"
    assert mask.block_mask.kv_num_blocks.flatten().tolist() == [2, 3], "ceil(254 / 128), ceil(374 / 128)"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of block 128"):
        LengthMask(torch.tensor([3]), 100)
    with pytest.raises(ValueError, match="1-D"):
        LengthMask(torch.tensor([[3]]), 128)
    mask = LengthMask(torch.tensor([3]), 128)
    with pytest.raises(ValueError, match="do not group"):
        attend_within_lengths(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 128, 8), torch.randn(1, 2, 128, 8), mask)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_row_spans_attend_from_each_rows_padding_to_its_length_and_read_nothing_else(device):
    """Note [Row spans for FlashAttention]: the reservation's own layout [rows, capacity,
    heads, dim]; every position outside a row's span is NaN, so a kernel that loaded one
    (even under a zero weight) would return NaN."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, q_heads, kv_heads, dim, capacity = 4, 8, 2, 64, 512
    starts, lengths = [0, 5, 130, 0], [1, 200, 131, 512]
    keys = torch.full((batch, capacity, kv_heads, dim), float("nan"), dtype=dtype, device=device)
    values = keys.clone()
    for b, (s, n) in enumerate(zip(starts, lengths)):
        keys[b, s:n] = torch.randn(n - s, kv_heads, dim, dtype=dtype, device=device)
        values[b, s:n] = torch.randn(n - s, kv_heads, dim, dtype=dtype, device=device)
    query = torch.randn(batch, q_heads, 1, dim, dtype=dtype, device=device)
    spans = RowSpans(batch, capacity, torch.device(device))
    addresses = (spans.key_starts.data_ptr(), spans.used.data_ptr())
    spans.update(torch.tensor(lengths, dtype=torch.int32, device=device),
                 torch.tensor(starts, dtype=torch.int32, device=device))
    assert (spans.key_starts.data_ptr(), spans.used.data_ptr()) == addresses, "rewritten in place"
    out = attend_row_spans(query, keys, values, spans)
    assert out.shape == (batch, 1, q_heads, dim)
    expected = torch.cat([F.scaled_dot_product_attention(
        query[b:b + 1].float(), keys[b:b + 1, s:n].transpose(1, 2).float(), values[b:b + 1, s:n].transpose(1, 2).float(),
        enable_gqa=True) for b, (s, n) in enumerate(zip(starts, lengths))]).transpose(1, 2)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_left_padding_is_found_and_holes_are_told_apart():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert left_padding(mask).tolist() == [2, 0, 1]
    assert left_padding(mask).dtype == torch.int32
    assert is_left_padding_only(mask)
    assert not is_left_padding_only(torch.tensor([[1, 0, 1, 1]])), "a hole after the first attended position"
    assert not is_left_padding_only(torch.tensor([[0, 0, 0, 0]])), "a row attending to nothing has no span"


def test_row_spans_read_rows_padded_past_their_capacity():
    """Rows 256 positions apart holding 200 each (padded to whole pages, as a VirtualTensor pads
    a row over a page): the spans start each row at b x 256 and read the same keys SDPA reads."""
    from vmmalloc.integrations.length_attention import row_positions

    g = torch.Generator().manual_seed(0)
    padded = torch.randn(3, 256, 2, 2, 8, generator=g)  # K beside V, as the cache lays them out
    keys, values = padded[:, :200, 0], padded[:, :200, 1]
    assert row_positions(keys) == 256
    spans = RowSpans(3, 200, torch.device("cpu"), row_positions=256)
    lengths, starts = torch.tensor([200, 57, 1], dtype=torch.int32), torch.tensor([0, 7, 0], dtype=torch.int32)
    spans.update(lengths, starts)
    query = torch.randn(3, 4, 1, 8, generator=g)
    out = attend_row_spans(query, keys, values, spans)
    for b in range(3):
        k = keys[b, starts[b]:lengths[b]].transpose(0, 1).unsqueeze(0)
        v = values[b, starts[b]:lengths[b]].transpose(0, 1).unsqueeze(0)
        ref = F.scaled_dot_product_attention(query[b:b + 1], k, v, enable_gqa=True)
        torch.testing.assert_close(out[b:b + 1], ref.transpose(1, 2))


def test_row_spans_refuse_a_layout_they_cannot_read():
    spans = RowSpans(1, 128, torch.device("cpu"))
    keys = torch.randn(1, 128, 8, 2).transpose(2, 3)  # [1, 128, 2, 8], a head's dim not contiguous
    with pytest.raises(ValueError, match="not the cache's layout"):
        attend_row_spans(torch.randn(1, 4, 1, 8), keys, keys, spans)
    from vmmalloc.integrations.length_attention import row_positions

    assert row_positions(torch.zeros(1, 1, 2, 8).expand(2, 128, 2, 8)) is None, "no run of positions"
    assert row_positions(torch.zeros(2, 128, 2, 2, 8)[:, :, 0]) == 128, "K beside V: positions 32 apart"
    two_rows = RowSpans(2, 128, torch.device("cpu"))
    apart = torch.randn(2, 256, 2, 8)[:, :128]  # rows 256 positions apart, spans made for 128
    with pytest.raises(ValueError, match="rows 128 positions apart"):
        attend_row_spans(torch.randn(2, 4, 1, 8), apart, apart, two_rows)
    good = torch.randn(1, 128, 2, 8)
    with pytest.raises(ValueError, match="do not group"):
        attend_row_spans(torch.randn(1, 3, 1, 8), good, good, spans)
