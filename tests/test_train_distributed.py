"""The trainer under tensor, data and pipeline parallelism (glm130b.train.distributed).

Every parallel run is compared with the single-process trainer on the same global batch: same
seeded model, same sample stream, same per-step losses (to ~1e-5). Workers are gloo processes on
CPU started with `torch.multiprocessing.spawn` and a `file://` rendezvous in tmp_path; each calls
`trainer.train` (the CLI's entry function) and leaves with `os._exit` after a barrier, because
gloo can abort during interpreter teardown.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import spawn_ranks

from glm130b.checkpoint import load_model
from glm130b.config import GLMConfig
from glm130b.data.objective import GLMSampleBuilder, ObjectiveConfig, collate
from glm130b.model.glm import GLMModel
from glm130b.tokenizer import default_tokenizer
from glm130b.train import parallel_plan as P
from glm130b.train import trainer as trainer_module
from glm130b.train.distributed import export_checkpoint
from glm130b.train.metrics import read_jsonl
from glm130b.train.precision import Precision
from glm130b.train.state import list_checkpoints
from glm130b.train.trainer import TrainConfig, token_documents, train

# warmup_steps >= every run's length: the learning rate of step k does not depend on cfg.steps,
# so a run cut in two (save, resume with more steps) follows the straight run's schedule.
STEPS = 4
SMALL = dict(preset="tiny", batch_size=4, seq_len=32, warmup_steps=STEPS, lr=1e-3, sources=("en_kjv", "zh_cuv"),
             model_overrides={"num_layers": 2, "hidden_size": 64, "num_heads": 2, "ffn_hidden_size": 96})
TOL = {"atol": 1e-5, "rtol": 1e-5}


def config(out: Path, steps: int, **kwargs) -> TrainConfig:
    return TrainConfig(out=str(out), steps=steps, **{**SMALL, **kwargs})


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(run) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The single-process run every parallel run is compared with (STEPS steps)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(config(out, STEPS, checkpoint_every=2), default_tokenizer(), progress=False)
    return out


# --------------------------------------------------------------------------------------------
# Process launching
# --------------------------------------------------------------------------------------------
def launch(fn, world: int, tmp_path: Path, *args) -> None:
    spawn_ranks(fn, world, tmp_path, *args)


def _train_worker(rank: int, cfg: TrainConfig) -> None:
    summary = train(cfg, default_tokenizer(), progress=False)
    assert summary["steps"] == cfg.steps


def run_parallel(tmp_path: Path, name: str, steps: int, *, tp=1, pp=1, dp=1, **kwargs) -> Path:
    out = tmp_path / name
    launch(_train_worker, tp * pp * dp, tmp_path, config(out, steps, tp=tp, pp=pp, dp=dp, **kwargs))
    return out


# --------------------------------------------------------------------------------------------
# Same losses as one process
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [dict(tp=2), dict(dp=2), dict(pp=2)], ids=["tp2", "dp2", "pp2"])
def test_parallel_training_matches_single_process(tmp_path, reference, dims):
    out = run_parallel(tmp_path, "run", 3, **dims)
    torch.testing.assert_close(losses(out), losses(reference)[:3], **TOL)
    records = read_jsonl(out / "metrics.jsonl")
    ref_records = read_jsonl(reference / "metrics.jsonl")[:3]
    assert [r["step"] for r in records] == [1, 2, 3]
    # Gradient norms after an Adam step: Adam turns float noise in near-zero gradients into
    # lr-sized differences, so 1e-4 here (as in tests/test_parallel_plan.py after a step).
    torch.testing.assert_close([r["grad_norm"] for r in records], [r["grad_norm"] for r in ref_records],
                               atol=1e-4, rtol=1e-4)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in ref_records]
    state = json.loads((list_checkpoints(out)[-1] / "state.json").read_text())
    assert state["format"] == "dcp" and state["layout"] == {"pp": 1, "dp": 1, "tp": 1, **dims}


PACKED = dict(instructions="builtin", instruction_share=0.5, pack_instructions=True, seq_len=96)


@pytest.mark.parametrize("dims", [dict(pp=2), pytest.param(dict(tp=2), marks=pytest.mark.slow)], ids=["pp2", "tp2"])
def test_packed_instruction_rows_train_alike_in_parallel(tmp_path, dims):
    """Packed rows carry their segments [B, 2, L] to every stage and shard like the other inputs."""
    reference = tmp_path / "reference"
    train(config(reference, 2, **PACKED), default_tokenizer(), progress=False)
    out = run_parallel(tmp_path, "run", 2, **dims, **PACKED)
    torch.testing.assert_close(losses(out), losses(reference), **TOL)


@pytest.mark.slow  # 4 processes each
@pytest.mark.parametrize("dims,schedule", [(dict(tp=2, dp=2), "1f1b"), (dict(pp=2, tp=2), "1f1b"),
                                            (dict(pp=2, dp=2), "gpipe")], ids=["dp2xtp2", "pp2xtp2", "pp2xdp2-gpipe"])
def test_2d_parallel_training_matches_single_process(tmp_path, reference, dims, schedule):
    out = run_parallel(tmp_path, "run", 2, pipeline_schedule=schedule, **dims)
    torch.testing.assert_close(losses(out), losses(reference)[:2], **TOL)


@pytest.mark.slow
def test_gradient_accumulation_and_microbatches_match(tmp_path):
    # 2 accumulation steps x 2 samples == one batch of 4, split into 2 pipeline microbatches per dp rank
    ref = tmp_path / "ref"
    train(config(ref, 2, batch_size=2, grad_accum=2), default_tokenizer(), progress=False)
    out = run_parallel(tmp_path, "run", 2, pp=2, batch_size=2, grad_accum=2, microbatches=2,
                       pipeline_schedule="gpipe")
    torch.testing.assert_close(losses(out), losses(ref), **TOL)


def _overflow_worker(rank: int, cfg: TrainConfig) -> None:
    trainer_module.Precision = functools.partial(Precision, init_scale=2.0**40)
    _train_worker(rank, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2"])
def test_fp16_overflow_is_skipped_everywhere_like_one_process(tmp_path, monkeypatch, dims):
    # A loss scale of 2^40 overflows fp16 gradients: steps are skipped and the scale backed off,
    # on every rank alike (GradScaler cannot unscale mixed DTensor/plain gradients itself).
    monkeypatch.setattr(trainer_module, "Precision", functools.partial(Precision, init_scale=2.0**40))
    monkeypatch.setenv("GLM130B_CPU_HALF", "allow")  # real FP16 on every rank, even on a CPU without fast FP16
    ref = tmp_path / "ref"
    train(config(ref, 3, precision="fp16"), default_tokenizer(), progress=False)
    out = tmp_path / "run"
    launch(_overflow_worker, 2, tmp_path, config(out, 3, precision="fp16", **dims))
    want, got = read_jsonl(ref / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["loss_scale"] for r in got] == [r["loss_scale"] for r in want] == [2.0**39, 2.0**38, 2.0**37]
    assert [r["skipped"] for r in got] == [True] * 3
    torch.testing.assert_close([r["loss"] for r in got], [r["loss"] for r in want], **TOL)
    assert [e["event"] for e in read_jsonl(out / "events.jsonl")].count("overflow") == 3


def _poisoned(loss_fn, calls: range):
    count = {"n": 0}

    def poisoned(*args):
        count["n"] += 1
        loss = loss_fn(*args)
        return loss * float("nan") if count["n"] in calls else loss

    return poisoned


def _spiky_worker(rank: int, cfg: TrainConfig, calls: range) -> None:
    P.glm_token_loss = _poisoned(P.glm_token_loss, calls)
    _train_worker(rank, cfg)


@pytest.mark.slow
def test_repeated_spikes_roll_back_every_rank(tmp_path, monkeypatch):
    # Steps 5-7 have a non-finite loss: three skips, then every rank rolls back to the step-4
    # checkpoint (DCP) and carries on with the data after the bad batches, as one process does.
    calls = range(5, 8)
    kwargs = dict(checkpoint_every=4, warmup_steps=10)
    monkeypatch.setattr(trainer_module, "glm_loss", _poisoned(trainer_module.glm_loss, calls))
    ref = tmp_path / "ref"
    train(config(ref, 8, **kwargs), default_tokenizer(), progress=False)
    out = tmp_path / "run"
    launch(_spiky_worker, 2, tmp_path, config(out, 8, tp=2, **kwargs), calls)
    events = [(e["step"], e["event"]) for e in read_jsonl(out / "events.jsonl")]
    assert events == [(e["step"], e["event"]) for e in read_jsonl(ref / "events.jsonl")]
    assert events == [(4, "checkpoint"), (5, "spike"), (6, "spike"), (7, "spike"), (7, "rollback"), (8, "checkpoint")]
    torch.testing.assert_close(losses(out), losses(ref), **TOL, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Checkpoints across layouts, and the model folder
# --------------------------------------------------------------------------------------------
def _final_model_worker(rank: int, out: str) -> None:
    """Reload the run's last DCP checkpoint into a tp=2 model (the in-memory parallel model) and
    compare its logits with the model folder rank 0 wrote from the gathered full state dict."""
    ckpt = list_checkpoints(out)[-1]
    config = GLMConfig.from_preset(SMALL["preset"], **SMALL["model_overrides"])
    mesh = P.build_mesh(1, 1, 2)
    model = P.parallelize_glm(GLMModel(config), mesh)
    P.load_checkpoint(model, ckpt / "dcp", optimizer=torch.optim.AdamW(model.parameters(), foreach=False))
    batch = _batch()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"]).full_tensor()
    folder, _ = load_model(out)
    with torch.no_grad():
        want = folder(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"])
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=1e-6)


def _batch() -> dict:
    tokenizer = default_tokenizer()
    builder = GLMSampleBuilder(ObjectiveConfig(seq_len=SMALL["seq_len"]), tokenizer, seed=99)
    samples = builder.samples(token_documents(tokenizer, SMALL["sources"], 99))
    return collate([next(samples) for _ in range(3)])


def test_tp2_run_resumes_under_dp2_then_in_one_process_and_exports_the_model(tmp_path, reference):
    out = run_parallel(tmp_path, "run", 2, tp=2)  # steps 1-2 under tp=2, checkpoint at step 2
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"]
    # The model folder, gathered by rank 0, equals the tp=2 model reloaded from its DCP checkpoint.
    launch(_final_model_worker, 2, tmp_path, str(out))
    # export_checkpoint writes the same folder from the DCP checkpoint, in this plain process.
    exported, _ = load_model(export_checkpoint(list_checkpoints(out)[-1], tmp_path / "exported", default_tokenizer()))
    folder, _ = load_model(out)
    for name, value in folder.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    # Step 3 under dp=2 (FSDP) from the tp=2 checkpoint ...
    run_parallel(tmp_path, "run", 3, dp=2, resume=True)
    # ... and step 4 in this very process (no process group) from the dp=2 checkpoint.
    train(config(out, 4, resume=True), default_tokenizer(), progress=False)
    torch.testing.assert_close(losses(out), losses(reference), **TOL)
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000003", "step_000004"]
    # The single-process run's model and this run's model folder agree.
    got, _ = load_model(out)
    want, _ = load_model(reference)
    batch = _batch()
    with torch.no_grad():
        a = got(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"])
        b = want(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_pp2(tmp_path, reference):
    out = tmp_path / "run"
    train(config(out, 2), default_tokenizer(), progress=False)  # single-process format at step 2
    run_parallel(tmp_path, "run", STEPS, pp=2, resume=True)
    torch.testing.assert_close(losses(out), losses(reference), **TOL)


@pytest.mark.slow
def test_corrupt_distributed_checkpoint_falls_back(tmp_path, reference):
    out = run_parallel(tmp_path, "run", 3, tp=2, checkpoint_every=1, keep_checkpoints=5)
    assert [p.name for p in list_checkpoints(out)] == ["step_000001", "step_000002", "step_000003"]
    shard = sorted((out / "checkpoints" / "step_000003" / "dcp").glob("__1_*"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])  # torn shard of rank 1
    log = tmp_path / "log.txt"
    train(config(out, STEPS, resume=True), default_tokenizer(), progress=False,
          log=lambda m: log.open("a").write(m + "\n"))
    assert "step_000003 is corrupt" in log.read_text() and "resuming" in log.read_text()
    # Resumed from step 2: steps 3 and 4 redone, same losses as the straight run.
    torch.testing.assert_close(losses(out), losses(reference), **TOL)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def test_layout_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from glm130b.cli import main

    base = ["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--steps", "1"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([*base, "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchrun --nproc-per-node 2" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main([*base, "--tp", "2", "--dp", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "= 2 processes" in err and "started 4" in err
    assert not dist.is_initialized()
    assert main([*base, "--dp", "4", "--batch-size", "6"]) == 2  # the global batch must split over dp ...
    err = capsys.readouterr().err
    assert "--batch-size 6 (the global batch) is not divisible by --dp 4" in err
    monkeypatch.setenv("RANK", "3")  # ... and only rank 0 says so
    assert main([*base, "--dp", "4", "--batch-size", "6"]) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # a real torchrun launch: ~2 interpreters + the elastic agent
def test_torchrun_command(tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m glm130b train --tp 2 ...` end to end, then load the model.

    gloo may abort at interpreter exit after a finished run (see docs/training.md); a non-zero
    exit is accepted only when the run finished: model folder and all metrics written."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "glm130b", "train", "--tp", "2", "--preset", "tiny", "--steps", "3", "--batch-size", "2",
           "--seq-len", "32", "--warmup-steps", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (out / "model.safetensors").is_file(), proc.stderr[-3000:]
    assert len(read_jsonl(out / "metrics.jsonl")) == 3, proc.stderr[-3000:]
    if proc.returncode != 0:
        assert '"steps": 3' in proc.stdout, proc.stderr[-3000:]  # finished; died at exit
    model, _ = load_model(out)
    assert model.config.num_layers == 2
