"""Single-process training loop with the GLM objective (first cut of the pretraining issue).

AdamW (FP32 states), linear warm-up then cosine decay, gradient clipping, Embedding Gradient
Shrink (in the model), fp32 or bf16 autocast. Progress goes to a tqdm bar (loss, tokens/s,
lr, ETA) and one JSON object per step to RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
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

DEFAULT_SOURCES = ("en_kjv", "en_wordnet", "zh_cuv", "zh_classics")


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out: str = "runs/tiny"
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    seed: int = 1234
    gmask_prob: float = 0.7
    instruction_share: float = 0.05
    instructions: str | None = None  # JSONL of {"prompt", "answer"}, or "builtin"; None: share 0
    sources: tuple[str, ...] = DEFAULT_SOURCES
    save_every: int = 0  # also save the model folder every N steps (0: only at the end)
    model_overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 16:
            raise ConfigError("steps and batch_size must be >= 1 and seq_len >= 16")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not self.lr > 0:
            raise ConfigError("lr must be positive")


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
    epoch = 0
    while True:
        order = torch.randperm(len(texts), generator=gen).tolist()
        for i in order:
            ids = tokenizer.encode(texts[i])
            if ids:
                yield ids
        epoch += 1


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


def train(cfg: TrainConfig, tokenizer, progress: bool = True) -> dict:
    """Train from scratch and save the model folder to cfg.out; returns a summary dict."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model_cfg = GLMConfig.from_preset(cfg.preset, **cfg.model_overrides)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens; preset {cfg.preset} only {model_cfg.vocab_size}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    model = GLMModel(model_cfg)
    model.train()

    share = cfg.instruction_share if cfg.instructions else 0.0
    objective = ObjectiveConfig(seq_len=cfg.seq_len, gmask_prob=cfg.gmask_prob, instruction_share=share,
                                two_d=model_cfg.rotary == "2d")
    builder = GLMSampleBuilder(objective, tokenizer, seed=cfg.seed)
    instructions = instruction_pairs(cfg.instructions, tokenizer, cfg.seed) if cfg.instructions else None
    samples = builder.samples(token_documents(tokenizer, cfg.sources, cfg.seed), instructions)

    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics = open(out / "metrics.jsonl", "w", buffering=1)

    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    tokens_seen, losses = 0, []
    for step in bar:
        t0 = time.perf_counter()
        batch = collate([next(samples) for _ in range(cfg.batch_size)])
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits = model(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"])
        loss = glm_loss(logits, batch["targets"], batch["loss_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        n_tokens = int(batch["input_ids"].numel())
        tokens_seen += n_tokens
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        record = {"step": step + 1, "loss": losses[-1], "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": n_tokens / dt, "tokens": tokens_seen, "time_s": time.perf_counter() - start}
        metrics.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{n_tokens / dt:.0f}", lr=f"{lr:.1e}", gnorm=f"{grad_norm:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_model(out, model, tokenizer, extra={"trained_steps": step + 1, "train_config": dataclasses.asdict(cfg)})
    metrics.close()
    elapsed = time.perf_counter() - start
    save_model(out, model, tokenizer, extra={"trained_steps": cfg.steps, "train_config": dataclasses.asdict(cfg)})
    return {"out": str(out), "steps": cfg.steps, "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "tokens": tokens_seen, "seconds": elapsed, "tokens_per_s": tokens_seen / elapsed,
            "parameters": model.num_parameters()}
