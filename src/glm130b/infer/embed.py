"""Text embeddings from a GLM: each input is one bidirectional context (GLM's Part A), and its
vector is the mean of the final (LayerNormed) hidden states over its tokens, L2-normalised, as
sentence-transformers' mean pooling does. Served at /v1/embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glm130b.model.masks import prefill_inputs


@torch.no_grad()
def embed(model, contexts: Sequence[Sequence[int]], pad_id: int = 0, batch: int = 16) -> list[torch.Tensor]:
    """One FP32 unit vector [hidden] per token-id list."""
    device = model.final_layernorm.weight.device
    two_d = model.config.rotary == "2d"
    out = []
    for start in range(0, len(contexts), batch):
        chunk = contexts[start : start + batch]
        ids, pos, allowed = prefill_inputs(chunk, two_d, pad_id, device)
        h = model.final_layernorm(model.run_blocks(model.embed(ids), pos, allowed)).float()
        lengths = torch.tensor([len(c) for c in chunk], device=device)
        keep = (torch.arange(ids.shape[1], device=device).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
        mean = (h * keep).sum(dim=1) / lengths.view(-1, 1)
        out += list(torch.nn.functional.normalize(mean, dim=-1).cpu())
    return out
