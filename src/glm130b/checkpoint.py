"""Model folders: `model.safetensors` + `config.json` + `tokenizer.json`.

This is the format every command reads (`--model DIR`). Saving writes every file in a temporary folder
beside the target first and then renames each into place, so a crash or a full disk never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from glm130b.config import ConfigError, GLMConfig
from glm130b.integrity import verify_checksums, write_checksums
from glm130b.interop.sat import CheckpointError, check_state_dict
from glm130b.io import save_safetensors, staging_folder
from glm130b.model.glm import GLMModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def save_model(directory: str | Path, model: GLMModel, tokenizer, dtype: torch.dtype | None = None,
               extra: dict | None = None, context: int | None = None) -> Path:
    """Write the model folder atomically (weights optionally cast to `dtype`, e.g. fp16).
    `context`: the config's max_seq_len to record, when shorter than the model's (a trained run
    records its training windows: rotary positions past them were never trained)."""
    directory = Path(directory)
    with staging_folder(directory, f"could not save the model to {directory}") as tmp:
        state = {}
        for name, tensor in model.state_dict().items():
            tensor = tensor.detach().cpu()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[name] = tensor.contiguous()
        save_safetensors(state, tmp / WEIGHTS, metadata={"format": "pt", "glm130b": "1"})
        write_checksums(tmp, (WEIGHTS,))
        config = model.config
        if context is not None and context < config.max_seq_len:
            config = dataclasses.replace(config, max_seq_len=context)
        config.save(tmp / CONFIG)
        if tokenizer is not None:  # None: weights only (a converted checkpoint without its tokenizer)
            tokenizer.save(tmp / TOKENIZER)
        if extra:
            (tmp / "meta.json").write_text(json.dumps(extra, indent=2, ensure_ascii=False) + "\n")
        _swap_in(tmp, directory)
    return directory


def _swap_in(tmp: Path, directory: Path) -> None:
    """Move each finished file into place with an atomic rename; other files there are kept
    (a training run keeps its metrics beside the model)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(p.name for p in tmp.iterdir()):
        if name != WEIGHTS:
            os.replace(tmp / name, directory / name)
    os.replace(tmp / WEIGHTS, directory / WEIGHTS)
    tmp.rmdir()


def load_config(directory: str | Path) -> GLMConfig:
    directory = _model_dir(directory)
    try:
        return GLMConfig.load(directory / CONFIG)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a model folder, with one-line errors for bad folders."""
    directory = _model_dir(directory)
    config = load_config(directory)
    if config.extra.get("quantization"):
        from glm130b.quant import load_model_quantized

        return load_model_quantized(directory, device=device, dtype=dtype)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    verify_checksums(directory)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupt or unreadable ({e})") from None
    with torch.device("meta"):
        model = GLMModel(config)
    check_state_dict(state, model, str(weights))
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    model = model.to(dtype)
    model.eval()
    return model, load_folder_tokenizer(directory, config)


def load_folder_tokenizer(directory: Path, config: GLMConfig):
    """The tokenizer of a model folder, checked to fit the model's vocabulary."""
    from glm130b.tokenizer import SENTENCEPIECE_FILE, GLMTokenizer, SentencePieceTokenizer, TokenizerError

    try:
        if not (directory / TOKENIZER).is_file() and (directory / SENTENCEPIECE_FILE).is_file():
            tokenizer = SentencePieceTokenizer.load_folder(directory)  # a converted official checkpoint
        else:
            tokenizer = GLMTokenizer.load(directory / TOKENIZER)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    return tokenizer


def _model_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"model folder not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder (expected {WEIGHTS}, {CONFIG}, {TOKENIZER})")
    return directory
