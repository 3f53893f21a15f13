"""Continuous batching: one decoding loop that requests join and leave as they start and finish.

Every running request owns one row of a slotted KV cache. A row holds its own context (encoded
once, bidirectionally, when the request joins) followed by the tokens it has generated, so rows
of different lengths need no padding between context and Part B: a decoding step writes each
row's new key/value at that row's own length and lets it attend to everything before it,

    allowed[row, j] = j <= length[row].

Position ids are explicit (masks.py's rules, as in glm130b.infer.engine.Batch), so this layout
gives the same tokens as decoding the request alone. Live rows are kept in cache rows [0, n):
when a request leaves, the last live row is moved into its place, so each step is one batched
forward over a contiguous slice of the cache.

A request may have several blanks ([MASK]/[sMASK]/[gMASK]); their blocks follow each other in
the row, each seeing the context and the earlier blocks (glm130b.infer.generate's one-cache
infilling). Beam search is not served here (it needs several rows per request).

The batcher runs in one background thread. Requests come in through `submit` from any thread;
results go out through each job's `emit` callback (called on the batcher thread).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from glm130b.errors import GLMError
from glm130b.infer.engine import Engine, GenerationConfig, Row, make_generator, process_logits, sample_next
from glm130b.model.attention import fit_cache
from glm130b.model.masks import Block


class QueueFull(GLMError):
    """The waiting queue is at its bound: the client should retry later (HTTP 503)."""


@dataclass
class Event:
    """What a job's `emit` receives: a generated token, the end of a blank's block, or the end."""

    kind: str  # "token", "block_end", "done", "error"
    block: int = 0
    token: int | None = None
    reason: str | None = None  # block_end/done: "stop" (<eop>, <eos> or a stop string), "length", "cancelled"
    text_end: int | None = None  # block_end: a stop string cut the block's text here (characters)
    message: str | None = None
    tokens: list[int] | None = None  # block_end of a job that does not stream: the block's tokens


@dataclass
class Job:
    """One sequence to decode: a context with one or more blanks, filled left to right."""

    context: list[int]
    blocks: list[Block]
    config: GenerationConfig  # strategy "greedy" or "sample"; max_new_tokens per blank
    emit: Callable[[Event], None]
    stream: bool = True  # False: no per-token events; each block_end carries its tokens
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (a disconnected client); the row is freed at the next step."""
        self.cancelled = True


class SlotCache:
    """Keys/values of up to `slots` sequences, each with its own length."""

    def __init__(self, engine: Engine, slots: int, max_len: int):
        cfg = engine.config
        shape = (slots, engine.local_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=engine.kv_dtype, device=engine.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=engine.kv_dtype, device=engine.device) for _ in range(cfg.num_layers)]
        self.max_len = max_len

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class _Prefill:
    """The engine's cache interface for encoding contexts into rows [slot, slot + k) at once."""

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        rows, n = slice(self.slot, self.slot + k.shape[0]), k.shape[2]
        self.cache.k[layer][rows, :, :n] = fit_cache(k, self.cache.k[layer].dtype)
        self.cache.v[layer][rows, :, :n] = fit_cache(v, self.cache.v[layer].dtype)
        return self.cache.k[layer][rows, :, :n].to(k.dtype), self.cache.v[layer][rows, :, :n].to(v.dtype)

    def fused_view(self, batch: int, length: int):
        """For the fused step (infer/fused.py): cache rows [slot, slot + batch) from slot 0."""
        rows = slice(self.slot, self.slot + batch)
        return ([k[rows] for k in self.cache.k], [v[rows] for v in self.cache.v],
                torch.zeros(batch, dtype=torch.long), length)

    def advance(self, n: int) -> None:
        pass


class _Step:
    """The engine's cache interface for one decoding step of rows [0, n): row i writes at lengths[i]."""

    def __init__(self, cache: SlotCache, lengths: torch.Tensor):
        self.cache, self.lengths = cache, lengths
        self.rows = torch.arange(len(lengths), device=lengths.device)
        self.end = int(lengths.max()) + 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        n = len(self.lengths)
        # (fit_cache converts too: an index_put, unlike a slice copy, does not)
        self.cache.k[layer][self.rows, :, self.lengths] = fit_cache(k[:, :, 0], self.cache.k[layer].dtype)
        self.cache.v[layer][self.rows, :, self.lengths] = fit_cache(v[:, :, 0], self.cache.v[layer].dtype)
        return self.cache.k[layer][:n, :, : self.end].to(k.dtype), self.cache.v[layer][:n, :, : self.end].to(v.dtype)

    def fused_view(self, batch: int, length: int = 1):
        """For the fused step (infer/fused.py): rows [0, n) write one token at their lengths."""
        if length != 1:
            raise ValueError("a batcher step feeds one token per row")
        return self.cache.k, self.cache.v, self.lengths, self.end

    def advance(self, n: int) -> None:
        pass


@dataclass
class _Live:
    job: Job
    length: int  # keys of this row in the cache
    block_index: int = 0
    first: int = 0  # where a continuing ([gMASK]) block's positions start
    step: int = 0  # tokens fed in the current block (<sop> included)
    row: Row | None = None  # the current block's tokens (engine.Row: stop strings, n-gram rules)
    next_token: int = 0
    flushing: bool = False  # feeding a cut block's last token before the next block starts
    limit: int = 0  # most tokens the current block may generate
    generator: torch.Generator | None = None


class Batcher:
    """Runs jobs in one continuously batched decoding loop on a background thread."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, decode=None):
        self.engine = Engine(model)
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = model.config.max_seq_len
        self.cache = SlotCache(self.engine, max_batch, self.max_len)
        self.stop_ids = {tokenizer.eop_id, tokenizer.eos_id}
        self.decode = decode or tokenizer.decode
        self.pending: collections.deque[Job] = collections.deque()
        self.live: list[_Live] = []
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (a step advances every live row by one token)
        self.tokens_generated = 0

    # -- the outside ---------------------------------------------------------------------------
    def start(self) -> Batcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="glm130b-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all or none): QueueFull when more than `max_queue` would have to wait for a
        free row of the batch."""
        for job in jobs:
            self._check(job)
        with self._lock:
            waiting = len(self.live) + len(self.pending) + len(jobs) - self.max_batch
            if waiting > self.max_queue:
                raise QueueFull(f"server busy: {len(self.live)} running, {len(self.pending)} waiting "
                                f"(at most {self.max_batch} running and {self.max_queue} waiting)")
            self.pending.extend(jobs)
            self._lock.notify_all()

    def _check(self, job: Job) -> None:
        if job.config.strategy not in ("greedy", "sample"):
            raise ValueError("the batcher decodes greedy or sampled jobs, not beam search")
        if not job.blocks:
            raise ValueError("a job needs at least one blank")
        if len(job.context) + 2 > self.max_len:
            raise ValueError(f"context of {len(job.context)} tokens leaves no room in {self.max_len}")

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def running(self) -> int:
        return len(self.live)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, keep_running: Callable[[], bool]) -> None:
        """Run the decoding loop on the calling thread until `keep_running()` is False (checked
        at least every half second) or close(). `glm130b serve` runs it on the main thread:
        the thread that loaded the model owns the OpenMP/torch thread pools, and a step there
        measured 8.0 ms against 10.6-192 ms from a second thread (docs/serving.md)."""
        self._loop(keep_running)

    def _loop(self, keep_running: Callable[[], bool] | None = None) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.pending and not self.live:
                    if keep_running is not None and not keep_running():
                        self._stop = True
                        break
                    self._lock.wait(timeout=None if keep_running is None else 0.5)
                if self._stop:
                    break
                joining = []
                while self.pending and len(self.live) + len(joining) < self.max_batch:
                    joining.append(self.pending.popleft())
            self._run_once(joining)
            del joining  # the sleeping loop holds no job
        for live in self.live:
            self._emit(live.job, Event("done", reason="cancelled"))
        self.live.clear()

    def _run_once(self, joining: list[Job]) -> None:
        """Admit the joining jobs, drop cancelled ones, decode one step."""
        try:
            self._join([job for job in joining if not self._cancelled_before_start(job)])
            self._drop_cancelled()
            if self.live:
                self._step()
        except Exception as e:  # a bug or out of memory: fail the running jobs, keep serving
            for live in self.live:
                self._emit(live.job, Event("error", message=f"{type(e).__name__}: {e}"))
            self.live.clear()

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # a consumer that went away must not stop the loop
            job.cancelled = True

    def _cancelled_before_start(self, job: Job) -> bool:
        if job.cancelled:
            self._emit(job, Event("done", reason="cancelled"))
        return job.cancelled

    @torch.no_grad()
    def _join(self, jobs: list[Job]) -> None:
        """Encode the joining contexts in one forward (right-padded; a row's keys past its own
        length are never attended, and its decoding overwrites them) into the next free rows."""
        if not jobs:
            return
        slot = len(self.live)
        self.engine.forward(*self.engine.prefill_inputs([job.context for job in jobs]), _Prefill(self.cache, slot))
        for i, job in enumerate(jobs):
            try:
                generator = make_generator(job.config.seed) if job.config.strategy == "sample" else None
            except (ValueError, RuntimeError, OverflowError) as e:  # this job's settings: fail it alone
                self._emit(job, Event("error", message=f"{type(e).__name__}: {e}"))
                continue
            live = _Live(job, length=len(job.context), generator=generator)
            if self._start_block(live, 0):  # (False only for a context with no room: its row is dropped)
                if slot + i != len(self.live):  # keep live rows contiguous after a dropped one
                    self.cache.move(slot + i, len(self.live), live.length)
                self.live.append(live)

    def _start_block(self, live: _Live, index: int) -> bool:
        """Begin blank `index`; False (and the job is done) when the context has no room left."""
        job = live.job
        live.block_index, live.first, live.step, live.flushing = index, live.length, 0, False
        live.row = Row(job.context, job.blocks[index])
        live.next_token = self.tokenizer.sop_id
        room = self.max_len - 1 - live.length - (1 if index else 0)  # as glm130b.infer.generate
        live.limit = min(job.config.max_new_tokens, room)
        if live.limit < 1:
            self._emit(job, Event("done", reason="length"))
            return False
        return True

    def _positions(self) -> torch.Tensor:
        pos, steps = [], []
        for live in self.live:
            block = live.row.block
            pos.append(live.first + live.step if block.continues else block.mask_position)
            steps.append(live.step + 1)
        p = torch.tensor(pos, dtype=torch.long, device=self.engine.device).view(-1, 1)
        if self.engine.two_d:
            s = torch.tensor(steps, dtype=torch.long, device=self.engine.device).view(-1, 1)
            return torch.stack((p, s), dim=1)
        return p

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.live))):
            if self.live[i].job.cancelled:
                self._emit(self.live[i].job, Event("done", reason="cancelled"))
                self._remove(i)

    def _remove(self, i: int) -> None:
        last = len(self.live) - 1
        if i != last:
            self.cache.move(last, i, self.live[last].length)
            self.live[i] = self.live[last]
        self.live.pop()

    @torch.no_grad()
    def _step(self) -> None:
        dev = self.engine.device
        lengths = torch.tensor([live.length for live in self.live], dtype=torch.long, device=dev)
        tokens = torch.tensor([live.next_token for live in self.live], dtype=torch.long, device=dev)
        end = int(lengths.max()) + 1
        allowed = (torch.arange(end, device=dev).view(1, -1) <= lengths.view(-1, 1)).view(-1, 1, 1, end)
        at = torch.zeros(len(self.live), dtype=torch.long, device=dev)
        logits = self.engine.forward(tokens.view(-1, 1), self._positions(), allowed, _Step(self.cache, lengths),
                                     logits_at=at)
        self.steps += 1
        # the rules of each row (vocabulary, min length, n-grams), then one argmax for the batch
        vocab = self.tokenizer.vocab_size
        if vocab < logits.shape[-1]:
            logits[:, vocab:] = -torch.inf
        for i, live in enumerate(self.live):
            cfg = live.job.config
            if cfg.no_repeat_ngram_size or len(live.row.tokens) < cfg.min_new_tokens:
                process_logits(logits[i : i + 1], [live.row], cfg, self.stop_ids)
        greedy = logits.argmax(dim=-1).tolist()
        finished = []
        for i, live in enumerate(self.live):
            live.length += 1
            live.step += 1
            if live.flushing:  # the cut block is complete in the cache: the next blank starts
                if not self._start_block(live, live.block_index + 1):
                    finished.append(i)
                continue
            if live.job.config.strategy == "greedy":
                token = greedy[i]
            else:
                try:
                    token = int(sample_next(logits[i : i + 1].cpu(), live.job.config, live.generator)[0])
                except RuntimeError as e:  # this request's settings, not the batch's: fail it alone
                    self._emit(live.job, Event("error", message=f"sampling failed: {e}"))
                    finished.append(i)
                    continue
            if self._advance(live, token):
                finished.append(i)
        for i in reversed(finished):
            self._remove(i)

    def _advance(self, live: _Live, token: int) -> bool:
        """Take the row's next token; True when the job is finished."""
        job, row, cfg = live.job, live.row, live.job.config
        reason = None
        if token in self.stop_ids:
            reason = "stop"
        else:
            row.tokens.append(token)
            self.tokens_generated += 1
            if job.stream:
                self._emit(job, Event("token", block=live.block_index, token=token))
            if cfg.stop_strings:
                text = self.decode(row.tokens)
                cuts = [c for c in (text.find(s) for s in cfg.stop_strings) if c >= 0]
                if cuts:
                    row.text_end, reason = min(cuts), "stop"
            if reason is None and len(row.tokens) >= live.limit:
                reason = "length"
        if reason is None:
            live.next_token = token
            return False
        self._emit(job, Event("block_end", block=live.block_index, reason=reason, text_end=row.text_end,
                              tokens=None if job.stream else list(row.tokens)))
        if live.block_index + 1 >= len(job.blocks):
            self._emit(job, Event("done", reason=reason))
            return True
        if token in self.stop_ids:
            return not self._start_block(live, live.block_index + 1)
        else:  # the last token is not in the cache yet: feed it, then start the next block
            live.next_token, live.flushing = token, True
        return False
