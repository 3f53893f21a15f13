"""Adapters: LoRA (through peft) and P-Tuning v2 prefixes, saved and loaded in peft's format.

An adapter folder holds what peft writes, so peft reads it too:
* `adapter_config.json`: peft's LoraConfig or PrefixTuningConfig;
* `adapter_model.safetensors`: LoRA's `base_model.model.<module>.lora_A.weight` / `lora_B.weight`,
  or P-Tuning's `prompt_embeddings` [pre_seq_len, layers x 2 x hidden] (any prefix projection
  already applied, as peft saves it);
and `glm130b_adapter.json`: how the base was loaded when it was trained (its folder, bits, group
size), which `--adapter` uses to warn when the base differs.

LoRA modules are peft's own (`peft.tuners.lora.Linear`), on nn.Linear layers and on our frozen
QuantizedLinear layers alike (registered as a custom module: the base product runs the INT4/INT8
kernel; quant/weights.py passes the gradient to the input). Loading an adapter onto a
full-precision base merges it into the weights (W + scale * B A), so inference runs at the base
model's speed on every path, the fused CPU step included; on a quantized base the LoRA product
stays beside the quantized one (merging would re-quantize).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from glm130b.errors import GLMError
from glm130b.io import atomic_write, atomic_write_text, save_safetensors
from glm130b.model.prefix import PrefixEncoder
from glm130b.quant.weights import QuantizedLinear

CONFIG, WEIGHTS, SIDECAR = "adapter_config.json", "adapter_model.safetensors", "glm130b_adapter.json"
PEFT_PREFIX = "base_model.model."
# names of the matrices LoRA may target (model/layout.py), and the short names the CLI takes
LORA_TARGETS = {"qkv": "query_key_value", "attn_out": "attention.dense", "ffn_in": "dense_h_to_4h",
                "ffn_out": "dense_4h_to_h"}


class AdapterError(GLMError, ValueError):
    """An adapter folder that cannot be read or does not fit the model."""


# -- LoRA -------------------------------------------------------------------------------------
def lora_config(rank: int, alpha: float, dropout: float, targets: list[str], base: str | None = None):
    from peft import LoraConfig

    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise AdapterError(f"LoRA targets must be among {', '.join(LORA_TARGETS)}, got {', '.join(unknown) or 'none'}")
    if rank < 1 or not alpha > 0 or not 0 <= dropout < 1:
        raise AdapterError("LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                      target_modules=sorted(LORA_TARGETS[t] for t in targets), base_model_name_or_path=base)


def add_lora(model: nn.Module, config) -> nn.Module:
    """Freeze the model and put peft's LoRA modules on the targeted layers (trainable)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    config._register_custom_module({QuantizedLinear: LoraLinear})
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():  # peft warns about any layer type it does not know; this one is tested
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return inject_adapter_in_model(config, model)


def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA module on a full-precision layer into its weight and put the plain layer
    back; LoRA on quantized layers stays. Returns how many were merged."""
    merged = 0
    for name, module in lora_layers(model):
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):
            continue
        module.merge(safe_merge=True)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, base)
        merged += 1
    return merged


# -- P-Tuning v2 ------------------------------------------------------------------------------
def add_prefix(model: nn.Module, pre_seq_len: int, projection_hidden: int | None = None) -> nn.Module:
    """Freeze the model and give it a trainable P-Tuning v2 prefix (model/prefix.py)."""
    for p in model.parameters():
        p.requires_grad_(False)
    param = model.final_layernorm.weight
    model.prefix_encoder = PrefixEncoder(model.config, pre_seq_len, projection_hidden).to(param.device, param.dtype)
    return model


def _prefix_config(model) -> dict:
    """peft's PrefixTuningConfig fields (write_adapter adds the base's path)."""
    enc, cfg = model.prefix_encoder, model.config
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": enc.pre_seq_len,
            "token_dim": cfg.hidden_size, "num_transformer_submodules": 1, "num_attention_heads": cfg.num_heads,
            "num_layers": cfg.num_layers, "encoder_hidden_size": enc.projection_hidden or cfg.hidden_size,
            "prefix_projection": bool(enc.projection_hidden), "inference_mode": True, "revision": None}


# -- save and load ----------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(peft config, full CPU tensors) of the model's adapter. Under FSDP2 every rank must call it
    (the shards are gathered; a prefix projection runs on the sharded DTensor parameters, whose
    ops gather what they need, and its table is then gathered whole)."""
    if model.prefix_encoder is not None:
        with torch.no_grad():
            table = _full(model.prefix_encoder.table().detach())
        return _prefix_config(model), {"prompt_embeddings": table.float().cpu().contiguous()}
    from peft import get_peft_model_state_dict

    if not lora_layers(model):
        raise AdapterError("the model has no adapter to save")
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # (no Hub lookup)
    return _json_ready(model.peft_config["default"]), {PEFT_PREFIX + k: _full(v.detach()).cpu().contiguous()
                                                       for k, v in state.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def write_adapter(directory: str | Path, config: dict, weights: dict[str, torch.Tensor], base: dict) -> Path:
    """Write an adapter atomically into `directory` (other files there, such as a run's
    checkpoints, are left alone). `base`: {"model", "bits", "group_size", ...}."""
    directory = Path(directory)
    config = {**config, "base_model_name_or_path": base.get("model")}
    method = "ptuning" if config["peft_type"] == "PREFIX_TUNING" else "lora"
    atomic_write(directory / WEIGHTS, lambda tmp: save_safetensors(weights, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / SIDECAR, json.dumps({"method": method, "base": base}, indent=2) + "\n")
    return directory


def save_adapter(directory: str | Path, model: nn.Module, base: dict) -> Path:
    """The model's adapter (LoRA or P-Tuning prefix), written in peft's format."""
    return write_adapter(directory, *adapter_state(model), base)


def _json_ready(config) -> dict:
    out = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in out.items() if not k.startswith("_")}


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG).is_file()


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(peft config dict, weights, glm130b sidecar or {}) of an adapter folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter {directory}: not a folder")
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        weights = load_file(str(directory / WEIGHTS))
    except FileNotFoundError as e:
        raise AdapterError(f"adapter {directory}: {Path(e.filename).name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
        raise AdapterError(f"adapter {directory}: cannot read it ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") not in ("LORA", "PREFIX_TUNING"):
        raise AdapterError(f"adapter {directory}: a peft LORA or PREFIX_TUNING adapter_config.json is expected")
    try:
        sidecar = json.loads((directory / SIDECAR).read_text(encoding="utf-8"))
    except FileNotFoundError:  # (an adapter made by peft itself has none)
        sidecar = {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {directory}: {SIDECAR} is unreadable ({e}); restore it or delete it") from None
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("base", {}), dict):
        raise AdapterError(f"adapter {directory}: {SIDECAR} must hold a JSON object; restore it or delete it")
    return config, weights, sidecar


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = True, log=None) -> nn.Module:
    """Put a saved adapter on a loaded model, for inference: LoRA merged into full-precision
    weights (with `merge`), P-Tuning's prefix as a fixed table. Errors name what does not fit."""
    config, weights, sidecar = read_adapter(directory)
    if config["peft_type"] == "PREFIX_TUNING":
        table = weights.get("prompt_embeddings")
        if table is None:
            raise AdapterError(f"adapter {directory}: no prompt_embeddings tensor")
        try:
            encoder = PrefixEncoder.from_table(model.config, table)
        except ValueError as e:
            raise AdapterError(f"adapter {directory}: {e}") from None
        param = model.final_layernorm.weight
        model.prefix_encoder = encoder.to(param.device, param.dtype).requires_grad_(False)
    else:
        _load_lora(model, directory, config, weights)
        if merge:
            merge_lora(model)
    base = sidecar.get("base", {})
    bits = next((m.bits for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if log is not None and base and base.get("bits") != bits:
        log(f"note: adapter {directory} was trained on a {_describe_bits(base.get('bits'))} base; this base is "
            f"{_describe_bits(bits)}")
    model.eval()
    return model


def _describe_bits(bits) -> str:
    return f"INT{bits}" if bits else "full-precision"


def _load_lora(model: nn.Module, directory: Path, config: dict, weights: dict) -> None:
    from peft import LoraConfig, set_peft_model_state_dict

    known = set(LoraConfig.__dataclass_fields__)
    try:
        lora = LoraConfig(**{k: v for k, v in config.items() if k in known and k not in ("peft_type",)})
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter {directory}: unusable LoRA config ({e})") from None
    state = {}
    for key, tensor in weights.items():
        key = key.removeprefix(PEFT_PREFIX).removeprefix("transformer.")  # ours, or a ChatGLM-6B (HF) adapter
        state[key] = tensor
    names = {name for name, _ in model.named_modules()}
    targets = {k.rsplit(".lora_", 1)[0] for k in state}
    missing = sorted(t for t in targets if t not in names)
    if missing:
        raise AdapterError(f"adapter {directory}: it adapts {missing[0]!r}, which this model does not have")
    try:
        add_lora(model, lora)
        result = set_peft_model_state_dict(model, state)
    except (RuntimeError, ValueError, TypeError) as e:  # (TypeError: a config value of the wrong kind, "r": "x")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(e).__name__)
        raise AdapterError(f"adapter {directory}: does not fit this model ({why})") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterError(f"adapter {directory}: unexpected tensor {unexpected[0]!r}")
