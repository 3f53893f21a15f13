"""Quantized layers under tensor parallelism: one rank's shard of a column- or row-parallel
matrix as a QuantizedLinear (quantized on the rank, or an empty shell a quantized checkpoint's
slices are read into: checkpoint.tensor_parallel_shell, interop/sat.py). Used by
infer/tensor_parallel.py.

A column-parallel shard keeps whole output rows, so its per-row scales are the full model's; a
row-parallel shard's rows are parts of rows: quantized on the rank, per-row scales become per
shard (with a group size that divides the shard, the full model's groups exactly); read from a
quantized folder, each rank takes its whole groups of scales (per-row scales whole).

A quantized output head (`--head-bits`) is vocabulary-parallel, as the full-precision head is:
each rank holds its rows of the vocabulary with their per-row scales (the full model's exactly)
and returns its slice of the logits as a vocabulary-sharded DTensor, gathered by the engine.
"""

from __future__ import annotations

import torch

from glm130b.model.layout import LAYER_MATRICES


class ShardQuantizedLinear(torch.nn.Module):
    """One rank's quantized shard of a tensor-parallel linear, replacing the DTensor module.

    "colwise": replicated input -> this rank's output columns (its bias rows inside `local`).
    "rowwise": this rank's input columns -> partial sums, all-reduced through DTensor
    (Partial -> Replicate), then the replicated bias, added once.
    "vocab": the output head: replicated hidden states -> this rank's vocabulary slice of the
    logits, as a vocabulary-sharded DTensor (Shard(-1)), like the full-precision head's."""

    def __init__(self, local: torch.nn.Module, style: str, mesh, bias: torch.Tensor | None = None):
        super().__init__()
        self.local, self.style, self.mesh = local, style, mesh
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "colwise":
            return self.local(x)
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        if self.style == "vocab":
            local = self.local(x.to_local() if isinstance(x, DTensor) else x)
            return DTensor.from_local(local, self.mesh, [Shard(-1)], run_check=False)
        y = DTensor.from_local(self.local(x), self.mesh, [Partial()], run_check=False)
        y = y.redistribute(self.mesh, [Replicate()]).to_local()
        return y if self.bias is None else y + self.bias


def _head_weight(model):
    """The vocabulary-sharded DTensor the head multiplies by: an untied head's, else the table's."""
    head = getattr(model, "lm_head", None)
    return model.word_embeddings.weight if head is None else head.weight


@torch.no_grad()
def quantize_shards(model, bits: int, group_size: int | None = None, head_bits: int | None = None) -> None:
    """Swap each layer's four DTensor linears for ShardQuantizedLinear over the local shard, and
    with `head_bits` the output head for this rank's vocabulary rows, quantized per row (the
    tied table's rows then take the head's dequantized values, as quantize_head does in one
    process)."""
    from glm130b.quant.weights import QuantizedLinear, _linear_of, check_settings, table_from_head

    check_settings(bits, group_size)
    if head_bits is not None:
        check_settings(head_bits)
        tied = getattr(model, "lm_head", None) is None
        weight = _head_weight(model)
        local = weight.to_local()
        head = QuantizedLinear.from_linear(_linear_of(local, None), head_bits)
        model.lm_head = ShardQuantizedLinear(head, "vocab", weight.device_mesh)
        if tied:  # one table, as quantize_head makes it in one process
            table_from_head(local, head)
    for _matrix, parent, attr, dist_linear, style in _tp_linears(model):
        weight, bias = dist_linear.weight.to_local(), dist_linear.bias
        colwise_bias = bias is not None and style == "colwise"
        plain = _linear_of(weight, bias.to_local() if colwise_bias else None)
        row_bias = bias.full_tensor() if bias is not None and style == "rowwise" else None
        setattr(parent, attr, ShardQuantizedLinear(QuantizedLinear.from_linear(plain, bits, group_size), style,
                                                   dist_linear.weight.device_mesh, row_bias))


def quantized_shells(model, bits: int, group_size: int | None, dtype: torch.dtype,
                     head_bits: int | None = None) -> dict:
    """Swap each layer's four (meta) DTensor linears for empty ShardQuantizedLinear shells of the
    local shard's shape, to be filled from a quantized folder's slices (checkpoint._load_shard);
    with `head_bits`, the output head too (this rank's vocabulary rows, per-row scales).
    Returns {module name: shell}."""
    from glm130b.quant.weights import QuantizedLinear

    shells = {}
    if head_bits is not None:
        weight = _head_weight(model)
        rows, hidden = weight.to_local().shape
        local = QuantizedLinear(hidden, rows, head_bits, None, bias=False, device="meta", dtype=dtype)
        model.lm_head = shells["lm_head"] = ShardQuantizedLinear(local, "vocab", weight.device_mesh)
    for i, block in enumerate(model.layers):
        for matrix, parent, attr, dist_linear, style in _tp_linears(block):
            out_features, in_features = dist_linear.weight.to_local().shape
            has_bias = dist_linear.bias is not None
            local = QuantizedLinear(in_features, out_features, bits, group_size, bias=has_bias and style == "colwise",
                                    device="meta", dtype=dtype)
            row_bias = torch.empty(out_features, dtype=dtype, device="meta") \
                if has_bias and style == "rowwise" else None
            shell = ShardQuantizedLinear(local, style, dist_linear.weight.device_mesh, row_bias)
            setattr(parent, attr, shell)
            shells[f"layers.{i}.{matrix.module}"] = shell
    return shells


def quantized_split_problems(config, tp: int) -> list[str]:
    """What keeps a quantized folder's row-parallel matrices (attention.dense: H inputs,
    dense_4h_to_h: F inputs) from splitting over `tp` ranks on whole packed bytes (INT4) and whole
    groups of scales; [] when it splits. A column split (and the quantized head's vocabulary
    split) keeps whole rows and always fits."""
    scheme = config.extra.get("quantization") or {}
    bits, group = scheme.get("bits"), scheme.get("group_size")
    problems = []
    for module, inputs in (("attention.dense", config.hidden_size), ("mlp.dense_4h_to_h", config.ffn_hidden_size)):
        local = inputs // tp
        if bits == 4 and local % 2:
            problems.append(f"{module}: {local} inputs per rank at --tp {tp} is odd, which splits INT4's packed bytes")
        elif group is not None and group < inputs and local % group:
            problems.append(f"{module}: {local} inputs per rank at --tp {tp} do not fall on its groups of {group} "
                            "scales")
    return problems


def _tp_linears(module):
    """(Matrix, parent, attribute, DTensor linear, "colwise" | "rowwise") of the four matrices of each
    layer under `module` (a GLMModel or one block)."""
    blocks = module.layers if hasattr(module, "layers") else [module]
    for block in blocks:
        for matrix in LAYER_MATRICES:
            parent_name, _, attr = matrix.module.rpartition(".")
            parent = block.get_submodule(parent_name)
            yield matrix, parent, attr, getattr(parent, attr), "rowwise" if matrix.split == "row" else "colwise"
