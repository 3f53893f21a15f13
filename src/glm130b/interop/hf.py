"""Hugging Face style folders: read ChatGLM-6B checkpoints, write (and read back) our own export.

A ChatGLM-6B folder (THUDM/chatglm-6b) holds `config.json` (ChatGLM's keys), the weights as
`pytorch_model-0000K-of-0000N.bin` with `pytorch_model.bin.index.json` (or safetensors shards
with `model.safetensors.index.json`, or a single file) and `ice_text.model`. Its tensor names are
GLM-130B's (`transformer.` + ours) plus an untied `lm_head.weight`, with the same per-head QKV
layout and DeepNorm residual; it differs in a GELU (tanh) FFN of 4H and 2D rotary positions,
both GLMConfig options (the `chatglm-6b` preset).

Our export writes the same layout: `config.json` with ChatGLM's keys plus a `glm130b` entry that
holds our exact GLMConfig, `model-0000K-of-0000N.safetensors` shards with
`model.safetensors.index.json`, and `tokenizer.json`; reading it back is lossless.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from glm130b.checkpoint import CheckpointError
from glm130b.config import GLMConfig
from glm130b.errors import first_line
from glm130b.interop.sat import PREFIX
from glm130b.io import SaveError, save_safetensors, staging_folder

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")


def config_from_hf(data: dict, where: str = "config.json") -> GLMConfig:
    """GLMConfig from a ChatGLM-6B style config.json (or our export's exact `glm130b` entry)."""
    if "glm130b" in data:
        return GLMConfig.from_dict(data["glm130b"])
    try:
        hidden, heads = int(data["hidden_size"]), int(data["num_attention_heads"])
        return GLMConfig(
            name=str(data.get("_name_or_path") or data.get("model_type") or "chatglm"),
            vocab_size=int(data["vocab_size"]), hidden_size=hidden, num_layers=int(data["num_layers"]),
            num_heads=heads, ffn_hidden_size=int(data.get("inner_hidden_size") or 4 * hidden),
            ffn_type="gelu", gelu_approximate="tanh",
            max_seq_len=int(data.get("max_sequence_length", 2048)),
            rotary="2d" if data.get("position_encoding_2d", True) else "1d",
            layernorm_eps=float(data.get("layernorm_epsilon", 1e-5)),
            tie_word_embeddings=False, rotary_precision="fp16",  # ChatGLM-6B's own angles
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing {e.args[0]!r} (not a ChatGLM-6B config)") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {first_line(e)}") from None


def config_to_hf(cfg: GLMConfig) -> dict:
    """ChatGLM-6B's config keys for our model, plus the exact GLMConfig under `glm130b`."""
    return {
        "architectures": ["GLMModel"], "model_type": "glm130b", "torch_dtype": "float16",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "inner_hidden_size": cfg.ffn_hidden_size,
        "max_sequence_length": cfg.max_seq_len, "layernorm_epsilon": cfg.layernorm_eps,
        "position_encoding_2d": cfg.rotary == "2d", "tie_word_embeddings": cfg.tie_word_embeddings,
        "glm130b": cfg.to_dict(),
    }


def _weight_files(directory: Path) -> list[Path]:
    for index in INDEXES:
        path = directory / index
        if path.is_file():
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: not a weight index ({first_line(e)})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{path}: not a weight index (weight_map must map tensor names to file names)")
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path} names {missing[0]}, which is not in {directory}")
            return files
    for name in SINGLE:
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(f"{directory} has no weights ({', '.join(INDEXES + SINGLE)})")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or unreadable ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    return state


def read_hf(directory) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    """(config, our-named state dict) of a ChatGLM-6B folder or of our export."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json (not a Hugging Face model folder)")
    try:
        data = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON ({e.msg})") from None
    if data.get("quantization_bit"):
        raise CheckpointError(f"{directory} is a quantized ChatGLM release; convert the FP16 checkpoint "
                              "and quantize here (--bits)")
    cfg = config_from_hf(data, str(directory / "config.json"))
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        for name, tensor in _load_weights(path).items():
            if name.endswith("inv_freq"):
                continue
            if name.startswith(PREFIX):
                name = name[len(PREFIX):]
            elif name != "lm_head.weight":
                raise CheckpointError(f"{path}: unexpected tensor {name!r}")
            state[name] = tensor
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return cfg, state


def hf_tokenizer(directory):
    """The tokenizer of a HF folder: our tokenizer.json, else ChatGLM-6B's ice_text.model."""
    from glm130b.tokenizer import GLMTokenizer

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return GLMTokenizer.load(directory / "tokenizer.json")
    if (directory / "ice_text.model").is_file():  # num_image_tokens 20000: ChatGLM-6B v1.0 (150,528 ids)
        return GLMTokenizer.from_sentencepiece(directory / "ice_text.model", convention="chatglm-6b",
                                               num_image_tokens=_num_image_tokens(directory))
    return None


def _num_image_tokens(directory: Path) -> int:
    """ChatGLM's tokenizer_config.json `num_image_tokens` (v1.0: 20000; later: 0); without the
    file, 20000 when config.json's vocabulary is v1.0's 150528."""
    for name, key, value_of in (("tokenizer_config.json", "num_image_tokens", int),
                                ("config.json", "vocab_size", lambda v: 20000 if int(v) == 150528 else 0)):
        try:
            data = json.loads((directory / name).read_text())
            if key in data:
                return value_of(data[key])
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            continue
    return 0


def write_hf(directory, cfg: GLMConfig, state: dict[str, torch.Tensor], tokenizer=None,
             shard_bytes: int = 2 * 1024**3, dtype: torch.dtype | None = torch.float16) -> Path:
    """Export our-named weights as a HF style folder (atomic: built beside, renamed into place)."""
    directory = Path(directory)
    if directory.exists():
        raise SaveError(f"{directory} exists; choose a new folder for the export")
    with staging_folder(directory, f"could not write {directory}") as tmp:
        named = {}
        for name, tensor in state.items():
            tensor = tensor.detach().cpu()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            named[name if name == "lm_head.weight" else PREFIX + name] = tensor.contiguous()
        shards: list[dict] = [{}]
        size = 0
        for name, tensor in named.items():
            n = tensor.numel() * tensor.element_size()
            if shards[-1] and size + n > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += n
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, tmp / fname, metadata={"format": "pt"})
            for name, tensor in shard.items():
                weight_map[name] = fname
                total += tensor.numel() * tensor.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEXES[0]).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        os.replace(tmp, directory)
    return directory
