"""GLM generation and infilling on top of the engine (glm130b.infer.engine).

* `generate`: continue a prompt -- a [gMASK] is appended (GLM-130B's convention) and its block
  generated; `generate_batch` does many prompts of different lengths in one batch.
* `infill` / `infill_ids`: fill the blanks left to right by GLM-130B's generate.py rules
  (`fill_blanks`: one kind of blank, `<eos>` before `<sop>`, the sequence re-encoded with each
  answer spliced in; tested token for token against the official code). `reuse_cache=True`
  instead encodes the prompt once and lets the blanks' blocks follow each other in the same KV
  cache, each seeing the context and the earlier blocks (GLM's multi-span pretraining layout;
  faster, and every kind of blank is filled, but not the official layout). Beam search always
  re-encodes.
* `generate_block`: one Part-B block for a blank, the primitive the evaluation code uses.

Every function takes a GenerationConfig (greedy by default): sampling, beam search, lengths,
no-repeat n-grams and stop strings. Streaming: `on_text` receives text as it is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from glm130b.errors import GLMError
from glm130b.infer.engine import (
    GREEDY,
    Batch,
    Engine,
    GenerationConfig,
    GenerationError,
    Row,
    beam_search,
    feed_last,
    generate_rows,
    make_generator,
    stop_cut,
)
from glm130b.model.glm import GLMModel
from glm130b.model.masks import Block

__all__ = ["GenerationConfig", "GenerationError", "InfillResult", "PromptError", "generate", "generate_batch",
           "generate_block", "infill", "infill_ids"]


class PromptError(GLMError, ValueError):
    """A prompt the model cannot take (too long, no blank to fill)."""


@dataclass
class InfillResult:
    text: str
    spans: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the filled sequence (fill_blanks)


def _config(config: GenerationConfig | None, max_new_tokens: int | None, default: int = 64) -> GenerationConfig:
    config = config or replace(GREEDY, max_new_tokens=default)
    if max_new_tokens is not None and max_new_tokens != config.max_new_tokens:
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        config = replace(config, max_new_tokens=max_new_tokens,
                         min_new_tokens=min(config.min_new_tokens, max_new_tokens))
    return config


def _room(model: GLMModel, used: int) -> int:
    """Tokens that may still be generated after `used` cache slots (the model's context)."""
    room = model.config.max_seq_len - used - 1
    if room < 1:
        raise PromptError(f"prompt is {used} tokens; the model's context is {model.config.max_seq_len} "
                          "(leave room to generate)")
    return room


def _stop_ids(tokenizer) -> set[int]:
    return {tokenizer.eop_id, tokenizer.eos_id}


def blank_ids(tokenizer) -> tuple[int, ...]:
    return (tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id)


def _span(tokenizer, row: Row) -> tuple[str, list[int]]:
    text = tokenizer.decode(row.tokens)
    if row.text_end is not None:
        text = text[: row.text_end]
    return text, list(row.tokens)


# --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_block(
    model: GLMModel,
    context: list[int],
    block_start: Block,
    sop_id: int,
    stop_ids: set[int],
    max_new_tokens: int,
    on_token: Callable[[int], None] | None = None,
    config: GenerationConfig | None = None,
) -> list[int]:
    """Generate the Part-B block for the blank at `block_start.mask_position` (greedy by default)."""
    cfg = _config(config, max_new_tokens)
    cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, _room(model, len(context))),
                  min_new_tokens=min(cfg.min_new_tokens, _room(model, len(context))))
    engine = Engine(model)
    row = Row(list(context), block_start)
    if cfg.strategy == "beam":
        best = beam_search(engine, row, cfg, sop_id, set(stop_ids))
        if on_token is not None:
            for t in best.tokens:
                on_token(t)
        return best.tokens
    callback = None if on_token is None else (lambda _i, t: on_token(t))
    generate_rows(engine, [row], cfg, sop_id, set(stop_ids), on_token=callback)
    return row.tokens


# --------------------------------------------------------------------------------------------
class TextStream:
    """Turns streamed tokens into text pieces: whole UTF-8 characters only, and text that could
    be the start of a stop string is held back until it is known not to be one."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop_strings: Sequence[str] = ()):
        self.tokenizer, self.on_text, self.stops = tokenizer, on_text, tuple(stop_strings)
        self.tokens: list[int] = []
        self.printed = 0

    def _holdback(self, text: str) -> int:
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def token(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            return
        end = stop_cut(text, self.stops)
        if end is None:
            end = len(text) - self._holdback(text)
        if end > self.printed:
            self.on_text(text[self.printed : end])
            self.printed = end

    def finish(self, final_text: str) -> None:
        if len(final_text) > self.printed:
            self.on_text(final_text[self.printed :])
            self.printed = len(final_text)


def generate(model: GLMModel, tokenizer, prompt: str, max_new_tokens: int | None = None,
             on_text: Callable[[str], None] | None = None, config: GenerationConfig | None = None) -> str:
    """Continue `prompt`: a [gMASK] is appended (GLM-130B's convention) and its block generated.

    A prompt that already holds blanks is filled instead (the filled text is returned).
    """
    cfg = _config(config, max_new_tokens)
    ids = tokenizer.encode(prompt)
    if any(t in blank_ids(tokenizer) for t in ids):
        return infill_ids(model, tokenizer, ids, config=cfg).text
    ids = ids + [tokenizer.gmask_id]
    stream = TextStream(tokenizer, on_text, cfg.stop_strings) if on_text is not None else None
    text, _ = _generate_one(model, tokenizer, ids, Block(len(ids) - 1, 0, continues=True), cfg,
                            None if stream is None else stream.token)
    if stream is not None:
        stream.finish(text)
    return text


def _generate_one(model, tokenizer, ids, block, cfg, on_token=None) -> tuple[str, list[int]]:
    room = _room(model, len(ids))
    cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, room), min_new_tokens=min(cfg.min_new_tokens, room))
    engine = Engine(model)
    row = Row(list(ids), block)
    stop = _stop_ids(tokenizer)
    if cfg.strategy == "beam":
        row = beam_search(engine, row, cfg, tokenizer.sop_id, stop, decode=tokenizer.decode,
                          pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
        if on_token is not None:
            for t in row.tokens:
                on_token(t)
    else:
        callback = None if on_token is None else (lambda _i, t: on_token(t))
        generate_rows(engine, [row], cfg, tokenizer.sop_id, stop, on_token=callback, decode=tokenizer.decode,
                      pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
    return _span(tokenizer, row)


@torch.no_grad()
def generate_batch(model: GLMModel, tokenizer, prompts: Sequence[str], config: GenerationConfig | None = None,
                   on_token: Callable[[int, int], None] | None = None) -> list[str]:
    """Continue several prompts (of any lengths) in one batch; `on_token(prompt index, token)`
    streams. Beam search runs the prompts one after another."""
    cfg = _config(config, None)
    ids = [tokenizer.encode(p) + [tokenizer.gmask_id] for p in prompts]
    if not ids:
        return []
    if cfg.strategy == "beam":
        out = []
        for i, x in enumerate(ids):
            cb = None if on_token is None else (lambda t, i=i: on_token(i, t))
            out.append(_generate_one(model, tokenizer, x, Block(len(x) - 1, 0, continues=True), cfg, cb)[0])
        return out
    longest = max(len(x) for x in ids)
    room = _room(model, longest)
    cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, room), min_new_tokens=min(cfg.min_new_tokens, room))
    rows = [Row(x, Block(len(x) - 1, 0, continues=True)) for x in ids]
    generate_rows(Engine(model), rows, cfg, tokenizer.sop_id, _stop_ids(tokenizer), on_token=on_token,
                  decode=tokenizer.decode, pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
    return [_span(tokenizer, r)[0] for r in rows]


# --------------------------------------------------------------------------------------------
def infill_ids(model: GLMModel, tokenizer, ids: list[int], max_new_tokens: int | None = None,
               config: GenerationConfig | None = None, reuse_cache: bool = False,
               out_seq_length: int | None = None) -> InfillResult:
    """Fill the blanks of `ids` (see the module docstring): GLM-130B's `fill_blanks` rules by
    default, or every blank in one KV cache with `reuse_cache` (faster; not the official layout).

    `out_seq_length` is generate.py's total length budget: blank k may generate
    `out_seq_length - len(sequence so far) - 1` tokens; without it each blank may generate
    `max_new_tokens` (and what the model's context leaves)."""
    cfg = _config(config, max_new_tokens)
    blanks = blank_ids(tokenizer)
    where = [i for i, t in enumerate(ids) if t in blanks]
    if not where:  # (fill_blanks itself would append a [gMASK]: `generate` does that)
        raise PromptError("the text has no [MASK], [sMASK] or [gMASK] blank to fill")
    if reuse_cache and cfg.strategy != "beam":
        return _infill_one_cache(model, tokenizer, list(ids), where, cfg)
    return fill_blanks(model, tokenizer, list(ids), cfg, out_seq_length)


def fill_blanks(model: GLMModel, tokenizer, ids: list[int], cfg: GenerationConfig,
                out_seq_length: int | None = None) -> InfillResult:
    """GLM-130B's generate.py `fill_blanks`, on token ids:

    * One kind of blank is filled: [MASK] if there is one, else [sMASK], else [gMASK]; blanks of
      the other kinds stay in the text as plain tokens. Without any blank, [gMASK] is appended.
    * If the sequence does not end in a blank, `<eos>` is appended before `<sop>`.
    * Blanks are filled left to right, one at a time: the sequence with the earlier answers
      spliced in is encoded again for each blank (its context bidirectional, `<sop>` and the
      answer causal). [MASK]/[sMASK] answers sit at their blank's position; [gMASK] answers (and
      only when neither [MASK] nor [sMASK] is present) continue counting after the context.
    * An answer ends at `<eop>`/`<eos>` (not kept) or at its length budget; the final text drops
      one trailing `<eos>`.
    Where the official code crashes (a budget of 0 or less), this raises PromptError; an answer
    holding `<sop>` is spliced in like any other (the official code then fills the wrong place).
    """
    kinds = (tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id)
    kind = next((k for k in kinds if k in ids), tokenizer.gmask_id)
    seq = list(ids)
    if not any(t in kinds for t in seq):
        seq.append(tokenizer.gmask_id)
    if seq[-1] not in kinds:
        seq.append(tokenizer.eos_id)
    result = InfillResult(text="")
    while kind in seq:
        pos = seq.index(kind)
        budget = _room(model, len(seq))
        if out_seq_length is not None:
            budget = min(budget, out_seq_length - len(seq) - 1)
            if budget < 1:
                raise PromptError(f"the sequence is {len(seq)} tokens: an out_seq_length of {out_seq_length} "
                                  "leaves nothing to generate")
        block_cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, budget) if out_seq_length is None else budget,
                            min_new_tokens=min(cfg.min_new_tokens, budget))
        span, tokens = _generate_one(model, tokenizer, seq, Block(pos, 0, continues=kind == tokenizer.gmask_id),
                                     block_cfg)
        result.tokens.append(tokens)
        result.spans.append(span)
        filled = tokens if span == tokenizer.decode(tokens) else tokenizer.encode(span)  # cut by a stop string
        seq = seq[:pos] + filled + seq[pos + 1 :]
    if seq and seq[-1] == tokenizer.eos_id:
        seq = seq[:-1]
    result.text = tokenizer.decode(seq)
    result.ids = seq
    return result


@torch.no_grad()
def _infill_one_cache(model, tokenizer, ids: list[int], where: list[int], cfg: GenerationConfig) -> InfillResult:
    """Encode the prompt once; generate the blanks' blocks one after another in the same cache."""
    room = _room(model, len(ids))
    engine = Engine(model)
    first = Row(ids, Block(where[0], 0, continues=ids[where[0]] == tokenizer.gmask_id))
    batch = Batch(engine, [first], room, tokenizer.pad_id)
    stop = _stop_ids(tokenizer)
    generator = make_generator(cfg.seed) if cfg.strategy == "sample" else None
    result = InfillResult(text="")
    generated = 0  # Part-B tokens already in the cache (for a [gMASK] block's positions)
    pieces, last = [], 0
    for k, pos in enumerate(where):
        left = batch.room() - 1
        if left < 1:
            raise PromptError(f"prompt is {len(ids)} tokens and {k} blanks are filled; the model's context is "
                              f"{model.config.max_seq_len} (leave room to generate)")
        block_cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, left),
                            min_new_tokens=min(cfg.min_new_tokens, left))
        row = first if k == 0 else Row(ids, Block(pos, 0, continues=ids[pos] == tokenizer.gmask_id))
        generate_rows(engine, [row], block_cfg, tokenizer.sop_id, stop, decode=tokenizer.decode,
                      pad_id=tokenizer.pad_id, first_position=[len(ids) + generated],
                      vocab_limit=tokenizer.vocab_size, batch=batch, generator=generator)
        if k + 1 < len(where):
            feed_last(batch, [row], tokenizer.pad_id)
        generated = batch.cache.seen - len(ids)
        span, tokens = _span(tokenizer, row)
        result.spans.append(span)
        result.tokens.append(tokens)
        pieces += [tokenizer.decode(ids[last:pos]), span]
        last = pos + 1
    pieces.append(tokenizer.decode(ids[last:]))
    result.text = "".join(pieces)
    return result


def infill(model: GLMModel, tokenizer, text: str, max_new_tokens: int | None = None,
           config: GenerationConfig | None = None, reuse_cache: bool = False) -> InfillResult:
    return infill_ids(model, tokenizer, tokenizer.encode(text), max_new_tokens, config, reuse_cache)
