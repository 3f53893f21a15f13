"""The training loop: GLM objective, AdamW, warm-up + cosine, clipping, accumulation,
mixed precision, the loss-spike guard, checkpoints and exact resume.

Each piece lives in its own module (precision.py, spike.py, state.py, metrics.py); this file
only wires them together in the order a step happens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from glm130b.checkpoint import save_model
from glm130b.config import ConfigError, GLMConfig
from glm130b.data.heldout import training_documents
from glm130b.data.instructions import builtin_instructions, cycle
from glm130b.data.objective import GLMSampleBuilder, ObjectiveConfig, collate, read_instructions
from glm130b.model.glm import GLMModel, glm_loss
from glm130b.train.metrics import MetricsLog
from glm130b.train.precision import PRECISIONS, Precision
from glm130b.train.spike import SpikeGuard
from glm130b.train.state import (
    TrainState,
    list_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

DEFAULT_SOURCES = ("en_kjv", "en_wordnet", "zh_cuv", "zh_classics")
FAULT_ENV = "GLM130B_FAULT_KILL_AFTER_STEP"  # tests: SIGKILL this process after that step


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out: str = "runs/tiny"
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + loss scaling)
    loss_scale_growth_interval: int = 1000
    seed: int = 1234
    gmask_prob: float = 0.7
    instruction_share: float = 0.05
    instructions: str | None = None  # JSONL of {"prompt", "answer"}, or "builtin"; None: share 0
    sources: tuple[str, ...] = DEFAULT_SOURCES
    checkpoint_every: int = 0  # save a resumable checkpoint (and the model folder) every N steps
    keep_checkpoints: int = 3
    resume: bool = False
    spike_factor: float = 1.5
    spike_window: int = 50
    max_consecutive_spikes: int = 3
    model_overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 16:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1 and seq_len >= 16")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.lr > 0:
            raise ConfigError("lr must be positive")
        if not 0 <= self.instruction_share <= 1 or not 0 <= self.gmask_prob <= 1:
            raise ConfigError("instruction_share and gmask_prob must be in [0, 1]")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def token_documents(tokenizer, sources, seed: int) -> Iterator[list[int]]:
    """Shuffled training documents (dev items and the perplexity slice removed, see
    data/heldout.py), tokenised lazily, repeated epoch after epoch."""
    texts = [doc.text for doc in training_documents(sources)]
    gen = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(texts), generator=gen).tolist():
            ids = tokenizer.encode(texts[i])
            if ids:
                yield ids


def instruction_pairs(source: str, tokenizer, seed: int) -> Iterator[tuple[list[int], list[int]]]:
    """"builtin" (translation and definition pairs from the corpus) or a JSONL file."""
    pairs = builtin_instructions(seed) if source == "builtin" else list(read_instructions(source))
    return cycle(pairs, tokenizer.encode)


def parameter_groups(model: GLMModel, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, LayerNorms and the (tied) embedding are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "word_embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: TrainConfig, tokenizer, progress: bool = True, log=print) -> dict:
    """Train (or resume) and save the model folder to cfg.out; returns a summary dict."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model_cfg = GLMConfig.from_preset(cfg.preset, **cfg.model_overrides)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens; preset {cfg.preset} only {model_cfg.vocab_size}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    model = GLMModel(model_cfg)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    precision = Precision(cfg.precision, growth_interval=cfg.loss_scale_growth_interval)
    guard = SpikeGuard(cfg.spike_factor, cfg.spike_window, max_consecutive=cfg.max_consecutive_spikes)
    share = cfg.instruction_share if cfg.instructions else 0.0
    builder = GLMSampleBuilder(
        ObjectiveConfig(seq_len=cfg.seq_len, gmask_prob=cfg.gmask_prob, instruction_share=share,
                        two_d=model_cfg.rotary == "2d"),
        tokenizer, seed=cfg.seed,
    )
    out = Path(cfg.out)
    step, tokens_seen = 0, 0

    def restore(state: TrainState, data_too: bool) -> None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        precision.load_state_dict(state.extra.get("scaler", {}))
        if data_too:  # a rollback keeps the data position, so the bad batches are skipped
            builder.load_state_dict(state.extra["objective"])
            guard.load_state_dict(state.extra.get("guard", {}))
            set_rng_state(state.rng)

    if cfg.resume:
        state = load_latest(out, log=log)
        restore(state, data_too=True)
        step, tokens_seen = state.step, state.extra.get("tokens", 0)
        log(f"resuming {out} from step {step}")
    elif list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue it, or choose another --out")

    def checkpoint() -> None:
        extra = {"objective": builder.state_dict(), "guard": guard.state_dict(), "scaler": precision.state_dict(),
                 "tokens": tokens_seen, "config": dataclasses.asdict(cfg)}
        save_checkpoint(out, TrainState(step, model.state_dict(), optimizer.state_dict(), extra, rng_state()),
                        keep=cfg.keep_checkpoints)
        save_model(out, model, tokenizer, extra={"trained_steps": step, "train_config": dataclasses.asdict(cfg)})
        metrics.event(step, "checkpoint")

    instructions = instruction_pairs(cfg.instructions, tokenizer, cfg.seed) if cfg.instructions else None
    samples = builder.samples(token_documents(tokenizer, cfg.sources, cfg.seed), instructions)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics = MetricsLog(out, resume_step=step)
    fault_step = int(os.environ.get(FAULT_ENV, "0"))
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress, unit="step", dynamic_ncols=True)
    start, losses, first_loss = time.perf_counter(), [], None
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_value, n_tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = collate([next(samples) for _ in range(cfg.batch_size)])
            with precision.autocast():
                logits = model(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"])
            loss = glm_loss(logits, batch["targets"], batch["loss_mask"]) / cfg.grad_accum
            precision.backward(loss)
            loss_value += loss.item()
            n_tokens += int(batch["input_ids"].numel())
        precision.unscale(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        tokens_seen += n_tokens
        if cfg.precision == "fp16" and not math.isfinite(grad_norm):
            precision.step(optimizer)  # GradScaler skips the update and backs the scale off
            action = "overflow"
            metrics.event(step + 1, "overflow", loss_scale=precision.scale)
        else:
            action = guard.check(loss_value, grad_norm)
            if action == "ok":
                precision.step(optimizer)
            else:
                precision.scaler.update()
                metrics.event(step + 1, "spike", loss=loss_value, grad_norm=grad_norm,
                              reason=guard.reason(loss_value, grad_norm) or "repeated spikes")
        if action == "rollback":
            if list_checkpoints(out):
                state = load_latest(out, log=log)
                restore(state, data_too=False)
                metrics.event(step + 1, "rollback", to_step=state.step)
                log(f"warning: {cfg.max_consecutive_spikes} spikes in a row at step {step + 1}; rolled back "
                    f"to step {state.step} and skipped the data since")
                bar.update(state.step - step)
                step = state.step
                continue
            metrics.event(step + 1, "rollback-impossible", reason="no checkpoint yet")
        step += 1
        first_loss = loss_value if first_loss is None else first_loss
        losses.append(loss_value)
        dt = time.perf_counter() - t0
        metrics.step({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "loss_scale": precision.scale,
                      "tokens_per_s": n_tokens / dt, "tokens": tokens_seen, "skipped": action != "ok",
                      "time_s": time.perf_counter() - start})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{n_tokens / dt:.0f}", lr=f"{lr:.1e}",
                        gnorm=f"{grad_norm:.2f}", scale=f"{precision.scale:.0f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            checkpoint()
        if fault_step and step == fault_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    checkpoint()
    metrics.close()
    elapsed = time.perf_counter() - start
    tail = losses[-10:] or [float("nan")]
    run_tokens = len(losses) * cfg.batch_size * cfg.grad_accum * cfg.seq_len
    return {"out": str(out), "steps": step, "first_loss": first_loss, "final_loss": sum(tail) / len(tail),
            "tokens": tokens_seen, "seconds": elapsed, "tokens_per_s": run_tokens / elapsed,
            "parameters": model.num_parameters()}
