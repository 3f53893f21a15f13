"""Batched GLM scoring: context once, then one causal Part-B block per choice.

A scoring row is Part A (the context, with one blank: the mask token) followed by blocks
`<sop> + c[:-1]` for one or more continuations c. Block k's tokens see the whole context and,
causally, their own block, never another block; the context sees only itself (GLM's
bidirectional Part A). That is `masks.attention_allowed`'s rule applied to each block on its own
(`masks.blocks_allowed`),
so packing all choices of an item into one row gives exactly the scores of scoring each choice in
a row of its own (tested), while the context is computed once.

Positions (1D): the context takes 0..P-1; a [MASK]/[sMASK] block repeats the blank's position
for every token, a [gMASK] block continues after the context (P, P+1, ... for each block). 2D
models add block positions 1..n inside each block.

A model trained with the causal objective (config `extra["objective"] == "causal"`, the GPT
baseline) is scored as a causal LM instead (`causal_rows`): each block becomes a row of its own,
`<eos>` + the context's text before its blank + the block's tokens after `<sop>`, causal
everywhere, with the same targets; the context's text after a [MASK] blank is not seen.

The forward pass skips the output head for every position that is not scored: the head is a
third of a small model's compute and most of a row is context (GLMModel's pieces: embed,
run_blocks, final_layernorm, head; tested equal to the model's own forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from glm130b.model.masks import Block, attention_allowed, blocks_allowed, position_ids


@dataclass
class Row:
    """One scoring sequence.

    `ids`: Part A (context, `context_length` tokens) then the Part-B blocks back to back.
    `block_lengths`: the length of each block, in order. `continues`: gMASK-style positions.
    `pairs`: (index, token) — the log-probability of `token` from the logits at `index` is
    wanted (the logits at a block's `<sop>` predict its first token). `owners[k]`: which
    continuation pair k belongs to.
    """

    ids: list[int]
    context_length: int
    mask_position: int
    block_lengths: list[int]
    continues: bool
    pairs: list[tuple[int, int]]
    owners: list[int]
    tag: object = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RowScore:
    """Per continuation (owner): summed log-probability, token count, whether every token was the
    argmax (greedy) prediction."""

    logprob: list[float] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    token_logprobs: list[list[float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def choice_row(context: Sequence[int], mask_position: int, continues: bool, continuations: Sequence[Sequence[int]],
               sop_id: int, owners: Sequence[int] | None = None, tag=None) -> Row:
    """Context + one causal block `<sop> + c[:-1]` per continuation c (targets c)."""
    ids = list(context)
    pairs, owner_list, lengths = [], [], []
    owners = list(range(len(continuations))) if owners is None else list(owners)
    for owner, cont in zip(owners, continuations, strict=True):
        if not cont:
            raise ValueError("a continuation needs at least one token")
        start = len(ids)
        ids += [sop_id] + list(cont[:-1])
        lengths.append(len(cont))
        pairs += [(start + i, int(t)) for i, t in enumerate(cont)]
        owner_list += [owner] * len(cont)
    return Row(ids, len(context), mask_position, lengths, continues, pairs, owner_list, tag)


def single_token_row(context: Sequence[int], mask_position: int, continues: bool, tokens: Sequence[int],
                     sop_id: int, tag=None) -> Row:
    """The fast path when every choice is one token: one `<sop>` whose logits score them all."""
    p = len(context)
    return Row(list(context) + [sop_id], p, mask_position, [1], continues,
               [(p, int(t)) for t in tokens], list(range(len(tokens))), tag)


def row_position_ids(row: Row, two_d: bool, total_length: int | None = None) -> torch.Tensor:
    """[L] (1D) or [2, L] (2D) positions of a row (masks.position_ids, blocks independent), padded with 0."""
    blocks = [Block(row.mask_position, n, row.continues) for n in row.block_lengths]
    return position_ids(row.context_length, blocks, two_d, independent=True, total_length=total_length)


def collate(rows: Sequence[Row], two_d: bool, pad_id: int, device=None):
    """ids [B, L], position ids [B, L] or [B, 2, L], allowed [B, 1, L, L] for a batch of rows."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r.ids, dtype=torch.long)
    pos = torch.stack([row_position_ids(r, two_d, length) for r in rows])
    if all(len(r.block_lengths) <= 1 and len(r) == length for r in rows):
        # the plain GLM layout: build it with masks.py itself
        allowed = attention_allowed(length, torch.tensor([r.context_length for r in rows]))
    else:
        allowed = torch.stack([blocks_allowed(r.context_length, r.block_lengths, length) for r in rows]).unsqueeze(1)
    return ids.to(device), pos.to(device), allowed.to(device)


# ---------------------------------------------------------------------------------------------
# Forward with logits only where needed
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def score_batch(model, rows: Sequence[Row], pad_id: int, keep_token_logprobs: bool = False,
                head_chunk: int = 2048) -> list[RowScore]:
    """Score one batch of rows with one forward pass."""
    two_d = model.config.rotary == "2d"
    device = next(model.parameters()).device
    ids, pos, allowed = collate(rows, two_d, pad_id, device)
    b_index, p_index, targets = [], [], []
    for b, r in enumerate(rows):
        for p, t in r.pairs:
            b_index.append(b)
            p_index.append(p)
            targets.append(t)
    b_index = torch.tensor(b_index, device=device)
    p_index = torch.tensor(p_index, device=device)
    targets = torch.tensor(targets, device=device)
    # unique (row, position) pairs: the single-token path asks for one position many times
    flat = b_index * ids.shape[1] + p_index
    uniq, inverse = torch.unique(flat, return_inverse=True)
    if hasattr(model, "run_blocks"):  # a GLMModel: the head only where a token is scored
        h = model.run_blocks(model.embed(ids), pos, allowed)
        h_sel = model.final_layernorm(h.reshape(-1, h.shape[-1])[uniq])
        logp_parts = []
        for s in range(0, len(uniq), head_chunk):
            lp = torch.log_softmax(model.head(h_sel[s : s + head_chunk]).float(), dim=-1)
            logp_parts.append(lp)
        logp = torch.cat(logp_parts) if logp_parts else torch.empty(0)
    else:  # anything else that is called like GLMModel
        logits = model(ids, pos, allowed=allowed)
        logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[uniq].float(), dim=-1)
    argmax = logp.argmax(dim=-1)
    token_lp = logp[inverse, targets]
    is_greedy = argmax[inverse] == targets
    token_lp, is_greedy = token_lp.tolist(), is_greedy.tolist()

    out, k = [], 0
    for r in rows:
        n_owner = max(r.owners) + 1 if r.owners else 0
        score = RowScore([0.0] * n_owner, [0] * n_owner, [True] * n_owner,
                         [[] for _ in range(n_owner)] if keep_token_logprobs else [])
        for owner in r.owners:
            score.logprob[owner] += token_lp[k]
            score.num_tokens[owner] += 1
            score.greedy[owner] = score.greedy[owner] and is_greedy[k]
            if keep_token_logprobs:
                score.token_logprobs[owner].append(token_lp[k])
            k += 1
        out.append(score)
    return out


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped into batches: sorted by length (longest first, so memory peaks at once),
    each batch's padded size rows * max_len <= batch_tokens (a single row may exceed it)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, current_max = [], [], 0
    for i in order:
        new_max = max(current_max, lengths[i])
        if current and (new_max * (len(current) + 1) > batch_tokens or len(current) >= max_rows):
            batches.append(current)
            current, new_max = [], lengths[i]
        current.append(i)
        current_max = new_max
    if current:
        batches.append(current)
    return batches


def is_causal(model) -> bool:
    """A model trained with the causal objective (the trainer records it in config.json)."""
    config = getattr(model, "config", None)
    return (getattr(config, "extra", None) or {}).get("objective") == "causal"


def causal_rows(row: Row, bos_id: int) -> list[Row]:
    """The rows that score `row`'s pairs with a causal LM: one per block, `bos_id` + the context
    before the blank + the block's tokens after `<sop>`; the logits that predicted a block
    token from `<sop>` (offset 0) now come from the last context token (or `bos_id`)."""
    prefix = [bos_id] + row.ids[: row.mask_position]
    starts, start = [], row.context_length
    for n in row.block_lengths:
        starts.append(start)
        start += n
    by_block: dict[int, list[tuple[int, int, int]]] = {}
    for (index, token), owner in zip(row.pairs, row.owners, strict=True):
        k = max(i for i, s in enumerate(starts) if s <= index)
        by_block.setdefault(k, []).append((index - starts[k], token, owner))
    out = []
    for k, pairs in sorted(by_block.items()):
        block = row.ids[starts[k] + 1 : starts[k] + row.block_lengths[k]]
        ids = prefix + block
        out.append(Row(ids, 0, 0, [len(ids)], True, [(len(prefix) - 1 + r, t) for r, t, _ in pairs],
                       [o for _, _, o in pairs], row.tag))
    return out


def score_rows(model, rows: Sequence[Row], pad_id: int, batch_tokens: int = 8192, max_rows: int = 64,
               keep_token_logprobs: bool = False, on_batch: Callable[[Sequence[Row]], None] | None = None,
               causal_bos: int | None = None) -> list[RowScore]:
    """Score every row, batched by length; results in the order of `rows`. With `causal_bos`
    (a causal model's `<eos>`) every row is scored through `causal_rows`."""
    if causal_bos is not None:
        return _score_causal(model, rows, pad_id, batch_tokens, max_rows, keep_token_logprobs, on_batch, causal_bos)
    results: list[RowScore | None] = [None] * len(rows)
    for batch in plan_batches([len(r) for r in rows], batch_tokens, max_rows):
        batch_rows = [rows[i] for i in batch]
        for i, s in zip(batch, score_batch(model, batch_rows, pad_id, keep_token_logprobs), strict=True):
            results[i] = s
        if on_batch is not None:
            on_batch(batch_rows)
    return results  # type: ignore[return-value]


def _score_causal(model, rows, pad_id, batch_tokens, max_rows, keep_token_logprobs, on_batch, bos_id) -> list[RowScore]:
    """score_rows for a causal model: each row's causal rows scored, then summed per owner."""
    parts = [dataclasses.replace(part, tag=i) for i, row in enumerate(rows) for part in causal_rows(row, bos_id)]
    left = [0] * len(rows)
    for part in parts:
        left[part.tag] += 1

    def report(batch_rows):  # a row counts as scored once all its causal rows are
        finished = []
        for part in batch_rows:
            left[part.tag] -= 1
            if left[part.tag] == 0:
                finished.append(rows[part.tag])
        if finished and on_batch is not None:
            on_batch(finished)

    scored = score_rows(model, parts, pad_id, batch_tokens, max_rows, keep_token_logprobs, report)
    out = []
    for row in rows:
        n = max(row.owners) + 1 if row.owners else 0
        out.append(RowScore([0.0] * n, [0] * n, [True] * n, [[] for _ in range(n)] if keep_token_logprobs else []))
    for part, score in zip(parts, scored, strict=True):
        target = out[part.tag]
        for owner in dict.fromkeys(part.owners):
            target.logprob[owner] += score.logprob[owner]
            target.num_tokens[owner] += score.num_tokens[owner]
            target.greedy[owner] = target.greedy[owner] and score.greedy[owner]
            if keep_token_logprobs:
                target.token_logprobs[owner] += score.token_logprobs[owner]
    return out
