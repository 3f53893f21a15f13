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

Under tensor parallelism (`glm130b serve --tp N` under torchrun) rank 0 runs the batcher and
every other rank runs `follow`: each operation that touches the model or the cache (`ModelOps`:
encode joining contexts, move a row, decode a step) is broadcast by rank 0 with
torch.distributed's broadcast_object_list before it runs, and the other ranks run the same
operation on their own shards, so every collective inside the model meets its peers. The
decisions (which rows, which tokens, sampling, stop rules) are rank 0's alone.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from glm130b.errors import GLMError
from glm130b.infer.engine import (
    Engine,
    GenerationConfig,
    Row,
    make_generator,
    process_logits,
    sample_next,
    stop_cut,
)
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


@dataclass
class _Live:
    job: Job
    block_index: int = 0
    first: int = 0  # where a continuing ([gMASK]) block's positions start
    step: int = 0  # tokens fed in the current block (<sop> included)
    row: Row | None = None  # the current block's tokens (engine.Row: stop strings, n-gram rules)
    next_token: int = 0
    flushing: bool = False  # feeding a cut block's last token before the next block starts
    limit: int = 0  # most tokens the current block may generate
    generator: torch.Generator | None = None


class ModelOps:
    """The batcher's operations on the model and its slotted cache, the only ones that touch
    either. With `broadcast` (rank 0 under tensor parallelism) each is sent to the other ranks
    before it runs; `follow` runs them there."""

    HEARTBEAT_S = 60.0  # an idle rank 0 tells the others it is alive (collectives time out)

    def __init__(self, engine: Engine, cache, broadcast: Callable[[tuple], None] | None = None):
        self.engine, self.cache, self.broadcast = engine, cache, broadcast
        self.last_sent = time.monotonic()
        self.stopped = False  # "stop" was sent

    def __call__(self, op: str, *args):
        if self.broadcast is not None:
            try:
                self.broadcast((op, args))
            except RuntimeError as e:  # a peer died: there is no model to decode with any more
                raise GLMError(f"a tensor-parallel rank is gone ({str(e).splitlines()[0] if str(e) else e!r})") from None
            self.last_sent = time.monotonic()
        return getattr(self, op)(*args)

    def prefill(self, start: int, contexts: list[list[int]]) -> None:
        """Encode the contexts into rows start.. (one forward) and set the rows' lengths."""
        rows = slice(start, start + len(contexts))
        self.cache.lengths[rows] = 0
        self.engine.forward(*self.engine.prefill_inputs(contexts), self.cache.select(rows))
        for i, context in enumerate(contexts):
            self.cache.lengths[start + i] = len(context)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def reset(self) -> None:
        """Every row empty (after the compiled step's warm-up)."""
        self.cache.lengths.zero_()

    def decode(self, tokens, blocks, firsts, steps, contexts) -> torch.Tensor:
        """One step of rows [0, len(tokens)): the logits of their next tokens.

        With the compiled step (one graph per row count) the rows are padded to a power of two
        with free rows, so a server compiles log2(max_batch) + 1 graphs, not max_batch: a free
        row decodes a pad token at slot 0 of its own (its keys there are overwritten by the next
        request's prefill), seeing only itself."""
        n = len(tokens)
        rows = self.padded_rows(n)
        if rows > n:
            free = rows - n
            self.cache.lengths[n:rows] = 0
            tokens, blocks = list(tokens) + [0] * free, list(blocks) + [Block(0, 0, continues=True)] * free
            firsts, steps, contexts = list(firsts) + [0] * free, list(steps) + [0] * free, list(contexts) + [0] * free
        cache = self.cache.select(slice(0, rows))
        logits = self.engine.step(tokens, cache, blocks, firsts, steps, contexts, contexts)
        return logits[:n]

    def padded_rows(self, n: int) -> int:
        """The rows a step of n live rows runs: n, or with the compiled step the next power of two
        (at most the cache's rows)."""
        return min(len(self.cache.lengths), 1 << (n - 1).bit_length()) if self.engine.compile_decode else n

    def idle(self) -> None:
        if self.broadcast is not None and time.monotonic() - self.last_sent > self.HEARTBEAT_S:
            self("heartbeat")

    def heartbeat(self) -> None:
        pass

    def stop(self) -> None:
        """Rank 0 has stopped serving: the other ranks leave `follow`."""

    def stop_followers(self) -> None:
        """Send the other ranks "stop", once (at the loop's end, or when rank 0 fails before it;
        a rank already gone is not waited for)."""
        if self.broadcast is None or self.stopped:
            return
        self.stopped = True
        try:
            self("stop")
        except GLMError:
            pass


def follow(model, max_batch: int) -> None:
    """The loop of a rank other than 0 under `serve --tp`: run each operation rank 0 broadcasts
    on this rank's shards, until rank 0 sends "stop". (A failing operation fails on rank 0 too,
    which fails its jobs and keeps serving; so does this rank.)"""
    import torch.distributed as dist

    engine = Engine(model)
    ops = ModelOps(engine, engine.new_cache(max_batch, model.config.max_seq_len, pooled=False))
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        op, args = message[0]
        if op == "stop":
            return
        try:
            with torch.no_grad():
                getattr(ops, op)(*args)
        except Exception:  # noqa: S112 - as rank 0's batcher: the jobs fail there, serving goes on
            continue


def broadcast_from_rank0(message: tuple) -> None:
    """ModelOps' broadcast under torch.distributed: rank 0 sends one (op, args) to every rank."""
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0)


class Batcher:
    """Runs jobs in one continuously batched decoding loop on a background thread.

    `broadcast` (rank 0 of `serve --tp`): each model operation is sent to the other ranks
    (ModelOps); the loop's end sends them "stop"."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, decode=None,
                 broadcast: Callable[[tuple], None] | None = None):
        self.engine = Engine(model)
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = model.config.max_seq_len
        self.cache = self.engine.new_cache(max_batch, self.max_len, pooled=False)  # row i: self.live[i]
        self.ops = ModelOps(self.engine, self.cache, broadcast)
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
        if self.engine.compile_decode:
            self._warm_up()
        while True:
            with self._lock:
                while not self._stop and not self.pending and not self.live:
                    if keep_running is not None and not keep_running():
                        self._stop = True
                        break
                    self.ops.idle()
                    self._lock.wait(timeout=None if keep_running is None and self.ops.broadcast is None else 0.5)
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
        self.ops.stop_followers()

    @torch.no_grad()
    def _warm_up(self) -> None:
        """Compile the decode step for every padded row count (1, 2, 4, ..., max_batch) before the
        first request, on this thread (the one that replays the CUDA graphs): requests wait in the
        queue meanwhile instead of stalling every stream at the first step of a new row count."""
        sizes = sorted({self.ops.padded_rows(n) for n in range(1, self.max_batch + 1)})
        t0 = time.monotonic()
        for n in sizes:  # through the ops: under --tp every rank compiles the same steps in step
            self.ops("prefill", 0, [[self.tokenizer.gmask_id]] * n)
            self.ops("decode", [self.tokenizer.sop_id] * n, [Block(0, 0, continues=True)] * n, [1] * n, [0] * n,
                     [1] * n)
        self.ops("reset")
        print(f"glm130b serve: decode step compiled for {', '.join(map(str, sizes))} rows "
              f"in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

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
        self.ops("prefill", slot, [job.context for job in jobs])
        for i, job in enumerate(jobs):
            try:
                generator = make_generator(job.config.seed) if job.config.strategy == "sample" else None
            except (ValueError, RuntimeError, OverflowError) as e:  # this job's settings: fail it alone
                self._emit(job, Event("error", message=f"{type(e).__name__}: {e}"))
                continue
            live = _Live(job, generator=generator)
            if self._start_block(live, 0, len(job.context)):  # (False: a context with no room; row dropped)
                if slot + i != len(self.live):  # keep live rows contiguous after a dropped one
                    self.ops("move", slot + i, len(self.live))
                self.live.append(live)

    def _start_block(self, live: _Live, index: int, length: int) -> bool:
        """Begin blank `index` in a row holding `length` keys; False (and the job is done) when the
        context has no room left."""
        job = live.job
        live.block_index, live.first, live.step, live.flushing = index, length, 0, False
        live.row = Row(job.context, job.blocks[index])
        live.next_token = self.tokenizer.sop_id
        room = self.max_len - 1 - length - (1 if index else 0)  # as glm130b.infer.generate
        live.limit = min(job.config.max_new_tokens, room)
        if live.limit < 1:
            self._emit(job, Event("done", reason="length"))
            return False
        return True

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.live))):
            if self.live[i].job.cancelled:
                self._emit(self.live[i].job, Event("done", reason="cancelled"))
                self._remove(i)

    def _remove(self, i: int) -> None:
        last = len(self.live) - 1
        if i != last:
            self.ops("move", last, i)
            self.live[i] = self.live[last]
        self.live.pop()

    @torch.no_grad()
    def _step(self) -> None:
        n = len(self.live)
        lengths = self.cache.lengths[:n].clone()  # each row's new token goes to slot lengths[row]
        contexts = [len(live.job.context) for live in self.live]  # Part B follows each row's own context
        logits = self.ops("decode", [live.next_token for live in self.live], [live.row.block for live in self.live],
                          [live.first for live in self.live], [live.step for live in self.live], contexts)
        self.steps += 1
        # the rules of each row (vocabulary, min length, n-grams), then one argmax for the batch
        process_logits(logits, [live.row for live in self.live], [live.job.config for live in self.live],
                       self.stop_ids, self.tokenizer.vocab_size)
        greedy = logits.argmax(dim=-1).tolist()
        finished = []
        for i, live in enumerate(self.live):
            live.step += 1
            if live.flushing:  # the cut block is complete in the cache: the next blank starts
                if not self._start_block(live, live.block_index + 1, int(lengths[i]) + 1):
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
            if self._advance(live, token, int(lengths[i]) + 1):
                finished.append(i)
        for i in reversed(finished):
            self._remove(i)

    def _advance(self, live: _Live, token: int, length: int) -> bool:
        """Take the row's next token (the row now holds `length` keys); True when the job is finished."""
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
                row.text_end = stop_cut(self.decode(row.tokens), cfg.stop_strings)
                if row.text_end is not None:
                    reason = "stop"
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
            return not self._start_block(live, live.block_index + 1, length)
        else:  # the last token is not in the cache yet: feed it, then start the next block
            live.next_token, live.flushing = token, True
        return False
