"""The fused CPU decode step: one C++ call runs a token (or a short prefill) through the whole stack.

In eager PyTorch a decode step of a small model spends more time in the ~25 small operations
per layer around the matrix products (dispatch, allocation, Python) than in the products
themselves; `quant/kernels/decode_step.cpp` runs the same math as plain loops around the same
GEMV kernels (see its header). The engine (infer/engine.py) uses it on the CPU, when the model
fits, for every decode step and for short prefills; long prefills, the GPU and everything
unusual stay on the modules.

`FusedDecoder.for_model(model)` returns None, with the reason in `why_not(model)`, when the model
does not fit: not on the CPU, activations not FP32, the reference attention asked for, a tensor
parallel model, weights in a format the kernels do not read, or no C++ kernels.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from glm130b.model.layout import layer_matrices
from glm130b.quant import kernels as K
from glm130b.quant.kernels import cpu as _cpu
from glm130b.quant.weights import DenseLinear, QuantizedLinear

ENV_OFF = "GLM130B_FUSED_DECODE"  # "0" turns the fused step off (every step runs the modules)


def _weight(ext, module):
    """A DecodeWeight for an nn.Linear / DenseLinear (FP32 or BF16) or a CPU QuantizedLinear."""
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    if isinstance(module, QuantizedLinear):
        fmt = K.FMT["int8" if module.bits == 8 else "int4"]
        return ext.DecodeWeight(module.qweight, module.scales.float().contiguous(), module.group_size or 0, bias, fmt,
                                module.in_features)
    w = module.weight.detach()
    return ext.DecodeWeight(w.contiguous(), None, 0, bias, K.FMT[w.dtype], module.in_features)


def weights_key(model) -> tuple:
    """What the fused stack was built from: every module, tensor and storage of the model, and the
    attention choice. A change means the stack must be built again."""
    tensors = [*model.parameters(), *model.buffers()]
    return (tuple(id(m) for m in model.modules()), tuple((id(t), t.data_ptr(), t.dtype) for t in tensors),
            tuple(block.attention.use_sdpa for block in model.layers))


def why_not(model) -> str | None:
    """Why the fused step cannot run this model (None: it can)."""
    if os.environ.get(ENV_OFF, "") == "0":
        return f"turned off by {ENV_OFF}=0"
    cfg = model.config
    final = model.final_layernorm
    if final.weight.dtype != torch.float32:
        return f"activations are {final.weight.dtype}, not FP32"
    from torch.distributed.tensor import DTensor

    tensors = [*model.parameters(), *model.buffers()]
    if any(isinstance(t, DTensor) for t in tensors):
        return "a tensor-parallel model"
    if any(t.device.type != "cpu" for t in tensors):
        return "the model is not (all) on the CPU"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "forward hooks on the model (the fused step would skip them)"
    if model.prefix_encoder is not None:
        return "a P-Tuning v2 prefix"
    head = model.lm_head
    if head is not None and type(head) not in (nn.Linear, QuantizedLinear):
        return f"an output head of type {type(head).__name__}"
    for t in (model.word_embeddings.weight, head.weight if isinstance(head, nn.Linear) else None):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16):
            return f"{t.dtype} embeddings or head"
    if cfg.rotary_precision != "fp32":
        return "FP16 rotary angles (the official models' rounding; the C++ step computes FP32 angles)"
    for block in model.layers:
        if not block.attention.use_sdpa:
            return "the reference attention is selected"
        if block.attention.num_heads != cfg.num_heads:
            return "a tensor-parallel model"
        for ln in (block.input_layernorm, block.post_attention_layernorm):
            if not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None:
                return "a LayerNorm without weight and bias"
        for _, m in layer_matrices(block):
            if type(m) not in (nn.Linear, DenseLinear, QuantizedLinear):  # exact: a subclass may compute otherwise
                return f"a {type(m).__name__} layer"
            if type(m) is not QuantizedLinear and m.weight.dtype not in (torch.float32, torch.bfloat16):
                return f"a {m.weight.dtype} layer"
    if _cpu.get() is None:
        return f"no C++ kernels ({_cpu.error()})"
    return None


class FusedDecoder:
    """The model's layers as one C++ DecodeStack (sharing the model's weight tensors)."""

    def __init__(self, model):
        ext = _cpu.get()
        cfg = model.config
        first = model.layers[0]
        self.stack = ext.DecodeStack(
            hidden=cfg.hidden_size, heads=cfg.num_heads, ffn=cfg.ffn_hidden_size, geglu=cfg.ffn_type == "geglu",
            gelu_tanh=cfg.gelu_approximate == "tanh", rotary_2d=cfg.rotary == "2d",
            inv_freq=first.attention.inv_freq.float(), eps=first.input_layernorm.eps,
            alpha=1.0 if first.pre_ln else first.alpha, pre_ln=first.pre_ln)
        for block in model.layers:
            qkv, dense, up, down = (_weight(ext, m) for _, m in layer_matrices(block))  # the table's order
            ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
            self.stack.add_layer(ln1.weight.detach(), ln1.bias.detach(), qkv, dense, ln2.weight.detach(),
                                 ln2.bias.detach(), up, down)
        emb = model.word_embeddings.weight.detach().contiguous()
        if model.lm_head is None:  # tied
            head = ext.DecodeWeight(emb, None, 0, None, K.FMT[emb.dtype], cfg.hidden_size)
        else:  # untied, or quantized
            head = _weight(ext, model.lm_head)
        self.stack.set_output(emb, model.final_layernorm.weight.detach(), model.final_layernorm.bias.detach(), head)

    @classmethod
    def for_model(cls, model) -> FusedDecoder | None:
        """The decoder, or None when the model does not fit (or, with a warning, when building the
        stack failed: the modules decode instead)."""
        if why_not(model) is not None:
            return None
        try:
            return cls(model)
        except (RuntimeError, ValueError, TypeError) as e:
            warnings.warn(f"glm130b: the fused decode step could not take this model ({e}); decoding through "
                          "the modules", RuntimeWarning, stacklevel=3)
            return None

    def step(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, cache,
             logits_at: torch.Tensor | None) -> torch.Tensor | None:
        """ids [B, L], positions [B, L] or [B, 2, L], allowed [B or 1, 1, L, T]; `cache` gives
        `fused_view(B, L)` = (K list, V list, first write slot of each row [B], T) and is written
        there (the caller advances it). FP32 logits [B, V] of token logits_at[b] of each row, or
        None."""
        b, length = ids.shape
        k, v, slots, t = cache.fused_view(b, length)
        if positions.dim() == 3:  # 2D: [B, 2, L] -> [B, L, 2]
            positions = positions.transpose(1, 2)
        keys = allowed.shape[-1]  # the C++ step checks it against T
        mask = allowed.expand(allowed.shape[0], 1, length, keys).reshape(allowed.shape[0], length, keys)
        if mask.shape[0] != b:
            mask = mask.expand(b, -1, -1)
        # token indices within each row, as the modules' indexing takes them (negative from the end)
        at = None if logits_at is None else (logits_at.to(torch.long) % length).contiguous()
        return self.stack.step(ids.contiguous(), positions.contiguous(), mask.contiguous(), k, v, slots, t, at,
                               K.num_threads())  # None without logits_at
