"""Official GLM-130B (SwissArmyTransformer) parameter names <-> ours.

Our module tree mirrors the official one, minus the `transformer.` prefix, and keeps the
official tensor layouts (per-head interleaved QKV rows; GeGLU `[linear half; gated half]`),
so a merged official state dict loads by renaming. Rotary `inv_freq` buffers in released
checkpoints are ignored, as the official loader does. Merging tensor-parallel shards and
re-sharding belong to the checkpoint-interop work and will build on these two functions.
"""

from __future__ import annotations

import torch

from glm130b.config import GLMConfig
from glm130b.errors import GLMError

PREFIX = "transformer."


class CheckpointError(GLMError, ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.endswith("inv_freq"):
            continue
        if not name.startswith(PREFIX):
            raise CheckpointError(f"unexpected parameter {name!r}: official names start with {PREFIX!r}")
        out[name[len(PREFIX):]] = tensor
    return out


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + name: tensor for name, tensor in state.items()}


def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]!r}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the model expects {tuple(shape)}"
            )


def load_official(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a merged official GLM-130B state dict into `model` (shapes checked first)."""
    ours = official_to_ours(state)
    check_state_dict(ours, model, "official checkpoint")
    model.load_state_dict(ours, strict=True)


def config_from_official_shapes(state: dict[str, torch.Tensor], num_heads: int, **overrides) -> GLMConfig:
    """Infer a GLM-130B-style config from official tensor shapes (heads cannot be inferred)."""
    vocab, hidden = state[PREFIX + "word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(PREFIX + "layers."))
    inner = state[PREFIX + "layers.0.mlp.dense_4h_to_h.weight"].shape[1]
    return GLMConfig(
        name="official", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=num_heads,
        ffn_hidden_size=inner, **overrides,
    )
