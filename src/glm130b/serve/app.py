"""The HTTP server: OpenAI's completions API and GLM blank infilling over one continuous batcher.

    GET  /                 a page to try completion and infilling by hand
    GET  /health           liveness, with the running and waiting request counts
    GET  /metrics          Prometheus text: requests, tokens, queue depth, latency
    GET  /v1/models        the served model
    POST /v1/completions   OpenAI completions (string or list prompt, n, stop, seed, stream)
    POST /v1/infill        fill [MASK]/[sMASK]/[gMASK] blanks; the filled text and the spans

Every request becomes one or more batcher jobs (glm130b.serve.batcher); their events come back
to the request's asyncio task through a queue. Errors have OpenAI's body
`{"error": {"message", "type", "param", "code"}}`: 400 for bad input, 401 for a missing or
wrong key, 503 with Retry-After when the queue is full. A client that disconnects cancels its
jobs. Decisions and limits: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm130b.errors import GLMError
from glm130b.infer.chat import ChatError, fit_history, template_of
from glm130b.infer.embed import embed
from glm130b.infer.engine import GenerationConfig
from glm130b.infer.generate import TextStream, blank_ids
from glm130b.model.masks import Block
from glm130b.serve.batcher import Batcher, Event, Job, QueueFull
from glm130b.serve.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorBody,
    Health,
    Infill,
    InfillRequest,
    InfillSpan,
    ModelCard,
    ModelList,
    Usage,
)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/infill", "/v1/embeddings", "/v1/models")
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does): 1/T would overflow
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
ERRORS = {400: {"model": ErrorBody, "description": "invalid request"},
          401: {"model": ErrorBody, "description": "missing or wrong API key"},
          404: {"model": ErrorBody, "description": "no such model"},
          503: {"model": ErrorBody, "description": "queue full; retry after the Retry-After seconds"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus series of one server (its own registry, so several apps can live in a process)."""

    def __init__(self, batcher: Batcher):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("glm130b_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("glm130b_request_latency_seconds", "request latency, to the last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.first_token = Histogram("glm130b_time_to_first_token_seconds", "submission to first generated token",
                                     registry=r, buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.prompt_tokens = Counter("glm130b_prompt_tokens", "prompt tokens encoded", registry=r)
        self.generated_tokens = Counter("glm130b_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("glm130b_cancelled_jobs", "jobs cancelled by a client going away", registry=r)
        Gauge("glm130b_queue_depth", "requests waiting to join the batch", registry=r).set_function(
            lambda: batcher.queue_depth)
        Gauge("glm130b_running_requests", "sequences in the decoding batch", registry=r).set_function(
            lambda: batcher.running)
        Gauge("glm130b_batch_capacity", "most sequences decoded together", registry=r).set(batcher.max_batch)


class MetricsMiddleware:
    """Counts every /v1 request by status and times it to its last byte (streams included)."""

    def __init__(self, app, metrics: Callable[[], Metrics | None]):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m = self.metrics()
            if m is not None:
                endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
                m.requests.labels(endpoint, str(status[0])).inc()
                m.latency.labels(endpoint).observe(time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
def _usage(prompt_tokens: int, choices) -> Usage:
    """The usage block of a completions or chat answer: prompt tokens and the tokens generated."""
    generated = sum(c.tokens() for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated)


@dataclass
class _Choice:
    """What the request side gathers of one job: tokens per blank, finish reasons, text."""

    index: int
    prefix: str = ""
    spans: list[list[int]] = field(default_factory=list)
    text_end: list[int | None] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    done: bool = False
    reason: str | None = None
    stream: TextStream | None = None

    def on(self, ev: Event) -> None:
        while len(self.spans) <= ev.block:
            self.spans.append([])
            self.text_end.append(None)
            self.reasons.append(None)
        if ev.kind == "token":
            self.spans[ev.block].append(ev.token)
        elif ev.kind == "block_end":
            self.reasons[ev.block], self.text_end[ev.block] = ev.reason, ev.text_end
            if ev.tokens is not None:  # a job that does not stream gets its tokens here
                self.spans[ev.block] = list(ev.tokens)
        elif ev.kind == "done":
            self.done, self.reason = True, ev.reason

    def span_text(self, tokenizer, k: int) -> str:
        text = tokenizer.decode(self.spans[k]) if k < len(self.spans) else ""
        end = self.text_end[k] if k < len(self.text_end) else None
        return text if end is None else text[:end]

    def tokens(self) -> int:
        return sum(len(s) for s in self.spans)


class Server:
    """The model, its batcher and the request handlers of one app."""

    def __init__(self, model, tokenizer, model_name: str, max_batch: int, max_queue: int,
                 chat_template: str | None = None, broadcast=None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.chat_template = chat_template or template_of(None, tokenizer)
        self.embed_lock = threading.Lock()
        self.max_len = model.config.max_seq_len
        self.tensor_parallel = broadcast is not None  # rank 0 of serve --tp (batcher.ModelOps)
        self.batcher = Batcher(model, tokenizer, max_batch=max_batch, max_queue=max_queue, broadcast=broadcast)
        self.metrics = Metrics(self.batcher)
        self.created = int(time.time())
        self.deadline: float | None = None  # set by drain(): requests still running then end with an error

    def drain(self, seconds: float) -> None:
        """Shutting down: requests in flight may finish for `seconds`; after that each ends with a
        503 `server_shutting_down` (an error event in a stream), so none is cut without a word."""
        deadline = time.monotonic() + max(0.0, seconds)
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)

    # -- building jobs ---------------------------------------------------------------------------
    def config(self, req, max_tokens: int, index: int) -> GenerationConfig:
        stop = req.stop_strings()
        least = min(getattr(req, "min_tokens", 0), max_tokens)
        if req.temperature < GREEDY_BELOW:
            return GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=least, strategy="greedy",
                                    stop_strings=stop)
        seed = None if req.seed is None else (req.seed + index) % 2**64  # torch's own wrap; never overflows
        return GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=least, strategy="sample",
                                temperature=req.temperature, top_p=req.top_p, seed=seed, stop_strings=stop)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def check_room(self, n_prompt: int, max_tokens: int | None, what: str = "prompt") -> int:
        """The tokens to generate: max_tokens, or all the room left when it is null; 400 when the
        prompt and max_tokens do not fit the context."""
        room = self.max_len - 1 - n_prompt
        if max_tokens is None and room >= 1:
            return room
        if max_tokens is None or max_tokens > room:
            asked = n_prompt + (max_tokens or 1)
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                                f"requested {asked} tokens ({n_prompt} in the {what}, {asked - n_prompt} "
                                f"for the completion). Please reduce the {what} or max_tokens.",
                           param="max_tokens" if room > 0 else what, code="context_length_exceeded")
        return max_tokens

    def submit(self, jobs: list[Job]) -> None:
        most = self.batcher.max_batch + self.batcher.max_queue
        if len(jobs) > most:  # could never be admitted: not a retry-later 503
            raise APIError(400, f"the request needs {len(jobs)} sequences (prompts x n); this server takes at most "
                                f"{most} at once", param="n", code="too_many_sequences")
        try:
            self.batcher.submit(jobs)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="server_busy", headers={"Retry-After": "1"}) from None

    def run(self, jobs_of: Callable[[Callable[[int], Callable[[Event], None]]], list[Job]]):
        """Make jobs whose events land on one asyncio queue as (job index, event)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(i: int):
            def emit(ev: Event) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
            return emit

        jobs = jobs_of(emitter)
        self.submit(jobs)
        return jobs, queue

    async def events(self, request: Request, jobs: list[Job], queue: asyncio.Queue, stream: bool
                     ) -> AsyncIterator[tuple[int, Event]]:
        """Events until every job is done; a gone client cancels the jobs (streams are cancelled by
        Starlette, which raises here; a plain request is polled)."""
        left, t0, first = len(jobs), time.perf_counter(), True
        try:
            while left:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise APIError(503, "the server is shutting down and stopped this request before it finished",
                                   type="server_error", code="server_shutting_down")
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    if not stream and await request.is_disconnected():
                        return
                    continue
                if ev.kind == "token":
                    self.metrics.generated_tokens.inc()
                    if first:
                        self.metrics.first_token.observe(time.perf_counter() - t0)
                        first = False
                elif ev.kind == "block_end" and ev.tokens:
                    self.metrics.generated_tokens.inc(len(ev.tokens))
                elif ev.kind == "error":
                    raise APIError(500, f"generation failed: {ev.message}", type="server_error")
                elif ev.kind == "done":
                    left -= 1
                yield i, ev
        finally:
            for job in jobs:
                if not job.cancelled and left:
                    job.cancel()
                    self.metrics.cancelled.inc()

    # -- /v1/completions -----------------------------------------------------------------------
    def completion_jobs(self, req: CompletionRequest) -> tuple[list[tuple[list[int], int]], Callable]:
        refuse_unless_neutral((("logprobs", req.logprobs, (None,)), ("suffix", req.suffix, (None,)),
                               ("presence_penalty", req.presence_penalty, (0.0,)),
                               ("frequency_penalty", req.frequency_penalty, (0.0,))))
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "`best_of` other than n is not supported", param="best_of", code="unsupported")
        tok, blanks = self.tokenizer, blank_ids(self.tokenizer)
        contexts = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = tok.encode(p)
            elif max(p) >= tok.vocab_size:
                raise APIError(400, f"token id {max(p)} is outside the vocabulary (0..{tok.vocab_size - 1})",
                               param="prompt")
            else:
                ids = list(p)
            if any(t in blanks for t in ids[:-1]) or (ids and ids[-1] in blanks and ids[-1] != tok.gmask_id):
                raise APIError(400, "the prompt holds [MASK]/[sMASK]/[gMASK] blanks: /v1/completions continues "
                                    "text; fill blanks with POST /v1/infill", param="prompt")
            if not ids or ids[-1] != tok.gmask_id:
                ids = ids + [tok.gmask_id]
            contexts.append((ids, self.check_room(len(ids), req.max_tokens)))

        def jobs_of(emitter):
            jobs = []
            for p, (ids, max_tokens) in enumerate(contexts):
                for j in range(req.n):
                    index = p * req.n + j
                    jobs.append(Job(ids, [Block(len(ids) - 1, 0, continues=True)],
                                    self.config(req, max_tokens, index), emitter(index), stream=req.stream))
            return jobs

        return contexts, jobs_of

    async def completions(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        contexts, jobs_of = self.completion_jobs(req)
        prompts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in req.prompts()]  # for echo
        prompt_tokens = sum(len(ids) for ids, _ in contexts) * req.n
        self.metrics.prompt_tokens.inc(prompt_tokens)
        jobs, queue = self.run(jobs_of)
        choices = [_Choice(i, prefix=prompts[i // req.n] if req.echo else "") for i in range(len(jobs))]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def usage() -> Usage:
            return _usage(prompt_tokens, choices)

        if not req.stream:
            async for i, ev in self.events(request, jobs, queue, stream=False):
                choices[i].on(ev)
            out = [CompletionChoice(index=c.index, text=c.prefix + c.span_text(self.tokenizer, 0),
                                    finish_reason=_finish(c.reason)) for c in choices]
            return Completion(id=rid, created=created, model=self.model_name, choices=out, usage=usage())

        def chunk(index: int, text: str, reason: str | None = None) -> str:
            body = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]}
            return _sse(body)

        return self.stream_choices(
            request, jobs, queue, req, choices, opening=lambda c: chunk(c.index, c.prefix) if c.prefix else None,
            piece=chunk, end=lambda i, reason: chunk(i, "", reason),
            usage=lambda: _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                "choices": [], "usage": usage().model_dump()}))

    def stream_choices(self, request: Request, jobs, queue, req, choices: list[_Choice], opening, piece, end,
                       usage) -> StreamingResponse:
        """Server-sent events of continuation jobs (completions, chat): `opening(choice)` (a first
        event, or None), `piece(index, text)` for each piece of whole characters (stop strings
        held back), `end(index, finish_reason)`, then `usage()` when asked, then [DONE]."""

        async def body() -> AsyncIterator[str]:
            pieces: list[str] = []
            for c in choices:
                c.stream = TextStream(self.tokenizer, pieces.append, req.stop_strings())
                first = opening(c)
                if first:
                    yield first
            async for i, ev in self.events(request, jobs, queue, stream=True):
                c = choices[i]
                c.on(ev)
                if ev.kind == "token":
                    c.stream.token(ev.token)
                elif ev.kind == "done":
                    c.stream.finish(c.span_text(self.tokenizer, 0))
                for text in pieces:
                    yield piece(i, text)
                pieces.clear()
                if ev.kind == "done":
                    yield end(i, _finish(c.reason))
            if req.stream_options is not None and req.stream_options.include_usage:
                yield usage()
            yield "data: [DONE]\n\n"

        async def stream() -> AsyncIterator[str]:
            async for item in _or_error(body()):
                yield item

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- /v1/chat/completions --------------------------------------------------------------------
    async def chat(self, req: ChatRequest, request: Request):
        """The messages rendered by the chat template (infer/chat.py; the oldest exchanges dropped
        when the conversation outgrows the context), continued as /v1/completions continues."""
        self.check_model(req.model)
        refuse_unless_neutral((("logprobs", req.logprobs, (None, False)), ("tools", req.tools, (None,)),
                               ("presence_penalty", req.presence_penalty, (0.0,)),
                               ("frequency_penalty", req.frequency_penalty, (0.0,))))
        if req.response_format not in (None, {"type": "text"}):
            raise APIError(400, "`response_format` other than {\"type\": \"text\"} is not supported by this server",
                           param="response_format", code="unsupported")
        tok, budget = self.tokenizer, req.answer_budget()
        try:
            ids = fit_history(tok, self.chat_template, [m.model_dump() for m in req.messages],
                              lambda n: n + (budget or 1) <= self.max_len - 1)
        except ChatError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = self.check_room(len(ids), budget, what="messages")
        prompt_tokens = len(ids) * req.n
        self.metrics.prompt_tokens.inc(prompt_tokens)
        jobs, queue = self.run(lambda emitter: [
            Job(ids, [Block(len(ids) - 1, 0, continues=True)], self.config(req, max_tokens, j), emitter(j),
                stream=req.stream) for j in range(req.n)])
        choices = [_Choice(j) for j in range(req.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage() -> Usage:
            return _usage(prompt_tokens, choices)

        if not req.stream:
            async for i, ev in self.events(request, jobs, queue, stream=False):
                choices[i].on(ev)
            out = [ChatChoice(index=c.index, message=ChatMessage(role="assistant", content=c.span_text(tok, 0)),
                              finish_reason=_finish(c.reason)) for c in choices]
            return ChatCompletion(id=rid, created=created, model=self.model_name, choices=out, usage=usage())

        def chunk(index: int, delta: dict, reason: str | None = None) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]})

        return self.stream_choices(
            request, jobs, queue, req, choices, opening=lambda c: chunk(c.index, {"role": "assistant", "content": ""}),
            piece=lambda i, text: chunk(i, {"content": text}), end=lambda i, reason: chunk(i, {}, reason),
            usage=lambda: _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "choices": [], "usage": usage().model_dump()}))

    # -- /v1/embeddings ------------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingList:
        """Mean of the final (LayerNormed) hidden states over the input's tokens, L2-normalised;
        the input is one bidirectional GLM context (infer/embed.py)."""
        self.check_model(req.model)
        if self.tensor_parallel:  # its forward would run outside the batcher's steps that the other ranks follow
            raise APIError(400, "embeddings are not served under --tp", code="unsupported")
        if req.dimensions is not None:
            raise APIError(400, "`dimensions` is not supported by this server", param="dimensions", code="unsupported")
        raw = req.input
        items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        contexts = []
        for i, item in enumerate(items):
            ids = self.tokenizer.encode(item, blanks=False) if isinstance(item, str) else list(item)
            if not ids or any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
                raise APIError(400, f"input[{i}] is empty or holds ids outside the vocabulary", param="input")
            if len(ids) > self.max_len:
                raise APIError(400, f"input[{i}] is {len(ids)} tokens; this model's maximum context length is "
                                    f"{self.max_len}", param="input", code="context_length_exceeded")
            contexts.append(ids)
        self.metrics.prompt_tokens.inc(sum(len(c) for c in contexts))

        def run():
            with self.embed_lock:
                return embed(self.model, contexts, self.tokenizer.pad_id)

        vectors = await asyncio.to_thread(run)
        data = []
        for i, v in enumerate(vectors):
            value = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() \
                if req.encoding_format == "base64" else v.tolist()
            data.append(Embedding(index=i, embedding=value))
        total = sum(len(c) for c in contexts)
        return EmbeddingList(data=data, model=self.model_name,
                             usage=EmbeddingUsage(prompt_tokens=total, total_tokens=total))

    # -- /v1/infill ------------------------------------------------------------------------------
    async def infill(self, req: InfillRequest, request: Request):
        """GLM-130B's fill_blanks rules (glm130b.infer.generate.fill_blanks): one kind of blank, `<eos>`
        before `<sop>`, each blank a job of its own on the text with the earlier answers spliced in;
        `reuse_cache`: every blank in one job, one KV cache (the faster layout)."""
        self.check_model(req.model)
        refuse_unless_neutral((("n", req.n, (1,)), ("min_tokens", req.min_tokens, (0,))), by="/v1/infill")
        tok, blanks = self.tokenizer, blank_ids(self.tokenizer)
        ids = tok.encode(req.text)
        if not any(t in blanks for t in ids):
            raise APIError(400, "the text has no [MASK], [sMASK] or [gMASK] blank to fill", param="text")
        if req.reuse_cache:
            kind, seq = None, list(ids)
            where = [i for i, t in enumerate(ids) if t in blanks]
        else:
            kind = next(k for k in blanks if k in ids)  # [MASK] > [sMASK] > [gMASK]
            seq = ids + ([] if ids[-1] in blanks else [tok.eos_id])
            where = [i for i, t in enumerate(seq) if t == kind]
        max_tokens = self.check_room(len(seq), req.max_tokens, what="text")
        self.metrics.prompt_tokens.inc(len(ids))
        choice = _Choice(0)
        rid, created = f"infill-{uuid.uuid4().hex}", int(time.time())
        filled: list[list[int]] = [seq]  # the official mode's sequence, answers spliced in as they end

        async def blank_events(stream: bool) -> AsyncIterator[Event]:
            if kind is None:
                blocks = [Block(w, 0, continues=seq[w] == tok.gmask_id) for w in where]
                jobs, queue = self.run(lambda emitter: [Job(seq, blocks, self.config(req, max_tokens, 0), emitter(0),
                                                            stream=stream)])
                async for _i, ev in self.events(request, jobs, queue, stream=stream):
                    yield ev
                return
            for k in range(len(where)):
                current = filled[0]
                pos = current.index(kind)
                budget = min(max_tokens, self.max_len - 1 - len(current))
                if budget < 1:
                    raise APIError(400, f"the text with {k} blanks filled is {len(current)} tokens: no room is left "
                                        f"in the model's context of {self.max_len}", param="text",
                                   code="context_length_exceeded")
                block = [Block(pos, 0, continues=kind == tok.gmask_id)]
                jobs, queue = self.run(lambda emitter, c=current, b=block, n=budget: [
                    Job(c, b, self.config(req, n, 0), emitter(0), stream=stream)])
                async for _i, ev in self.events(request, jobs, queue, stream=stream):
                    ev = dataclasses.replace(ev, block=k)
                    if ev.kind == "done" and k + 1 < len(where):
                        continue  # the next blank's job follows
                    yield ev
                    if ev.kind == "block_end":  # (the consumer has taken the event into `choice`)
                        span = choice.span_text(tok, k)
                        answer = choice.spans[k] if span == tok.decode(choice.spans[k]) else tok.encode(span)
                        filled[0] = current[:pos] + answer + current[pos + 1 :]

        def result() -> Infill:
            if kind is None:
                pieces, last = [], 0
                for k, pos in enumerate(where):
                    pieces += [tok.decode(ids[last:pos]), choice.span_text(tok, k)]
                    last = pos + 1
                pieces.append(tok.decode(ids[last:]))
                text = "".join(pieces)
            else:
                final = filled[0][:-1] if filled[0] and filled[0][-1] == tok.eos_id else filled[0]
                text = tok.decode(final)
            spans = [InfillSpan(index=k, text=choice.span_text(tok, k),
                                finish_reason=_finish(choice.reasons[k] if k < len(choice.reasons) else None))
                     for k in range(len(where))]
            gen = choice.tokens()
            return Infill(id=rid, created=created, model=self.model_name, text=text, spans=spans,
                          usage=Usage(prompt_tokens=len(ids), completion_tokens=gen, total_tokens=len(ids) + gen))

        if not req.stream:
            async for ev in blank_events(stream=False):
                choice.on(ev)
            return result()

        async def stream() -> AsyncIterator[str]:
            async for item in _or_error(stream_body()):
                yield item

        async def stream_body() -> AsyncIterator[str]:
            pieces: list[str] = []
            streams: dict[int, TextStream] = {}
            async for ev in blank_events(stream=True):
                choice.on(ev)
                if ev.kind == "token":
                    s = streams.setdefault(ev.block, TextStream(tok, pieces.append, req.stop_strings()))
                    s.token(ev.token)
                elif ev.kind == "block_end":
                    streams.setdefault(ev.block, TextStream(tok, pieces.append)).finish(choice.span_text(tok, ev.block))
                for piece in pieces:
                    yield _sse({"id": rid, "object": "infill.chunk", "span": ev.block, "text": piece})
                pieces.clear()
                if ev.kind == "block_end":
                    yield _sse({"id": rid, "object": "infill.chunk", "span": ev.block, "text": "",
                                "finish_reason": _finish(ev.reason)})
            yield _sse(result().model_dump())
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length"}.get(reason or "")


async def _or_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's status line is sent already when generation fails: the error becomes an event."""
    try:
        async for item in events:
            yield item
    except APIError as e:
        yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        yield "data: [DONE]\n\n"


def refuse_unless_neutral(fields, by: str = "this server") -> None:
    """400 `unsupported` for the first (name, value, neutral values) whose value is set away from
    them: a field this server does not implement is ignored only while it asks for nothing."""
    for name, value, neutral in fields:
        if value not in neutral:
            raise APIError(400, f"`{name}` is not supported by {by}", param=name, code="unsupported")


def _validation_message(errors: list) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's errors: field names only in the path (not
    the union member a value was tried against), and no "Value error, " prefix."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        where = next((x for x in first.get("loc", ()) if isinstance(x, int)), None)
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return f"the body is not valid JSON ({reason}{f' at character {where}' if where is not None else ''})", None
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in (
            "missing", "model_attributes_type", "dict_type", "model_type"):  # no body, a text/plain upload, a list
        return "the body must be a JSON object, sent with Content-Type: application/json", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    loc = [x for x in loc if x.isdigit() or x.isidentifier() and x not in ("str", "int", "list", "float", "bool")]
    where = ".".join(loc)
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{where}: {message}" if where else message), where or None


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------
def create_app(model, tokenizer, model_name: str = "glm-small", api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 128, batcher_thread: bool = True,
               chat_template: str | None = None, broadcast=None) -> FastAPI:
    """The FastAPI app serving `model` (plain or quantized). The batcher starts with the app on
    its own thread, unless `batcher_thread=False`: then the caller runs `app.state.server.batcher.run`
    (glm130b serve does, on the main thread). `broadcast`: rank 0 of `serve --tp` (the other
    ranks run batcher.follow)."""
    server = Server(model, tokenizer, model_name, max_batch, max_queue, chat_template, broadcast)

    @asynccontextmanager
    async def lifespan(app):
        if batcher_thread:
            server.batcher.start()
        try:
            yield
        finally:
            server.batcher.close()

    app = FastAPI(title="glm130b", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and GLM blank infilling")
    app.state.server = server
    app.add_middleware(MetricsMiddleware, metrics=lambda: server.metrics)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        try:  # the key is checked first: a wrong key is 401 whatever the body holds
            authorized(request)
        except APIError as denied:
            return await api_error(request, denied)
        message, param = _validation_message(e.errors())
        return _error(400, message, param=param)

    @app.exception_handler(GLMError)
    async def input_error(_request, e: GLMError):  # e.g. text the tokenizer cannot take
        return _error(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("glm130b.serve").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health)
    async def health():
        return Health(model=model_name, running=server.batcher.running, waiting=server.batcher.queue_depth)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=[Depends(authorized)])
    async def models():
        card = ModelCard(id=model_name, created=server.created, max_model_len=server.max_len)
        return ModelList(data=[card])

    @app.post("/v1/completions", response_model=Completion, responses=ERRORS, dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        return await server.completions(req, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,
              dependencies=[Depends(authorized)])
    async def chat(req: ChatRequest, request: Request):
        return await server.chat(req, request)

    @app.post("/v1/embeddings", response_model=EmbeddingList, responses=ERRORS, dependencies=[Depends(authorized)])
    async def embeddings(req: EmbeddingRequest):
        return await server.embeddings(req)

    @app.post("/v1/infill", response_model=Infill, responses=ERRORS, dependencies=[Depends(authorized)])
    async def infill(req: InfillRequest, request: Request):
        return await server.infill(req, request)

    return app
