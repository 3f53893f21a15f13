"""Greedy GLM decoding with a KV cache: continuation ([gMASK]) and blank infilling ([MASK]/[sMASK]).

The context (Part A) is encoded once, bidirectionally, into the cache; then `<sop>` and each
generated token are fed one at a time, causally, at the positions masks.py assigns. Sampling,
beam search and batching come with the inference engine; this is the first cut that every
command can already use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glm130b.errors import GLMError
from glm130b.model.glm import GLMModel
from glm130b.model.masks import Block, generation_position, position_ids


class PromptError(GLMError, ValueError):
    """A prompt the model cannot take (too long, no blank to fill)."""


@dataclass
class InfillResult:
    text: str
    spans: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


@torch.no_grad()
def generate_block(
    model: GLMModel,
    context: list[int],
    block_start: Block,
    sop_id: int,
    stop_ids: set[int],
    max_new_tokens: int,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Greedily generate the Part-B block for the blank at `block_start.mask_position`."""
    cfg = model.config
    two_d = cfg.rotary == "2d"
    ctx = len(context)
    room = cfg.max_seq_len - ctx - 1
    if room < 1:
        raise PromptError(f"prompt is {ctx} tokens; the model's context is {cfg.max_seq_len} (leave room to generate)")
    max_new_tokens = min(max_new_tokens, room)
    device = model.word_embeddings.weight.device
    cache = model.new_kv_cache(1, ctx + max_new_tokens + 1)
    ids = torch.tensor([context], device=device)
    model(ids, position_ids(ctx, two_d=two_d).unsqueeze(0).to(device),
          context_lengths=torch.tensor([ctx], device=device), kv_cache=cache)
    token, out = sop_id, []
    for step in range(max_new_tokens):
        pos = generation_position(ctx, block_start, step, two_d).unsqueeze(0).to(device)
        allowed = torch.ones(1, 1, 1, cache.seen + 1, dtype=torch.bool, device=device)
        logits = model(torch.tensor([[token]], device=device), pos, allowed=allowed, kv_cache=cache)
        token = int(logits[0, -1].float().argmax())
        if token in stop_ids:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out


def blank_ids(tokenizer) -> tuple[int, ...]:
    return (tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id)


def infill_ids(model: GLMModel, tokenizer, ids: list[int], max_new_tokens: int = 64) -> InfillResult:
    """Fill every blank of `ids` left to right; each fill sees the earlier ones filled."""
    blanks = blank_ids(tokenizer)
    if not any(t in blanks for t in ids):
        raise PromptError("the text has no [MASK], [sMASK] or [gMASK] blank to fill")
    stop = {tokenizer.eop_id, tokenizer.eos_id}
    result = InfillResult(text="")
    while True:
        where = next((i for i, t in enumerate(ids) if t in blanks), None)
        if where is None:
            break
        block = Block(where, 0, continues=ids[where] == tokenizer.gmask_id)
        span = generate_block(model, ids, block, tokenizer.sop_id, stop, max_new_tokens)
        result.tokens.append(span)
        result.spans.append(tokenizer.decode(span))
        ids = ids[:where] + span + ids[where + 1 :]
    result.text = tokenizer.decode(ids)
    return result


def infill(model: GLMModel, tokenizer, text: str, max_new_tokens: int = 64) -> InfillResult:
    return infill_ids(model, tokenizer, tokenizer.encode(text), max_new_tokens)


def generate(model: GLMModel, tokenizer, prompt: str, max_new_tokens: int = 64,
             on_text: Callable[[str], None] | None = None) -> str:
    """Continue `prompt`: a [gMASK] is appended (GLM-130B's convention) and its block generated."""
    ids = tokenizer.encode(prompt)
    if any(t in blank_ids(tokenizer) for t in ids):
        return infill_ids(model, tokenizer, ids, max_new_tokens).text
    ids = ids + [tokenizer.gmask_id]
    block = Block(len(ids) - 1, 0, continues=True)
    stop = {tokenizer.eop_id, tokenizer.eos_id}
    emitted: list[int] = []
    printed = ""

    def stream(token: int) -> None:
        nonlocal printed
        emitted.append(token)
        text = tokenizer.decode(emitted)
        if on_text is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            on_text(text[len(printed):])
            printed = text

    out = generate_block(model, ids, block, tokenizer.sop_id, stop, max_new_tokens, on_token=stream)
    text = tokenizer.decode(out)
    if on_text is not None and len(text) > len(printed):
        on_text(text[len(printed):])
    return text
