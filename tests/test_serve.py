"""The HTTP server against a live uvicorn on 127.0.0.1: the OpenAI client, streaming, continuous
batching (concurrent greedy outputs equal single-request outputs), limits and errors, cancelled
streams, metrics, schema fuzzing, and the web page in headless Chromium."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
from helpers import varied_model

from glm130b.cli import main
from glm130b.infer.engine import GenerationConfig
from glm130b.infer.generate import generate, infill
from glm130b.model.masks import Block
from glm130b.quant import kernels as K
from glm130b.serve.app import create_app
from glm130b.serve.batcher import Batcher, Event, Job, QueueFull
from glm130b.tokenizer import default_tokenizer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["In the beginning", "And God said", "天地玄黄，宇宙洪荒", "The", "Blessed are the meek, for they",
           "子曰：学而时习之", "a", "Then the LORD answered Job out of the whirlwind, and said"]


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model():
    return varied_model("1d", seed=1, max_seq_len=128)


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(model, tokenizer):
    app = create_app(model, tokenizer, model_name="tiny-test", api_key=KEY, max_batch=8, max_queue=64)
    with running(app) as base:
        yield base, app


def single(model, tokenizer, prompt, max_tokens, **kw):
    return generate(model, tokenizer, prompt, config=GenerationConfig(max_new_tokens=max_tokens, **kw))


def _wait(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# The batcher alone
# --------------------------------------------------------------------------------------------
def _run_jobs(batcher, specs):
    """Submit (context, blocks, config) jobs at once; return each job's tokens per block."""
    out = [dict() for _ in specs]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(ev: Event):
            if ev.kind == "token":
                out[i].setdefault(ev.block, []).append(ev.token)
            elif ev.kind in ("done", "error"):
                assert ev.kind == "done", ev.message
                done.release()
        return emit

    batcher.submit([Job(c, b, cfg, emitter(i)) for i, (c, b, cfg) in enumerate(specs)])
    for _ in specs:
        assert done.acquire(timeout=60)
    return out


@pytest.mark.parametrize("rotary,compile_decode", [("1d", False), ("2d", False), ("1d", "eager"), ("2d", "eager")])
def test_batcher_equals_single_requests(rotary, compile_decode, tokenizer):
    """Rows of different lengths joining a batch of 3 give the tokens each gets alone, for
    continuations, seeded sampling and multi-blank infilling; also with the static cache of the
    compiled decode step (its steps uncompiled here: test_compiled_decode compiles)."""
    model = varied_model(rotary, seed=2)
    model.compile_decode = compile_decode  # the batcher's engine only: the expectations decode plainly
    batcher = Batcher(model, tokenizer, max_batch=4 if compile_decode else 3)
    model.compile_decode = False
    assert batcher.engine.compile_decode == bool(compile_decode)
    stepped = []  # the rows of every step (compiled: padded to 1, 2 or 4 with free rows)
    step = batcher.engine.step
    batcher.engine.step = lambda tokens, *a: stepped.append(len(tokens)) or step(tokens, *a)
    batcher.start()
    try:
        greedy = GenerationConfig(max_new_tokens=10)
        sample = GenerationConfig(max_new_tokens=10, strategy="sample", temperature=0.9, top_p=0.9, seed=7)
        specs, expect = [], []
        for p in PROMPTS[:6]:
            ids = tokenizer.encode(p) + [tokenizer.gmask_id]
            for cfg in (greedy, sample):
                specs.append((ids, [Block(len(ids) - 1, 0, continues=True)], cfg))
                expect.append([single(model, tokenizer, p, 10, strategy=cfg.strategy, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seed=cfg.seed)])
        text = "In the [MASK] God created the [MASK] and the [gMASK]"
        ids = tokenizer.encode(text)
        blanks = [Block(i, 0, continues=t == tokenizer.gmask_id) for i, t in enumerate(ids)
                  if t in (tokenizer.mask_id, tokenizer.gmask_id)]
        specs.append((ids, blanks, GenerationConfig(max_new_tokens=6)))
        expect.append(infill(model, tokenizer, text, config=GenerationConfig(max_new_tokens=6), reuse_cache=True).spans)
        got = _run_jobs(batcher, specs)
        texts = [[tokenizer.decode(g.get(k, [])) for k in range(len(e))] for g, e in zip(got, expect, strict=True)]
        assert texts == expect
        assert len({t[0] for t in texts}) > 3  # the outputs differ: a real comparison
        if K.cpu_kernels_available() and not compile_decode:
            assert batcher.engine._fused  # the slotted cache ran the fused decode step
        assert set(stepped) <= ({1, 2, 4} if compile_decode else {1, 2, 3})
        assert max(stepped) == (4 if compile_decode else 3)
        _wait(lambda: batcher.running == 0 and batcher.queue_depth == 0)
    finally:
        batcher.close()


def test_batcher_queue_bound(model, tokenizer):
    batcher = Batcher(model, tokenizer, max_batch=2, max_queue=1)  # not started: nothing leaves the queue
    ids = tokenizer.encode("a") + [tokenizer.gmask_id]
    job = lambda: Job(ids, [Block(len(ids) - 1, 0, continues=True)], GenerationConfig(), lambda ev: None)  # noqa: E731
    batcher.submit([job(), job()])  # two free rows
    batcher.submit([job()])  # one may wait
    with pytest.raises(QueueFull):
        batcher.submit([job()])
    with pytest.raises(ValueError, match="beam"):
        batcher.submit([Job(ids, [Block(len(ids) - 1, 0, True)], GenerationConfig(strategy="beam"), lambda e: None)])


# --------------------------------------------------------------------------------------------
# The live server
# --------------------------------------------------------------------------------------------
def test_openai_client(live, model, tokenizer):
    import openai

    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    want = single(model, tokenizer, PROMPTS[0], 12)
    r = client.completions.create(model="tiny-test", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(tokenizer.encode(PROMPTS[0])) + 1  # + [gMASK]
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == len(tokenizer.encode(want))
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny-test", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == want and len(pieces) > 1
    # list prompts and n: OpenAI's choice order (prompt-major); seeded sampling is reproducible
    r1 = client.completions.create(model="tiny-test", prompt=PROMPTS[:2], n=2, max_tokens=6, temperature=1.0, seed=5)
    r2 = client.completions.create(model="tiny-test", prompt=PROMPTS[:2], n=2, max_tokens=6, temperature=1.0, seed=5)
    assert [c.index for c in r1.choices] == [0, 1, 2, 3]
    assert [c.text for c in r1.choices] == [c.text for c in r2.choices]
    assert r1.choices[0].text == single(model, tokenizer, PROMPTS[0], 6, strategy="sample", seed=5)
    assert r1.choices[3].text == single(model, tokenizer, PROMPTS[1], 6, strategy="sample", seed=8)  # seed + choice index
    # stop strings cut the text (and are not part of it)
    full = single(model, tokenizer, PROMPTS[4], 20)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if stop.strip():
        r = client.completions.create(model="tiny-test", prompt=PROMPTS[4], max_tokens=20, temperature=0, stop=[stop])
        assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny-test", prompt="word " * 200, max_tokens=8)


def test_infill_endpoint(live, model, tokenizer):
    base, _ = live
    text = "Blessed are the [MASK], for they shall [MASK] the earth."
    want = infill(model, tokenizer, text, config=GenerationConfig(max_new_tokens=5))
    r = httpx.post(f"{base}/v1/infill", json={"text": text, "max_tokens": 5}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == want.text and [s["text"] for s in body["spans"]] == want.spans
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(text))
    events = _sse(httpx.stream("POST", f"{base}/v1/infill", json={"text": text, "max_tokens": 5, "stream": True},
                               headers=AUTH, timeout=60))
    spans = ["", ""]
    for ev in events[:-1]:
        spans[ev["span"]] += ev["text"]
    assert spans == want.spans and events[-1]["text"] == want.text
    # the one-cache layout on request, equal to the library's
    fast = infill(model, tokenizer, text, config=GenerationConfig(max_new_tokens=5), reuse_cache=True)
    r = httpx.post(f"{base}/v1/infill", json={"text": text, "max_tokens": 5, "reuse_cache": True}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200 and r.json()["text"] == fast.text
    r = httpx.post(f"{base}/v1/infill", json={"text": "no blank here"}, headers=AUTH)
    assert r.status_code == 400 and "blank" in r.json()["error"]["message"]


def _sse(stream_ctx) -> list[dict]:
    events = []
    with stream_ctx as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                if data == "[DONE]":
                    return events
                events.append(json.loads(data))
    raise AssertionError("stream ended without [DONE]")


def test_32_concurrent_streams_equal_single_requests(live, model, tokenizer):
    """32 clients at once through 8 batch rows: each greedy stream equals its prompt alone."""
    base, app = live
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]
    max_tokens = [8 + (i % 5) * 3 for i in range(32)]  # requests leave the batch at different steps
    want = {(p, m): single(model, tokenizer, p, m) for p, m in zip(prompts, max_tokens, strict=True)}
    got: list[str | None] = [None] * 32
    steps0 = app.state.server.batcher.steps

    def client(i):
        events = _sse(httpx.stream("POST", f"{base}/v1/completions", headers=AUTH, timeout=120, json={
            "prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0, "stream": True}))
        got[i] = "".join(c["text"] for ev in events for c in ev["choices"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert got == [want[(p, m)] for p, m in zip(prompts, max_tokens, strict=True)]
    # they shared decoding steps: far fewer steps than the tokens generated
    generated = sum(len(tokenizer.encode(g)) for g in got)
    assert app.state.server.batcher.steps - steps0 < generated / 2


def test_errors_are_openai_shaped(live):
    base, _ = live
    cases = [
        ({"prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "n": 100}, 400, "n"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": []}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "fill [MASK] here"}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ({"prompt": ["x"] * 64, "n": 2}, 400, "n"),  # more sequences than the server ever holds: not a 503
    ]
    for body, status, param in cases:
        r = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and (err["param"] or "").startswith(param), (body, err)
    r = httpx.post(f"{base}/v1/completions", content=b'{"prompt": "x",', headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health").status_code == 200  # health needs no key
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 5e-324}, headers=AUTH)
    assert r.status_code == 200  # found by the fuzzer: 1/T overflowed into NaN probabilities (now greedy)
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "", "max_tokens": 3, "top_p": 5e-324}, headers=AUTH)
    assert r.status_code == 200  # found by the fuzzer: a top_p of 0 in FP32 dropped every token
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": None, "temperature": 0}, headers=AUTH)
    assert r.status_code == 200 and 0 < r.json()["usage"]["completion_tokens"] <= 128 - 3  # null: to the context end
    assert httpx.get(f"{base}/v1/nothing", headers=AUTH).status_code == 404


def test_full_queue_answers_503_with_retry_after(model, tokenizer):
    app = create_app(model, tokenizer, model_name="m", max_batch=1, max_queue=0)
    with running(app) as base:
        batcher, release, started = app.state.server.batcher, threading.Event(), threading.Event()

        def stall(ev):  # holds the batcher's only row until released
            started.set()
            release.wait(30)

        ids = tokenizer.encode("a") + [tokenizer.gmask_id]
        batcher.submit([Job(ids, [Block(len(ids) - 1, 0, True)], GenerationConfig(max_new_tokens=3), stall)])
        assert started.wait(30)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        release.set()
        _wait(lambda: batcher.running == 0)
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_cancelled_streams_free_their_rows(live, model, tokenizer):
    """Clients that hang up mid-stream, many in a row: every job is cancelled and forgotten."""
    base, app = live
    server = app.state.server
    cancelled0 = server.metrics.cancelled._value.get()
    for i in range(40):
        body = {"prompt": PROMPTS[i % 8], "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            next(r.iter_lines())
    _wait(lambda: server.batcher.running == 0 and server.batcher.queue_depth == 0)
    assert server.metrics.cancelled._value.get() - cancelled0 >= 30  # most hung up before finishing
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Job]  # no job is kept alive
    r = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0},
                   headers=AUTH)
    assert r.json()["choices"][0]["text"] == single(model, tokenizer, PROMPTS[0], 5)


def test_metrics_and_health(live):
    base, _ = live
    httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH)
    httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 0}, headers=AUTH)
    text = httpx.get(f"{base}/metrics").text
    for series in ("glm130b_requests_total", "glm130b_generation_tokens_total", "glm130b_queue_depth",
                   "glm130b_running_requests", "glm130b_request_latency_seconds_bucket",
                   "glm130b_time_to_first_token_seconds_bucket"):
        assert series in text
    assert 'glm130b_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert httpx.get(f"{base}/health").json()["model"] == "tiny-test"


def test_schema_fuzzing_finds_no_server_error(live):
    """schemathesis sends schema-driven (and schema-breaking) bodies to every operation: no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    base, _ = live
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures = []

    def fuzz(case):
        case.headers = {**(case.headers or {}), **AUTH}
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 24)  # keep generation short
        response = case.call(base_url=base, timeout=60)
        try:
            case.validate_response(response, checks=(not_a_server_error,))
        except Exception as e:  # collect, then fail with all of them
            failures.append(f"{case.operation.label}: {e}")

    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/infill", "GET /v1/models"}
    for operation in operations:
        settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
            given(case=operation.as_strategy())(fuzz))()
    assert not failures, failures[:3]


# --------------------------------------------------------------------------------------------
def test_web_page_in_headless_chromium(live, tmp_path):
    """A person's view: open the page in Debian's Chromium, type, click, and see text come back."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium when it can)")
    sync_api = pytest.importorskip("playwright.sync_api")
    base, _ = live
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=browser, headless=True, args=flags)
        try:
            page = chrome.new_page(viewport={"width": 1000, "height": 900})
            page.goto(base + "/")
            page.fill("#key", KEY)
            page.fill("#prompt", "In the beginning")
            page.click("#complete")
            page.wait_for_function("document.getElementById('completion').dataset.done === '1'", timeout=60000)
            page.fill("#text", "Let there be [MASK].")
            page.click("#fill")
            page.wait_for_function("document.getElementById('filled').dataset.done === '1'", timeout=60000)
            for message in ("Who created the heaven?", "And then?"):  # two turns of one conversation
                page.fill("#message", message)
                page.click("#send")
                page.wait_for_function("document.getElementById('reply').dataset.done === '1'", timeout=60000)
            turns = page.locator("#chatlog .turn").count()
            completion, filled = page.inner_text("#completion"), page.inner_text("#filled")
            errors = [page.get_attribute(f"#{x}", "class") for x in ("completion", "filled", "reply")]
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            chrome.close()
    assert errors == [None, None, None] and completion.strip(), (errors, completion)
    assert turns == 2
    assert filled.startswith("Let there be") and filled.endswith(".") and "[MASK]" not in filled
    # the screenshot shows the page: a PNG with more than a blank background
    import matplotlib.image

    pixels = torch.tensor(matplotlib.image.imread(shot))
    assert pixels.shape[0] > 300 and pixels.float().std() > 0.05


def test_cli_serve_bad_model(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("env", [{"GLM130B_FUSED_DECODE": "0", "GLM130B_KV_CACHE": "fp16"},
                                 {"GLM130B_KV_CACHE": "fp32"}])
def test_batcher_with_any_cache_dtype_and_path(env, tokenizer, monkeypatch):
    """The module path writes an FP16 slot cache too (an index_put does not convert dtypes), and
    an FP32 cache works on the fused path: the batcher still gives each request's own tokens."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model = varied_model("1d", seed=2)
    batcher = Batcher(model, tokenizer, max_batch=3).start()
    try:
        greedy = GenerationConfig(max_new_tokens=8)
        specs, expect = [], []
        for p in PROMPTS[:3]:
            ids = tokenizer.encode(p) + [tokenizer.gmask_id]
            specs.append((ids, [Block(len(ids) - 1, 0, continues=True)], greedy))
            expect.append(single(model, tokenizer, p, 8))
        got = _run_jobs(batcher, specs)
        assert [tokenizer.decode(g.get(0, [])) for g in got] == expect
        assert batcher.engine.kv_dtype == (torch.float16 if env.get("GLM130B_KV_CACHE") == "fp16" else torch.float32)
    finally:
        batcher.close()


def test_chat_completions_with_the_openai_client(live, model, tokenizer):
    """chat.completions.create: the rendered conversation continued as generate() continues it;
    streaming deltas, n, usage, and OpenAI's errors."""
    import openai

    from glm130b.infer.chat import PLAIN, encode_chat

    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "In the beginning"}]
    r = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=8, temperature=0)
    ids = encode_chat(tokenizer, PLAIN, messages)
    from glm130b.infer.generate import generate_block
    from glm130b.model.masks import Block

    want = generate_block(model, ids, Block(len(ids) - 1, 0, continues=True), tokenizer.sop_id,
                          {tokenizer.eop_id, tokenizer.eos_id}, 8)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == tokenizer.decode(want)
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=8, temperature=0,
                                                 n=2, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == tokenizer.decode(want)
    assert chunks[-1].usage.prompt_tokens == 2 * len(ids)
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="tiny-test", messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "word " * 300}],
                                       max_tokens=4)


def test_embeddings_endpoint(live, model, tokenizer):
    import openai

    from glm130b.infer.embed import embed

    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    r = client.embeddings.create(model="tiny-test", input=["In the beginning", "起初"])
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    want = embed(model, [tokenizer.encode("In the beginning", blanks=False)])[0]
    assert max(abs(a - b) for a, b in zip(r.data[0].embedding, want.tolist(), strict=True)) < 1e-5
    import base64

    import numpy as np

    one = client.embeddings.create(model="tiny-test", input="起初", encoding_format="base64")
    floats = np.frombuffer(base64.b64decode(one.data[0].embedding), dtype="<f4")  # as OpenAI encodes them
    assert np.allclose(floats, r.data[1].embedding, atol=1e-6)
