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


def test_packed_instruction_training_resumes_exactly(tmp_path):
    packed = ("--instructions", "builtin", "--instruction-share", "0.5", "--pack-instructions", "--seq-len", "96")
    straight = cli(tmp_path / "straight", 14, *packed)
    assert straight.returncode == 0, straight.stderr
    killed = cli(tmp_path / "killed", 14, *packed, env={FAULT_ENV: "12"})
    assert killed.returncode == -signal.SIGKILL
    resumed = cli(tmp_path / "killed", 14, *packed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert json.loads((tmp_path / "straight" / "train_config.json").read_text())["pack_instructions"] is True


def test_packed_rows_reach_the_model_with_their_segments(tmp_path, monkeypatch):
    from glm130b.model.glm import GLMModel

    seen = []
    forward = GLMModel.forward

    def spy(self, *args, segments=None, **kwargs):
        seen.append(segments)
        return forward(self, *args, segments=segments, **kwargs)

    monkeypatch.setattr(GLMModel, "forward", spy)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=3, instructions="builtin", instruction_share=0.5,
                      pack_instructions=True, **{**SMALL, "seq_len": 96})
    train(cfg, default_tokenizer(), progress=False)
    assert len(seen) == 3 and all(s is not None and s.shape[1] == 2 for s in seen)
    # some row of some batch packs several pairs: a segment starts after position 0
    assert any((s[:, 0] == torch.arange(s.shape[-1])).logical_and(torch.arange(s.shape[-1]) > 0)
               .logical_and(s[:, 1] > s[:, 0]).any() for s in seen)


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


def test_fp16_loss_scaler_skips_overflow_and_regrows(monkeypatch):
    monkeypatch.setenv("GLM130B_CPU_HALF", "allow")  # fp16 even where this CPU has no fast FP16
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


def test_fp16_training_runs_and_logs_the_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM130B_CPU_HALF", "allow")  # the loss scaler runs (tiny model: speed is no issue)
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
    config = json.loads((out / "config.json").read_text())
    assert config["num_layers"] == 1
    # the run folder's context is the training windows (the tiny preset's own is longer): an
    # eval or a prompt past it would use rotary positions the model never saw
    assert config["max_seq_len"] == SMALL["seq_len"] < tiny_preset_context()


def tiny_preset_context() -> int:
    from glm130b.config import GLMConfig

    return GLMConfig.from_preset("tiny").max_seq_len


def _sample_stream(tokenizer, seed=3):
    from glm130b.data.objective import GLMSampleBuilder, ObjectiveConfig

    builder = GLMSampleBuilder(ObjectiveConfig(seq_len=64), tokenizer, seed=seed)
    docs = trainer_module.token_documents(tokenizer, ("en_kjv",), seed)
    return builder, builder.samples(docs, None)


def test_prefetched_batches_equal_inline_batches_with_their_resume_states():
    """The GPU path builds batches on a thread ahead of the step; it must hand out the same
    batches, each with the objective state right after it (what a checkpoint records)."""
    tok = default_tokenizer()
    inline = trainer_module.BatchStream(*reversed(_sample_stream(tok)), batch_size=4)
    ahead = trainer_module.BatchStream(*reversed(_sample_stream(tok)), batch_size=4, ahead=2, pin=False)
    try:
        for _ in range(5):
            (a, state_a), (b, state_b) = inline.next(), ahead.next()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert state_a == state_b
    finally:
        ahead.close()
    # a state handed out with a batch resumes the stream right after that batch
    builder, samples = _sample_stream(tok)
    builder.load_state_dict(state_a)
    resumed = trainer_module.BatchStream(samples, builder, batch_size=4)
    assert torch.equal(resumed.next()[0]["input_ids"], inline.next()[0]["input_ids"])


def test_prefetch_thread_errors_reach_the_training_loop():
    def broken():
        yield from ()
        raise ValueError("corrupt document")

    stream = trainer_module.BatchStream(broken(), None, batch_size=2, ahead=1)
    for _ in range(2):  # and again on the next call, instead of waiting forever for the ended thread
        with pytest.raises((ValueError, RuntimeError)):
            stream.next()
    stream.close()
    assert not stream._thread.is_alive()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_config_error():
    from glm130b.config import ConfigError

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        TrainConfig(device="cuda").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("compile_model", [False, True])
def test_cuda_training_follows_the_cpu_run(tmp_path, compile_model):
    """The same run on the GPU (batches prefetched on a thread) and on the CPU: the same data in
    the same order, so the fp32 losses agree to rounding, and a checkpoint resumes on either."""
    cfg = dict(SMALL, steps=6, precision="fp32")
    cpu = train(TrainConfig(out=str(tmp_path / "cpu"), **cfg), default_tokenizer(), progress=False)
    gpu = train(TrainConfig(out=str(tmp_path / "gpu"), device="cuda", compile=compile_model, **cfg),
                default_tokenizer(), progress=False)
    a, b = losses(tmp_path / "cpu"), losses(tmp_path / "gpu")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-3, (a, b)
    assert gpu["steps"] == cpu["steps"]
    resumed = train(TrainConfig(out=str(tmp_path / "gpu"), device="cpu", resume=True, **dict(cfg, steps=8)),
                    default_tokenizer(), progress=False)
    assert resumed["steps"] == 8


def test_a_compile_failure_falls_back_to_eager_training(tmp_path, monkeypatch, capsys):
    """--compile where torch.compile cannot build (say, no C++ compiler): a warning, then the
    same run as without it."""
    def broken_compile(module, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = dict(SMALL, steps=3, precision="fp32")
    train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **cfg), default_tokenizer(), progress=False)
    assert "torch.compile failed" in capsys.readouterr().err
    train(TrainConfig(out=str(tmp_path / "eager"), **cfg), default_tokenizer(), progress=False)
    assert losses(tmp_path / "compiled") == losses(tmp_path / "eager")


def test_errors_after_the_first_compiled_step_are_not_swallowed(tmp_path, monkeypatch):
    """Only the first step may fall back to eager: a later failure (out of memory, a bug) stops
    the run instead of silently changing how it trains."""
    def flaky_compile(module, **kw):
        calls = []

        def run(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory")
            return module(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(TrainConfig(out=str(tmp_path / "run"), compile=True, **dict(SMALL, steps=3)), default_tokenizer(),
              progress=False)


def _budget_run(budget_s, step_s, cap=10**9, steps_file=None, compile_s=5.0625, first_step=0, slow_until=float("inf")):
    """A TimeBudget on a simulated clock: step 1 compiles; steps before `slow_until` seconds take
    step_s, later ones 2 x step_s (a second run joining the GPU). (decided, at step, messages)."""
    from glm130b.train.trainer import TimeBudget

    cfg = TrainConfig(steps=cap, time_budget_s=budget_s, steps_file=steps_file)
    messages = []
    budget = TimeBudget(cfg, start=100.0, log=messages.append, first_step=first_step)
    now = 100.0
    for step in range(first_step + 1, 10**6):
        now += compile_s if step == first_step + 1 else step_s * (1 if now - 100.0 < slow_until else 2)
        decided = budget.after_step(step, now)
        if decided is not None:
            return decided, step, messages
    raise AssertionError("never decided")


def test_time_budget_fixes_the_step_count_from_the_measured_step_time(tmp_path):
    """Decided once a quarter of the budget has passed (and 20 steps), from the median of the
    recent step times (not the compiling first step): the count fills what is left, capped by
    `steps`; a shared steps file gives a second run the first run's count."""
    from glm130b.train.trainer import TimeBudget

    # (times exact in binary) 5.0625 s compile, then 0.125 s steps: a quarter (10 s) is passed
    # at step 41; 29.9375 s left -> 239 more
    steps, at, messages = _budget_run(40.0, 0.125)
    assert (steps, at) == (280, 41) and "280 steps" in messages[0]
    assert _budget_run(40.0, 0.125, cap=200)[0] == 200  # --steps caps it
    assert _budget_run(4.0, 0.5)[:2] == (20, 20)  # the budget already spent at step 20: stop there
    # a second run joins at 7 s: steps take 0.25 s from step 18; the quarter is passed at step 29,
    # where the window's median is the shared rate: 29.9375 / 0.25 -> 119 more
    assert _budget_run(40.0, 0.125, slow_until=7.0)[:2] == (148, 29)
    shared = str(tmp_path / "steps.json")
    first, at, _ = _budget_run(40.0, 0.125, steps_file=shared)
    assert at == 89  # with a steps file, 40% of the budget (16 s): partners side by side have compiled
    second, _, messages = _budget_run(50.0, 0.0625, steps_file=shared)  # its own rate would give far more
    assert first == second == 280 and "taken from" in messages[0]
    assert json.loads(Path(shared).read_text()) == {"steps": 280}
    # resumed at step 500 (before deciding): 20 steps and a quarter of a new budget, counted from the resume
    assert _budget_run(40.0, 0.125, first_step=500)[:2] == (780, 541)
    budget = TimeBudget(TrainConfig(time_budget_s=40.0), start=0.0, log=print)
    assert not budget.overdue(45.0) and budget.overdue(46.5)  # 15% over: the run stops


def test_a_steps_file_without_a_number_is_an_error_after_waiting(tmp_path):
    from glm130b.config import ConfigError
    from glm130b.train.trainer import _shared_steps

    path = tmp_path / "steps.json"
    path.write_text("")  # a writer that died between create and write
    with pytest.raises(ConfigError, match="no step count"):
        _shared_steps(path, 10, wait_s=0.2)


def test_time_budgeted_run_records_its_steps_and_a_resume_keeps_them(tmp_path):
    """`train --time-budget` on the CLI: the decided count is in train_config.json and is the
    number of steps run; `--resume` of the finished run keeps that count (it would train on to
    the cap otherwise); a steps file without a budget is one error line."""
    out = tmp_path / "run"
    done = cli(out, 10**6, "--time-budget", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    decided = json.loads((out / "train_config.json").read_text())["steps"]
    assert 20 <= decided < 10**6 and "time budget:" in done.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")][-1] == decided
    assert json.loads((out / "meta.json").read_text())["train_config"]["steps"] == decided  # the model folder's too
    resumed = cli(out, 10**6, "--time-budget", "8", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["steps"] == decided
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")][-1] == decided
    bad = cli(tmp_path / "bad", 5, "--steps-file", str(tmp_path / "s.json"))
    assert bad.returncode == 2 and "time_budget_s" in bad.stderr
