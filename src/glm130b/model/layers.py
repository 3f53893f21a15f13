"""The GLM block: GeGLU feed-forward, the DeepNorm residual and Embedding Gradient Shrink."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm130b.config import GLMConfig
from glm130b.model.attention import SelfAttention
from glm130b.model.kv_cache import KVCache


def shrink_embedding_gradient(e: torch.Tensor, alpha: float) -> torch.Tensor:
    """Embedding Gradient Shrink (GLM-130B): same value, gradient scaled by alpha.

    `alpha * e + (1 - alpha) * e.detach()`. The paper found the embedding gradient's spikes
    preceded loss divergence; shrinking it by 10x kept the 130B run stable.
    """
    if alpha >= 1.0 or not e.requires_grad:
        return e
    return alpha * e + (1.0 - alpha) * e.detach()


class MLP(nn.Module):
    """GeGLU (GLM-130B) or plain GELU (ChatGLM-6B) feed-forward.

    GeGLU: `dense_h_to_4h` has 2F outputs; rows [0, F) are the linear half `a`, rows [F, 2F)
    the gated half `b`; the product is `a * gelu(b)` (the official order).
    """

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.geglu = config.ffn_type == "geglu"
        self.approximate = config.gelu_approximate
        inner = config.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * inner if self.geglu else inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.dense_h_to_4h(x)
        if self.geglu:
            a, b = u.chunk(2, dim=-1)
            u = a * F.gelu(b, approximate=self.approximate)
        else:
            u = F.gelu(u, approximate=self.approximate)
        return self.dense_4h_to_h(u)


class GLMBlock(nn.Module):
    """One transformer layer with the residual GLM-130B uses.

    DeepNorm (official): `x = LN1(h); h = alpha*x + Attn(x); m = LN2(h); out = alpha*m + FFN(m)`
    with alpha = (2N)^0.5. The residual carries the *normalised* input, and the block's output
    is not normalised: the next block's LN1 (or the final LN) does that. Post-LN is the same
    with alpha = 1; Pre-LN (`h + f(LN(h))`) is kept for the stability comparison.
    """

    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.pre_ln = config.norm == "preln"
        self.alpha = config.deepnorm_alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        allowed: torch.Tensor,
        cache: KVCache | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self.input_layernorm(h)
        a = self.attention(x, position_ids, allowed, cache, prefix)
        h = (h if self.pre_ln else self.alpha * x) + a
        m = self.post_attention_layernorm(h)
        return (h if self.pre_ln else self.alpha * m) + self.mlp(m)
