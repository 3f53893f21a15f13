"""`glm130b convert`: between our model folders, SAT tensor-parallel shards and HF folders.

    --from sat   GLM-130B's SwissArmyTransformer checkpoint (mp_rank_XX_model_states.pt shards)
    --from hf    a ChatGLM-6B folder, or our HF export
    --from ours  one of our model folders
    --to ours    a model folder (optionally quantized while converting: --bits 8/4)
    --to hf      a HF style folder (safetensors shards + index + config.json + tokenizer)
    --to sat     SAT shards at --tp N (re-sharding: sat -> sat with another --tp)

Everything goes through one our-named state dict in memory (shards are memory-mapped and merged
tensor by tensor, and shards are written one at a time), so a conversion holds the model once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from glm130b.checkpoint import (
    CheckpointError,
    load_config,
    load_folder_tokenizer,
    model_from_state,
    read_state,
    save_model,
)
from glm130b.config import GLMConfig
from glm130b.errors import GLMError
from glm130b.interop.hf import hf_tokenizer, read_hf, write_hf
from glm130b.interop.sat import ours_to_official, read_sat_model, write_sat
from glm130b.io import check_new_folder

FORMATS_IN = ("sat", "hf", "ours")
FORMATS_OUT = ("ours", "hf", "sat")


def read_ours(directory) -> tuple[GLMConfig, dict[str, torch.Tensor], object | None]:
    """(config, state, tokenizer or None) of one of our model folders."""
    directory = Path(directory)
    cfg = load_config(directory)
    state = read_state(directory)
    try:
        tokenizer = load_folder_tokenizer(directory, cfg)
    except CheckpointError:
        tokenizer = None
    return cfg, state, tokenizer


def convert(src, dst, from_fmt: str, to_fmt: str, tp: int | None = None, bits: int | None = None,
            group_size: int | None = None, preset: str | None = None, num_heads: int | None = None,
            tokenizer_path: str | None = None, unsafe_pickle: bool = False, dtype: str | None = None,
            max_seq_len: int | None = None) -> dict:
    t0 = time.perf_counter()
    if from_fmt not in FORMATS_IN or to_fmt not in FORMATS_OUT:
        raise GLMError(f"convert --from {'|'.join(FORMATS_IN)} --to {'|'.join(FORMATS_OUT)}")
    if tp is not None and to_fmt != "sat":
        raise GLMError("--tp sets the shard count of --to sat (ours and hf folders hold one model)")
    if bits is not None and to_fmt != "ours":
        raise GLMError("--bits quantizes into our model folder: use --to ours")
    if group_size is not None and bits is None:
        raise GLMError("--group-size sets the scales of --bits 8/4: pass --bits as well")
    check_new_folder(dst, "the destination")
    if Path(dst).exists() and any(Path(dst).iterdir()):
        raise GLMError(f"{dst} exists and is not empty; choose a new folder")
    tokenizer = None
    if from_fmt == "sat":
        cfg, state = read_sat_model(src, preset, num_heads, unsafe_pickle)
        scheme = cfg.extra.get("quantization")
        if scheme is not None and bits is not None:  # the official INT8/INT4 shards (interop/sat_quantized.py)
            raise GLMError(f"{src} is already quantized ({scheme['bits']}-bit): convert without --bits")
    elif from_fmt == "hf":
        cfg, state = read_hf(src)
        tokenizer = hf_tokenizer(src)
    else:
        cfg, state, tokenizer = read_ours(src)
    quantized = cfg.extra.get("quantization")
    if quantized and (to_fmt == "hf" or bits is not None):
        raise CheckpointError(f"{src} is quantized ({quantized.get('bits')}-bit): "
                              + ("--bits needs the full-precision model" if bits is not None else
                                 "the HF layout holds full-precision weights; convert the unquantized model"))
    if quantized and quantized.get("head_bits") and to_fmt == "sat":
        raise CheckpointError(f"{src} has a quantized output head (--head-bits), which the official SAT layout "
                              "does not have: convert a folder quantized without --head-bits")
    if max_seq_len:
        cfg = GLMConfig.from_dict({**cfg.to_dict(), "max_seq_len": max_seq_len})
    if tokenizer_path:
        tokenizer = _tokenizer(tokenizer_path, from_fmt)
    cast = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in cast:
        raise GLMError(f"--dtype must be fp32, fp16 or bf16, got {dtype!r}")
    model = model_from_state(cfg, state, str(src))  # checks every name and shape before writing
    params = model.num_parameters()
    if to_fmt == "sat":
        state = model.state_dict()
        quantization = cfg.extra.get("quantization")
        write_sat(dst, ours_to_official(state if quantization else _cast(state, cast[dtype])), tp or 1,
                  quantization=quantization)
    elif to_fmt == "hf":
        write_hf(dst, cfg, model.state_dict(), tokenizer, dtype=cast[dtype] or torch.float16)
    elif bits is not None:
        from glm130b.quant import quantize_model

        save_model(dst, quantize_model(model.float(), bits, group_size), tokenizer)
    else:
        save_model(dst, model, tokenizer, dtype=cast[dtype])
    return {"from": from_fmt, "to": to_fmt, "src": str(src), "dst": str(dst), "preset": cfg.name,
            "parameters": params, "tp": (tp or 1) if to_fmt == "sat" else None, "bits": bits,
            "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def _cast(state: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _tokenizer(path: str, from_fmt: str):
    from glm130b.tokenizer import GLMTokenizer

    path = Path(path)
    if path.suffix == ".model":  # an official ice_text.model
        return GLMTokenizer.from_sentencepiece(path, "glm-130b" if from_fmt == "sat" else "chatglm-6b")
    return GLMTokenizer.load(path)

