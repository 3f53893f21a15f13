"""Any model folder a verb is pointed at: ours (checkpoint.load_model: tensor by tensor, straight
to the device) or an official SAT folder of TP shards (interop/sat.load_sat_model: merged once),
so `glm130b generate --model GLM-130B-SAT-FOLDER` runs without a conversion step."""

from __future__ import annotations

import torch

from glm130b.checkpoint import load_model
from glm130b.interop.sat import is_sat_folder, load_sat_model


def load_any(directory, device="cpu", dtype: torch.dtype = torch.float32, bits: int | None = None,
             group_size: int | None = None, head_bits: int | None = None):
    """(model, tokenizer) of our folder or a SAT folder."""
    if is_sat_folder(directory):
        return load_sat_model(directory, device, dtype, bits, group_size, head_bits)
    return load_model(directory, device=device, dtype=dtype, bits=bits, group_size=group_size, head_bits=head_bits)
