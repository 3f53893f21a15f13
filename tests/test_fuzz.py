"""Fuzzing (hypothesis, seeded): every HTTP route with schema-shaped and schema-breaking
requests, and every CLI verb with random arguments.

HTTP: no 5xx, an OpenAI error body on every /v1 error, every stream ends with [DONE], and the
server still answers /health at the end. CLI: every run ends with status 0 or 2 (argparse's
usage errors too) and one `error:` line, never a traceback; a run still busy after a few seconds
(a valid command doing real work) is stopped and counted as passed.

GLM130B_FUZZ_EXAMPLES scales both (default: a quick run); GLM130B_FUZZ_SEED picks the cases.
Each test prints one `figures:` line (docs/reliability.md records a larger run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from helpers import varied_model
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from test_serve import running

from glm130b.cli import build_parser, main
from glm130b.serve.app import create_app
from glm130b.tokenizer import default_tokenizer

SEED = int(os.environ.get("GLM130B_FUZZ_SEED", "20"))
EXAMPLES = int(os.environ.get("GLM130B_FUZZ_EXAMPLES", "0"))
KEY = "fuzz-key"
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "glm-small"

# -- HTTP -------------------------------------------------------------------------------------
ROUTES = [("GET", "/"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/docs"),
          ("GET", "/openapi.json"), ("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("POST", "/v1/nothing"),
          ("PUT", "/health")] + [("POST", "/v1/completions"), ("POST", "/v1/infill")] * 6  # the bodies matter there
FIELDS = ["prompt", "text", "max_tokens", "min_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
          "stream_options", "echo", "user", "model", "logprobs", "best_of", "presence_penalty",
          "frequency_penalty", "suffix"]
EDGES = [0, 1, -1, 2, 16, 17, 2**63, 2**64, -(2**63) - 1, 1e308, -0.0, 1e-320, 0.5, True, False, None, "", "x",
         "\ud800", "\udfff x", "[MASK]", "a [MASK] b [sMASK]", "[gMASK]", "<eop>", "子曰", [], [""], ["a"] * 5,
         [101, 202], [[1], [2]], [-1], [10**9], {"include_usage": True}, {"include_usage": "yes"}, "tiny-fuzz"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
field_values = st.one_of(st.sampled_from(EDGES), json_values, st.integers(-5, 40), st.text(max_size=24))
COMPLETION = [{"prompt": "In the beginning", "max_tokens": 4}, {"prompt": ["a", "b"], "max_tokens": 3, "n": 2},
              {"prompt": "x", "max_tokens": 4, "stream": True}, {"prompt": "x", "temperature": 0.8, "seed": 3, "max_tokens": 4}]
INFILL = [{"text": "Let there be [MASK].", "max_tokens": 4}, {"text": "a [MASK] b [sMASK]", "max_tokens": 3, "stream": True}]
TEXTS = ["", "x", "\ud800", "a\udfffb", "\udc80\udc81", "x\ud83d", "[MASK]", "a [MASK] b [sMASK]", "[gMASK]",
         "<eop>", "子曰", "\x00", " " * 300]
INTS = [0, 1, -1, 2, 16, 17, 128, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]
FLOATS = [0, 1e-6, 1e-320, 0.5, 2, 2.0000001, -1, 1e308]
TYPED = {  # each field's edge values: of its type, around its limits, and what broke before
    **{k: TEXTS for k in ("prompt", "text", "user", "model", "suffix")},
    "stop": TEXTS + [[t] for t in TEXTS] + [["a"] * 5, []],
    **{k: INTS for k in ("max_tokens", "min_tokens", "n", "seed", "logprobs", "best_of")},
    **{k: FLOATS for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty")},
    "stream": [True, False, 1, "yes"], "echo": [True, False, None],
}
TYPED["prompt"] = TEXTS + [[101, 202], [[1], [2]], [-1], [10**9], [2**64], [], ["a"] * 65, [1, "a"]]


def _mutated(bases: list[dict], fields: list[str]):
    """A valid body with one to three fields changed to edge values: requests that get past
    validation to the model (generic fuzz rarely does)."""
    change = st.sampled_from(fields).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(TYPED[k]) | json_values))
    return st.builds(lambda base, changes: {**base, **dict(changes)}, st.sampled_from(bases),
                     st.lists(change, min_size=1, max_size=3))


generic = st.one_of(st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=8), json_values)
completion_fields = [k for k in TYPED if k != "text"]
infill_fields = [k for k in TYPED if k not in ("prompt", "n", "echo", "logprobs", "best_of", "suffix")]


def _body(route):
    """A body for the route: mostly mutated valid ones on the two POST routes; also any JSON,
    bytes that are not JSON, and a cut-off body."""
    if route == ("POST", "/v1/completions"):
        shaped = _mutated(COMPLETION, completion_fields)
    elif route == ("POST", "/v1/infill"):
        shaped = _mutated(INFILL, infill_fields)
    else:
        shaped = generic
    return st.one_of(shaped.map(lambda b: json.dumps(b).encode()), shaped.map(lambda b: json.dumps(b).encode()),
                     shaped.map(lambda b: json.dumps(b).encode()), generic.map(lambda b: json.dumps(b).encode()),
                     st.binary(max_size=40), st.just(b'{"prompt": "x", "max_tokens": 16'))


requests = st.sampled_from(ROUTES).flatmap(lambda route: st.tuples(st.just(route), _body(route)))
auth = st.sampled_from([{"Authorization": f"Bearer {KEY}"}] * 8 + [{}, {"Authorization": "Bearer wrong"},
                                                                   {"Authorization": KEY}])


def _check_response(method: str, path: str, r: httpx.Response, events: list[str] | None) -> str | None:
    """What is wrong with a response, or None."""
    if r.status_code >= 500:
        return f"{r.status_code} {r.text[:200]}"
    if path.startswith("/v1/") and r.status_code >= 400:
        try:
            err = r.json()["error"]
            assert err["message"] and err["type"]
        except Exception:  # noqa: BLE001
            return f"{r.status_code} without OpenAI's error body: {r.text[:200]}"
    if events is not None and (not events or events[-1] != "[DONE]"):
        return f"stream without [DONE]: {events[-3:]}"
    return None


@pytest.fixture(scope="module")
def fuzz_server():
    app = create_app(varied_model("1d", seed=3, max_seq_len=128), default_tokenizer(), model_name="tiny-fuzz",
                     api_key=KEY, max_batch=4, max_queue=32)
    with running(app) as base:
        yield base


def test_http_fuzz_every_route(fuzz_server):
    base, tried, failures, statuses = fuzz_server, [0], [], {}

    @hypothesis_seed(SEED)
    @settings(max_examples=EXAMPLES or 150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=requests, headers=auth)
    def one(request, headers):
        (method, path), body = request
        tried[0] += 1
        headers = {**headers, "content-type": "application/json"}
        with httpx.Client(base_url=base, timeout=60) as client:
            events = None
            with client.stream(method, path, content=body if method != "GET" else None, headers=headers) as r:
                if r.headers.get("content-type", "").startswith("text/event-stream"):
                    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                else:
                    r.read()
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        problem = _check_response(method, path, r, events)
        if problem:
            failures.append(f"{method} {path} {body[:120]!r}: {problem}")

    one()
    assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"
    print(f"\nfigures: http requests {tried[0]}, failures {len(failures)}, statuses {dict(sorted(statuses.items()))}")
    assert not failures, failures[:5]


# -- CLI --------------------------------------------------------------------------------------------
class _Busy(Exception):
    """The command was still running when its time was up: real work, not a failure."""


INTS = ["-1", "0", "1", "2", "3", "7", "2147483648", "18446744073709551616", "abc", "", "1.5"]
FLOATS = ["-1", "0", "0.5", "1", "2.5", "nan", "inf", "1e309", "x", "1e-320"]


def _text_pool(tmp: Path) -> list[str]:
    """Values for text options; the model is a copy (a fuzzed `train --out` must not write into the repo)."""
    import shutil

    a_file = tmp / "a-file"
    a_file.write_text("not a model\n")
    model = tmp / "glm-small"
    shutil.copytree(SHIPPED, model)
    return ["", "x", "\udcff", "In the beginning", "Paris is the [MASK] of France.", "[gMASK]", "glm-130b", "tiny",
            "small", "nope", "mmlu", "lambada_openai", "4x24GB", "8x40GB", "1xabc", str(model), str(a_file),
            str(tmp / "missing"), str(tmp / "out"), str(tmp / "a-file" / "under"), str(tmp / "x.png"), "-", "--"]


def _argv_strategy(verb: str, parser: argparse.ArgumentParser, texts: list[str]):
    """Random argv for one verb: some of its options, each with a value of its type (or not)."""
    parts = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        if action.choices:
            values = st.sampled_from([str(c) for c in action.choices] + ["bogus"])
        elif action.type is int:
            values = st.sampled_from(INTS)
        elif action.type is float:
            values = st.sampled_from(FLOATS)
        else:
            values = st.sampled_from(texts)
        if (verb, action.dest) in (("generate", "tp"), ("infill", "tp")):
            values = st.sampled_from(["-1", "0", "1", "x"])  # > 1 needs torchrun's peers
        if not action.option_strings:  # positional: almost always given
            parts.append(st.lists(values, min_size=1, max_size=1 if action.nargs is None else 2)
                         | st.just([]).filter(lambda _: True))
        elif action.nargs == 0:
            parts.append(st.sampled_from([[], [], [action.option_strings[0]]]))
        else:
            parts.append(st.one_of(st.just([]), st.just([]), values.map(lambda v, o=action.option_strings[0]: [o, v])))
    extra = st.sampled_from([[], [], [], ["--nope"], ["-h"]])
    return st.tuples(st.permutations(parts).flatmap(lambda ps: st.tuples(*ps)), extra).map(
        lambda t: [verb] + [x for part in t[0] for x in part] + t[1])


@pytest.mark.slow
def test_cli_fuzz_every_verb(tmp_path, capsys, monkeypatch):
    import uvicorn

    monkeypatch.chdir(tmp_path)  # relative defaults (runs/tiny, runs/demo) land here
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)  # serve: everything but the socket
    texts = _text_pool(tmp_path)
    shipped_before = sorted(p.name for p in SHIPPED.iterdir())
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    counts = {"tried": 0, "ok": 0, "error": 0, "usage": 0, "busy": 0}
    failures = []

    def alarm(_signum, _frame):
        raise _Busy

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        for verb, parser in verbs.items():
            @hypothesis_seed(SEED)
            @settings(max_examples=EXAMPLES or 12, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(argv=_argv_strategy(verb, parser, texts))
            def one(argv):
                counts["tried"] += 1
                usage = False
                signal.setitimer(signal.ITIMER_REAL, 4, 1)  # repeats: an alarm swallowed somewhere comes again
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse: usage error (2) or --help (0)
                    code, usage = e.code, True
                except _Busy:
                    counts["busy"] += 1
                    return
                except BaseException as e:  # noqa: BLE001 - a traceback is the failure we look for
                    failures.append(f"{argv!r}: {type(e).__name__}: {e}")
                    return
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    out, err = capsys.readouterr()
                if code not in (0, 2):
                    failures.append(f"{argv!r}: exit {code}: {err[-300:]}")
                elif code == 2 and "error:" not in err:
                    failures.append(f"{argv!r}: exit 2 without an error line: {err[-300:]}")
                elif "Traceback" in err:
                    failures.append(f"{argv!r}: traceback: {err[-300:]}")
                else:
                    counts["usage" if usage else "ok" if code == 0 else "error"] += 1

            one()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    print(f"\nfigures: cli runs {counts['tried']} over {len(verbs)} verbs, failures {len(failures)}, "
          f"exit 0 {counts['ok']}, one-line errors {counts['error']}, argparse usage errors {counts['usage']}, "
          f"busy {counts['busy']}")
    assert sorted(p.name for p in SHIPPED.iterdir()) == shipped_before  # nothing written into the repo
    assert not failures, failures[:8]
