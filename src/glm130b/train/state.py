"""Training checkpoints: everything needed to continue a run exactly.

`RUN/checkpoints/step_000100/` holds `model.safetensors` (FP32 master weights),
`optimizer.pt` (AdamW states), `state.json` (step, objective/data position, spike guard, loss
scaler, and the RNG states) and `manifest.json` (size and sha256 of every file), written last.
A checkpoint is written in a temporary folder and renamed into place, so a crash never leaves a
half-written one under a real name; a torn or corrupt one (bad size or checksum) is skipped
with a message and the previous good one is used. Only the last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from glm130b.errors import GLMError
from glm130b.integrity import sha256_file
from glm130b.io import save_safetensors, staging_folder

MANIFEST = "manifest.json"


class TrainCheckpointError(GLMError):
    """No usable training checkpoint."""


@dataclass
class TrainState:
    step: int
    model: dict
    optimizer: dict
    extra: dict  # JSON-safe: objective state, spike guard, scaler, events
    rng: dict


def rng_state() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: str | Path, state: TrainState, keep: int = 3) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    with staging_folder(final, f"could not save checkpoint {final}") as tmp:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.model.items()}, tmp / "model.safetensors")
        torch.save({"optimizer": state.optimizer, "rng": state.rng}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": state.step, **state.extra}) + "\n")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": state.step, "files": files}, indent=1) + "\n")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (torn write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    return check_files(path, files)


def check_files(path: Path, files: dict) -> str | None:
    """None if every file of a manifest (`{name: {"bytes", "sha256"}}`) is intact under `path`."""
    for name, meta in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {meta['bytes']}"
        if sha256_file(p) != meta["sha256"]:
            return f"{name} fails its checksum"
    return None


def latest_intact(run_dir: str | Path, log=print) -> Path:
    """The newest intact checkpoint folder of a run; corrupt ones are reported and skipped."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise TrainCheckpointError(f"no checkpoint to resume from in {Path(run_dir) / 'checkpoints'}")
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            return path
        log(f"warning: checkpoint {path} is corrupt ({problem}); trying the previous one")
    raise TrainCheckpointError(f"every checkpoint in {Path(run_dir) / 'checkpoints'} is corrupt")


def read_checkpoint(path: Path) -> TrainState:
    """A single-process checkpoint folder (see save_checkpoint)."""
    # on the CPU: a GPU run's AdamW states are CUDA tensors, and load_state_dict moves them to
    # the parameters' device, so a GPU checkpoint resumes on a machine without one
    blob = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    extra = json.loads((path / "state.json").read_text())
    step = extra.pop("step")
    return TrainState(step, load_file(str(path / "model.safetensors")), blob["optimizer"], extra, blob["rng"])


def load_latest(run_dir: str | Path, log=print) -> TrainState:
    """The newest intact checkpoint of a run; corrupt ones are reported and skipped."""
    return read_checkpoint(latest_intact(run_dir, log))
