"""Tensor-parallel inference: the training plan (glm130b.train.parallel_plan) applied to generation.

Under `torchrun --nproc-per-node TP`, every process loads the model, keeps its 1/TP of every
matrix (whole heads of QKV, its rows of the GeGLU halves, its vocabulary rows), and runs the same
decoding loop; each sub-layer ends in an all-reduce and the head's logits are all-gathered, so
every rank picks the same tokens and rank 0 prints them. The KV cache holds the local heads only.

With `bits`, each rank quantizes its own shard of the four matrices (as GLM-130B quantizes each
of its TP checkpoints): a column-parallel shard keeps whole output rows, so its per-row scales
are the full model's; a row-parallel shard's rows are half rows, so per-row scales are per shard
(with a group size that divides the shard, they equal the full model's groups exactly).
With `head_bits` the output head is quantized too, each rank its vocabulary rows per row (the
full model's scales exactly); its logits are gathered as the full-precision head's are.
"""

from __future__ import annotations

import os

import torch

from glm130b.errors import GLMError
from glm130b.quant.tensor_parallel import (  # noqa: F401 - re-exported
    ShardQuantizedLinear,
    quantize_shards,
    quantized_split_problems,
)


def load_tensor_parallel(directory, tp: int, bits: int | None = None, group_size: int | None = None,
                         dtype: torch.dtype = torch.float32, head_bits: int | None = None):
    """(model, tokenizer) of this rank of `tp` torchrun processes: each rank reads only its own
    slices of the folder (checkpoint.load_model with a mesh; peak memory about 1/tp of the
    model) and, with `bits`, quantizes its own shard (`head_bits`: its rows of the head too). A quantized folder (`glm130b quantize`)
    loads as saved: each rank reads its slices of the packed weights and of the scales. A SAT
    folder (mp_rank_XX_model_states.pt shards, full precision or official INT8/INT4) of any
    degree loads re-split to `tp` (interop/sat.load_sat_tensor_parallel)."""
    from glm130b.checkpoint import _quantization_of, load_config, load_model
    from glm130b.interop.sat import (
        is_sat_folder,
        load_sat_shard,
        load_sat_tensor_parallel,
        sat_folder_config,
        sat_shard_files,
    )
    from glm130b.interop.sat_quantized import quantized_bits
    from glm130b.train.distributed import join_process_group
    from glm130b.train.parallel_plan import build_mesh, tp_split_problems

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise GLMError(f"--tp {tp} runs under torchrun with {tp} processes: "
                       f"torchrun --standalone --nproc-per-node {tp} -m glm130b ... --tp {tp} (WORLD_SIZE is {world})")
    sat = is_sat_folder(directory)
    if sat:  # SAT shards of any degree: each rank copies the parts of the shards its slices cover
        shard0 = load_sat_shard(sat_shard_files(directory)[0])
        config = sat_folder_config(directory, shard0, len(sat_shard_files(directory)))
        saved = quantized_bits(shard0) is not None
        if saved and (bits is not None or head_bits is not None):
            raise GLMError(f"{directory} holds quantized shards; load them without --bits or --head-bits")
        del shard0
    else:
        config = load_config(directory)
        saved = bool(config.extra.get("quantization"))
    problems = tp_split_problems(config, tp)
    if saved and not sat:  # a quantized folder: each rank reads its slices of the packed weights and scales
        _quantization_of(directory, config, bits, group_size, head_bits)  # asking for another scheme is an error
        problems += quantized_split_problems(config, tp)
    if problems:  # before any collective: every rank says the same and leaves
        raise GLMError("; ".join(problems))
    device, _ = join_process_group()
    mesh = build_mesh(tp=tp, device_type=device.type)
    if sat:
        model, tokenizer = load_sat_tensor_parallel(directory, device, dtype, mesh["tp"])
    else:
        model, tokenizer = load_model(directory, device=device, dtype=dtype, tp_mesh=mesh["tp"])
    if bits is not None and not saved:
        quantize_shards(model, bits, group_size, head_bits)
    return model, tokenizer
