"""THE one place for GLM attention masks and position ids.

A GLM sequence is Part A (the context, with [MASK]/[sMASK]/[gMASK] blanks) followed by Part B
(one block per blank: `<sop>` + the blank's tokens). The rules, from the official code
(see docs/model.md and tests/fixtures/oracle):

* Attention: `allowed[i, j] = (j < context_length) or (j <= i)`. The context sees itself
  bidirectionally and never Part B; Part B sees the whole context and itself causally.
  (Several Part-B blocks see each other causally too, as in GLM's pretraining.)
* 1D positions (GLM-130B): the context takes 0..P-1. A [MASK]/[sMASK] block takes the blank's
  position for every token; a [gMASK] block continues counting (P, P+1, ...).
* Prefix keys (P-Tuning v2, glm130b/model/prefix.py): every position sees every learned prefix
  key; they sit before the sequence's keys and have no position (`with_prefix`).
* 2D positions (GLM-10B / ChatGLM-6B): the first row is the blank's position for every token of
  every block, [gMASK] included (GLM's blocklm_utils gives part B the mask position; ChatGLM-6B
  feeds `<sop>` and each generated token at the [gMASK] index); the second row ("block
  positions") is 0 in the context and 1, 2, ... inside each Part-B block.

The same rules, in the shapes each user needs (every caller builds its masks and positions here):
training (`attention_allowed`, `position_ids`; with `segments`, rows that pack several samples), a padded prefill of several contexts
(`prefill_inputs`), one decoding step over a KV cache (`step_allowed`, `step_positions`: the
engine, beam search and the serving batcher), and scoring rows that pack several independent
blocks after one context (`blocks_allowed`, `position_ids(..., independent=True)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """One Part-B block: `length` tokens (`<sop>` included) generating the blank at `mask_position`.

    `continues` is True for a [gMASK] block, whose 1D positions continue after the context
    instead of repeating the blank's position (with 2D positions it repeats it too).
    """

    mask_position: int
    length: int
    continues: bool = False


def attention_allowed(seq_len: int, context_lengths: torch.Tensor | int | None = None, device=None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, L, L] (True = may attend) for a batch with per-sample context lengths.

    `segments` [B, 2, L] instead: rows that pack several samples side by side (instruction pairs,
    objective.py). Row 0 holds each token's segment start s_i, row 1 the end of its segment's
    context c_i (absolute indices); the rule is the one above within each segment:
    `allowed[i, j] = j >= s_i and (j < c_i or j <= i)`, so no token sees another segment. An
    unpacked sample is s_i = 0, c_i = its context length; a causal segment has c_i = s_i; a
    padding token s_i = i, c_i = 0 (itself only).
    """
    i = torch.arange(seq_len, device=device).view(1, 1, seq_len, 1)
    j = torch.arange(seq_len, device=device).view(1, 1, 1, seq_len)
    if segments is not None:
        if segments.dim() != 3 or segments.shape[1] != 2 or segments.shape[2] != seq_len:
            raise ValueError(f"segments must be [B, 2, {seq_len}], got {list(segments.shape)}")
        segments = segments.to(device=device)
        starts, ends = segments[:, 0].unsqueeze(1).unsqueeze(-1), segments[:, 1].unsqueeze(1).unsqueeze(-1)
        return (j >= starts) & ((j < ends) | (j <= i))
    if context_lengths is None:
        raise ValueError("pass context_lengths or segments")
    if isinstance(context_lengths, int):
        context_lengths = torch.tensor([context_lengths])
    context_lengths = context_lengths.to(device=device).view(-1, 1, 1, 1)
    return (j < context_lengths) | (j <= i)


def with_prefix(allowed: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """`allowed` [..., Lq, K] with `prefix_length` always-visible key columns in front (P-Tuning v2
    prefixes: visible to the context and to every Part-B token alike)."""
    if prefix_length == 0:
        return allowed
    return torch.nn.functional.pad(allowed, (prefix_length, 0), value=True)


def blocks_allowed(context_length: int, block_lengths: Sequence[int], total_length: int | None = None) -> torch.Tensor:
    """Mask [L, L] for a context followed by independent causal blocks (a scoring row).

    Each block follows `attention_allowed`'s rule, `(j < context_length) or (j <= i)`, restricted
    to its own block; the context sees only the context; padding rows (when `total_length`
    exceeds the content) see only themselves so that softmax stays defined.
    """
    parts = [torch.zeros(context_length, dtype=torch.long)]
    parts += [torch.full((n,), k + 1, dtype=torch.long) for k, n in enumerate(block_lengths)]
    bid = torch.cat(parts)  # 0: context, k: block k, -1: padding
    if total_length is not None and total_length > len(bid):
        bid = torch.cat((bid, torch.full((total_length - len(bid),), -1, dtype=torch.long)))
    length = len(bid)
    i = torch.arange(length).view(-1, 1)
    j = torch.arange(length).view(1, -1)
    real_row = (bid >= 0).view(-1, 1)
    same_block = (bid.view(-1, 1) == bid.view(1, -1)) & (bid.view(-1, 1) > 0)
    allowed = real_row & ((j < context_length) | (same_block & (j <= i)))
    pad_row = (bid < 0).view(-1, 1)
    return allowed | (pad_row & (i == j))


def prefill_inputs(contexts: Sequence[Sequence[int]], two_d: bool, pad_id: int = 0, device=None):
    """ids [B, P] (right-padded to the longest context), positions 0..P-1 (2D: block positions 0)
    and the mask [B, 1, P, P] letting every token see its own row's context and no padding: the
    inputs that encode several contexts bidirectionally in one forward."""
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    longest = int(lengths.max())
    ids = torch.full((len(contexts), longest), pad_id, dtype=torch.long)
    for i, context in enumerate(contexts):
        ids[i, : len(context)] = torch.tensor(context, dtype=torch.long)
    pos = torch.arange(longest, device=device).expand(len(contexts), longest)
    if two_d:
        pos = torch.stack((pos, torch.zeros_like(pos)), dim=1)
    j = torch.arange(longest, device=device)
    allowed = (j.view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)).expand(-1, 1, longest, -1)
    return ids.to(device), pos, allowed


def step_allowed(context_lengths: torch.Tensor, generated_from: torch.Tensor | int, slots: torch.Tensor | int,
                 end: int, device=None) -> torch.Tensor:
    """Mask [B, 1, 1, end] for one new token per row, written at cache slot `slots[b]`: it sees its
    row's context [0, context_lengths[b]) and the row's Part-B tokens [generated_from[b], slots[b]]
    (the engine pads contexts to one length P and generates from P for every row; the serving
    batcher generates right after each row's own context). Anything else (padding, other rows'
    longer tails) is hidden."""
    j = torch.arange(end, device=device).view(1, -1)

    def col(x):
        return torch.as_tensor(x, device=device).view(-1, 1)

    ok = (j < col(context_lengths)) | ((j >= col(generated_from)) & (j <= col(slots)))
    return ok.view(ok.shape[0], 1, 1, end)


def step_positions(blocks: Sequence[Block], firsts: Sequence[int], steps: Sequence[int], two_d: bool,
                   device=None) -> torch.Tensor:
    """Position ids [B, 1] (1D) or [B, 2, 1] (2D) of the steps[b]-th token (0 = `<sop>`) of each
    row's block being generated; a continuing block counts from firsts[b]."""
    pos = [f + s if b.continues and not two_d else b.mask_position
           for b, f, s in zip(blocks, firsts, steps, strict=True)]
    p = torch.tensor(pos, dtype=torch.long, device=device).view(-1, 1)
    if two_d:
        block_pos = torch.tensor([s + 1 for s in steps], dtype=torch.long, device=device).view(-1, 1)
        return torch.stack((p, block_pos), dim=1)
    return p


def position_ids(context_length: int, blocks: Sequence[Block] = (), two_d: bool = False,
                 independent: bool = False, total_length: int | None = None) -> torch.Tensor:
    """Position ids for one sample: [L] for 1D rotary, [2, L] for 2D (positions, block positions).

    Blocks follow each other (a continuing block counts on after the context and the blocks
    before it), or, `independent`, each stands alone after the context (scoring alternatives).
    `total_length` pads with position 0."""
    pos = list(range(context_length))
    block_pos = [0] * context_length
    for block in blocks:
        if not 0 <= block.mask_position < max(context_length, 1):
            raise ValueError(f"mask position {block.mask_position} outside the context of {context_length}")
        if block.continues and not two_d:
            start = context_length if independent else len(pos)
            pos.extend(range(start, start + block.length))
        else:
            pos.extend([block.mask_position] * block.length)
        block_pos.extend(range(1, block.length + 1))
    pad = (total_length or len(pos)) - len(pos)
    pos += [0] * pad
    block_pos += [0] * pad
    if two_d:
        return torch.tensor([pos, block_pos], dtype=torch.long)
    return torch.tensor(pos, dtype=torch.long)
