"""GLMModel: embedding -> N GLM blocks -> final LayerNorm -> output head tied to the embedding.

Parameter names follow the official checkpoints without the `transformer.` prefix
(`word_embeddings`, `layers.N.attention.query_key_value`, `layers.N.mlp.dense_h_to_4h`, ...),
so loading official weights is a rename plus nothing (see glm130b/interop/sat.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from glm130b.config import GLMConfig
from glm130b.model.kv_cache import KVCache, StaticKVCache
from glm130b.model.layers import GLMBlock, shrink_embedding_gradient
from glm130b.model.masks import attention_allowed


class GLMModel(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.prefix_encoder = None  # P-Tuning v2 keys and values (model/prefix.py), set by an adapter
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DeepNorm initialisation (docs/model.md).

        Xavier normal with gain beta = (2N)^-0.5 on the value, attention-output and both FFN
        matrices; gain 1 on query and key; zero biases; LayerNorms at (1, 0); embeddings
        N(0, 0.02). Fused matrices are initialised per logical sub-matrix, so each has the
        fan-in/fan-out of the unfused layer it stands for.
        """
        cfg = self.config
        beta = cfg.deepnorm_beta
        h, nh, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.layers:
            qkv = block.attention.query_key_value.weight.view(nh, 3, d, h)
            for part, gain in ((0, 1.0), (1, 1.0), (2, beta)):
                qkv[:, part].normal_(std=gain * math.sqrt(2.0 / (h + h)))
            nn.init.xavier_normal_(block.attention.dense.weight, gain=beta)
            w1 = block.mlp.dense_h_to_4h.weight
            for half in w1.view(-1, cfg.ffn_hidden_size, h):  # the GeGLU halves, or the one GELU matrix
                half.normal_(std=beta * math.sqrt(2.0 / (cfg.ffn_hidden_size + h)))
            nn.init.xavier_normal_(block.mlp.dense_4h_to_h.weight, gain=beta)
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        nn.init.ones_(self.final_layernorm.weight)
        nn.init.zeros_(self.final_layernorm.bias)

    def num_parameters(self) -> int:
        """Exact count, shared (tied) tensors once. Works on the meta device."""
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------------
    # The forward pass: the one place that runs embedding -> blocks -> final LayerNorm -> head.
    # A pipeline stage (train/parallel_plan.py: GLMStage) holds a slice of the same modules and
    # runs this same forward; the engine and the scorer call it or its pieces.
    # ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        context_lengths: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        return_hidden: bool = False,
        logits: bool = True,
    ):
        """Logits [B, L, V] for input_ids [B, L] (a later pipeline stage: hidden states [B, L, H]).

        position_ids: [B, L] (1D rotary) or [B, 2, L] (2D); default 0..L-1 (block positions 0).
        The mask is `allowed` [B or 1, 1, L, K] (True = may attend), or, without it, the GLM
        training mask of `context_lengths` [B], or of `segments` [B, 2, L] for rows that pack
        several samples (masks.attention_allowed).
        `cache`: keys/values are written there (and read back) and it advances by L.
        `logits_at` [B]: logits [B, V] of one token per row only (the head is skipped elsewhere).
        `return_hidden`: also each block's output (before the final LayerNorm), as a list.
        `logits=False`: run the blocks only and return None (a prefill that fills the cache).
        """
        b, length = input_ids.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(b, length, self.config.rotary == "2d", input_ids.device)
        if allowed is None:
            if context_lengths is None and segments is None:
                raise ValueError("pass context_lengths (the GLM context length of each sample), segments or allowed")
            allowed = attention_allowed(length, context_lengths, device=input_ids.device, segments=segments)
        h = self.embed(input_ids) if self.embeds else input_ids
        hidden = [] if return_hidden else None
        h = self.run_blocks(h, position_ids, allowed, cache, hidden)
        if cache is not None:
            cache.advance(length)
        if self.final_layernorm is None:  # not the last pipeline stage
            return h
        if not logits:
            return None
        if logits_at is not None:
            h = h[torch.arange(b, device=h.device), logits_at.to(h.device)]  # [B, H]
        out = self.head(self.final_layernorm(h))
        return (out, hidden) if return_hidden else out

    embeds = True  # False on a pipeline stage after the first: its input is hidden states
    # The inference engine decodes through a compiled step over a static KV cache (`--compile`:
    # infer/engine.py); a setting of the model so that every decoder built on it follows it.
    compile_decode = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (Embedding Gradient Shrink in training), in the blocks' dtype (BF16
        weights with FP32 activations are a layout the inference engine runs)."""
        h = shrink_embedding_gradient(self.word_embeddings(input_ids), self.config.emb_grad_shrink)
        dtype = self.activation_dtype
        return h if dtype is None or h.dtype == dtype else h.to(dtype)

    @property
    def activation_dtype(self) -> torch.dtype | None:
        block = next(iter(self.blocks()), None)
        return None if block is None else block.input_layernorm.weight.dtype

    def blocks(self):
        """The blocks this module holds, in order."""
        return self.layers.values() if isinstance(self.layers, nn.ModuleDict) else iter(self.layers)

    def run_blocks(self, h, position_ids, allowed, cache=None, hidden: list | None = None) -> torch.Tensor:
        prefix = None if self.prefix_encoder is None else self.prefix_encoder()
        for block in self.blocks():
            h = block(h, position_ids, allowed, cache, None if prefix is None else prefix[block.attention.layer_id])
            if hidden is not None:
                hidden.append(h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states: the tied embedding table, an untied head's weight, or a
        head module of another kind (a quantized head, glm130b.quant.quantize_head). Without a
        gradient, small batches on the CPU use the fast GEMV (quant/kernels); under tensor
        parallelism the weight is a vocabulary-sharded DTensor and so are the logits."""
        head = self.lm_head
        if head is not None and not isinstance(head, nn.Linear):
            return head(h)
        weight = self.word_embeddings.weight if head is None else head.weight
        if torch.is_grad_enabled() or isinstance(weight, DTensor):
            return F.linear(h, weight if weight.dtype == h.dtype else weight.to(h.dtype))
        from glm130b.quant.kernels import dense_linear

        return dense_linear(h, weight, None)

    def new_kv_cache(self, rows: int, max_len: int, dtype: torch.dtype | None = None,
                     static: bool = False) -> KVCache:
        """A cache for `rows` sequences of up to `max_len` tokens (the local heads under tensor
        parallelism; the activations' dtype unless `dtype` says otherwise). `static`: the
        fixed-shape cache of the compiled decode step (kv_cache.StaticKVCache)."""
        cfg = self.config
        norm = self.final_layernorm.weight
        heads = self.layers[0].attention.num_heads
        kind = StaticKVCache if static else KVCache
        return kind(cfg.num_layers, rows, heads, max_len, cfg.head_dim, dtype or norm.dtype, norm.device)

    def set_attention_impl(self, impl: str) -> None:
        """"sdpa" (fast, default) or "reference" (the official step-by-step math)."""
        if impl not in ("sdpa", "reference"):
            raise ValueError(f"attention impl must be 'sdpa' or 'reference', got {impl!r}")
        for block in self.layers:
            block.attention.use_sdpa = impl == "sdpa"


def default_position_ids(batch: int, length: int, two_d: bool, device=None) -> torch.Tensor:
    pos = torch.arange(length, device=device).expand(batch, length)
    if two_d:
        return torch.stack((pos, torch.zeros_like(pos)), dim=1)
    return pos


def glm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (in FP32) over the positions where loss_mask is 1."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = loss_mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def build_model(config: GLMConfig, device: str | torch.device = "cpu") -> GLMModel:
    """Build a model; on the "meta" device no memory is used (for counting and planning)."""
    with torch.device(device):
        return GLMModel(config)
