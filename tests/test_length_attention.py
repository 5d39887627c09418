"""Attention over reserved buffers within per-row lengths held on the device (Note [Length
block masks]): equal to SDPA over each row's first `length` positions, the mask following its
lengths tensor when that changes in place, and bad arguments named. The fused kernel's
skipping of unlisted blocks (what keeps unmapped pages unread) is the GPU suite's to show;
here FlexAttention runs unfused, so the buffers are dense."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmmalloc.integrations.length_attention import LengthMask, attend_within_lengths

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
