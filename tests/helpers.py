"""Shared test models."""

from __future__ import annotations

import torch

from glm130b.config import GLMConfig
from glm130b.model.glm import build_model


def varied_model(rotary: str = "1d", seed: int = 0, max_seq_len: int = 128):
    """A random tiny GLM whose untied head makes varied, context-dependent choices (a plain random
    model repeats one token, which would hide batching and cache bugs)."""
    torch.manual_seed(seed)
    cfg = GLMConfig.from_preset("tiny", rotary=rotary, tie_word_embeddings=False, max_seq_len=max_seq_len)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)
        for block in model.layers:  # stronger attention so the context matters
            block.attention.query_key_value.weight.mul_(3.0)
    return model
