"""The optimizer: AdamW with weight decay on the matrices only (trainer.py and distributed.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, LayerNorms and the (tied) embedding are not decayed. Frozen
    parameters (a fine-tuned model's base) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() == 2 and "word_embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with FP32 states over `parameter_groups`. Under TP the parameters mix DTensors and
    plain tensors (replicated LayerNorms), which the multi-tensor (foreach) kernels refuse: the
    per-parameter loop is used then (it is also what CPU runs use by default). `cfg`: a
    TrainConfig (lr, weight_decay)."""
    params = [p for p in module.parameters() if p.requires_grad]
    mixed = any(isinstance(p, DTensor) for p in params) and not all(isinstance(p, DTensor) for p in params)
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    foreach = False if mixed or len(meshes) > 1 else None
    return torch.optim.AdamW(parameter_groups(module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                             foreach=foreach)
