"""Self-attention as GLM-130B computes it: fused per-head QKV, rotary, layer-scaled FP32 softmax.

Two implementations of the same math live here:

* `attention_reference`: the official recipe, step by step. The query is divided by
  sqrt(d) * (layer_id + 1), the scores are multiplied back by (layer_id + 1) in FP32, blocked
  scores are filled with -10000 and the softmax runs in FP32. (The layer scaling only keeps
  FP16 scores in range; mathematically it is plain 1/sqrt(d) scaling.)
* `F.scaled_dot_product_attention`: the fast path. Its kernels accumulate scores and softmax in
  FP32 even for half-precision inputs, so the result equals the reference up to rounding;
  tests/test_model.py checks that. Every GLM mask row has at least one allowed key, so the
  -10000 fill and SDPA's -inf give identical probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glm130b.config import GLMConfig
from glm130b.model.kv_cache import KVCache
from glm130b.model.masks import with_prefix


# --------------------------------------------------------------------------------------------
# Rotary position embedding (GPT-NeoX "rotate_half" form, as in the official code)
# --------------------------------------------------------------------------------------------
def rotary_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, nh, L, d] by angles positions [B, L] * inv_freq [d/2]; pairs dim i with i+d/2.
    An FP16 inv_freq means the official FP16 angles: the product and cos/sin rounded to FP16."""
    dtype = torch.float16 if inv_freq.dtype == torch.float16 else torch.float32
    freqs = positions.to(dtype).unsqueeze(-1) * inv_freq  # [B, L, d/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, L, d]
    cos, sin = emb.cos().float(), emb.sin().float()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def apply_position_encoding(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """1D: rotary over the whole head. 2D ([B, 2, L] ids): first half of the head on positions,
    second half on block positions (GLM-10B / ChatGLM-6B)."""
    if position_ids.dim() == 2:
        return apply_rotary(q, position_ids, inv_freq), apply_rotary(k, position_ids, inv_freq)
    pos, block_pos = position_ids[:, 0], position_ids[:, 1]
    q1, q2 = q.chunk(2, dim=-1)
    k1, k2 = k.chunk(2, dim=-1)
    q = torch.cat((apply_rotary(q1, pos, inv_freq), apply_rotary(q2, block_pos, inv_freq)), dim=-1)
    k = torch.cat((apply_rotary(k1, pos, inv_freq), apply_rotary(k2, block_pos, inv_freq)), dim=-1)
    return q, k


# --------------------------------------------------------------------------------------------
# Attention kernels
# --------------------------------------------------------------------------------------------
def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, layer_id: int
) -> torch.Tensor:
    """The official GLM-130B attention math. q, k, v: [B, nh, L, d]; allowed: [B, 1, Lq, Lk]."""
    coeff = float(layer_id + 1)
    q = q / (math.sqrt(q.shape[-1]) * coeff)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores.masked_fill(~allowed, -10000.0)
    scores = scores.float() * coeff
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, layer_id: int
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class SelfAttention(nn.Module):
    """Fused QKV with the official per-head interleaved rows: `W.view(nh, 3, d, H)`.

    Keeping the official layout means a head's q, k and v rows are contiguous, so a
    column-parallel split of `query_key_value` keeps whole heads on each rank.
    """

    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        # A plain FP32 attribute, not a buffer: `.half()`/`.to(dtype)` must not round the
        # frequencies, and building on the meta device must not lose them. `_apply` moves it.
        self._rotary = (self.head_dim if config.rotary == "1d" else self.head_dim // 2, config.rotary_base,
                        torch.float16 if config.rotary_precision == "fp16" else torch.float32)
        self.inv_freq = self._rotary_frequencies("cpu")
        self.use_sdpa = True

    def _rotary_frequencies(self, device) -> torch.Tensor:
        dim, base, dtype = self._rotary  # computed on the CPU, as the official code does, then moved
        return rotary_inv_freq(dim, base, device="cpu").to(dtype).to(device)

    def _apply(self, fn, recurse=True):
        """`.to(device)`, `.cuda()`, `.to_empty()` move the frequencies too (their dtype and values
        stay): a compiled forward must not find them on another device at its first call and
        recompile when they move."""
        super()._apply(fn, recurse)
        try:
            where = fn(torch.empty(0, device=self.inv_freq.device)).device
        except Exception:  # noqa: BLE001 - a conversion for other tensors: the forward moves them lazily
            return self
        if where != self.inv_freq.device:
            self.inv_freq = self._rotary_frequencies(where)
        return self

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        allowed: torch.Tensor,
        cache: KVCache | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`prefix`: learned keys and values [B or 1, nh, P, d] (P-Tuning v2) that every position
        sees; they are not rotated and not written to the cache."""
        b, length, _ = x.shape
        qkv = self.query_key_value(x).view(b, length, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each [B, nh, L, d]
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        q, k = apply_position_encoding(q, k, position_ids, self.inv_freq)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        if prefix is not None:
            pk, pv = (t.to(k.dtype).expand(b, -1, -1, -1) for t in prefix)
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            allowed = with_prefix(allowed, pk.shape[2])
        attend = attention_sdpa if self.use_sdpa else attention_reference
        ctx = attend(q, k, v, allowed, self.layer_id)
        ctx = ctx.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim)
        return self.dense(ctx)
