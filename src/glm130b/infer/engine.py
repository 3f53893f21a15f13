"""The decoding engine: GLM's KV-cache layout, batching, sampling, beam search, streaming.

Layout (docs/inference.md). A batch of contexts (Part A, with their blanks) of different lengths
is right-padded to the longest, P, and encoded once, bidirectionally; pad keys are masked out.
Generated tokens (Part B: `<sop>` and what follows) go to cache slots P, P+1, ... for every
row and attend the row's own context plus every generated slot, causally:

    allowed[b, j] = j < context_length[b]  or  P <= j <= current slot.

Positions follow masks.py: a [MASK]/[sMASK] block repeats its blank's position, a [gMASK]
block continues counting after the context (after the context and the earlier blocks, when
several blocks share one cache).

The engine runs GLMModel's own forward, asking for logits only at the token of each row that
needs them (never the whole prefill). The activations are FP32 unless the model's LayerNorms are
in another dtype, so BF16 / INT8 / INT4 weights run with FP32 activations. On the CPU, decode
steps and short prefills run the same math in one C++ call for the whole stack
(infer/fused.py) when the model allows it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.distributed.tensor import DTensor

from glm130b.errors import GLMError
from glm130b.model.kv_cache import KVCache, StaticKVCache
from glm130b.model.masks import Block, prefill_inputs, step_allowed, step_positions

KV_ENV = "GLM130B_KV_CACHE"
# Every decode step runs as one fused C++ step, and so does a prefill of B rows x L tokens while
# B * L * L (its attention's work) is at most this: a server's joining requests (measured on
# glm-small: 1 x 6 tokens 4.7 -> 3.1 ms, 8 x 6 14.6 -> 11.6 ms; at 1 x 32 both paths take the same
# time). Longer prefills use the modules (SDPA, and BLAS for long ones).
FUSED_PREFILL_WORK = 512


class GenerationError(GLMError, ValueError):
    """Bad generation settings (temperature, top-p, beams, lengths)."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. `strategy`: "greedy", "sample" or "beam".

    Sampling: `temperature` divides the logits, then `top_k` (0 = off) keeps the k largest and
    `top_p` (1.0 = off) the smallest set whose FP32 softmax mass reaches p; `seed` makes a run
    reproducible (same seed, same prompts, same batch -> same tokens).
    Beam search: `num_beams` hypotheses, scored by the summed log-probability divided by the
    GNMT length penalty ((5 + length) / 6) ** `length_penalty`.
    All: at least `min_new_tokens` (stop tokens are blocked before), at most `max_new_tokens`;
    `no_repeat_ngram_size` n > 0 forbids any n-gram to appear twice in a block; generation stops
    at `<eop>`/`<eos>` or when the text contains one of `stop_strings` (cut before it).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise GenerationError(msg)

        need(self.strategy in ("greedy", "sample", "beam"),
             f"strategy must be greedy, sample or beam, got {self.strategy!r}")
        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        need(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        need(math.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0, got {self.temperature!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0, got {self.top_k!r}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.num_beams, int) and self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams!r}")
        need(math.isfinite(self.length_penalty), "length_penalty must be finite")
        need(isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
             f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size!r}")
        need(all(isinstance(s, str) and s for s in self.stop_strings), "stop strings must be non-empty strings")
        need(self.seed is None or -(2**63) <= self.seed < 2**64,  # torch.Generator's range (#20)
             f"seed must be in [-2**63, 2**64), got {self.seed!r}")


GREEDY = GenerationConfig()


# --------------------------------------------------------------------------------------------
# The forward pass
# --------------------------------------------------------------------------------------------
class Engine:
    """Runs a GLMModel (plain, quantized or with fast linears) for generation: GLMModel's own
    forward, or on the CPU the fused C++ step for decode steps and short prefills."""

    def __init__(self, model, fused_decode: bool = True, kv_dtype: torch.dtype | None = None,
                 compile_decode: bool | str | None = None):
        self.model = model
        # gpt-fast's decode: a static cache and one compiled step (a CUDA graph on a GPU). None:
        # the model's own setting (GLMModel.compile_decode, set by --compile); a str: the
        # torch.compile mode ("eager" = the static-cache step uncompiled, for tests).
        chosen = getattr(model, "compile_decode", False) if compile_decode is None else compile_decode
        self.compile_decode = chosen is not False and chosen is not None
        # decode steps and short prefills in one C++ call (infer/fused.py). Built at the first step,
        # and rebuilt when a prefill finds the weights replaced since.
        self.fused_decode = fused_decode
        self._fused = None
        self._fused_key = None
        self.config = model.config
        self.two_d = self.config.rotary == "2d"
        self.device = model.final_layernorm.weight.device
        self.dtype = model.final_layernorm.weight.dtype  # activations
        self.kv_dtype = kv_dtype or self._default_kv_dtype()
        self._decoder = None
        if self.compile_decode:
            from glm130b.infer.compiled import CompiledDecoder

            self._decoder = CompiledDecoder(model, None if chosen is True else chosen)

    def new_cache(self, rows: int, max_len: int, pooled: bool = True) -> KVCache:
        """A cache for `rows` sequences of `max_len` tokens. With the compiled step: a static cache,
        reused per shape with its length rounded up (infer/compiled.py); `pooled=False` gives one
        of its own (a server's cache, held for its whole life)."""
        if self._decoder is not None:
            if not pooled:
                return self.model.new_kv_cache(rows, max_len, self.kv_dtype, static=True)
            from glm130b.infer.compiled import static_cache

            return static_cache(self.model, rows, max_len, self.kv_dtype)
        return self.model.new_kv_cache(rows, max_len, self.kv_dtype)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, cache: KVCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run ids [B, L] into the cache's selected rows; return FP32 logits [B, V] at token
        `logits_at` [B] of each row (None: no logits, e.g. a prefill that only fills the cache)."""
        if ids.shape[1] > 1:
            self._check_fused_weights()
        short = ids.shape[1] == 1 or ids.numel() * ids.shape[1] <= FUSED_PREFILL_WORK
        if self.fused_decode and short and cache.k[0].dtype in (torch.float32, torch.float16):
            fused = self._fused_decoder()
            if fused is not None:  # decode steps and short prefills in one C++ call
                logits = fused.step(ids, positions, allowed, cache, logits_at)
                cache.advance(ids.shape[1])
                return logits
        logits = self.model(ids, positions, allowed=allowed, cache=cache, logits_at=logits_at,
                            logits=logits_at is not None)
        if logits is None:
            return None
        if isinstance(logits, DTensor):  # tensor parallel: vocabulary-sharded logits
            logits = logits.full_tensor()
        return logits.float()

    def _default_kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: FP16 where the fused CPU step decodes (half the cache's memory and
        half its reads per token, as llama.cpp's default; the attention math stays FP32: 1.3x
        faster decoding at a 1,000-token context), else the activations' dtype.
        $GLM130B_KV_CACHE=fp32 (or fp16) overrides."""
        choice = os.environ.get(KV_ENV, "").lower()
        if choice in ("fp32", "float32"):
            return torch.float32
        if choice in ("fp16", "float16"):
            return torch.float16
        if choice:
            raise GenerationError(f"${KV_ENV} must be fp16 or fp32, got {choice!r}")
        from glm130b.infer.fused import why_not

        fused = self.fused_decode and not self.compile_decode and self.device.type == "cpu" and self.dtype == torch.float32 and \
            why_not(self.model) is None
        return torch.float16 if fused else self.dtype

    def _fused_decoder(self):
        """The FusedDecoder of the model's current weights, or None (the modules decode)."""
        from glm130b.infer.fused import FusedDecoder, weights_key

        if self._fused is None:
            self._fused = FusedDecoder.for_model(self.model) or False
            self._fused_key = weights_key(self.model)
        return self._fused or None

    def _check_fused_weights(self) -> None:
        """At each prefill: if the model's weights or modules were replaced since the fused stack
        was built (load_state_dict(assign=True), quantize_model, .to(), ...), build it again."""
        if self._fused is not None:
            from glm130b.infer.fused import weights_key

            if weights_key(self.model) != self._fused_key:
                self._fused = None

    def prefill_inputs(self, contexts: Sequence[Sequence[int]], pad_id: int = 0):
        """masks.prefill_inputs on this engine's device: (ids, positions, allowed)."""
        return prefill_inputs(contexts, self.two_d, pad_id, self.device)

    def step(self, tokens: Sequence[int] | torch.Tensor, cache: KVCache, blocks: Sequence[Block],
             firsts: Sequence[int], steps: Sequence[int], contexts, generated_from,
             logits: bool = True) -> torch.Tensor | None:
        """One decoding step, the one every decoder takes (Batch for greedy/sampled rows and beam
        search, the serving batcher): token b goes to slot cache.lengths[b] of the selected rows,
        at masks.step_positions, seeing masks.step_allowed (its context, and its Part B from
        `generated_from[b]`); FP32 logits [B, V] for the next token (unless logits=False)."""
        dev = self.device
        slots = cache.lengths[cache.rows]
        if self._decoder is not None and isinstance(cache, StaticKVCache):  # the compiled step
            from glm130b.infer.compiled import step_inputs

            positions = step_positions(blocks, firsts, steps, self.two_d)
            return self._decoder.step(step_inputs(tokens, contexts, generated_from, slots, positions), cache, logits)
        allowed = step_allowed(contexts, generated_from, slots, int(slots.max()) + 1, device=dev)
        positions = step_positions(blocks, firsts, steps, self.two_d, device=dev)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=dev).view(-1, 1)
        at = torch.zeros(ids.shape[0], dtype=torch.long, device=dev) if logits else None
        return self.forward(ids, positions, allowed, cache, logits_at=at)


@dataclass
class Row:
    """One sequence being generated: its context, its blank, and what it has produced."""

    context: list[int]
    block: Block
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    text_end: int | None = None  # where a stop string cut the text, in characters
    score: float | None = None  # beam search: the hypothesis's length-penalised log-probability


class Batch:
    """Contexts of different lengths in one cache; generated tokens share the slots after P."""

    def __init__(self, engine: Engine, rows: Sequence[Row], max_new_tokens: int, pad_id: int = 0,
                 first_position: Sequence[int] | None = None):
        self.engine = engine
        self.rows = list(rows)
        self.ctx = torch.tensor([len(r.context) for r in self.rows])
        self.P = int(self.ctx.max())
        # where a continuing ([gMASK]) block starts counting: after the context (and earlier blocks)
        self.first = list(first_position) if first_position is not None else [len(r.context) for r in self.rows]
        self.cache = engine.new_cache(len(self.rows), self.P + max_new_tokens)
        engine.forward(*engine.prefill_inputs([r.context for r in self.rows], pad_id), self.cache)
        self.step = 0  # tokens fed in the current block

    def next_block(self, rows: Sequence[Row], first_position: Sequence[int]) -> None:
        """Start a new Part-B block in the same cache (the earlier blocks stay visible, causally)."""
        self.rows = list(rows)
        self.first = list(first_position)
        self.step = 0

    def room(self) -> int:
        return self.cache.room()

    def feed(self, tokens: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Feed one token per row [B]; FP32 logits [B, V] for the next (unless logits=False)."""
        out = self.engine.step(tokens, self.cache, [r.block for r in self.rows], self.first,
                               [self.step] * len(self.rows), self.ctx, self.P, logits)
        self.step += 1
        return out

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i continues row index[i] (cache rows are gathered)."""
        self.cache.reorder(index)


# --------------------------------------------------------------------------------------------
# Logits processing
# --------------------------------------------------------------------------------------------
def banned_ngram_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram already in `tokens`."""
    if n <= 0:
        return set()
    if n == 1:
        return set(tokens)
    if len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1 :])
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}


def process_logits(logits: torch.Tensor, rows: Sequence[Row], cfg: GenerationConfig | Sequence[GenerationConfig],
                   stop_ids: set[int], vocab_limit: int | None = None) -> torch.Tensor:
    """Apply min length, no-repeat-ngram and the vocabulary limit (in place on FP32 logits).
    `cfg`: the rows' settings, or one per row (the serving batcher's requests)."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = -math.inf
    cfgs = [cfg] * len(rows) if isinstance(cfg, GenerationConfig) else cfg
    for i, (r, cfg) in enumerate(zip(rows, cfgs, strict=True)):
        if len(r.tokens) < cfg.min_new_tokens and stop_ids:
            logits[i, list(stop_ids)] = -math.inf
        if cfg.no_repeat_ngram_size:
            banned = banned_ngram_tokens(r.tokens, cfg.no_repeat_ngram_size)
            if banned:
                logits[i, list(banned)] = -math.inf
    return logits


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or temperature / top-k / top-p sampling with an FP32 softmax. [B, V] -> [B]."""
    if cfg.strategy == "greedy":
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        drop = before >= cfg.top_p
        drop[..., 0] = False  # the top token always stays (a top_p below FP32's range would drop it)
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
TokenCallback = Callable[[int, int], None]  # (row index, token)


def stop_cut(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text` (None: none is there). The engine, the
    serving batcher and the text stream all cut here."""
    cuts = [c for c in (text.find(s) for s in stop_strings) if c >= 0]
    return min(cuts) if cuts else None


def _check_stop_strings(row: Row, cfg: GenerationConfig, decode) -> None:
    """Mark the row done, with its text cut, once its text holds a stop string."""
    if not cfg.stop_strings or decode is None:
        return
    cut = stop_cut(decode(row.tokens), cfg.stop_strings)
    if cut is not None:
        row.text_end, row.done = cut, True


def generate_rows(engine: Engine, rows: Sequence[Row], cfg: GenerationConfig, sop_id: int, stop_ids: set[int],
                  on_token: TokenCallback | None = None, decode=None, pad_id: int = 0,
                  first_position: Sequence[int] | None = None, vocab_limit: int | None = None,
                  batch: Batch | None = None, generator: torch.Generator | None = None) -> list[Row]:
    """Greedy or sampled generation of every row's block, batched; tokens stream to on_token.

    With `batch`, the rows' blocks continue an existing cache (several blanks of one prompt);
    otherwise the contexts are encoded first. The cache must have room for max_new_tokens.
    """
    if cfg.strategy == "beam":
        raise GenerationError("beam search runs one prompt at a time: use beam_search")
    rows = list(rows)
    if batch is None:
        batch = Batch(engine, rows, cfg.max_new_tokens, pad_id, first_position)
    else:
        batch.next_block(rows, first_position or [len(r.context) for r in rows])
    if cfg.strategy == "sample" and generator is None:
        generator = make_generator(cfg.seed)
    tokens = torch.full((len(rows),), sop_id, dtype=torch.long, device=engine.device)
    for step in range(cfg.max_new_tokens):
        logits = batch.feed(tokens)
        process_logits(logits, rows, cfg, stop_ids, vocab_limit)
        nxt = sample_next(logits.cpu() if generator is not None else logits, cfg, generator).tolist()
        for i, r in enumerate(rows):
            if r.done:
                continue
            t = nxt[i]
            if t in stop_ids:
                r.done = True
                continue
            r.tokens.append(t)
            if on_token is not None:
                on_token(i, t)
            _check_stop_strings(r, cfg, decode)
        if all(r.done for r in rows) or step == cfg.max_new_tokens - 1:
            break
        tokens = torch.tensor([r.tokens[-1] if r.tokens and not r.done else pad_id for r in rows],
                              dtype=torch.long, device=engine.device)
    return rows


def feed_last(batch: Batch, rows: Sequence[Row], pad_id: int = 0) -> None:
    """Put each row's last generated token into the cache if it is not there yet (a block cut by
    max_new_tokens or a stop string), so a following block sees the whole of this one."""
    fed = batch.step  # tokens fed in this block: <sop> + fed - 1 generated
    if any(len(r.tokens) >= fed for r in rows):
        tokens = [r.tokens[fed - 1] if len(r.tokens) >= fed else pad_id for r in rows]
        batch.feed(torch.tensor(tokens, dtype=torch.long, device=batch.engine.device), logits=False)


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


BANNED = -65504.0  # GLM-130B's beam search sets banned logits to FP16's lowest, before log_softmax


def beam_search(engine: Engine, row: Row, cfg: GenerationConfig, sop_id: int, stop_ids: set[int],
                decode=None, pad_id: int = 0, first_position: int | None = None,
                vocab_limit: int | None = None) -> Row:
    """The best hypothesis of `beam_hypotheses` (a new Row, end token excluded)."""
    return beam_hypotheses(engine, row, cfg, sop_id, stop_ids, decode, pad_id, first_position, vocab_limit)[0]


def beam_hypotheses(engine: Engine, row: Row, cfg: GenerationConfig, sop_id: int, stop_ids: set[int],
                    decode=None, pad_id: int = 0, first_position: int | None = None,
                    vocab_limit: int | None = None) -> list[Row]:
    """Beam search for one row as GLM-130B's `BeamSearchStrategy(deterministic=True,
    consider_end=True)` does it; returns the finished hypotheses, best first (Rows with
    `score` set to the penalised score, end token excluded).

    * Each step takes the top `(max(1, #end ids) + 1) * num_beams` candidates of the FP32
      softmax over all beams' summed log-probabilities (the first step from one beam), sorted by
      score; an end id (`<eop>`, `<eos>`) finishes its hypothesis, the first `num_beams` others
      continue, and the first other candidate past them ends the step.
    * A finished hypothesis scores sum(log p) / ((5 + len) / 6) ** length_penalty, where len is
      the WHOLE sequence: context, `<sop>`, the generated tokens and the end id. The best
      `num_beams` are kept.
    * Search ends when `num_beams` hypotheses are finished and the worst beats the best running
      score at the next length, or after max_new_tokens steps (the running beams then count as
      finished, without an end id).
    * No-repeat n-grams (n >= 2) are banned by setting the logit to -65504 before log_softmax,
      from n-grams whose last token was generated (the prefix may reach into the context); n = 1
      bans every generated token. min_new_tokens bans the end ids the same way.
    Extension: a stop string in the text also finishes a hypothesis (its text is cut there).
    """
    nb = cfg.num_beams
    ends = sorted(stop_ids)
    n = cfg.no_repeat_ngram_size
    start = [first_position if first_position is not None else len(row.context)] * nb
    batch = Batch(engine, [replace(row, tokens=[], done=False) for _ in range(nb)], cfg.max_new_tokens, pad_id, start)
    prefix = list(row.context) + [sop_id]  # the official beam holds the whole sequence
    seqs = [prefix]  # live hypotheses (one before the first step)
    bans: list[dict] = [{}]
    scores = torch.zeros(1)
    finished: list[tuple[float, list[int], int | None]] = []  # (penalised score, sequence, text end)
    done = False

    def finish(score: float, seq: list[int], text_end: int | None = None) -> None:
        finished.append((score / length_penalty(len(seq), cfg.length_penalty), seq, text_end))
        finished.sort(key=lambda f: -f[0])  # stable: an equal score goes after the earlier ones
        del finished[nb:]

    tokens = torch.full((nb,), sop_id, dtype=torch.long, device=engine.device)
    for step in range(cfg.max_new_tokens):
        logits = batch.feed(tokens)[: len(seqs)].float().cpu()
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = BANNED
        if step < cfg.min_new_tokens:
            logits[:, ends] = BANNED
        if n > 0 and len(seqs[0]) > n:
            for i, seq in enumerate(seqs):
                banned = bans[i].get(tuple(seq[len(seq) - n + 1:]) if n > 1 else (), ())
                if banned:
                    logits[i, list(banned)] = BANNED
        flat = (torch.log_softmax(logits, dim=-1) + scores.view(-1, 1)).view(-1)
        vocab = logits.shape[-1]
        k = min((max(1, len(ends)) + 1) * nb, flat.numel())
        picked = torch.topk(torch.softmax(flat, dim=-1), k).indices
        cand_scores, order = torch.sort(flat[picked], descending=True)
        live, live_scores, live_bans, source = [], [], [], []
        for score, index in zip(cand_scores.tolist(), picked[order].tolist(), strict=True):
            b, t = divmod(index, vocab)
            seq = seqs[b] + [t]
            if t in stop_ids:
                finish(score, seq)
                continue
            if len(live) == nb:
                break
            text_end = None
            if cfg.stop_strings and decode is not None:
                text_end = stop_cut(decode(seq[len(prefix):]), cfg.stop_strings)
            if text_end is not None:
                finish(score, seq, text_end)
                continue
            if n > 0:
                grown = dict(bans[b])
                key = tuple(seqs[b][len(seqs[b]) - n + 1:]) if n > 1 else ()
                grown[key] = grown.get(key, ()) + (t,)
                live_bans.append(grown)
            live.append(seq)
            live_scores.append(score)
            source.append(b)
        if not live:
            done = True
            break
        seqs, bans, scores = live, live_bans or [{}] * len(live), torch.tensor(live_scores)
        if len(finished) == nb and finished[-1][0] >= max(live_scores) / length_penalty(len(seqs[0]),
                                                                                      cfg.length_penalty):
            done = True
            break
        if step == cfg.max_new_tokens - 1:
            break
        batch.reorder(torch.tensor(source + [source[0]] * (nb - len(source)), device=engine.device))
        tokens = torch.tensor([seq[-1] for seq in seqs] + [pad_id] * (nb - len(seqs)), dtype=torch.long,
                              device=engine.device)
    if not done:  # out of length: the running beams count as finished
        for seq, score in zip(seqs, scores.tolist(), strict=True):
            finish(score, seq)
    out = []
    for score, seq, text_end in finished:
        tokens = seq[len(prefix):]
        if tokens and tokens[-1] in stop_ids:
            tokens = tokens[:-1]
        out.append(Row(row.context, row.block, tokens, True, text_end, score))
    return out
