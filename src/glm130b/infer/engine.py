"""The decoding engine: GLM's KV-cache layout, batching, sampling, beam search, streaming.

Layout (docs/inference.md). A batch of contexts (Part A, with their blanks) of different lengths
is right-padded to the longest, P, and encoded once, bidirectionally; pad keys are masked out.
Generated tokens (Part B: `<sop>` and what follows) go to cache slots P, P+1, ... for every
row and attend the row's own context plus every generated slot, causally:

    allowed[b, j] = j < context_length[b]  or  P <= j <= current slot.

Positions follow masks.py: a [MASK]/[sMASK] block repeats its blank's position, a [gMASK]
block continues counting after the context (after the context and the earlier blocks, when
several blocks share one cache).

The engine runs GLMModel's own modules (embedding, blocks, final LayerNorm) in the model's order;
only the output head is its own: logits are computed for the rows that need them (the last
token of each row, never the whole prefill), with the fast GEMV of glm130b.quant.kernels. The
activations are FP32 unless the model's LayerNorms are in another dtype, so BF16 / INT8 / INT4
weights run with FP32 activations. On the CPU, decode steps and short prefills run the same math
in one C++ call for the whole stack (infer/fused.py) when the model allows it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from glm130b.errors import GLMError
from glm130b.model.attention import KVCache
from glm130b.model.masks import Block

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
    """Runs a GLMModel (plain, quantized or with fast linears) for generation."""

    def __init__(self, model, fast_head: bool = True, fused_decode: bool | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        self.fast_head = fast_head  # the output head through glm130b.quant.kernels (else F.linear)
        # decode steps and short prefills in one C++ call (infer/fused.py); default: with the fast
        # head. Built at the first step, and rebuilt when a prefill finds the weights replaced since.
        self.fused_decode = fast_head if fused_decode is None else fused_decode
        self._fused = None
        self._fused_key = None
        self.config = model.config
        self.two_d = self.config.rotary == "2d"
        self.device = model.final_layernorm.weight.device
        self.dtype = model.final_layernorm.weight.dtype  # activations
        self.kv_dtype = kv_dtype or self._default_kv_dtype()
        from torch.distributed.tensor import DTensor

        # the output head: the tied embedding table, an untied nn.Linear's weight, or a module
        # (a quantized head, glm130b.quant.quantize_head), called as it is
        self.head_module = None if model.lm_head is None or isinstance(model.lm_head, torch.nn.Linear) else model.lm_head
        self.head = None if self.head_module is not None else \
            model.word_embeddings.weight if model.lm_head is None else model.lm_head.weight
        self.vocab_parallel = isinstance(self.head, DTensor)  # a tensor-parallel model (infer/parallel.py)

    @property
    def local_heads(self) -> int:
        """Attention heads of this process (all of them, or nh / tp under tensor parallelism)."""
        return self.model.layers[0].attention.num_heads

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_layers, batch, self.local_heads, max_len, cfg.head_dim, self.kv_dtype, self.device)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, cache: KVCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run ids [B, L] into the cache; return FP32 logits [B, V] at token `logits_at` [B] of
        each row (None: no logits, e.g. a prefill that only fills the cache)."""
        if ids.shape[1] > 1:
            self._check_fused_weights()
        short = ids.shape[1] == 1 or ids.numel() * ids.shape[1] <= FUSED_PREFILL_WORK
        if self.fused_decode and short and hasattr(cache, "fused_view") and \
                self.kv_dtype in (torch.float32, torch.float16):
            fused = self._fused_decoder()
            if fused is not None:  # decode steps and short prefills in one C++ call
                logits = fused.step(ids, positions, allowed, cache, logits_at)
                cache.advance(ids.shape[1])
                return logits
        model = self.model
        h = model.word_embeddings(ids)
        if h.dtype != self.dtype:
            h = h.to(self.dtype)
        for block in model.layers:
            h = block(h, positions, allowed, cache)
        cache.advance(ids.shape[1])
        if logits_at is None:
            return None
        if h.shape[1] == 1:
            h = h[:, 0]
        else:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # [B, H]
        return self._head(model.final_layernorm(h))

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

        fused = self.fused_decode and self.device.type == "cpu" and self.dtype == torch.float32 and \
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
        """ids [B, P] (right-padded to the longest context), positions 0..P-1 (2D: block positions
        0) and the mask [B, 1, P, P] letting every token see its own row's context and no padding:
        the inputs that encode several contexts bidirectionally in one forward."""
        dev = self.device
        lengths = torch.tensor([len(c) for c in contexts], device=dev)
        longest = int(lengths.max())
        ids = torch.full((len(contexts), longest), pad_id, dtype=torch.long, device=dev)
        for i, context in enumerate(contexts):
            ids[i, : len(context)] = torch.tensor(context, dtype=torch.long)
        pos = torch.arange(longest, device=dev).expand(len(contexts), longest)
        if self.two_d:
            pos = torch.stack((pos, torch.zeros_like(pos)), dim=1)
        j = torch.arange(longest, device=dev)
        allowed = (j.view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)).expand(-1, 1, longest, -1)
        return ids, pos, allowed

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        from glm130b.quant.kernels import dense_linear

        if self.head_module is not None:
            return self.head_module(h).float()
        if self.vocab_parallel:
            return self._vocab_parallel_head(h)
        if self.fast_head:
            return dense_linear(h, self.head, None).float()
        w = self.head if self.head.dtype == h.dtype else self.head.to(h.dtype)
        return torch.nn.functional.linear(h, w).float()

    def _vocab_parallel_head(self, h) -> torch.Tensor:
        """Tensor parallel: the final LayerNorm's output is a replicated DTensor and the head is
        vocabulary-sharded; each rank computes its logits, then they are all-gathered."""
        from torch.distributed.tensor import DTensor, Shard

        h = h.to_local()
        local = torch.nn.functional.linear(h, self.head.to_local().to(h.dtype)).float()
        return DTensor.from_local(local, self.head.device_mesh, [Shard(local.dim() - 1)],
                                  run_check=False).full_tensor()

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Full logits [B, L, V] without a cache (for tests against GLMModel.forward)."""
        model = self.model
        h = model.word_embeddings(ids).to(self.dtype)
        for block in model.layers:
            h = block(h, positions, allowed, None)
        return self._head(model.final_layernorm(h))


@dataclass
class Row:
    """One sequence being generated: its context, its blank, and what it has produced."""

    context: list[int]
    block: Block
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    text_end: int | None = None  # where a stop string cut the text, in characters


class Batch:
    """Contexts of different lengths in one cache; generated tokens share the slots after P."""

    def __init__(self, engine: Engine, rows: Sequence[Row], max_new_tokens: int, pad_id: int = 0,
                 first_position: Sequence[int] | None = None):
        self.engine = engine
        self.rows = list(rows)
        dev = engine.device
        self.ctx = torch.tensor([len(r.context) for r in self.rows], device=dev)
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

    def positions(self, step: int) -> torch.Tensor:
        """Position ids [B, 1] (1D) or [B, 2, 1] (2D) of the step-th generated token of each row."""
        pos = [self.first[i] + step if r.block.continues else r.block.mask_position for i, r in enumerate(self.rows)]
        p = torch.tensor(pos, dtype=torch.long, device=self.engine.device).view(-1, 1)
        if self.engine.two_d:
            return torch.stack((p, torch.full_like(p, step + 1)), dim=1)
        return p

    def room(self) -> int:
        return self.cache.max_len - self.cache.seen

    def feed(self, tokens: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Feed one token per row [B]; FP32 logits [B, V] for the next (unless logits=False)."""
        k = self.cache.seen + 1
        j = torch.arange(k, device=self.engine.device).view(1, 1, 1, k)
        allowed = (j < self.ctx.view(-1, 1, 1, 1)) | (j >= self.P)
        at = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device) if logits else None
        out = self.engine.forward(tokens.view(-1, 1), self.positions(self.step), allowed, self.cache, logits_at=at)
        self.step += 1
        return out

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i continues row index[i] (cache rows are gathered)."""
        for layer in range(len(self.cache.k)):
            self.cache.k[layer] = self.cache.k[layer].index_select(0, index)
            self.cache.v[layer] = self.cache.v[layer].index_select(0, index)


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


def process_logits(logits: torch.Tensor, rows: Sequence[Row], cfg: GenerationConfig, stop_ids: set[int],
                   vocab_limit: int | None = None) -> torch.Tensor:
    """Apply min length, no-repeat-ngram and the vocabulary limit (in place on FP32 logits)."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = -math.inf
    for i, r in enumerate(rows):
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


def _check_stop_strings(row: Row, cfg: GenerationConfig, decode) -> None:
    if not cfg.stop_strings or decode is None:
        return
    text = decode(row.tokens)
    cuts = [text.find(s) for s in cfg.stop_strings]
    cuts = [c for c in cuts if c >= 0]
    if cuts:
        row.text_end = min(cuts)
        row.done = True


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


def beam_search(engine: Engine, row: Row, cfg: GenerationConfig, sop_id: int, stop_ids: set[int],
                decode=None, pad_id: int = 0, first_position: int | None = None,
                vocab_limit: int | None = None) -> Row:
    """Beam search for one row; returns the best finished hypothesis (a new Row)."""
    nb = cfg.num_beams
    beams = [replace(row, tokens=[], done=False) for _ in range(nb)]
    first = [first_position if first_position is not None else len(row.context)] * nb
    batch = Batch(engine, beams, cfg.max_new_tokens, pad_id, first)
    scores = torch.zeros(nb, dtype=torch.float64)
    scores[1:] = -math.inf  # all beams start identical: expand only the first
    finished: list[tuple[float, list[int], int | None]] = []
    tokens = torch.full((nb,), sop_id, dtype=torch.long, device=engine.device)
    for step in range(cfg.max_new_tokens):
        logits = batch.feed(tokens)
        process_logits(logits, beams, cfg, stop_ids, vocab_limit)
        logp = torch.log_softmax(logits.double().cpu(), dim=-1) + scores.view(-1, 1)
        vocab = logp.shape[1]
        top = torch.topk(logp.view(-1), min(2 * nb, logp.numel()))
        new_beams, new_scores, source = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if score == -math.inf:
                break
            b, t = divmod(flat, vocab)
            parent = beams[b]
            if t in stop_ids:
                finished.append((score / length_penalty(len(parent.tokens), cfg.length_penalty),
                                 list(parent.tokens), None))
                continue
            cand = Row(parent.context, parent.block, parent.tokens + [t])
            _check_stop_strings(cand, cfg, decode)
            if cand.done:
                finished.append((score / length_penalty(len(cand.tokens), cfg.length_penalty), cand.tokens,
                                 cand.text_end))
                continue
            new_beams.append(cand)
            new_scores.append(score)
            source.append(b)
            if len(new_beams) == nb:
                break
        if len(finished) >= nb or not new_beams:
            beams, scores = [], torch.zeros(0, dtype=torch.float64)
            break
        while len(new_beams) < nb:  # fewer live candidates than beams: pad with dead copies
            new_beams.append(new_beams[0])
            new_scores.append(-math.inf)
            source.append(source[0])
        beams = new_beams
        scores = torch.tensor(new_scores, dtype=torch.float64)
        if step == cfg.max_new_tokens - 1:
            break
        batch.reorder(torch.tensor(source, device=engine.device))
        batch.rows = beams
        tokens = torch.tensor([b.tokens[-1] for b in beams], dtype=torch.long, device=engine.device)
    for b, s in zip(beams, scores.tolist(), strict=True):  # out of length: live beams count as finished
        if s > -math.inf:
            finished.append((s / length_penalty(len(b.tokens), cfg.length_penalty), b.tokens, None))
    best = max(finished, key=lambda f: f[0])
    return Row(row.context, row.block, list(best[1]), True, best[2])
