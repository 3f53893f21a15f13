"""`glm130b serve` stopped by SIGTERM or SIGINT: requests in flight finish (or, past the drain
time, end with an error event and [DONE]), nothing new is accepted, and the process exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from helpers import varied_model

import glm130b
from glm130b.checkpoint import save_model
from glm130b.tokenizer import default_tokenizer

SRC = str(Path(glm130b.__file__).resolve().parents[1])  # the code under test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served") / "m"
    save_model(out, varied_model("1d", seed=1, max_seq_len=512), default_tokenizer())
    return out


class Served:
    """A `glm130b serve` subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, *flags: str, env: dict | None = None, launcher: list[str] | None = None):
        self.proc = subprocess.Popen(
            [*(launcher or [sys.executable, "-m", "glm130b", "serve"]), "--model", str(model_dir), "--port", "0",
             "--log-level", "warning", *flags],
            env={**os.environ, "PYTHONPATH": SRC, **(env or {})}, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.base: str | None = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
                if m and self.base is None:
                    self.base = m.group(1)
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not (ready.wait(180) and self.base):
            self.kill()  # never leave a server behind
            raise AssertionError("the server did not start: " + "".join(self.lines))

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def stream_events(base: str, body: dict, out: list, first: threading.Event) -> None:
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    first.set()
    except httpx.HTTPError as e:
        out.append(f"transport error: {e!r}")
    first.set()


def _choices_text(events: list[str]) -> str:
    return "".join(c["text"] for e in events if e.startswith("{") for c in json.loads(e).get("choices", []))


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_lets_requests_in_flight_finish_then_exits_0(model_dir, sig):
    served = Served(model_dir, "--drain-timeout", "60")
    try:
        body = {"prompt": "In the beginning", "max_tokens": 200, "min_tokens": 200, "temperature": 0}
        events, first = [], threading.Event()
        streamer = threading.Thread(target=stream_events, args=(served.base, {**body, "stream": True}, events, first))
        streamer.start()
        plain: list = []
        poster = threading.Thread(target=lambda: plain.append(httpx.post(f"{served.base}/v1/completions",
                                                                          json=body, timeout=120)))
        poster.start()
        assert first.wait(60)
        code = served.stop(sig)
        streamer.join(60)
        poster.join(60)
    finally:
        served.kill()
    assert code == 0, "".join(served.lines)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events), events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert plain[0].status_code == 200 and plain[0].json()["usage"]["completion_tokens"] == 200
    assert plain[0].json()["choices"][0]["text"] == _choices_text(events)
    assert "no new requests; finishing" in "".join(served.lines)


@pytest.mark.slow
def test_past_the_drain_time_streams_end_with_an_error_event(model_dir):
    served = Served(model_dir, "--drain-timeout", "0", env={"GLM130B_NO_KERNELS": "1"})  # slower decoding
    try:
        body = {"prompt": "In the beginning", "max_tokens": 400, "min_tokens": 400, "temperature": 0}
        events, first = [], threading.Event()
        streamer = threading.Thread(target=stream_events, args=(served.base, {**body, "stream": True}, events, first))
        streamer.start()
        assert first.wait(60)
        code = served.stop(signal.SIGTERM)
        streamer.join(60)
    finally:
        served.kill()
    assert code == 0, "".join(served.lines)
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down", error


def test_bad_drain_timeout_is_one_line(capsys):
    from glm130b.cli import main

    assert main(["serve", "--drain-timeout", "-1"]) == 2
    assert "--drain-timeout" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.slow  # a torchrun launch of two serving ranks
@pytest.mark.parametrize("extra", [[], ["--compile", "--max-batch", "2"]], ids=["eager", "compiled"])
def test_serve_tensor_parallel_under_torchrun(model_dir, extra):
    """`torchrun --nproc-per-node 2 -m glm130b serve --tp 2`: rank 0 serves HTTP and broadcasts
    each batcher step, rank 1 follows. Two concurrent greedy completions of different lengths
    (rows join, one leaves while the other decodes) give the library's text; embeddings are
    refused; SIGTERM to torchrun stops every rank (no hang). With --compile every rank compiles
    the same padded steps at start (the warm-up is broadcast too) and the text is the same."""
    from glm130b.checkpoint import load_model
    from glm130b.infer.engine import GenerationConfig
    from glm130b.infer.generate import generate

    model, tokenizer = load_model(model_dir)
    prompts, lengths = ["In the beginning God created", "And the earth was without form"], [6, 14]
    want = [generate(model, tokenizer, p, config=GenerationConfig(max_new_tokens=n)) for p, n in zip(prompts, lengths,
                                                                                                     strict=True)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "glm130b", "serve", "--tp", "2", *extra]
    served = Served(model_dir, env={"OMP_NUM_THREADS": "1"}, launcher=launcher)
    try:
        workers = _children(served.proc.pid)
        got = [None, None]

        def ask(i):
            r = httpx.post(f"{served.base}/v1/completions", timeout=120,
                           json={"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0})
            got[i] = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert got == want
        if extra:  # compiled for 1 and 2 rows at start, with no fallback to the eager step
            log = "".join(served.lines)
            assert "decode step compiled for 1, 2 rows" in log and "compile of the decode step failed" not in log, log
        r = httpx.post(f"{served.base}/v1/embeddings", json={"input": "hi"}, timeout=30)
        assert r.status_code == 400 and "--tp" in r.json()["error"]["message"]
        served.stop(signal.SIGTERM, timeout=90)  # torchrun sends SIGTERM to both ranks; rank 0 drains, rank 1 follows
        assert workers and not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                                and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    finally:
        served.kill()
    if extra:
        return
    # rank 0 failing before it serves still lets rank 1 go: one error line, every rank ends
    out = subprocess.run([*launcher, "--model", str(model_dir), "--port", "0", "--chat-template", "/no/such/template"],
                         env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode != 0 and any(line.startswith("error: ") and "template" in line
                                       for line in out.stderr.splitlines()), out.stderr[-2000:]
