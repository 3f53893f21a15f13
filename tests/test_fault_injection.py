"""Fault injection: the server and the trainer killed at random (seeded) points, on loopback.

Server: rounds of concurrent requests (plain, streamed, infill) against `glm130b serve`, then
SIGTERM, SIGINT or SIGKILL at a random moment. After a SIGTERM/SIGINT every request that was
accepted ends complete or with an error (a stream: an error event and [DONE]), and the process
exits 0; after a SIGKILL every client gets an answer or a connection error, none hangs. The next
server starts and serves.

Trainer: `glm130b train --checkpoint-every 1` killed (SIGKILL or SIGTERM) at random moments,
resumed each time, must end with the same per-step losses as an uninterrupted run, a model
folder that passes its checksum, and no staging leftovers.

Both are slow (process starts dominate). GLM130B_FAULT_ROUNDS / GLM130B_FAULT_KILLS scale
them; GLM130B_FAULT_SEED picks the schedule. Each prints one `figures:` line (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_serve_shutdown import SRC, Served, model_dir  # noqa: F401 - model_dir is a fixture

SEED = int(os.environ.get("GLM130B_FAULT_SEED", "20"))
ROUNDS = int(os.environ.get("GLM130B_FAULT_ROUNDS", "4"))
KILLS = int(os.environ.get("GLM130B_FAULT_KILLS", "5"))


def _request(rng: random.Random, base: str) -> tuple[str, dict]:
    kind = rng.choice(["plain", "stream", "infill", "stream-infill"])
    max_tokens = rng.randint(1, 300)
    if kind in ("infill", "stream-infill"):
        body = {"text": "Let there be [MASK], and [MASK] there was.", "max_tokens": max_tokens,
                "stream": kind == "stream-infill"}
        return f"{base}/v1/infill", body
    body = {"prompt": rng.choice(["In the beginning", "起初，神创造", "a"]), "max_tokens": max_tokens,
            "min_tokens": max_tokens, "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99),
            "n": rng.randint(1, 3), "stream": kind == "stream"}
    return f"{base}/v1/completions", body


def _client(url: str, body: dict, results: list) -> None:
    """One request; the outcome: ok, error (an answer that says it failed), refused, reset."""
    try:
        if not body.get("stream"):
            r = httpx.post(url, json=body, timeout=90)
            ok = r.status_code == 200
            shutting = r.status_code == 503 and r.json()["error"]["code"] in ("server_shutting_down", "server_busy")
            results.append("ok" if ok else "error" if shutting else f"bad {r.status_code} {r.text[:200]}")
            return
        events = []
        with httpx.stream("POST", url, json=body, timeout=90) as r:
            if r.status_code != 200:
                results.append("error" if r.status_code == 503 else f"bad {r.status_code}")
                return
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        if not events or events[-1] != "[DONE]":
            results.append("cut")  # a stream that ended without [DONE]
        elif any('"error"' in e for e in events):
            results.append("error")
        else:
            results.append("ok")
    except httpx.ConnectError:
        results.append("refused")  # sent after the listener closed: never accepted
    except (httpx.RemoteProtocolError, httpx.ReadError):
        results.append("reset")
    except httpx.TimeoutException:
        results.append("hung")


@pytest.mark.slow
def test_the_server_killed_at_random_points_loses_nothing_and_restarts(model_dir):  # noqa: F811
    rng = random.Random(SEED)
    tried, outcomes, survived = 0, {}, 0
    for _ in range(ROUNDS):
        served = Served(model_dir, "--drain-timeout", str(rng.choice([0, 1, 30])), "--max-batch", "4",
                        "--max-queue", "8", env={"GLM130B_NO_KERNELS": "1"})  # slower: requests in flight
        try:
            results: list = []
            clients = []
            for _ in range(rng.randint(2, 10)):
                url, body = _request(rng, served.base)
                clients.append(threading.Thread(target=_client, args=(url, body, results)))
                clients[-1].start()
                time.sleep(rng.uniform(0, 0.05))
            time.sleep(rng.uniform(0.05, 0.8))
            sig = rng.choice([signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
            code = served.stop(sig, timeout=90)
            for c in clients:
                c.join(120)
        finally:
            served.kill()
        tried += len(clients)
        for r in results:
            outcomes[r.split()[0]] = outcomes.get(r.split()[0], 0) + 1
        assert not any(c.is_alive() for c in clients) and len(results) == len(clients), "a client hung"
        assert not [r for r in results if r.startswith(("bad", "hung"))], results
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, "".join(served.lines)
            assert not [r for r in results if r in ("cut", "reset")], (sig, results)  # nothing cut silently
        survived += 1
    served = Served(model_dir)  # and the next one starts and serves
    try:
        r = httpx.post(f"{served.base}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        served.stop()
    print(f"\nfigures: server kill points {ROUNDS}, survived {survived}, requests {tried}, outcomes {outcomes}")


# --------------------------------------------------------------------------------------------
def _train(out: Path, steps: int, resume: bool, config: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "glm130b", "train", "--config", str(config), "--steps", str(steps),
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--out", str(out)]
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 - a file, not a pipe that could fill
    return subprocess.Popen(args + (["--resume"] if resume else []), stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"})


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()[-3000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_trainer_killed_at_random_points_resumes_to_the_same_run(tmp_path):
    from glm130b.checkpoint import load_model
    from glm130b.train.state import list_checkpoints

    config = tmp_path / "tiny.yaml"
    config.write_text("preset: tiny\nbatch_size: 2\nseq_len: 32\nwarmup_steps: 2\nsources: [en_kjv]\n"
                      "model_overrides: {num_layers: 1, hidden_size: 64, num_heads: 2, ffn_hidden_size: 96}\n")
    steps = 30
    straight = _train(tmp_path / "straight", steps, False, config)
    assert straight.wait(300) == 0, _log(tmp_path / "straight")
    step_s = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])["time_s"] / steps
    rng = random.Random(SEED)
    out, kills, runs, at = tmp_path / "killed", 0, 0, []
    metrics = out / "metrics.jsonl"
    while True:
        done = int(list_checkpoints(out)[-1].name.split("_")[1]) if list_checkpoints(out) else 0
        proc = _train(out, steps, bool(list_checkpoints(out)), config)
        runs += 1
        if kills >= KILLS:
            assert proc.wait(300) == 0, _log(out)
            break
        # a random step of what is left (0: while starting), then a random moment inside it or its checkpoint
        target, started = min(done + rng.randint(0, 4), steps - 1), time.time()  # kills spread over the run
        if target == done:
            time.sleep(rng.uniform(0, 3))
        while target > done and proc.poll() is None and not (
                metrics.exists() and metrics.stat().st_mtime > started  # this run's lines, not the last one's
                and len(metrics.read_text().splitlines()) >= target):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 2 * step_s))
        if proc.poll() is not None:
            assert proc.returncode == 0, _log(out)
            break  # finished before its kill point
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        proc.send_signal(sig)
        proc.wait(60)
        kills += 1
        fresh = metrics.exists() and metrics.stat().st_mtime > started
        at.append(f"{sig.name[3:]}@{len(metrics.read_text().splitlines()) if fresh else 'start'}")
    assert _losses(out) == _losses(tmp_path / "straight")
    load_model(out)  # passes its checksum
    for folder in (tmp_path, out, out / "checkpoints"):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())
    print(f"\nfigures: trainer kill points {kills}, survived {kills}, runs {runs}, steps {steps}, "
          f"killed (signal@steps done): {' '.join(at)}")
