"""The training loop: GLM objective, AdamW, warm-up + cosine, clipping, accumulation,
mixed precision, the loss-spike guard, checkpoints and exact resume.

Each piece lives in its own module (precision.py, spike.py, state.py, metrics.py); this file
only wires them together in the order a step happens. The loop is the same in one process and
in a (pp, dp, tp) run under torchrun: what differs (the model's forward/backward, clipping,
checkpoints, the final model folder) sits behind an engine, `SingleProcessTraining` here or
`distributed.ParallelTraining` (see docs/training.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import queue
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from glm130b import errors
from glm130b.checkpoint import save_model
from glm130b.config import ConfigError, GLMConfig, check_types
from glm130b.data.corpus import check_sources
from glm130b.data.heldout import training_documents
from glm130b.data.instructions import builtin_instructions, cycle
from glm130b.data.objective import OBJECTIVES, GLMSampleBuilder, ObjectiveConfig, collate, read_instructions
from glm130b.io import SaveError, atomic_write_text, check_new_folder, free_bytes
from glm130b.model.glm import GLMModel, glm_loss
from glm130b.train import distributed
from glm130b.train.metrics import MetricsLog
from glm130b.train.optimizer import make_optimizer
from glm130b.train.precision import PRECISIONS, Precision
from glm130b.train.spike import SpikeGuard
from glm130b.train.state import (
    TrainState,
    latest_intact,
    list_checkpoints,
    read_checkpoint,
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
    objective: str = "glm"  # "glm" (blank infilling) or "causal" (the GPT baseline: next-token prediction)
    instruction_share: float = 0.05
    instructions: str | None = None  # JSONL of {"prompt", "answer"}, or "builtin"; None: share 0
    pack_instructions: bool = False  # an instruction sample holds as many pairs as fit (objective.py)
    sources: tuple[str, ...] = DEFAULT_SOURCES
    checkpoint_every: int = 0  # save a resumable checkpoint (and the model folder) every N steps
    keep_checkpoints: int = 3
    resume: bool = False
    spike_factor: float = 1.5
    spike_window: int = 50
    max_consecutive_spikes: int = 3
    model_overrides: dict = field(default_factory=dict)
    # One process: where to train ("cpu", "cuda" or "auto" = cuda when present) and whether to
    # torch.compile the model. Under torchrun each rank's device comes from the process group.
    device: str = "cpu"
    compile: bool = False
    # Parallelism (torchrun): pp * dp * tp must equal WORLD_SIZE. batch_size is the global batch.
    tp: int = 1
    pp: int = 1
    dp: int = 1
    pipeline_schedule: str = "1f1b"  # "gpipe" or "1f1b" (pp > 1)
    microbatches: int = 0  # pipeline microbatches per dp rank and step; 0: one per stage
    # Train for about this many seconds (0: off): `steps` becomes a cap, and the step count is
    # fixed once from the measured step time (see TimeBudget), so the cosine decay ends on time.
    time_budget_s: float = 0.0
    # Runs given the same file train the same number of steps (a GLM and a GPT run side by side
    # at equal tokens): the first to decide writes it, the others take its number.
    steps_file: str | None = None

    def record(self) -> dict:
        """The options a run writes to its train_config.json (FinetuneConfig leaves out those that
        do not apply to it)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        check_types(self)
        check_new_folder(self.out)
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 16:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1 and seq_len >= 16")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.lr > 0:
            raise ConfigError("lr must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1] (the last step's share of lr), got {self.min_lr_ratio!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not self.weight_decay >= 0 or not self.grad_clip > 0:
            raise ConfigError(f"weight_decay must be >= 0 and grad_clip > 0, got {self.weight_decay!r} and "
                              f"{self.grad_clip!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1 (the last good checkpoint is what --resume uses), "
                              f"got {self.keep_checkpoints!r}")
        if not 0 <= self.instruction_share <= 1 or not 0 <= self.gmask_prob <= 1:
            raise ConfigError("instruction_share and gmask_prob must be in [0, 1]")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.pipeline_schedule not in distributed.SCHEDULES:
            raise ConfigError(f"pipeline_schedule must be one of {', '.join(distributed.SCHEDULES)}, "
                              f"got {self.pipeline_schedule!r}")
        if not isinstance(self.microbatches, int) or self.microbatches < 0:
            raise ConfigError(f"microbatches must be a non-negative integer, got {self.microbatches!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but this PyTorch sees no CUDA GPU (use cpu or auto)")
        if not self.time_budget_s >= 0:
            raise ConfigError(f"time_budget_s must be >= 0 seconds, got {self.time_budget_s!r}")
        if self.steps_file and not self.time_budget_s:
            raise ConfigError("steps_file shares the step count a time budget decides: give time_budget_s too")
        if self.time_budget_s and self.tp * self.pp * self.dp > 1:
            raise ConfigError("time_budget_s runs in one process; under torchrun give --steps")


def changed_settings(saved: dict, cfg: TrainConfig, keys) -> list[str]:
    """The `keys` a checkpoint's saved options hold with another value than `cfg` (a JSON list
    equals a tuple)."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    return [k for k in keys if k in saved and norm(saved[k]) != norm(getattr(cfg, k, None))]


def schedule_note(saved: dict, cfg: TrainConfig, step: int, log) -> None:
    """Resuming with other schedule settings (most often more --steps) reshapes the cosine
    decay from here on: say so, with the learning rate before and after."""
    changed = {k: saved[k] for k in changed_settings(saved, cfg, ("steps", "warmup_steps", "lr", "min_lr_ratio"))}
    if changed:
        before = lr_at(step, dataclasses.replace(cfg, **changed))
        what = ", ".join(f"{k} {v} -> {getattr(cfg, k)}" for k, v in changed.items())
        log(f"note: {what}: the learning-rate schedule changes from step {step} on "
            f"(lr there {before:.3g} -> {lr_at(step, cfg):.3g})")


DATA_KEYS = ("seq_len", "sources", "instructions", "instruction_share", "pack_instructions", "gmask_prob",
             "objective", "seed")


def data_note(saved: dict, cfg: TrainConfig, log) -> None:
    """Resuming with other data settings (a share, packing, the corpus) continues the sample stream
    from where it stood, under the new settings: say so, since the run is then not the one a
    straight run of either setting would have trained."""
    changed = changed_settings(saved, cfg, DATA_KEYS)
    if changed:
        what = ", ".join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        log(f"note: {what}: the data stream continues from its position with the new settings")


def check_disk_space(out: Path, n_parameters: int) -> None:
    """Refuse to start a run whose saves cannot fit: a full disk found at the end lost the run.
    A save writes the FP32 model folder (4 bytes a parameter) and a checkpoint (FP32 weights and
    AdamW's two moments: 12 bytes) beside the files they replace, plus the tokenizer (~0.5 MiB)."""
    need = 16 * n_parameters + (2 << 20)
    free = free_bytes(out)
    if free is not None and free < need:
        raise ConfigError(f"{out}: {free / 2**20:.1f} MiB free, but this run's saves need about "
                          f"{need / 2**20:.0f} MiB (model folder and resumable checkpoint of {n_parameters:,} "
                          "parameters); free some space or choose another --out")


def training_device(cfg: TrainConfig) -> torch.device:
    """The single-process device: cfg.device, with "auto" meaning CUDA when there is one."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


class TimeBudget:
    """Fix a run's step count so that it ends `cfg.time_budget_s` seconds after it started.

    The count is decided once, at the first step that is at least DECIDE_AT steps into this
    process and DECIDE_SHARE of the budget in (SHARED_DECIDE_SHARE with a steps file: runs started
    side by side must all have finished compiling, and share the GPU, while the first to decide
    measures; one that decided while another compiled would overrun): the median of the last WINDOW step
    times, into the time left, gives the steps left (at most cfg.steps). Before the decision the
    cosine term runs against cfg.steps (the cap), so those steps get a learning rate up to a few
    percent above what `--steps N` would give; from the decision on the schedule is that of N.
    With `cfg.steps_file` the first run to decide writes its number (an exclusive create) and
    every other run takes it: runs side by side train equal steps. If a run still overruns the
    budget by OVERRUN, it stops there (and says so). Saving the model comes after the budget. A
    run resumed after its decision keeps the count; resumed before, it decides on a new budget
    counted from the resume."""

    DECIDE_AT, DECIDE_SHARE, SHARED_DECIDE_SHARE, WINDOW, OVERRUN = 20, 0.25, 0.4, 20, 1.15

    def __init__(self, cfg: TrainConfig, start: float, log, first_step: int = 0, decided: bool = False):
        self.cfg, self.start, self.log, self.first_step = cfg, start, log, first_step
        self.decided = decided or not cfg.time_budget_s  # (a resumed run that had decided)
        self.ends: list[float] = []  # when the recent steps ended

    def after_step(self, step: int, now: float) -> int | None:
        """The decided step count at the deciding step, else None."""
        if self.decided:
            return None
        self.ends = [*self.ends[-self.WINDOW:], now]
        spent = now - self.start
        share = self.SHARED_DECIDE_SHARE if self.cfg.steps_file else self.DECIDE_SHARE
        early = step - self.first_step < self.DECIDE_AT or spent < share * self.cfg.time_budget_s
        if early and step < self.cfg.steps:
            return None
        self.decided = True
        per_step = statistics.median(b - a for a, b in itertools.pairwise(self.ends)) if len(self.ends) > 1 \
            else spent / max(1, step - self.first_step)
        left = max(0.0, self.cfg.time_budget_s - spent)
        steps = max(step, min(self.cfg.steps, step + int(left / max(per_step, 1e-9))))
        how = f"{per_step * 1e3:.0f} ms a step, {left:.0f} s of the {self.cfg.time_budget_s:.0f} s budget left"
        if self.cfg.steps_file:
            shared, writer = _shared_steps(Path(self.cfg.steps_file), steps)
            if not writer:
                how += f"; {shared} taken from {self.cfg.steps_file}"
                if shared < step:  # this run is already past it: a partner more than ~3x slower
                    how += f", already passed: stopping here, {step - shared} steps more than the other run"
            steps = max(step, shared)
        self.log(f"time budget: {steps} steps ({how})")
        return steps

    def overdue(self, now: float) -> bool:
        return bool(self.cfg.time_budget_s) and now - self.start > self.OVERRUN * self.cfg.time_budget_s


def _shared_steps(path: Path, steps: int, wait_s: float = 600.0) -> tuple[int, bool]:
    """(the shared step count, whether this run wrote it): create `path` holding `steps` if it
    does not exist yet, else read the number another run wrote there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        deadline = time.monotonic() + wait_s
        while True:  # the writer may be between create and write
            try:
                return int(json.loads(path.read_text())["steps"]), False
            except (ValueError, KeyError, TypeError):
                if time.monotonic() > deadline:
                    raise ConfigError(f"{path} holds no step count (another run's time budget)") from None
                time.sleep(0.05)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"steps": steps}) + "\n")
    return steps, True


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


def trim_padding(batch: dict) -> dict:
    """The batch without the trailing columns that are padding in every row. Exact: padding sits
    after Part B, where no real token attends it, and carries no loss."""
    used = batch["loss_mask"].flatten(0, -2).amax(0).nonzero()
    end = int(used[-1]) + 1 if len(used) else 1
    return {k: (v[..., :end] if k != "context_lengths" else v) for k, v in batch.items()}


class BatchStream:
    """Batches of cfg.batch_size samples, each with the objective's state just after it (what a
    checkpoint must record to resume exactly there).

    With `ahead` > 0 a background thread builds the next batches while the accelerator works on
    this one (the sample builder is Python; on a GPU it would otherwise leave the GPU idle).
    """

    def __init__(self, samples: Iterator[dict], builder, batch_size: int, ahead: int = 0,
                 pin: bool = False, trim: bool = False, segments: bool = False):
        self._samples, self._builder, self._batch_size, self._pin = samples, builder, batch_size, pin
        self._trim, self._segments = trim, segments
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        if ahead > 0:
            self._queue = queue.Queue(maxsize=ahead)
            self._thread = threading.Thread(target=self._fill, name="glm130b-batches", daemon=True)
            self._thread.start()

    def _make(self) -> tuple[dict, dict]:
        batch = collate([next(self._samples) for _ in range(self._batch_size)], segments=self._segments)
        if self._trim:
            batch = trim_padding(batch)
        if self._pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, self._builder.state_dict()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._make()
            except BaseException as e:  # handed to the training thread, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> tuple[dict, dict]:
        if self._queue is None:
            return self._make()
        if self._error is not None:  # the thread has ended: raise again rather than wait forever
            raise self._error
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._thread.join(timeout=10)


class SingleProcessTraining:
    """One process: the model, its optimizer and the single-process checkpoint format (state.py)."""

    is_main = True

    def __init__(self, model: GLMModel, cfg: TrainConfig, device: torch.device, trainable_only: bool = False):
        self.module = model.to(device)
        # checkpoints of a fine-tuning run hold the parameters that train, not the frozen base
        self.saved_names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
        self.device = device
        self.optimizer = make_optimizer(self.module, cfg)
        # compiled forward; the state dicts and checkpoints keep using the plain module
        self.forward = torch.compile(self.module) if cfg.compile else self.module
        self._compile_unproven = cfg.compile

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, batch: dict, precision: Precision, grad_accum: int) -> float:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self._compile_unproven:  # the first step builds the compiled graphs, forward and backward
            try:
                value = self._forward_backward(batch, precision, grad_accum)
            except Exception as e:  # torch.compile could not build (no C++ compiler, ...): train eagerly
                print(f"warning: torch.compile failed ({errors.first_line(e)}); training without it",
                      file=sys.stderr)
                self.forward = self.module
                self.optimizer.zero_grad(set_to_none=True)  # nothing of the failed try may remain
                value = self._forward_backward(batch, precision, grad_accum)
            self._compile_unproven = False
            return value
        return self._forward_backward(batch, precision, grad_accum)

    def _forward_backward(self, batch: dict, precision: Precision, grad_accum: int) -> float:
        with precision.autocast():
            logits = self.forward(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"],
                                  segments=batch.get("segments"))
        loss = glm_loss(logits, batch["targets"], batch["loss_mask"]) / grad_accum
        precision.backward(loss)
        return loss.item()

    def reduce_loss(self, value: float) -> float:
        return value

    def unscale_and_clip(self, precision: Precision, max_norm: float) -> float:
        precision.unscale(self.optimizer)
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))

    def optimizer_step(self, precision: Precision) -> None:
        precision.step(self.optimizer)  # GradScaler skips the update if fp16 gradients overflowed

    def barrier(self) -> None:
        pass

    def on_main(self, fn, what: str) -> None:
        """Run fn (a save) where the run's files are written: here, this one process."""
        fn()

    def save_checkpoint(self, out: Path, step: int, extra: dict, keep: int) -> None:
        weights = self.module.state_dict()
        if self.saved_names is not None:
            weights = {k: v for k, v in weights.items() if k in self.saved_names}
        save_checkpoint(out, TrainState(step, weights, self.optimizer.state_dict(), extra, rng_state()), keep=keep)

    def load_latest(self, out: Path, log=print) -> tuple[int, dict, dict]:
        """The newest intact checkpoint (corrupt ones reported and skipped), in either format:
        a single-process one, or a DCP one written by a parallel run (any layout)."""
        path = latest_intact(out, log)
        if distributed.is_dcp_checkpoint(path):
            return distributed.load_into_plain(path, self.module, self.optimizer)
        state = read_checkpoint(path)
        if self.saved_names is not None:
            differ = sorted(self.saved_names ^ set(state.model))
            if differ:
                raise ConfigError(f"{path} was not written by this fine-tuning setup (its trained parameters differ: "
                                  f"{differ[0]})")
            self.module.load_state_dict(state.model, strict=False)
        else:
            self.module.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        return state.step, state.extra, state.rng

    def save_model(self, out: Path, tokenizer, extra: dict, context: int | None = None) -> None:
        save_model(out, self.module, tokenizer, extra=extra, context=context)


class _NoMetrics:
    """Ranks other than 0 log nothing."""

    def step(self, record: dict) -> None:
        pass

    def event(self, step: int, kind: str, **detail) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: TrainConfig, tokenizer, progress: bool = True, log=print) -> dict:
    """Train (or resume) and save the model folder to cfg.out; returns a summary dict.

    In one process unless started by torchrun (WORLD_SIZE set) or inside an initialised
    process group: then this process is one rank of a cfg.pp x cfg.dp x cfg.tp run (every rank
    calls train with the same cfg) and the process group is created here from torchrun's
    environment when none exists (and destroyed again at the end).
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model_cfg = GLMConfig.from_preset(cfg.preset, **cfg.model_overrides)
    if cfg.objective == "causal":  # recorded in config.json: evaluation then scores it as a causal LM
        model_cfg.extra = {**model_cfg.extra, "objective": "causal"}
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens; preset {cfg.preset} only {model_cfg.vocab_size}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    layout = distributed.layout_from(cfg, model_cfg)
    if not distributed.wants_distributed():
        return _train(cfg, tokenizer, model_cfg, progress, log, None)
    device, created = distributed.join_process_group()
    summary = _train(cfg, tokenizer, model_cfg, progress, log, (layout, device))
    if created:
        distributed.leave_process_group()
    return summary


@dataclass
class Job:
    """What a run trains, on what data, and what it leaves behind. Pretraining (`train`) and
    fine-tuning (glm130b.finetune) differ only here; the loop, checkpoints and resume are shared.

    `data` has `samples()` (an iterator of objective Samples) and a JSON-able `state_dict()` /
    `load_state_dict()` (where the stream stands, for exact resume). `save_folder(engine, out,
    step)` writes the run's result (a model folder, or an adapter). With `trainable_only`,
    checkpoints hold only the parameters that train (a frozen base is not copied); with `trim`,
    batches lose the padding columns that no row uses (samples of very different lengths)."""

    model: GLMModel
    data: object
    save_folder: Callable
    trainable_only: bool = False
    trim: bool = False


class PretrainingData:
    """The GLM objective over the shipped corpus, with instruction pairs mixed in."""

    def __init__(self, cfg: TrainConfig, tokenizer, model_cfg: GLMConfig):
        check_sources(cfg.sources)  # (a bad name or file fails here, before the run folder exists)
        if cfg.instructions and cfg.instructions != "builtin" and not Path(cfg.instructions).is_file():
            raise ConfigError(f"instructions: {cfg.instructions}: file not found")
        self.builder = GLMSampleBuilder(
            ObjectiveConfig(seq_len=cfg.seq_len, gmask_prob=cfg.gmask_prob,
                            instruction_share=cfg.instruction_share if cfg.instructions else 0.0,
                            two_d=model_cfg.rotary == "2d", objective=cfg.objective,
                            pack_instructions=cfg.pack_instructions),
            tokenizer, seed=cfg.seed,
        )
        self.cfg, self.tokenizer = cfg, tokenizer

    def samples(self) -> Iterator:
        cfg = self.cfg
        instructions = instruction_pairs(cfg.instructions, self.tokenizer, cfg.seed) if cfg.instructions else None
        return self.builder.samples(token_documents(self.tokenizer, cfg.sources, cfg.seed), instructions)

    def state_dict(self) -> dict:
        return self.builder.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.builder.load_state_dict(state)


def _train(cfg: TrainConfig, tokenizer, model_cfg: GLMConfig, progress: bool, log, parallel) -> dict:
    model = GLMModel(model_cfg)

    def save_folder(engine, out: Path, step: int) -> None:
        # the folder's context is the training windows' length (positions past it were never trained)
        engine.save_model(out, tokenizer, extra={"trained_steps": step, "train_config": dataclasses.asdict(cfg)},
                          context=cfg.seq_len)

    return run_job(cfg, Job(model, PretrainingData(cfg, tokenizer, model_cfg), save_folder), progress, log, parallel)


def run_job(cfg: TrainConfig, job: Job, progress: bool = True, log=print, parallel=None) -> dict:
    """The training loop over `job` (see Job); `parallel` is (layout, device) under torchrun.
    With a time budget, `cfg.steps` is set to the decided count (the job's saved folder records it)."""
    model = job.model
    model.train()
    n_parameters = model.num_parameters()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if parallel is None:
        device = training_device(cfg)
        engine = SingleProcessTraining(model, cfg, device, trainable_only=job.trainable_only)
        device_type = device.type
    else:
        layout, device = parallel
        engine = distributed.ParallelTraining(
            model, layout, device, lambda module: make_optimizer(module, cfg),
            schedule=cfg.pipeline_schedule, microbatches=distributed.microbatches_of(cfg),
        )
        device_type = device.type
        if not engine.is_main:
            log = distributed._NullLog()
    precision = Precision(cfg.precision, device_type=device_type, growth_interval=cfg.loss_scale_growth_interval)
    guard = SpikeGuard(cfg.spike_factor, cfg.spike_window, max_consecutive=cfg.max_consecutive_spikes)
    # One global sample stream on every rank; a parallel engine keeps its dp rank's rows of each batch.
    data = job.data
    out = Path(cfg.out)
    step, tokens_seen = 0, 0
    budget_kept = False  # a resumed run keeps the step count its time budget decided

    def restore(data_too: bool) -> tuple[int, dict]:
        state_step, extra, rng = engine.load_latest(out, log=log)
        precision.load_state_dict(extra.get("scaler", {}))
        if data_too:  # a rollback keeps the data position, so the bad batches are skipped
            data.load_state_dict(extra["objective"])
            guard.load_state_dict(extra.get("guard", {}))
            set_rng_state(rng)
        return state_step, extra

    if cfg.resume:
        step, extra = restore(data_too=True)
        tokens_seen = extra.get("tokens", 0)
        log(f"resuming {out} from step {step}")
        decided = extra.get("budget_steps")
        if cfg.time_budget_s and decided:  # keep the step count the budget decided (or its safety stop)
            if decided != cfg.steps:
                log(f"time budget: resuming with the {decided} steps decided before (not {cfg.steps})")
            cfg.steps, budget_kept = int(decided), True
        schedule_note(extra.get("config", {}), cfg, step, log)
        data_note(extra.get("config", {}), cfg, log)
        saved = extra.get("layout")
        if parallel is not None and saved and saved != {"pp": cfg.pp, "dp": cfg.dp, "tp": cfg.tp}:
            log(f"note: checkpoint written with pp={saved['pp']} dp={saved['dp']} tp={saved['tp']}, "
                f"continuing with {parallel[0]}")
    elif list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue it, or choose another --out")
    if parallel is None:
        check_disk_space(out, n_trainable if job.trainable_only else n_parameters)
    engine.barrier()

    def checkpoint() -> None:
        extra = {"objective": objective_state, "guard": guard.state_dict(), "scaler": precision.state_dict(),
                 "tokens": tokens_seen, "config": dataclasses.asdict(cfg),
                 "budget_steps": cfg.steps if cfg.time_budget_s and budget.decided else None}
        # the model folder (or adapter) first: it is what the run is for, and smaller than a checkpoint
        job.save_folder(engine, out, step)
        try:
            engine.save_checkpoint(out, step, extra, keep=cfg.keep_checkpoints)
        except SaveError as e:
            raise SaveError(f"{e}; the model folder {out} holds step {step}, only the resumable checkpoint "
                            "is missing") from e
        metrics.event(step, "checkpoint")

    samples = data.samples()
    objective_state = data.state_dict()  # before the prefetch thread starts moving the stream on
    on_accelerator = device_type != "cpu"
    stream = BatchStream(samples, data, cfg.batch_size, ahead=2 if on_accelerator else 0, pin=on_accelerator,
                         trim=job.trim, segments=cfg.pack_instructions)
    out.mkdir(parents=True, exist_ok=True)

    def write_config() -> None:  # the run's options (a time budget's decided count included)
        if engine.is_main:
            atomic_write_text(out / "train_config.json", json.dumps(cfg.record(), indent=2) + "\n")

    write_config()
    if engine.is_main:
        metrics = MetricsLog(out, resume_step=step)
    else:
        metrics = _NoMetrics()
    fault_step = int(os.environ.get(FAULT_ENV, "0"))
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not (progress and engine.is_main), unit="step",
               dynamic_ncols=True)
    start, losses, first_loss, tokens_at_start = time.perf_counter(), [], None, tokens_seen
    budget = TimeBudget(cfg, start, log, first_step=step, decided=budget_kept)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            engine.set_lr(lr)
            engine.zero_grad()
            loss_value, n_tokens = 0.0, 0
            for _ in range(cfg.grad_accum):
                batch, objective_state = stream.next()
                loss_value += engine.forward_backward(batch, precision, cfg.grad_accum)
                n_tokens += int(batch["input_ids"].numel())
            loss_value = engine.reduce_loss(loss_value)
            grad_norm = engine.unscale_and_clip(precision, cfg.grad_clip)
            tokens_seen += n_tokens
            if cfg.precision == "fp16" and not math.isfinite(grad_norm):
                engine.optimizer_step(precision)  # skipped: the scaler backs the scale off
                action = "overflow"
                metrics.event(step + 1, "overflow", loss_scale=precision.scale)
            else:
                action = guard.check(loss_value, grad_norm)
                if action == "ok":
                    engine.optimizer_step(precision)
                else:
                    precision.scaler.update()
                    metrics.event(step + 1, "spike", loss=loss_value, grad_norm=grad_norm,
                                  reason=guard.reason(loss_value, grad_norm) or "repeated spikes")
            if action == "rollback":
                if list_checkpoints(out):
                    state_step, _ = restore(data_too=False)
                    metrics.event(step + 1, "rollback", to_step=state_step)
                    log(f"warning: {cfg.max_consecutive_spikes} spikes in a row at step {step + 1}; rolled back "
                        f"to step {state_step} and skipped the data since")
                    bar.update(state_step - step)
                    step = state_step
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
            now = time.perf_counter()
            decided = budget.after_step(step, now)
            if decided is None and budget.overdue(now) and step < cfg.steps:
                log(f"time budget: {now - start:.0f} s spent of {cfg.time_budget_s:.0f}; stopping at step {step} of "
                    f"{cfg.steps}")
                decided, budget.decided = step, True  # final: a resume keeps it
            if decided is not None:
                cfg.steps = decided  # checkpoints and train_config.json record it: a resume keeps it
                bar.total = decided
                bar.refresh()
                write_config()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
            if fault_step and step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
    finally:
        stream.close()
    checkpoint()
    metrics.close()
    elapsed = time.perf_counter() - start
    tail = losses[-10:] or [float("nan")]
    run_tokens = tokens_seen - tokens_at_start  # (trimmed batches: the tokens actually fed)
    return {"out": str(out), "steps": step, "first_loss": first_loss, "final_loss": sum(tail) / len(tail),
            "tokens": tokens_seen, "seconds": elapsed, "tokens_per_s": run_tokens / elapsed,
            "parameters": n_parameters, **({"trainable_parameters": n_trainable} if job.trainable_only else {})}
