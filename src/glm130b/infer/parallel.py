"""Tensor-parallel inference: the training plan (glm130b.train.parallel) applied to generation.

Under `torchrun --nproc-per-node TP`, every process loads the model, keeps its 1/TP of every
matrix (whole heads of QKV, its rows of the GeGLU halves, its vocabulary rows), and runs the same
decoding loop; each sub-layer ends in an all-reduce and the head's logits are all-gathered, so
every rank picks the same tokens and rank 0 prints them. The KV cache holds the local heads only.
"""

from __future__ import annotations

import os

from glm130b.errors import GLMError


def tensor_parallel_for_inference(model, tp: int):
    """Shard `model` over the TP processes torchrun started (in place); returns it."""
    if tp <= 1:
        return model
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise GLMError(f"--tp {tp} runs under torchrun with {tp} processes: "
                       f"torchrun --standalone --nproc-per-node {tp} -m glm130b ... --tp {tp} (WORLD_SIZE is {world})")
    from glm130b.train.distributed import join_process_group
    from glm130b.train.parallel import apply_tensor_parallel, build_mesh

    try:
        apply_tp_check(model.config, tp)
    except ValueError as e:
        raise GLMError(str(e)) from None
    device, _ = join_process_group()
    model = model.to(device)
    mesh = build_mesh(tp=tp, device_type=device.type)
    return apply_tensor_parallel(model, mesh["tp"])


def apply_tp_check(config, tp: int) -> None:
    for name in ("num_heads", "ffn_hidden_size", "vocab_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"{name}={getattr(config, name)} does not split over --tp {tp}")


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
