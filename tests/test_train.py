"""Trainer: exact resume after a real SIGKILL, corrupt checkpoints, fp16 loss scaling, the spike
guard, metrics and plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm130b.tokenizer import default_tokenizer
from glm130b.train import trainer as trainer_module
from glm130b.train.metrics import plot_run, read_jsonl
from glm130b.train.precision import Precision
from glm130b.train.spike import SpikeGuard
from glm130b.train.state import list_checkpoints, load_latest
from glm130b.train.trainer import FAULT_ENV, TrainConfig, train

SMALL = dict(preset="tiny", batch_size=2, seq_len=32, warmup_steps=3, sources=("en_kjv", "zh_cuv"),
             model_overrides={"num_layers": 1, "hidden_size": 64, "num_heads": 2, "ffn_hidden_size": 96})


def cli(out: Path, steps: int, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "glm130b", "train", "--preset", "tiny", "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "32", "--warmup-steps", "3", "--checkpoint-every", "10", "--out", str(out), *extra]
    return subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=300)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def test_resume_after_sigkill_gives_identical_losses(tmp_path):
    straight = cli(tmp_path / "straight", 20)
    assert straight.returncode == 0, straight.stderr
    killed = cli(tmp_path / "killed", 20, env={FAULT_ENV: "13"})
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step_000010"]
    assert len(losses(tmp_path / "killed")) == 13  # steps 11-13 ran and are lost with the kill
    resumed = cli(tmp_path / "killed", 20, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 20


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), steps=6, checkpoint_every=2, keep_checkpoints=5, **SMALL),
          default_tokenizer(), progress=False)
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["step_000002", "step_000004", "step_000006"]
    weights = out / "checkpoints" / "step_000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # torn
    messages = []
    state = load_latest(out, log=messages.append)
    assert state.step == 4
    assert "corrupt" in messages[0] and "step_000006" in messages[0]
    bad = out / "checkpoints" / "step_000004" / "state.json"
    bad.write_text(bad.read_text().replace("1", "2", 1))  # same size, wrong checksum
    assert load_latest(out, log=messages.append).step == 2


def test_keep_last_k_and_refuse_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), steps=8, checkpoint_every=2, keep_checkpoints=2, **SMALL)
    train(cfg, default_tokenizer(), progress=False)
    assert [p.name for p in list_checkpoints(out)] == ["step_000006", "step_000008"]
    with pytest.raises(Exception, match="--resume"):
        train(cfg, default_tokenizer(), progress=False)


def test_fp16_loss_scaler_skips_overflow_and_regrows():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = Precision("fp16", growth_interval=2, init_scale=2.0**4)
    before = model.weight.detach().clone()
    # An overflowing step: the update is skipped and the scale halves.
    prec.backward(model(torch.full((1, 4), 1e38)).sum() * 1e38)
    prec.unscale(opt)
    assert not prec.step(opt)
    assert torch.equal(model.weight, before) and prec.scale == 8.0
    # Two clean steps: applied, and the scale doubles again.
    for _ in range(2):
        opt.zero_grad()
        prec.backward(model(torch.ones(1, 4)).sum())
        prec.unscale(opt)
        assert prec.step(opt)
    assert prec.scale == 16.0 and not torch.equal(model.weight, before)


def test_fp16_training_runs_and_logs_the_scale(tmp_path):
    out = tmp_path / "fp16"
    train(TrainConfig(out=str(out), steps=5, precision="fp16", **SMALL), default_tokenizer(), progress=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 5 and all(r["loss_scale"] >= 1 for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_spike_guard_rules():
    guard = SpikeGuard(factor=1.5, window=10, warmup=5, max_consecutive=3)
    for _ in range(5):
        assert guard.check(2.0, 1.0) == "ok"
    assert guard.check(2.9, 1.0) == "ok"
    assert guard.check(3.1, 1.0) == "skip"
    assert guard.check(2.0, float("nan")) == "skip"
    assert guard.check(float("inf"), 1.0) == "rollback"
    assert guard.check(2.0, 1.0) == "ok"


def test_repeated_spikes_roll_back_and_skip_the_data(tmp_path, monkeypatch):
    real_loss = trainer_module.glm_loss
    calls = {"n": 0}

    def spiky_loss(*args):
        calls["n"] += 1
        loss = real_loss(*args)
        return loss * 50 if 26 <= calls["n"] <= 28 else loss  # steps 26-28 spike

    monkeypatch.setattr(trainer_module, "glm_loss", spiky_loss)
    out = tmp_path / "spiky"
    cfg = TrainConfig(out=str(out), steps=30, checkpoint_every=20, spike_window=20, **SMALL)
    cfg.lr = 1e-3
    train(cfg, default_tokenizer(), progress=False)
    events = read_jsonl(out / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.count("spike") == 3 and kinds.count("rollback") == 1
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["to_step"] == 20
    records = read_jsonl(out / "metrics.jsonl")
    assert records[-1]["step"] == 30
    assert max(r["loss"] for r in records if not r["skipped"]) < 20


def test_metrics_and_plot(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), steps=4, **SMALL), default_tokenizer(), progress=False)
    record = read_jsonl(out / "metrics.jsonl")[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "loss_scale"} <= set(record)
    png = plot_run(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert any((out / "tensorboard").iterdir())
    assert json.loads((out / "config.json").read_text())["num_layers"] == 1
