"""model/masks.py: every mask and position rule, in the shapes training, decoding and scoring use."""

import pytest
import torch

from glm130b.model.masks import (
    Block,
    attention_allowed,
    blocks_allowed,
    position_ids,
    prefill_inputs,
    step_allowed,
    step_positions,
)


def test_glm_mask_rule():
    allowed = attention_allowed(6, torch.tensor([3]))[0, 0]
    for i in range(6):
        for j in range(6):
            assert bool(allowed[i, j]) == (j < 3 or j <= i)


def test_position_ids_two_d():
    pos = position_ids(4, [Block(1, 3)], two_d=True)
    assert pos.tolist() == [[0, 1, 2, 3, 1, 1, 1], [0, 0, 0, 0, 1, 2, 3]]


@pytest.mark.parametrize("ctx", [1, 2, 5])
@pytest.mark.parametrize("n", [1, 3])
def test_one_block_mask_is_masks_py_rule(ctx, n):
    assert torch.equal(blocks_allowed(ctx, [n]), attention_allowed(ctx + n, ctx)[0, 0])


def test_blocks_see_context_and_themselves_only():
    ctx, blocks = 3, [2, 3, 1]
    allowed = blocks_allowed(ctx, blocks, total_length=11)
    starts = [3, 5, 8]
    for k, (s, n) in enumerate(zip(starts, blocks, strict=True)):
        for i in range(s, s + n):
            assert allowed[i, :ctx].all()  # the whole context
            assert allowed[i, s : i + 1].all() and not allowed[i, i + 1 : s + n].any()  # causal in its block
            for k2, (s2, n2) in enumerate(zip(starts, blocks, strict=True)):
                if k2 != k:
                    assert not allowed[i, s2 : s2 + n2].any()  # never another block
    assert allowed[:ctx, :ctx].all() and not allowed[:ctx, ctx:].any()  # context: bidirectional, no Part B


def test_independent_blocks_each_restart_after_the_context():
    blocks = [Block(2, 2, continues=True), Block(2, 3, continues=True)]
    assert position_ids(4, blocks, independent=True).tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    assert position_ids(4, blocks).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # one cache: they follow
    assert position_ids(2, [Block(1, 1)], total_length=5).tolist() == [0, 1, 1, 0, 0]


def test_prefill_sees_own_context_only():
    ids, pos, allowed = prefill_inputs([[5, 6, 7], [8]], two_d=True, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert pos.shape == (2, 2, 3) and pos[:, 1].eq(0).all()
    assert allowed[0, 0].all() and allowed[1, 0, :, 0].all() and not allowed[1, 0, :, 1:].any()


@pytest.mark.parametrize("ctx,lengths", [([3, 1], [5, 5])])
def test_step_mask_matches_the_full_glm_mask(ctx, lengths):
    """A decoding step over a cache sees exactly the keys the training mask's last row allows:
    its context and its own Part B so far, never padding."""
    padded = max(ctx)
    slot = lengths[0]
    step = step_allowed(torch.tensor(ctx), padded, slot, slot + 1)[:, 0, 0]
    for b, c in enumerate(ctx):
        # the row without padding: context c, then Part B from padded..slot
        keep = [j for j in range(slot + 1) if j < c or j >= padded]
        full = attention_allowed(len(keep), c)[0, 0, -1]
        assert step[b, keep].tolist() == full.tolist()
        assert not step[b, c:padded].any()


def test_step_mask_hides_other_rows_tails():
    """The serving batcher: rows of different lengths in one cache; row b sees slots <= its own."""
    lengths = torch.tensor([2, 6])
    allowed = step_allowed([2, 3], [2, 3], lengths, 7)[:, 0, 0]
    assert allowed[0].tolist() == [True, True, True, False, False, False, False]
    assert allowed[1].tolist() == [True] * 7


def test_step_positions_repeat_or_count():
    blocks = [Block(1, 0), Block(2, 0, continues=True)]
    assert step_positions(blocks, [5, 5], [3, 3], two_d=False).view(-1).tolist() == [1, 8]
    two = step_positions(blocks, [5, 7], [0, 2], two_d=True)
    assert two.shape == (2, 2, 1) and two[:, 0, 0].tolist() == [1, 2] and two[:, 1, 0].tolist() == [1, 3]


def test_two_d_gmask_block_stays_at_the_blank():
    """ChatGLM-6B / GLM-10B: with 2D positions every Part-B token sits at its blank, [gMASK]
    included (only the block positions count); 1D (GLM-130B) [gMASK] counts on."""
    gmask = Block(3, 3, continues=True)
    assert position_ids(4, [gmask], two_d=True).tolist() == [[0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]]
    assert position_ids(4, [gmask]).tolist() == [0, 1, 2, 3, 4, 5, 6]
    step = step_positions([Block(3, 0, continues=True)], [4], [5], two_d=True)
    assert step.view(-1).tolist() == [3, 6]
