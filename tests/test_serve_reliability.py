"""The server under bad input: one bad request never touches the others, and every bad body is a
400 (or 401) with OpenAI's error body that names the field, never a 500 or a hang."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from helpers import varied_model
from test_serve import running

from glm130b.infer.engine import GenerationConfig
from glm130b.infer.generate import generate
from glm130b.model.masks import Block
from glm130b.serve.app import create_app
from glm130b.serve.batcher import Batcher, Event, Job
from glm130b.tokenizer import default_tokenizer

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model():
    return varied_model("1d", seed=1, max_seq_len=128)


@pytest.fixture(scope="module")
def live(model, tokenizer):
    app = create_app(model, tokenizer, model_name="m", api_key=KEY, max_batch=4, max_queue=16)
    with running(app) as base:
        yield base


def post(base, path, body, headers=AUTH, timeout=30):
    """POST a body as raw JSON text (httpx's json= refuses lone surrogates, a client may not)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}{path}", content=data, headers=headers, timeout=timeout)


def test_a_joining_job_that_fails_leaves_the_running_ones_alone(model, tokenizer):
    """A seed torch cannot take fails its own job when it joins; the job already decoding goes on
    to the tokens it gets alone (before: both failed, and the bad job never heard back)."""
    batcher = Batcher(model, tokenizer, max_batch=4).start()
    try:
        ids = tokenizer.encode("In the beginning") + [tokenizer.gmask_id]
        block = [Block(len(ids) - 1, 0, continues=True)]
        good, bad, done = [], [], threading.Event()
        bad_done = threading.Event()

        def on_bad(ev: Event):
            bad.append(ev)
            bad_done.set()

        def on_good(ev: Event):
            good.append(ev)
            if ev.kind == "token" and len(good) == 1:  # joins while this job decodes
                cfg = GenerationConfig(max_new_tokens=4, strategy="sample", seed=1)
                object.__setattr__(cfg, "seed", 2**64)  # a setting that fails only when the job joins
                batcher.submit([Job(ids, block, cfg, on_bad)])
            if ev.kind in ("done", "error"):
                done.set()

        batcher.submit([Job(ids, block, GenerationConfig(max_new_tokens=20, min_new_tokens=20), on_good)])
        assert done.wait(60) and bad_done.wait(60)
        assert [e.kind for e in bad] == ["error"] and "Overflow" in bad[0].message
        assert good[-1].kind == "done" and good[-1].reason == "length"
        want = generate(model, tokenizer, "In the beginning",
                        config=GenerationConfig(max_new_tokens=20, min_new_tokens=20))
        assert tokenizer.decode([e.token for e in good if e.kind == "token"]) == want
    finally:
        batcher.close()


def _stream(base, body, out: list, started: threading.Event):
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                started.set()


def test_an_overflowing_seed_is_400_and_a_running_stream_is_untouched(live, model, tokenizer):
    prompt = "And God said"
    body = {"prompt": prompt, "max_tokens": 60, "min_tokens": 60, "temperature": 0, "stream": True}
    events, started = [], threading.Event()
    t = threading.Thread(target=_stream, args=(live, body, events, started))
    t.start()
    assert started.wait(60)
    for seed in (2**64, -(2**63) - 1):
        r = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    t.join(60)
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    assert text == generate(model, tokenizer, prompt, config=GenerationConfig(max_new_tokens=60, min_new_tokens=60))
    # the edges of the range work, and n choices past the top wrap as torch does
    r = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": 2**64 - 1, "n": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "\ud800abc", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "bad \udfff"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "\udfff"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "\ud800"}, "stop"),
    ("/v1/infill", {"text": "\ud800 [MASK]"}, "text"),
])
def test_lone_surrogates_are_400_naming_the_field(live, path, body, param):
    r = post(live, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "lone surrogate" in err["message"], err


def test_token_id_prompts_are_served(live, model, tokenizer):
    ids = tokenizer.encode("In the beginning")
    by_text = post(live, "/v1/completions", {"prompt": "In the beginning", "max_tokens": 5, "temperature": 0})
    by_ids = post(live, "/v1/completions", {"prompt": ids, "max_tokens": 5, "temperature": 0})
    many = post(live, "/v1/completions", {"prompt": [ids, ids], "max_tokens": 5, "temperature": 0, "echo": True})
    assert by_ids.status_code == 200 and many.status_code == 200, (by_ids.text, many.text)
    assert by_ids.json()["choices"][0]["text"] == by_text.json()["choices"][0]["text"]
    assert [c["text"] for c in many.json()["choices"]] == ["In the beginning" + by_text.json()["choices"][0]["text"]] * 2
    r = post(live, "/v1/completions", {"prompt": [tokenizer.vocab_size], "max_tokens": 2})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("body,param,needle", [
    ({"prompt": [1, "a"]}, "prompt", "token ids"),
    ({"prompt": [[1], "a"]}, "prompt", "token ids"),
    ({"prompt": [-1]}, "prompt", "token ids must be >= 0"),
    ({"prompt": [[3], [-1]]}, "prompt", "token ids must be >= 0"),
    ({"prompt": True}, "prompt", "must be a string"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "stop": [1]}, "stop", "non-empty strings"),
    ({"prompt": "x", "stop": ""}, "stop", "empty"),
])
def test_wrong_shapes_say_what_is_expected(live, body, param, needle):
    r = post(live, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and "Value error" not in err["message"], err
    assert ".str" not in err["message"] and "list[" not in err["message"]


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "n": 2.0}, "n", "valid integer"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", "valid boolean"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, None, "min_tokens (5) must not exceed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                              "max_completion_tokens": 4}, None, "differ: give one of them"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_tokens": 9,
                              "max_completion_tokens": 4}, None, "min_tokens (9) must not exceed"),
])
def test_values_of_another_kind_are_not_coerced(live, path, body, param, needle):
    r = post(live, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0}).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/infill", {"text": "a [MASK] b", "n": 2}, "n"),
    ("/v1/infill", {"text": "a [MASK] b", "min_tokens": 3}, "min_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
])
def test_fields_not_served_are_refused_not_ignored(live, path, body, param):
    r = post(live, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported", err
    neutral = {**body, param: {"n": 1, "min_tokens": 0, "response_format": {"type": "text"}}[param], "max_tokens": 2}
    assert post(live, path, neutral).status_code == 200


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/embeddings", {"input": []}, "input: must be a non-empty string, or a non-empty list"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input: item 1 is an empty string"),
    ("/v1/infill", {"text": ""}, "the text has no [MASK], [sMASK] or [gMASK] blank to fill"),
])
def test_empty_inputs_say_what_is_missing(live, path, body, needle):
    r = post(live, path, body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("content,headers", [
    (b"", {"content-type": "application/json"}),
    (b"just text", {"content-type": "text/plain"}),
    (b"[1, 2]", {"content-type": "application/json"}),
])
def test_a_body_that_is_not_a_json_object_says_so(live, content, headers):
    r = httpx.post(f"{live}/v1/completions", content=content, headers={**AUTH, **headers}, timeout=30)
    assert r.status_code == 400, r.text
    assert "the body must be a JSON object" in r.json()["error"]["message"], r.text


def test_invalid_json_and_a_wrong_key(live):
    r = post(live, "/v1/completions", b'{"prompt": "x", "max_tokens": 16')
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None and "not valid JSON" in err["message"], err
    for headers in ({"content-type": "application/json"},
                    {"content-type": "application/json", "Authorization": "Bearer wrong"}):
        for body in (b'{"prompt": "x",', b'{"prompt": 5}', b'{}'):
            r = post(live, "/v1/completions", body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (body, r.text)
