"""THE one place for GLM attention masks and position ids.

A GLM sequence is Part A (the context, with [MASK]/[sMASK]/[gMASK] blanks) followed by Part B
(one block per blank: `<sop>` + the blank's tokens). The rules, from the official code
(see docs/model.md and tests/fixtures/oracle):

* Attention: `allowed[i, j] = (j < context_length) or (j <= i)`. The context sees itself
  bidirectionally and never Part B; Part B sees the whole context and itself causally.
  (Several Part-B blocks see each other causally too, as in GLM's pretraining.)
* 1D positions (GLM-130B): the context takes 0..P-1. A [MASK]/[sMASK] block takes the blank's
  position for every token; a [gMASK] block continues counting (P, P+1, ...).
* 2D positions (GLM-10B / ChatGLM-6B): the first row follows the same rule as 1D; the second row
  ("block positions") is 0 in the context and 1, 2, ... inside each Part-B block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """One Part-B block: `length` tokens (`<sop>` included) generating the blank at `mask_position`.

    `continues` is True for a [gMASK] block, whose 1D positions continue after the context
    instead of repeating the blank's position.
    """

    mask_position: int
    length: int
    continues: bool = False


def attention_allowed(seq_len: int, context_lengths: torch.Tensor | int, device=None) -> torch.Tensor:
    """Boolean mask [B, 1, L, L] (True = may attend) for a batch with per-sample context lengths."""
    if isinstance(context_lengths, int):
        context_lengths = torch.tensor([context_lengths])
    context_lengths = context_lengths.to(device=device).view(-1, 1, 1, 1)
    i = torch.arange(seq_len, device=device).view(1, 1, seq_len, 1)
    j = torch.arange(seq_len, device=device).view(1, 1, 1, seq_len)
    return (j < context_lengths) | (j <= i)


def query_rows_allowed(
    query_positions: torch.Tensor, key_len: int, context_lengths: torch.Tensor
) -> torch.Tensor:
    """Mask [B, 1, Q, K] for queries at absolute indices `query_positions` [Q] against keys 0..K-1.

    Used by the KV-cache decoder, where only the newest rows of the full mask are needed.
    """
    j = torch.arange(key_len, device=query_positions.device).view(1, 1, 1, key_len)
    i = query_positions.view(1, 1, -1, 1)
    ctx = context_lengths.to(query_positions.device).view(-1, 1, 1, 1)
    return (j < ctx) | (j <= i)


def position_ids(context_length: int, blocks: Sequence[Block] = (), two_d: bool = False) -> torch.Tensor:
    """Position ids for one sample: [L] for 1D rotary, [2, L] for 2D (positions, block positions)."""
    pos = list(range(context_length))
    block_pos = [0] * context_length
    for block in blocks:
        if not 0 <= block.mask_position < max(context_length, 1):
            raise ValueError(f"mask position {block.mask_position} outside the context of {context_length}")
        if block.continues:
            start = len(pos)
            pos.extend(range(start, start + block.length))
        else:
            pos.extend([block.mask_position] * block.length)
        block_pos.extend(range(1, block.length + 1))
    if two_d:
        return torch.tensor([pos, block_pos], dtype=torch.long)
    return torch.tensor(pos, dtype=torch.long)


def generation_position(context_length: int, block: Block, step: int, two_d: bool = False) -> torch.Tensor:
    """Position id of the `step`-th token (0 = `<sop>`) of a block being generated: [1] or [2, 1]."""
    pos = context_length + step if block.continues else block.mask_position
    if two_d:
        return torch.tensor([[pos], [step + 1]], dtype=torch.long)
    return torch.tensor([pos], dtype=torch.long)
