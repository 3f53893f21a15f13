"""One configuration dataclass for every GLM model, with named presets.

The presets carry the exact shapes of the official models, so `glm130b info --preset glm-130b`
counts the real parameter total without allocating any memory (see docs/model.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from glm130b.errors import GLMError


class ConfigError(GLMError, ValueError):
    """A configuration that cannot describe a valid model."""


SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len")


@dataclass
class GLMConfig:
    name: str = "custom"
    vocab_size: int = 16384
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    ffn_hidden_size: int = 1368  # GeGLU inner size F: the first projection has 2F outputs
    ffn_type: str = "geglu"  # "geglu" (GLM-130B) or "gelu" (ChatGLM-6B)
    gelu_approximate: str = "none"  # "none" = exact erf GELU (GLM-130B); "tanh" (ChatGLM-6B)
    max_seq_len: int = 512
    rotary: str = "1d"  # "1d" (GLM-130B) or "2d" (GLM-10B / ChatGLM-6B block positions)
    rotary_base: float = 10000.0
    # "fp32": exact angles. "fp16": the angles as the official GLM-130B (SAT) and ChatGLM-6B code
    # computes them, fp16(position) * fp16(inv_freq) and cos/sin in FP16 (0.24 rad off at 512).
    rotary_precision: str = "fp32"
    layernorm_eps: float = 1e-5
    norm: str = "deepnorm"  # "deepnorm" (GLM-130B), "postln" or "preln" (for stability studies)
    emb_grad_shrink: float = 0.1  # Embedding Gradient Shrink alpha; 1.0 disables it
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def deepnorm_alpha(self) -> float:
        """Residual scale alpha = (2N)^0.5 used in the forward pass (DeepNorm)."""
        return (2.0 * self.num_layers) ** 0.5 if self.norm == "deepnorm" else 1.0

    @property
    def deepnorm_beta(self) -> float:
        """Init gain beta = (2N)^-0.5 for FFN, value and output projections (DeepNorm)."""
        return (2.0 * self.num_layers) ** -0.5 if self.norm == "deepnorm" else 1.0

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid config {self.name!r}: {msg}")

        def number(value) -> bool:  # (JSON true is not a number here)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(isinstance(self.name, str), f"name must be a string, got {self.name!r}")
        for key in SHAPE_KEYS:
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{key} must be a positive integer, got {value!r}")
        for key in ("rotary_base", "layernorm_eps", "emb_grad_shrink"):
            value = getattr(self, key)
            need(number(value) and value > 0, f"{key} must be a positive number, got {value!r}")
        need(isinstance(self.tie_word_embeddings, bool),
             f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        need(isinstance(self.extra, dict), f"extra must be an object, got {self.extra!r}")
        scheme = self.extra.get("quantization")
        need(not scheme or isinstance(scheme, dict), f"extra.quantization must be an object, got {scheme!r}")
        need(self.hidden_size % self.num_heads == 0, "hidden_size must be divisible by num_heads")
        need(self.head_dim % 2 == 0, "head_dim must be even for rotary embeddings")
        need(self.rotary in ("1d", "2d"), f"rotary must be '1d' or '2d', got {self.rotary!r}")
        need(self.rotary != "2d" or self.head_dim % 4 == 0, "2d rotary needs head_dim divisible by 4")
        need(self.rotary_precision in ("fp32", "fp16"),
             f"rotary_precision must be 'fp32' or 'fp16', got {self.rotary_precision!r}")
        need(self.ffn_type in ("geglu", "gelu"), f"ffn_type must be 'geglu' or 'gelu', got {self.ffn_type!r}")
        need(self.gelu_approximate in ("none", "tanh"), "gelu_approximate must be 'none' or 'tanh'")
        need(self.norm in ("deepnorm", "postln", "preln"), f"norm must be deepnorm/postln/preln, got {self.norm!r}")
        need(0.0 < self.emb_grad_shrink <= 1.0, "emb_grad_shrink must be in (0, 1]")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GLMConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from glm130b.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        missing = [k for k in SHAPE_KEYS if k not in data]
        if missing:  # a default would build a model of another shape than the weights
            raise ConfigError(f"config file {path} lacks {', '.join(missing)}")
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GLMConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, GLMConfig] = {
    # The official GLM-130B: 70 layers, 96 heads of 128, GeGLU inner 32768, icetk vocabulary.
    "glm-130b": GLMConfig(
        name="glm-130b", vocab_size=150528, hidden_size=12288, num_layers=70, num_heads=96,
        ffn_hidden_size=32768, ffn_type="geglu", max_seq_len=2048, rotary="1d", rotary_precision="fp16",
    ),
    # ChatGLM-6B: GELU (tanh) FFN of 4H, 2D rotary (positions + block positions).
    "chatglm-6b": GLMConfig(
        name="chatglm-6b", vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32,
        ffn_hidden_size=16384, ffn_type="gelu", gelu_approximate="tanh", max_seq_len=2048, rotary="2d",
        rotary_precision="fp16",
    ),
    # The model this project trains and ships (about 27M parameters).
    "small": GLMConfig(
        name="small", vocab_size=16384, hidden_size=512, num_layers=6, num_heads=8,
        ffn_hidden_size=1368, max_seq_len=512,  # 1368 = 8 x 171: tensor-parallel up to 8
    ),
    # The next model up (issue #21): about 112M parameters, GLM-130B's architecture (DeepNorm,
    # GeGLU with F = 8/3 H, 1D rotary, 64-wide heads) on the shipped 16k vocabulary; for a
    # ~10-minute GPU run on the `base` corpus (tools/train_base.sh). 12 heads, F = 2048 = 8 x 256:
    # tensor-parallel up to 4 (heads) and 8 (FFN).
    "base": GLMConfig(
        name="base", vocab_size=16384, hidden_size=768, num_layers=14, num_heads=12,
        ffn_hidden_size=2048, max_seq_len=1024,
    ),
    # For tests and the first-cut demo: trains in seconds on a laptop CPU.
    "tiny": GLMConfig(
        name="tiny", vocab_size=16384, hidden_size=128, num_layers=2, num_heads=4,
        ffn_hidden_size=344, max_seq_len=256,
    ),
}


def check_types(cfg, error: type[Exception] = ConfigError, where: str = "") -> None:
    """Each option has its field's type (YAML gives whatever was written: `steps: "ten"`,
    `steps: 2.5`, `batch_size: true`); an int is taken for a float, nothing else is converted.
    Any dataclass of options (training runs, eval tasks); `error` (ConfigError) names the file
    kind, `where` the file."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        args = set(typing.get_args(hint)) or {hint}
        if value is None and type(None) in args:
            continue
        base = typing.get_origin(hint) or hint
        listed = base in (tuple, list) or any((typing.get_origin(a) or a) in (tuple, list) for a in args)
        if listed:  # (list[str], tuple[str, ...], list[str] | None)
            ok = isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)
        elif bool in args:
            ok = isinstance(value, bool)
        elif int in args:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif float in args:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # (a path is taken for a str: `out`, `instructions`)
            ok = isinstance(value, tuple(a for a in args if isinstance(a, type) and a is not type(None))) or (
                str in args and isinstance(value, os.PathLike))
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
            want = "a list of strings" if listed else next(
                (kind[a] for a in (bool, int, float, str) if a in args), "a " + getattr(base, "__name__", "value"))
            hint = ""
            if isinstance(value, str) and float in args:
                try:
                    float(value)
                    hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3)"
                except ValueError:
                    pass
            raise error(f"{where + ': ' if where else ''}option {name} must be {want}, got {value!r}{hint}")
