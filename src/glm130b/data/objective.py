"""The GLM pretraining objective: autoregressive blank infilling (Zeng et al. 2022, section 2.1).

Each training sample is Part A (text with blanks) followed by Part B (one block per blank:
`<sop>` + the blank's tokens, trained to predict those tokens + `<eop>`). Three blank kinds:

* [MASK]  (share `1 - gmask_prob` of pretraining samples): short spans, Poisson(3) lengths, that
  cover `mask_ratio` (15%) of the window, placed at random non-adjacent positions; Part-B blocks
  come in shuffled order. Each span becomes ONE [MASK] token in Part A.
* [sMASK] (share `smask_prob` of the [MASK]-mode samples): the spans are whole sentences.
* [gMASK] (share `gmask_prob`, 70%): a random-length suffix is cut off and generated
  left to right after the prefix, as in a prefix language model.

A share `instruction_share` of samples come from instruction pairs (GLM-130B's multi-task
instruction pretraining): Part A = prompt + [gMASK], Part B = `<sop>` + answer.

`objective="causal"` is the plain GPT baseline for the GLM-vs-GPT comparison at equal tokens: no
blanks and no Part A (context length 0, so the attention is causal everywhere); a sample is
`seq_len` stream tokens, each trained to predict the next stream token (positions 0..L-1,
loss on every real token). Its instruction samples are prompt + answer + `<eos>`, with the loss
on the answer and `<eos>` only. The stream, resume and skip rules are the GLM ones.

Position ids and the attention rule come from `glm130b.model.masks` (the one place for them).
Every sample is padded with `pad_id` to `seq_len`. Padding takes position id 0 (both rows in 2D),
target `pad_id` and loss mask 0; it sits after Part B, so under the causal Part-B rule no real
token can see it. Part-A targets are `pad_id` too (the loss mask is 0 there).

Choices where the papers leave room (documented here, tested in tests/test_objective.py):

* Span lengths: Poisson(lambda) with zeros redrawn, clipped at `max_span`, drawn until they cover
  `round(mask_ratio * W)` tokens of the W-token window; the last span is trimmed so the masked
  share is exact. Spans are shuffled, then the unmasked tokens are spread at random over the gaps
  (official GLM `sample_spans`), which keeps at least one token between two spans.
* MASK window: k spans make Part A + Part B = W + 2k tokens, so W starts at `seq_len` and shrinks
  to `seq_len - 2k` (re-trimming the spans) when needed; the rest is padding (about 2 tokens).
* gMASK suffix length: uniform over [max(1, floor(gmask_min_ratio * W)), W] with W = seq_len - 2
  and gmask_min_ratio = 0.2, as in GLM-130B's collator (`min_gmask_ratio`); the prefix may be empty.
* sMASK: sentences are runs of tokens ending in a sentence-end token (the `sentence_end` argument,
  plus `eos_id`); they are picked in random order, never two neighbours, keeping the masked total
  at most `2 * mask_ratio * W`, until they cover `mask_ratio` of the window. A window with no
  usable sentence falls back to [MASK] spans (and says so: mode "mask").

Exact resume: `state_dict()` holds the RNG state and how many samples, stream tokens and
instruction pairs were consumed. A trainer saves it with its checkpoint, then builds a new
builder with the same seed, calls `load_state_dict()` and `samples()` on the same documents and
instructions from their beginning; the builder skips what was consumed and continues exactly.
When samples are prefetched (so the builder runs ahead of the trainer), instead re-create the
builder with the same seed and pass `skip=samples_trained` to `samples()`.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glm130b.errors import GLMError
from glm130b.io import read_jsonl
from glm130b.model.masks import Block, position_ids

MODES = ("mask", "smask", "gmask", "instruction", "causal")
OBJECTIVES = ("glm", "causal")


@dataclass(frozen=True)
class SpecialIds:
    """The special token ids the objective needs."""

    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, obj) -> SpecialIds:
        """Read `mask_id, gmask_id, smask_id, sop_id, eop_id, eos_id, pad_id` from any object."""
        names = ("mask", "gmask", "smask", "sop", "eop", "eos", "pad")
        missing = [f"{n}_id" for n in names if not hasattr(obj, f"{n}_id")]
        if missing:
            raise TypeError(f"{type(obj).__name__} lacks the special token ids {', '.join(missing)}")
        return cls(**{n: getattr(obj, f"{n}_id") for n in names})

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"special id {name} must be a non-negative int, got {value!r}")
        blanks = (self.mask, self.gmask, self.smask, self.sop, self.eop)
        if len(set(blanks)) != len(blanks):
            raise ValueError(f"mask, gmask, smask, sop and eop ids must be distinct, got {blanks}")


@dataclass
class ObjectiveConfig:
    seq_len: int
    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    max_span: int = 40
    gmask_prob: float = 0.7  # share of pretraining samples in [gMASK] mode; the rest are [MASK]
    smask_prob: float = 0.0  # share of [MASK]-mode samples whose spans are whole sentences
    instruction_share: float = 0.05  # share of all samples drawn from instruction pairs
    two_d: bool = False  # 2D positions (GLM-10B / ChatGLM-6B) instead of GLM-130B's 1D
    gmask_min_ratio: float = 0.2  # shortest [gMASK] suffix, as a share of the window
    objective: str = "glm"  # "glm" (blank infilling) or "causal" (next-token prediction, GPT)
    pack_instructions: bool = False  # an instruction sample holds as many pairs as fit, kept apart

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid objective config: {msg}")

        need(_is_int(self.seq_len) and self.seq_len >= 3, f"seq_len must be an int >= 3, got {self.seq_len!r}")
        need(0.0 < self.mask_ratio <= 0.5, f"mask_ratio must be in (0, 0.5], got {self.mask_ratio!r}")
        need(self.poisson_lambda > 0, f"poisson_lambda must be > 0, got {self.poisson_lambda!r}")
        need(_is_int(self.max_span) and self.max_span >= 1, f"max_span must be an int >= 1, got {self.max_span!r}")
        for key in ("gmask_prob", "smask_prob", "instruction_share", "gmask_min_ratio"):
            value = getattr(self, key)
            need(0.0 <= value <= 1.0, f"{key} must be in [0, 1], got {value!r}")
        need(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        need(not (self.objective == "causal" and self.two_d), "the causal objective has no 2D (block) positions")


@dataclass
class Sample:
    """One padded training sample. `blocks` describe Part B (for position ids and debugging);
    `num_source_tokens` is how many tokens of the document stream it used (0 for instructions)."""

    input_ids: torch.Tensor  # long [seq_len]
    position_ids: torch.Tensor  # long [seq_len], or [2, seq_len] when two_d
    context_length: int  # len(Part A)
    targets: torch.Tensor  # long [seq_len]
    loss_mask: torch.Tensor  # float [seq_len]: 1 on Part B, 0 on Part A and padding
    mode: str  # one of MODES
    blocks: tuple[Block, ...]
    num_source_tokens: int
    # rows packing several pairs (pack_instructions): [2, seq_len] each token's segment start and
    # the end of its segment's context (masks.attention_allowed); None: one sample, context_length
    segments: torch.Tensor | None = None


class GLMSampleBuilder:
    """Turns token documents (and instruction pairs) into GLM samples, reproducibly from `seed`.

    `special_ids` is a `SpecialIds` or any object with `mask_id, ..., pad_id` (a tokenizer).
    `sentence_end` (needed when `smask_prob > 0`) is a set of sentence-ending token ids or a
    callable `token_id -> bool`; `eos_id` always ends a sentence.
    """

    def __init__(
        self,
        config: ObjectiveConfig,
        special_ids,
        seed: int = 0,
        sentence_end: Collection[int] | Callable[[int], bool] | None = None,
    ) -> None:
        if not isinstance(config, ObjectiveConfig):
            raise TypeError(f"config must be an ObjectiveConfig, got {type(config).__name__}")
        self.config = config
        self.ids = special_ids if isinstance(special_ids, SpecialIds) else SpecialIds.from_tokenizer(special_ids)
        if config.smask_prob > 0 and sentence_end is None:
            raise ValueError("smask_prob > 0 needs sentence_end (sentence-end token ids or a predicate)")
        if sentence_end is None or callable(sentence_end):
            self._is_sentence_end = sentence_end
        else:
            ends = frozenset(sentence_end)
            self._is_sentence_end = ends.__contains__
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._samples = 0  # samples built (yielded or skipped) by samples()
        self._tokens = 0  # document-stream tokens consumed (eos separators included)
        self._instructions = 0  # instruction pairs consumed

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """RNG state and stream position; JSON-serialisable."""
        return {
            "seed": self.seed,
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "samples": self._samples,
            "tokens": self._tokens,
            "instructions": self._instructions,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"rng", "samples", "tokens", "instructions"} - set(state)
        if missing:
            raise ValueError(f"objective state lacks {', '.join(sorted(missing))}")
        try:
            self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"objective state holds an unusable RNG state: {e}") from None
        self._samples, self._tokens, self._instructions = (
            int(state["samples"]), int(state["tokens"]), int(state["instructions"])
        )

    # -- the sample stream -------------------------------------------------------------------
    def samples(
        self,
        documents: Iterable[Sequence[int]],
        instructions: Iterable[tuple[Sequence[int], Sequence[int]]] | None = None,
        skip: int = 0,
    ) -> Iterator[Sample]:
        """Yield samples from documents joined by `eos_id` (empty documents are dropped).

        Every stream token lands in exactly one sample; the last samples may be shorter (padded).
        The iteration ends with the documents. When the instructions run out, samples drawn for
        them fall back to pretraining, and so does a pair whose answer does not fit seq_len. `skip` builds and drops that many samples first.
        Continues from the position in `state_dict()`: pass the same inputs from the start.
        """
        if not _is_int(skip) or skip < 0:
            raise ValueError(f"skip must be a non-negative int, got {skip!r}")
        L = self.config.seq_len
        causal = self.config.objective == "causal"
        need = L + 1 if causal else L  # a causal window also needs the token after it
        pieces = self._stream(documents, start=self._tokens)
        pairs = None if instructions is None else _Pairs(instructions)
        for _ in range(self._instructions if pairs is not None else 0):
            if pairs.take() is None:
                pairs = None
                break
        buf: list[int] = []
        exhausted = False
        while True:
            while len(buf) < need and not exhausted:
                piece = next(pieces, None)
                if piece is None:
                    exhausted = True
                else:
                    buf.extend(piece)
            if not buf:
                return
            sample = None
            if self.rng.random() < self.config.instruction_share and pairs is not None:
                if self.config.pack_instructions:
                    sample = self._packed_instructions(pairs)
                    if sample is None:
                        pairs = None
                elif (pair := pairs.take()) is None:
                    pairs = None
                else:
                    prompt_ids, answer_ids = _unpack_pair(pair)
                    self._instructions += 1
                    # an answer longer than the window allows is passed over, so a short
                    # --seq-len trains on the pairs that fit
                    if len(answer_ids) <= self.max_answer_tokens:
                        sample = self._instruction(prompt_ids, answer_ids)
                    else:
                        self._pass_over(answer_ids)
            if sample is None:
                if causal:
                    sample = self.causal_sample(buf[: L + 1])
                elif self.rng.random() < self.config.gmask_prob:
                    sample = self.gmask_sample(buf[:L])
                elif self.config.smask_prob > 0 and self.rng.random() < self.config.smask_prob:
                    sample = self.smask_sample(buf[:L])
                else:
                    sample = self.mask_sample(buf[:L])
                del buf[: sample.num_source_tokens]
                self._tokens += sample.num_source_tokens
            self._samples += 1
            if skip > 0:
                skip -= 1
                continue
            yield sample

    def _stream(self, documents: Iterable[Sequence[int]], start: int) -> Iterator[list[int]]:
        """Documents + eos as pieces of at most seq_len tokens, the first `start` tokens dropped."""
        if isinstance(documents, (str, bytes)):
            raise TypeError("documents must be an iterable of token-id lists, not a string")
        L = self.config.seq_len
        for index, doc in enumerate(documents):
            tokens = _token_list(doc, f"document {index}")
            if not tokens:
                continue
            tokens.append(self.ids.eos)
            if start >= len(tokens):
                start -= len(tokens)
                continue
            tokens, start = tokens[start:], 0
            for i in range(0, len(tokens), L):
                yield tokens[i : i + L]

    # -- one sample per mode -----------------------------------------------------------------
    def mask_sample(self, tokens: Sequence[int]) -> Sample:
        """[MASK] spans over a prefix of `tokens` (up to seq_len); `num_source_tokens` says how long."""
        window = _token_list(tokens, "tokens", allow_empty=False)
        L = self.config.seq_len
        W = min(len(window), L)
        drawn: list[int] = []
        while True:
            lengths = self._fit_spans(drawn, self._mask_target(W))
            if W + 2 * len(lengths) <= L:
                break
            W = max(1, min(W - 1, L - 2 * len(lengths)))
        lengths = [lengths[i] for i in self.rng.permutation(len(lengths))]
        free = W - sum(lengths) - (len(lengths) - 1)  # unmasked tokens beyond one per gap
        places = sorted(int(p) for p in self.rng.integers(0, free + 1, size=len(lengths)))
        spans, offset = [], 0
        for place, n in zip(places, lengths, strict=True):
            spans.append((offset + place, offset + place + n))
            offset += n + 1
        return self._infill(window[:W], spans, self.ids.mask, "mask")

    def smask_sample(self, tokens: Sequence[int]) -> Sample:
        """Whole-sentence [sMASK] spans; falls back to `mask_sample` when no sentence fits."""
        if self._is_sentence_end is None:
            raise ValueError("smask_sample needs the builder's sentence_end argument")
        window = _token_list(tokens, "tokens", allow_empty=False)
        L, ratio = self.config.seq_len, self.config.mask_ratio
        avail = min(len(window), L)
        sentences, start = [], 0
        for i in range(avail):
            if window[i] == self.ids.eos or self._is_sentence_end(window[i]):
                sentences.append((start, i + 1))
                start = i + 1
        if start < avail:
            sentences.append((start, avail))
        chosen: set[int] = set()
        masked, last_end = 0, 0
        for idx in (int(i) for i in self.rng.permutation(len(sentences))):
            if masked >= ratio * min(avail, L - 2 * len(chosen)):
                break
            s, e = sentences[idx]
            W = min(avail, L - 2 * (len(chosen) + 1))  # the window if this sentence is taken
            fits = max(last_end, e) <= W and masked + (e - s) <= max(1, int(2 * ratio * W + 0.5))
            if fits and idx - 1 not in chosen and idx + 1 not in chosen:
                chosen.add(idx)
                masked += e - s
                last_end = max(last_end, e)
        if not chosen:
            return self.mask_sample(window)
        W = min(avail, L - 2 * len(chosen))
        return self._infill(window[:W], [sentences[i] for i in sorted(chosen)], self.ids.smask, "smask")

    def gmask_sample(self, tokens: Sequence[int]) -> Sample:
        """Cut a random suffix off a prefix of `tokens` (up to seq_len - 2) and generate it."""
        window = _token_list(tokens, "tokens", allow_empty=False)
        W = min(len(window), self.config.seq_len - 2)
        lo = max(1, int(self.config.gmask_min_ratio * W))
        n = int(self.rng.integers(lo, W + 1))
        prefix, suffix = window[: W - n], window[W - n : W]
        block = Block(mask_position=len(prefix), length=n + 1, continues=True)
        return self._assemble(prefix + [self.ids.gmask], [block], [suffix], "gmask", W)

    def _instruction(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> Sample:
        if self.config.objective == "causal":
            return self.causal_instruction_sample(prompt_ids, answer_ids)
        return self.instruction_sample(prompt_ids, answer_ids)

    def _pass_over(self, answer_ids: Sequence[int]) -> None:
        """A pair whose answer the window cannot hold is skipped (Python warns once), so a short
        --seq-len trains on the pairs that fit."""
        warnings.warn(f"instruction answers longer than the {self.config.seq_len}-token window allows are passed "
                      f"over (one of {len(answer_ids)} tokens)", RuntimeWarning, stacklevel=3)

    def _packed_instructions(self, pairs: _Pairs) -> Sample | None:
        """One row of as many instruction pairs as fit, in stream order, each its own segment: its
        own positions from 0 and attention only inside it (`Sample.segments`). The first pair of
        a row is `instruction_sample`'s (a long prompt loses its start); a later pair that does not
        fit whole waits for the next instruction row. None when the pairs have run out."""
        L = self.config.seq_len
        parts: list[Sample] = []
        lengths: list[int] = []
        used = 0
        while (pair := pairs.peek()) is not None:
            prompt_ids, answer_ids = _unpack_pair(pair)
            if len(answer_ids) > self.max_answer_tokens:
                pairs.take()
                self._instructions += 1
                self._pass_over(answer_ids)
                continue
            part = self._instruction(prompt_ids, answer_ids)
            n = int(part.loss_mask.nonzero().max()) + 1  # through the last token with a loss
            if parts and n > L - used:
                break
            pairs.take()
            self._instructions += 1
            parts.append(part)
            lengths.append(n)
            used += n
        if not parts:
            return None
        return self._pack(parts, lengths)

    def _pack(self, parts: list[Sample], lengths: list[int]) -> Sample:
        """Samples side by side in one row: each one's first `lengths` tokens, then padding."""
        L, ids = self.config.seq_len, self.ids
        pos_dims = parts[0].position_ids.shape[:-1]
        input_ids = torch.full((L,), ids.pad, dtype=torch.long)
        targets = torch.full((L,), ids.pad, dtype=torch.long)
        positions = torch.zeros((*pos_dims, L), dtype=torch.long)
        loss_mask = torch.zeros(L, dtype=torch.float)
        starts = torch.arange(L)  # padding: its own segment, context 0 (itself only)
        ends = torch.zeros(L, dtype=torch.long)
        at = 0
        for part, n in zip(parts, lengths, strict=True):
            span = slice(at, at + n)
            input_ids[span], targets[span], loss_mask[span] = part.input_ids[:n], part.targets[:n], part.loss_mask[:n]
            positions[..., span] = part.position_ids[..., :n]
            starts[span], ends[span] = at, at + part.context_length
            at += n
        return Sample(
            input_ids=input_ids, position_ids=positions, context_length=parts[0].context_length, targets=targets,
            loss_mask=loss_mask, mode="instruction", blocks=tuple(b for p in parts for b in p.blocks),
            num_source_tokens=0, segments=torch.stack((starts, ends)),
        )

    @property
    def max_answer_tokens(self) -> int:
        """The longest instruction answer a window holds: GLM's [gMASK] and `<sop>` take one token
        each, the causal objective's `<eos>` one."""
        return self.config.seq_len - (1 if self.config.objective == "causal" else 2)

    def _check_answer(self, answer: Sequence[int]) -> None:
        if len(answer) > self.max_answer_tokens:
            raise ValueError(f"instruction answer of {len(answer)} tokens cannot fit seq_len {self.config.seq_len} "
                             f"(at most {self.max_answer_tokens})")

    def instruction_sample(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> Sample:
        """Part A = prompt + [gMASK], Part B = `<sop>` + answer; a long prompt loses its start."""
        prompt = _token_list(prompt_ids, "prompt_ids")
        answer = _token_list(answer_ids, "answer_ids", allow_empty=False)
        self._check_answer(answer)
        room = self.config.seq_len - 2 - len(answer)  # [gMASK] and <sop> take one each
        prompt = prompt[len(prompt) - room :] if len(prompt) > room else prompt
        block = Block(mask_position=len(prompt), length=len(answer) + 1, continues=True)
        return self._assemble(prompt + [self.ids.gmask], [block], [answer], "instruction", 0)

    def causal_sample(self, tokens: Sequence[int]) -> Sample:
        """The first min(len, seq_len) tokens as inputs, each predicting the token after it; the
        last input's target is token seq_len when given (the next sample starts there), else it
        has no target (the end of the stream). Uses (consumes) the inputs only."""
        window = _token_list(tokens, "tokens", allow_empty=False)
        L, ids = self.config.seq_len, self.ids
        n = min(len(window), L)
        targets = window[1 : n + 1]
        loss_mask = torch.zeros(L, dtype=torch.float)
        loss_mask[: len(targets)] = 1.0
        return Sample(
            input_ids=torch.tensor(window[:n] + [ids.pad] * (L - n), dtype=torch.long),
            position_ids=torch.cat((torch.arange(n), torch.zeros(L - n, dtype=torch.long))),
            context_length=0,
            targets=torch.tensor(targets + [ids.pad] * (L - len(targets)), dtype=torch.long),
            loss_mask=loss_mask,
            mode="causal",
            blocks=(),
            num_source_tokens=n,
        )

    def causal_instruction_sample(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> Sample:
        """prompt + answer + `<eos>`, causal; the loss on the answer and `<eos>`. A long prompt
        loses its start, as in `instruction_sample`."""
        prompt = _token_list(prompt_ids, "prompt_ids")
        answer = _token_list(answer_ids, "answer_ids", allow_empty=False)
        self._check_answer(answer)
        answer.append(self.ids.eos)
        L = self.config.seq_len
        prompt = prompt[max(0, len(prompt) - (L + 1 - len(answer))) :]
        if not prompt:  # the first answer token needs an input to be predicted from
            prompt = [self.ids.eos]
        sample = self.causal_sample(prompt + answer)
        sample.loss_mask[: len(prompt) - 1] = 0.0
        sample.mode, sample.num_source_tokens = "instruction", 0
        return sample

    # -- helpers -----------------------------------------------------------------------------
    def _mask_target(self, W: int) -> int:
        return max(1, int(self.config.mask_ratio * W + 0.5))

    def _fit_spans(self, drawn: list[int], target: int) -> list[int]:
        """Span lengths covering exactly `target` tokens: draw more into `drawn` as needed, trim the last."""
        while sum(drawn) < target:
            n = 0
            while n == 0:
                n = int(self.rng.poisson(self.config.poisson_lambda))
            drawn.append(min(n, self.config.max_span))
        out, total = [], 0
        for n in drawn:
            if total >= target:
                break
            out.append(min(n, target - total))
            total += out[-1]
        return out

    def _infill(self, window: list[int], spans: list[tuple[int, int]], mask_id: int, mode: str) -> Sample:
        """Replace each sorted (start, end) span by `mask_id`; Part-B blocks in shuffled order."""
        part_a, mask_positions, last = [], [], 0
        for s, e in spans:
            part_a.extend(window[last:s])
            mask_positions.append(len(part_a))
            part_a.append(mask_id)
            last = e
        part_a.extend(window[last:])
        order = [int(i) for i in self.rng.permutation(len(spans))]
        blocks = [Block(mask_positions[i], spans[i][1] - spans[i][0] + 1) for i in order]
        pieces = [window[spans[i][0] : spans[i][1]] for i in order]
        return self._assemble(part_a, blocks, pieces, mode, len(window))

    def _assemble(
        self, part_a: list[int], blocks: list[Block], pieces: list[list[int]], mode: str, used: int
    ) -> Sample:
        L, ids = self.config.seq_len, self.ids
        inputs, targets = list(part_a), [ids.pad] * len(part_a)
        for piece in pieces:
            inputs += [ids.sop] + piece
            targets += piece + [ids.eop]
        n, ctx = len(inputs), len(part_a)
        if n > L:  # a bug in this module, not bad input
            raise RuntimeError(f"internal error: {mode} sample of {n} tokens exceeds seq_len {L}")
        pos = position_ids(ctx, blocks, self.config.two_d)
        pos = torch.nn.functional.pad(pos, (0, L - n))
        loss_mask = torch.zeros(L, dtype=torch.float)
        loss_mask[ctx:n] = 1.0
        return Sample(
            input_ids=torch.tensor(inputs + [ids.pad] * (L - n), dtype=torch.long),
            position_ids=pos,
            context_length=ctx,
            targets=torch.tensor(targets + [ids.pad] * (L - n), dtype=torch.long),
            loss_mask=loss_mask,
            mode=mode,
            blocks=tuple(blocks),
            num_source_tokens=used,
        )


def collate(samples: Sequence[Sample], segments: bool = False) -> dict[str, torch.Tensor]:
    """Stack samples into a batch: input_ids, position_ids, targets, loss_mask, context_lengths [B];
    and segments [B, 2, L] (masks.attention_allowed) when a sample packs several pairs, or always
    with `segments` (a run that packs: every batch then has the same inputs, so a compiled model
    or a pipeline schedule sees one signature)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    shapes = {(tuple(s.input_ids.shape), tuple(s.position_ids.shape)) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples differ in seq_len or position layout: {sorted(shapes)}")
    batch = {
        "input_ids": torch.stack([s.input_ids for s in samples]),
        "position_ids": torch.stack([s.position_ids for s in samples]),
        "targets": torch.stack([s.targets for s in samples]),
        "loss_mask": torch.stack([s.loss_mask for s in samples]),
        "context_lengths": torch.tensor([s.context_length for s in samples], dtype=torch.long),
    }
    if segments or any(s.segments is not None for s in samples):
        L = samples[0].input_ids.shape[-1]
        batch["segments"] = torch.stack([
            s.segments if s.segments is not None
            else torch.stack((torch.zeros(L, dtype=torch.long), torch.full((L,), s.context_length)))
            for s in samples])
    return batch


# -- instruction data ------------------------------------------------------------------------
class InstructionFormatError(GLMError, ValueError):
    """An instruction JSONL file with a line that is not a {"prompt": str, "answer": str} object."""


def read_instructions(path: str | Path) -> Iterator[dict[str, str]]:
    """Yield {"prompt", "answer"} dicts from a JSONL file (blank lines skipped, extra keys dropped)."""
    for where, record in read_jsonl(path, InstructionFormatError):
        for key in ("prompt", "answer"):
            if key not in record:
                raise InstructionFormatError(f"{where}: missing field {key!r}")
            if not isinstance(record[key], str):
                raise InstructionFormatError(
                    f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}"
                )
        yield {"prompt": record["prompt"], "answer": record["answer"]}


def encode_instructions(
    records: Iterable[dict[str, str]], encode: Callable[[str], Sequence[int]]
) -> Iterator[tuple[list[int], list[int]]]:
    """Tokenise {"prompt", "answer"} records into the (prompt_ids, answer_ids) pairs `samples()` takes."""
    for record in records:
        yield list(encode(record["prompt"])), list(encode(record["answer"]))


# -- small input checks ----------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _token_list(tokens, what: str, allow_empty: bool = True) -> list[int]:
    """A fresh list of python ints, or a clear error for strings, floats and other non-ids."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
        raise TypeError(f"{what} must be a sequence of token ids, got {type(tokens).__name__}")
    tokens = list(tokens)
    try:
        out = [operator.index(t) for t in tokens]
    except TypeError:
        bad = next(t for t in tokens if not _is_int(t))
        raise TypeError(f"{what} must hold integer token ids, found {bad!r}") from None
    if not allow_empty and not out:
        raise ValueError(f"{what} is empty")
    if out and min(out) < 0:
        raise ValueError(f"{what} holds a negative token id {min(out)}")
    return out


class _Pairs:
    """The instruction pairs with one of lookahead: a packed row looks at the next pair before it
    takes it (a pair left for the next row is not counted as consumed, so resume finds it again)."""

    def __init__(self, pairs: Iterable):
        self._it, self._head, self._has = iter(pairs), None, False

    def peek(self):
        if not self._has:
            self._head, self._has = next(self._it, None), True
        return self._head

    def take(self):
        pair = self.peek()
        self._has = False
        return pair


def _unpack_pair(pair) -> tuple[Sequence[int], Sequence[int]]:
    try:
        prompt, answer = pair
    except (TypeError, ValueError):
        raise TypeError(f"instructions must yield (prompt_ids, answer_ids) pairs, got {pair!r:.80}") from None
    return prompt, answer

