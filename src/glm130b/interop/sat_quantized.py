"""The official INT8/INT4 SAT checkpoints (GLM-130B's tools/convert_tp.py --quantization-bit-width).

Each tensor-parallel shard holds, for the four matrices of every layer (model/layout.py):
`<name>.weight` int8 [rows, cols] (INT4: [rows, cols / 2], two values per byte, the first in the
high nibble, each a two's-complement nibble: cuda/quantization.cu's int4WeightCompression) and
`<name>.weight_scale` FP16 [rows]: absmax / (2^(bits-1) - 1) over the shard's own part of a row.
Everything else is as in a full-precision shard.

A row-parallel matrix (attention.dense, mlp.dense_4h_to_h) is split by input columns, so each
shard has its own scale for its part of a row. Merged, the model keeps every shard's scale
exactly: all four matrices become group-wise QuantizedLinears with one group size g that divides
every shard's columns (the gcd of H/tp and F/tp: 512 for GLM-130B at tp 8 or 4), a scale
repeated over the groups it covers. Splitting back to official shards needs a scale that is
constant over each shard's part of a row (true for anything that came from official shards);
scales are stored in FP16 there, as the official code stores them.
"""

from __future__ import annotations

import math

import torch

from glm130b.checkpoint import CheckpointError
from glm130b.model.layout import QUANTIZED_MODULES, split_rule
from glm130b.quant.weights import pack_int4, unpack_int4

SCALE = "_scale"  # official: "<name>.weight" + "_scale"


def is_quantized_matrix(name: str) -> bool:
    return name.endswith(tuple(f"{m}.weight" for m in QUANTIZED_MODULES))


def quantized_bits(shard: dict[str, torch.Tensor]) -> int | None:
    """8 or 4 for an official quantized shard, None for a full-precision one."""
    qkv = next((n for n in shard if n.endswith("attention.query_key_value.weight")), None)
    if qkv is None or qkv + SCALE not in shard:
        return None
    hidden = shard[qkv.replace("attention.query_key_value.weight", "input_layernorm.weight")].shape[0]
    cols = shard[qkv].shape[1]
    if shard[qkv].dtype != torch.int8 or cols not in (hidden, hidden // 2):
        raise CheckpointError(f"{qkv}: an int8 [rows, {hidden} or {hidden // 2}] matrix was expected beside "
                              f"its scale, got {shard[qkv].dtype} {tuple(shard[qkv].shape)}")
    return 8 if cols == hidden else 4


def unpack_official_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [rows, k/2] -> int8 [rows, k]: value 2j from the high nibble, 2j+1 from the low one."""
    high = packed >> 4  # arithmetic shift: the sign comes along
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).view(packed.shape[0], -1)


def pack_official_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, k] in -8..7 -> int8 [rows, k/2], as int4WeightCompression packs."""
    if q.shape[1] % 2:
        raise CheckpointError("the official INT4 layout needs an even number of columns")
    byte = ((q[:, 0::2].to(torch.int16) & 0x0F) << 4) | (q[:, 1::2].to(torch.int16) & 0x0F)
    return byte.to(torch.uint8).view(torch.int8)


def group_size_for(shards: list[dict[str, torch.Tensor]], bits: int) -> int | None:
    """The group size that keeps every shard's row scales: None (per row) for one shard, else
    the gcd of the row-parallel matrices' shard widths."""
    if len(shards) == 1:
        return None
    per_byte = 2 if bits == 4 else 1
    return math.gcd(*(t.shape[1] * per_byte for name, t in shards[0].items()
                      if is_quantized_matrix(name) and split_rule(name) == "row"))


def merge_quantized(name: str, shards: list[dict[str, torch.Tensor]], bits: int, group_size: int | None):
    """(our qweight, our FP32 scales [rows, groups]) of one official quantized matrix."""
    values = [s[name] if bits == 8 else unpack_official_int4(s[name]) for s in shards]
    scales = [s[name + SCALE].float().view(-1, 1) for s in shards]
    rule = split_rule(name)
    q = _merge(rule, values)
    if rule == "row":
        scale = torch.cat(scales, dim=1)  # [rows, tp]: one per shard's part of a row
        width = values[0].shape[1]
    else:
        scale = _merge(rule, scales)  # [rows, 1]
        width = q.shape[1]
    if group_size is not None:
        if width % group_size:
            raise CheckpointError(f"{name}: shard width {width} is not a multiple of the group size {group_size}")
        scale = scale.repeat_interleave(width // group_size, dim=1)
    return (q if bits == 8 else pack_int4(q)), scale.contiguous()


def _merge(rule: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if rule == "row":
        return torch.cat(parts, dim=1)
    if rule == "glu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=0)


def split_quantized(name: str, qweight: torch.Tensor, scales: torch.Tensor, bits: int, in_features: int,
                    tp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The official (weight, weight_scale) of each of `tp` shards of one of our quantized matrices."""
    q = qweight if bits == 8 else unpack_int4(qweight, in_features)
    rule = split_rule(name)
    groups = scales.shape[1]
    out = []
    for r in range(tp):
        if rule == "row":
            lo, hi = r * in_features // tp, (r + 1) * in_features // tp
            part = q[:, lo:hi]
            g0, g1 = lo * groups // in_features, max(lo * groups // in_features + 1, hi * groups // in_features)
            s = scales[:, g0:g1]
        else:
            part = _split_rows(rule, q, tp, r)
            s = _split_rows(rule, scales, tp, r)
        if not torch.equal(s, s[:, :1].expand_as(s)):
            raise CheckpointError(f"{name}: its scales vary inside a shard's part of a row; the official layout holds "
                                  "one scale per shard row: convert the full-precision model with --bits instead")
        scale = s[:, 0].half()
        out.append((part.contiguous() if bits == 8 else pack_official_int4(part), scale))
    return out


def _split_rows(rule: str, t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    if rule == "glu":
        first, second = t.chunk(2, dim=0)
        return torch.cat((first.chunk(tp)[r], second.chunk(tp)[r]), dim=0)
    return t.chunk(tp, dim=0)[r]
