"""Multi-process training: the trainer's side of `glm130b.train.parallel_plan`.

`glm130b train --tp T --pp P --dp D` under `torchrun` (or inside processes that already joined a
process group, as the tests do) runs the same loop as the single-process trainer
(`glm130b.train.trainer`); this module supplies the pieces that differ:

* `layout_from(cfg)` / `join_process_group`: the (pp, dp, tp) layout checked against the world
  size, the process group from torchrun's environment (gloo on CPU, nccl on CUDA) and the mesh.
* `ParallelTraining`: the model parallelised with `parallel_plan.py` (TP, FSDP2, pipeline stages), the
  forward/backward of one micro-batch on this rank's slice of the global batch (loss normalised by
  the global number of loss tokens), global-norm clipping, fp16 loss scaling over sharded
  gradients, distributed checkpoints (DCP + JSON state + per-rank RNG + manifest, atomically
  renamed, keep-last-K), resume under another layout, and the final model folder written by rank
  0 from a full, canonical state dict.

Data. Every rank runs the *same* sample stream (one `GLMSampleBuilder` seeded with `cfg.seed`)
and builds every global micro-batch of `batch_size` samples; the rank with data-parallel index d
keeps rows `d*B/dp : (d+1)*B/dp`. The tp and pp ranks of one dp index therefore hold identical
data, the global batch is exactly the single-process trainer's, and the data position is one
global number: a checkpoint stores one objective state, and a run resumed under another dp
continues the same global stream (each rank simply keeps a different slice from then on).
Cost: each rank builds the whole global batch on the CPU (cheap next to a step of a model that
needs parallelism; a sharded pre-tokenised loader would remove it).

Checkpoint folder `RUN/checkpoints/step_000100/` (world size > 1, or any torchrun run):
`dcp/` (`torch.distributed.checkpoint`: model and AdamW states, each rank writing its shards, in
the layout-independent form of `parallel.save_checkpoint`), `rng/rank_00000.pt` ... (each
rank's RNG state), `state.json` (step, objective/data position, spike guard, loss scaler, token
count, training config, the layout) and `manifest.json` (size and sha256 of every file, each
rank hashing the files it wrote), all written into `.step_000100.partial/` and renamed by rank 0.
The run folder must be on a file system every rank sees (a shared one across nodes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from glm130b.config import ConfigError, GLMConfig
from glm130b.io import SaveError
from glm130b.train import parallel_plan as P
from glm130b.train.state import (
    MANIFEST,
    TrainCheckpointError,
    check_files,
    list_checkpoints,
    rng_state,
    sha256_file,
)

DCP_DIR = "dcp"
RNG_DIR = "rng"
STATE = "state.json"
SCHEDULES = ("gpipe", "1f1b")


# ============================================================================================
# Layout and process group
# ============================================================================================
@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def __str__(self) -> str:
        return f"pp={self.pp} dp={self.dp} tp={self.tp}"


def env_world_size() -> int | None:
    """WORLD_SIZE set by torchrun (None when the process was not started by a launcher)."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def wants_distributed() -> bool:
    """True under torchrun (WORLD_SIZE set) or inside an initialised process group."""
    return dist.is_available() and (dist.is_initialized() or env_world_size() is not None)


def layout_from(cfg, model_cfg: GLMConfig) -> Layout:
    """The (pp, dp, tp) layout of `cfg`, checked against the world and the model (ConfigError)."""
    layout = Layout(cfg.pp, cfg.dp, cfg.tp)
    for name in ("tp", "pp", "dp"):
        value = getattr(cfg, name)
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    world = dist.get_world_size() if dist.is_initialized() else env_world_size()
    if world is None:
        if layout.world_size > 1:
            raise ConfigError(
                f"--tp {cfg.tp} x --pp {cfg.pp} x --dp {cfg.dp} needs {layout.world_size} processes: launch with "
                f"torchrun --nproc-per-node {layout.world_size} -m glm130b train ..."
            )
        return layout
    if layout.world_size != world:
        raise ConfigError(
            f"--tp {cfg.tp} x --pp {cfg.pp} x --dp {cfg.dp} = {layout.world_size} processes, but the launcher "
            f"started {world} (WORLD_SIZE): make the product equal the number of processes"
        )
    if cfg.pipeline_schedule not in SCHEDULES:
        raise ConfigError(f"--pipeline-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.pipeline_schedule!r}")
    problems = P.tp_split_problems(model_cfg, layout.tp)
    if model_cfg.ffn_type == "geglu" and model_cfg.hidden_size % layout.dp:
        problems.append(f"hidden_size={model_cfg.hidden_size} is not divisible by --dp {layout.dp}")
    if layout.pp > model_cfg.num_layers:
        problems.append(f"--pp {layout.pp} is more stages than the model's {model_cfg.num_layers} layers")
    if cfg.batch_size % layout.dp:
        problems.append(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by --dp {layout.dp}")
    elif layout.pp > 1:
        local, micro = cfg.batch_size // layout.dp, microbatches_of(cfg)
        if micro < 1 or local % micro:
            problems.append(f"each dp rank's {local} samples cannot be split into --microbatches {micro}")
    if problems:
        raise ConfigError("; ".join(problems))
    return layout


def microbatches_of(cfg) -> int:
    """Pipeline microbatches per step (cfg.microbatches, 0 meaning one per pipeline stage)."""
    return cfg.microbatches or cfg.pp


def join_process_group() -> tuple[torch.device, bool]:
    """Initialise the default process group from torchrun's environment unless one exists.

    nccl with one GPU per process (LOCAL_RANK) when CUDA is available, else gloo on CPU.
    Returns (this rank's device, whether this call created the group).
    """
    created = False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device()), created
    return torch.device("cpu"), created


def leave_process_group() -> None:
    """Barrier, then destroy the default group (the CLI's tidy exit after a finished run)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ============================================================================================
# Checkpoint helpers
# ============================================================================================
def _describe(root: Path, paths) -> dict:
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None, "no manifest (torn write)"
    try:
        return json.loads(manifest.read_text())["files"], None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None, "unreadable manifest"


def export_checkpoint(checkpoint: str | Path, out: str | Path, tokenizer) -> Path:
    """Write a model folder (model.safetensors + config.json + tokenizer.json) from one DCP
    training checkpoint, in a plain process (no process group, no GPUs): for runs too large for
    rank 0 to gather the model while training. The model's shape comes from state.json."""
    from glm130b.checkpoint import save_model
    from glm130b.model.glm import GLMModel

    checkpoint = Path(checkpoint)
    state = json.loads((checkpoint / STATE).read_text())
    train_cfg = state["config"]
    model_cfg = GLMConfig.from_preset(train_cfg["preset"], **train_cfg.get("model_overrides", {}))
    model = GLMModel(model_cfg)
    load_model_weights(model, checkpoint / DCP_DIR)
    return save_model(out, model, tokenizer, extra={"trained_steps": state["step"], "train_config": train_cfg},
                      context=train_cfg.get("seq_len"))


@contextlib.contextmanager
def _single_process_dcp():
    """DCP without a process group warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def load_model_weights(model, dcp_dir: str | Path) -> None:
    """Only the weights of a training checkpoint (saved with its optimizer) into a plain model,
    without a process group and without allocating optimizer states."""
    import torch.distributed.checkpoint as dcp

    state = P.checkpoint_state_dict(model)  # canonical layout: GeGLU entries as [2, F, H] / [2, F]
    with _single_process_dcp():
        dcp.load({"model": state}, checkpoint_id=str(dcp_dir))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()})


def load_into_plain(path: Path, model, optimizer) -> tuple[int, dict, dict]:
    """A DCP training checkpoint into a plain single-process model and optimizer (no process
    group): the single-process trainer resuming a run trained in parallel."""
    with _single_process_dcp():
        P.load_checkpoint(model, path / DCP_DIR, optimizer=optimizer)
    extra = json.loads((path / STATE).read_text())
    step = extra.pop("step")
    rng = torch.load(path / RNG_DIR / "rank_00000.pt", weights_only=False)
    return step, extra, rng


# ============================================================================================
# The engine
# ============================================================================================
class _NullLog:
    def __call__(self, *args, **kwargs) -> None:
        pass


class ParallelTraining:
    """The model, optimizer and collective steps of one rank of a (pp, dp, tp) run.

    `model` is the seeded, full single-process `GLMModel` (identical on every rank); it is
    split/parallelised here. `make_optimizer(module)` builds the optimizer on the parallel module.
    """

    def __init__(self, model, layout: Layout, device: torch.device, make_optimizer: Callable,
                 schedule: str = "1f1b", microbatches: int = 1):
        self.layout = layout
        self.device = device
        self.config: GLMConfig = model.config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.mesh = P.build_mesh(layout.pp, layout.dp, layout.tp, device.type)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.tp_rank = self.mesh["tp"].get_local_rank()
        self.pp_rank = self.mesh["pp"].get_local_rank()
        model = model.to(device)
        if layout.pp > 1:
            self.parts = P.pipeline_stages(model, self.mesh, device=device)
            self.module = self.parts.module
            self.schedule = P.build_schedule(self.parts.stage, microbatches, schedule)
            self.is_last_stage = self.module.is_last
        else:
            self.parts = self.schedule = None
            self.module = P.parallelize_glm(model, self.mesh)
            self.is_last_stage = True
        self.module.train()
        self.optimizer = make_optimizer(self.module)
        # fp16: GradScaler's unscale_ cannot handle a mix of DTensor and plain gradients, so the
        # engine unscales itself and records the *global* overflow decision in the scaler
        # through a one-element stand-in parameter (GradScaler.update then backs off/grows the
        # scale exactly as in a single process, on every rank alike).
        self._inf_probe = torch.zeros(1, device=device, requires_grad=True)
        self._inf_optimizer = torch.optim.SGD([self._inf_probe], lr=0.0)
        self._overflow = False

    # -- one step ----------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _local(self, batch: dict) -> dict:
        n = batch["input_ids"].shape[0] // self.layout.dp
        d = self.dp_rank
        return {k: v[d * n : (d + 1) * n].to(self.device) for k, v in batch.items()}

    def forward_backward(self, batch: dict, precision, grad_accum: int) -> float:
        """Forward and backward of this rank's slice of one global micro-batch. Returns this
        rank's share of the micro-batch loss / grad_accum (0 on ranks that hold no loss)."""
        b = self._local(batch)
        num_tokens = P.global_num_tokens(b["loss_mask"], self.mesh["dp"]).clamp(min=1.0)
        if self.parts is not None:
            # The loss is computed inside the schedule: loss scaling rides on the normaliser.
            scale = float(precision.scaler.scale(torch.ones((), device=self.device))) \
                if precision.scaler.is_enabled() else 1.0
            # pipeline_step all-reduces the tied embedding's gradient between the first and last
            # stage; with gradient accumulation only this micro-batch's part may be summed, so
            # the gradient accumulated so far is set aside and added back afterwards.
            tied = self.module.word_embeddings if self.module.tied else None  # None on middle stages
            earlier = tied.weight.grad if tied is not None else None
            if earlier is not None:
                tied.weight.grad = None
            with precision.autocast():
                loss = P.pipeline_step(
                    self.parts, self.schedule, b["input_ids"], b["targets"], b["loss_mask"],
                    position_ids=b["position_ids"], context_lengths=b["context_lengths"], segments=b.get("segments"),
                    num_tokens=num_tokens * grad_accum / scale,
                )
            if earlier is not None:
                with torch.no_grad():
                    tied.weight.grad.add_(earlier)
            return float(loss.detach()) / scale if loss is not None else 0.0
        with precision.autocast(), P.loss_context(self.module):
            logits = self.module(b["input_ids"], b["position_ids"], context_lengths=b["context_lengths"],
                                 segments=b.get("segments"))
            loss = P.glm_token_loss(logits, P.loss_targets(b["targets"], b["loss_mask"]), num_tokens) / grad_accum
            precision.backward(loss)
        return loss.item()

    def reduce_loss(self, local: float) -> float:
        """The global loss: the dp shares summed (tp ranks hold copies; only the last stage has it)."""
        holds = self.is_last_stage and self.tp_rank == 0
        t = torch.tensor([local if holds else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def unscale_and_clip(self, precision, max_norm: float) -> float:
        scaler = precision.scaler
        if scaler.is_enabled():
            inv = 1.0 / float(scaler.scale(torch.ones((), device=self.device)))
            with torch.no_grad():
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(inv)
        norm = float(P.clip_grad_norm_(self.module, max_norm, self.mesh))
        norm = self.agree(norm)
        if scaler.is_enabled():
            self._overflow = not torch.isfinite(torch.tensor(norm))
            self._inf_probe.grad = torch.full_like(self._inf_probe, float("inf") if self._overflow else 0.0)
            scaler.unscale_(self._inf_optimizer)  # records found_inf for scaler.update()
        return norm

    def optimizer_step(self, precision) -> None:
        """Apply the update (unless fp16 overflowed anywhere) and update the loss scale."""
        if not self._overflow:
            self.optimizer.step()
        precision.scaler.update()
        self._overflow = False

    def agree(self, value: float) -> float:
        """Rank 0's value on every rank (keeps the spike guard's decisions identical everywhere)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t)

    def barrier(self) -> None:
        dist.barrier()

    # -- checkpoints -------------------------------------------------------------------------
    def on_main(self, fn: Callable[[], None], what: str) -> None:
        """Run fn on rank 0 and raise its error (as SaveError) on every rank."""
        error, failure = None, None
        if self.is_main:
            try:
                fn()
            except OSError as e:
                error, failure = f"could not save {what}: {e.strerror or e}", e
            except Exception as e:  # re-raised below, on every rank
                error, failure = f"could not save {what}: {e}", e
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            if isinstance(failure, OSError) or not self.is_main:
                raise SaveError(box[0]) from failure
            raise failure

    def save_checkpoint(self, out: str | Path, step: int, extra: dict, keep: int) -> Path:
        root = Path(out) / "checkpoints"
        final = root / f"step_{step:06d}"
        tmp = root / f".{final.name}.partial"

        def prepare() -> None:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RNG_DIR).mkdir(parents=True)

        self.on_main(prepare, f"checkpoint {final}")
        P.save_checkpoint(self.module, tmp / DCP_DIR, optimizer=self.optimizer)
        mine = tmp / RNG_DIR / f"rank_{self.rank:05d}.pt"
        torch.save(rng_state(), mine)
        _fsync(mine)
        written = [mine, *sorted((tmp / DCP_DIR).glob(f"__{self.rank}_*"))]
        described = [None] * self.world if self.is_main else None
        dist.gather_object(_describe(tmp, written), described, dst=0)

        def finish() -> None:
            state = {"step": step, **extra, "format": "dcp",
                     "layout": {"pp": self.layout.pp, "dp": self.layout.dp, "tp": self.layout.tp}}
            (tmp / STATE).write_text(json.dumps(state) + "\n")
            files = {}
            for part in described:
                files.update(part)
            files.update(_describe(tmp, [tmp / STATE, *sorted(p for p in (tmp / DCP_DIR).iterdir()
                                                                  if p.is_file() and not p.name.startswith("__"))]))
            for name in files:
                _fsync(tmp / name)
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": dict(sorted(files.items()))}, indent=1) + "\n")
            _fsync(tmp / MANIFEST)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)

        self.on_main(finish, f"checkpoint {final}")
        return final

    def _verify(self, path: Path) -> str | None:
        """state.verify, with the hashing split over the ranks; the same answer on every rank."""
        files, problem = _read_manifest(path)
        if problem is None:
            names = sorted(files)[self.rank :: self.world]
            problem = check_files(path, {n: files[n] for n in names})
        problems = [None] * self.world
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)

    def load_latest(self, out: str | Path, log=print) -> tuple[int, dict, dict]:
        """Load the newest intact checkpoint of the run into the module and optimizer.

        DCP checkpoints load under any (pp, dp, tp) layout; a single-process checkpoint
        (model.safetensors + optimizer.pt) is converted on the fly. Returns (step, extra, this
        rank's RNG state: its own when the world size is unchanged, else rank 0's)."""
        candidates = list_checkpoints(out)
        if not candidates:
            raise TrainCheckpointError(f"no checkpoint to resume from in {Path(out) / 'checkpoints'}")
        for path in reversed(candidates):
            problem = self._verify(path)
            if problem:
                if self.is_main:
                    log(f"warning: checkpoint {path} is corrupt ({problem}); trying the previous one")
                continue
            extra = json.loads((path / STATE).read_text())
            step = extra.pop("step")
            if is_dcp_checkpoint(path):
                P.load_checkpoint(self.module, path / DCP_DIR, optimizer=self.optimizer)
                rng_file = path / RNG_DIR / f"rank_{self.rank:05d}.pt"
                saved = extra.get("layout", {})
                if Layout(saved.get("pp", 1), saved.get("dp", 1), saved.get("tp", 1)).world_size != self.world:
                    rng_file = path / RNG_DIR / "rank_00000.pt"
                rng = torch.load(rng_file, weights_only=False)
            else:
                rng = self._load_single_process_checkpoint(path)
            return step, extra, rng
        raise TrainCheckpointError(f"every checkpoint in {Path(out) / 'checkpoints'} is corrupt")

    def _load_single_process_checkpoint(self, path: Path) -> dict:
        """Rank 0 rewrites a single-process checkpoint as DCP (no collectives), every rank loads it."""
        from safetensors.torch import load_file

        from glm130b.model.glm import GLMModel

        scratch = path.parent / f".{path.name}.as_dcp"
        blob = {}

        def convert() -> None:
            shutil.rmtree(scratch, ignore_errors=True)
            import torch.distributed.checkpoint as dcp

            plain = GLMModel(self.config)
            plain.load_state_dict(load_file(str(path / "model.safetensors")))
            optimizer = self._plain_optimizer(plain)
            saved = torch.load(path / "optimizer.pt", weights_only=False)
            optimizer.load_state_dict(saved["optimizer"])
            blob["rng"] = saved["rng"]
            dcp.save(P.checkpoint_state_dict(plain, optimizer), checkpoint_id=str(scratch), no_dist=True)

        self.on_main(convert, f"a converted copy of {path}")
        try:
            P.load_checkpoint(self.module, scratch, optimizer=self.optimizer)
        finally:
            dist.barrier()
            if self.is_main:
                shutil.rmtree(scratch, ignore_errors=True)
        box = [blob.get("rng")]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _plain_optimizer(self, plain):
        # The same parameter groups and hyperparameters as this run's optimizer, on a plain model.
        from glm130b.train.optimizer import parameter_groups

        group = self.optimizer.param_groups[0]
        decay = next((g["weight_decay"] for g in self.optimizer.param_groups if g["weight_decay"]), 0.0)
        # load_state_dict then restores every group's saved hyperparameters
        return torch.optim.AdamW(parameter_groups(plain, decay), lr=group["lr"], betas=group["betas"], eps=group["eps"])

    # -- the model folder --------------------------------------------------------------------
    def full_state_dict(self) -> dict | None:
        """The whole model's canonical parameters on rank 0 (None elsewhere). A collective."""
        local = {k: v.detach().cpu() for k, v in P.full_state_dict(self.module).items()}
        if self.layout.pp == 1:
            return local if self.is_main else None
        leader = self.dp_rank == 0 and self.tp_rank == 0
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(local if leader else None, gathered, dst=0)
        if not self.is_main:
            return None
        merged: dict = {}
        for part in gathered:
            for key, value in (part or {}).items():
                merged.setdefault(key, value)  # the tied embedding: stage 0's copy (they are equal)
        return merged

    def save_model(self, out: str | Path, tokenizer, extra: dict, context: int | None = None) -> None:
        from glm130b.checkpoint import save_model
        from glm130b.model.glm import GLMModel

        state = self.full_state_dict()

        def write() -> None:
            with torch.device("meta"):
                model = GLMModel(self.config)
            model.load_state_dict(state, strict=True, assign=True)
            save_model(out, model, tokenizer, extra=extra, context=context)

        self.on_main(write, f"the model to {out}")
