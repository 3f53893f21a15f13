"""GLM-130B's weight-only quantization: symmetric absmax INT8 / INT4, per row or per group.

The scheme (Zeng et al. 2022, and the official `quantization/` code):

* scale = max|w| / qmax over a row (or over each group of `group_size` inputs of a row),
  qmax = 127 for INT8 and 7 for INT4 (so INT4 values lie in -7..7, never -8);
* q = round(w / scale) (round half to even, as torch.round), clamped to [-qmax, qmax];
* w ~= q * scale. A row (or group) of zeros gets scale 1 and q = 0.
* Applied to the four matrices of every layer -- `attention.query_key_value`,
  `attention.dense`, `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h` -- and nothing else:
  embeddings (and the tied output head), LayerNorms and biases keep their dtype.
* Optionally (`head_bits`, not in GLM-130B) the output head too, per row: a QuantizedLinear
  `lm_head` (the head is the largest single read of a decode step for a small model; llama.cpp
  does the like: its Q4_0 files carry a 6.5-bit output). A tied model stays tied: its lookup
  table takes the head's dequantized rows (`table_from_head`), so lookups and logits read one
  table, and a saved folder stores it once, as the quantized head (checkpoint.save_model; for
  the 16k x 768 table of the `base` preset, 12.6 MB at INT8 instead of 25.2 MB of FP16 plus
  the head).

Storage (what `QuantizedLinear` holds and quantized checkpoints contain):

* INT8: `qweight` int8 [out, in].
* INT4: `qweight` uint8 [out, ceil(in / 2)], two values per byte: input 2j in the low nibble,
  input 2j+1 in the high nibble, each stored as q + 8 (0..15; an odd `in` pads with q = 0).
* `scales` float32 [out, n_groups], n_groups = ceil(in / group_size) (1 without groups; the
  last group may be shorter). FP32, not FP16 as the official code: FP16 scales underflow for
  small weights, and at group size >= 64 they add at most 0.5 bit per weight.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from glm130b.errors import GLMError
from glm130b.model.layout import QUANTIZED_MODULES  # the matrices GLM-130B quantizes (the layout table)

SUPPORTED_BITS = (4, 8)
SCHEME = "glm130b-symmetric-absmax"


class QuantizationError(GLMError, ValueError):
    """Bad quantization settings (bits, group size) or a tensor that cannot be quantized."""


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_settings(bits, group_size=None) -> None:
    """Raise QuantizationError unless `bits` is 4 or 8 and `group_size` is None or a fitting int."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits must be 8 or 4, got {bits!r}")
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise QuantizationError(f"group size must be a positive integer, got {group_size!r}")
    if bits == 4 and group_size % 2:
        raise QuantizationError(
            f"group size must be even for INT4 (two values share a byte), got {group_size}"
        )


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


# --------------------------------------------------------------------------------------------
# Tensor-level quantization
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None):
    """(q int8 [out, in] in [-qmax, qmax], scales float32 [out, n_groups]) for a [out, in] matrix."""
    check_settings(bits, group_size)
    if weight.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise QuantizationError(f"expected a floating-point weight, got {weight.dtype}")
    out, k = weight.shape
    g = k if group_size is None else min(group_size, k)
    ng = math.ceil(k / g)
    q = torch.empty(out, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out, ng, dtype=torch.float32, device=weight.device)
    qmax = qmax_of(bits)
    step = max(1, (1 << 22) // max(1, k))  # rows per chunk: temporaries stay near 16 MB
    for r0 in range(0, out, step):
        w = weight[r0 : r0 + step].float()
        if ng * g != k:
            w = torch.nn.functional.pad(w, (0, ng * g - k))
        w = w.view(w.shape[0], ng, g)
        s = w.abs().amax(dim=-1) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        chunk = torch.round(w / s.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
        q[r0 : r0 + step] = chunk.view(w.shape[0], ng * g)[:, :k]
        scales[r0 : r0 + step] = s
    return q, scales


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantization: q [out, in] (int) times the scale of its row or group."""
    out, k = q.shape
    if group_size is None or scales.shape[1] == 1:
        return (q.to(torch.float32) * scales.to(torch.float32).view(out, -1)[:, :1]).to(dtype)
    expanded = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    return (q.to(torch.float32) * expanded).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in -7..7 -> uint8 [out, ceil(in/2)]: input 2j low nibble, 2j+1 high, as q + 8."""
    if q.dtype != torch.int8:
        raise QuantizationError(f"pack_int4 expects int8 values, got {q.dtype}")
    out, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if k % 2:
        u = torch.cat((u, torch.full((out, 1), 8, dtype=torch.uint8, device=q.device)), dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [out, ceil(in/2)] -> int8 [out, in]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).view(packed.shape[0], -1)[:, :in_features].contiguous()


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Drop-in replacement of nn.Linear holding INT8 or packed INT4 weights and FP32 scales.

    Takes and returns the input's dtype (FP32, BF16, FP16); the matrix product runs in the
    fastest kernel for the device (glm130b.quant.kernels): a fused dequantizing GEMV/GEMM in C++
    on CPU, PyTorch's int8/int4 weight kernels on CUDA, dequantize-then-matmul otherwise.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = True, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_settings(bits, group_size)
        if group_size is not None and group_size >= in_features:
            group_size = None  # one group per row is plain per-row quantization
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        cols = in_features if bits == 8 else (in_features + 1) // 2
        qdtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups(in_features, group_size),
                                                  dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._cache: dict = {}  # per-device kernel layouts (CUDA int4), built on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> QuantizedLinear:
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                     device=w.device, dtype=w.dtype if w.is_floating_point() else torch.float32)
        if w.is_meta:
            return module
        module.set_weight(w)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision [out, in] matrix into this module."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise QuantizationError(
                f"weight of shape {tuple(weight.shape)} does not fit a {self.out_features}x{self.in_features} layer"
            )
        q, scales = quantize_weight(weight, self.bits, self.group_size)
        device = weight.device if self.qweight.is_meta else self.qweight.device
        self.qweight = (q if self.bits == 8 else pack_int4(q)).to(device)
        self.scales = scales.to(device)
        self.source_released = False
        self._cache.clear()

    def int_weight(self) -> torch.Tensor:
        """The integer values, int8 [out, in] (unpacked for INT4)."""
        self._need_source()
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The matrix (or its `rows`) in `dtype`: the reference every kernel is tested against."""
        self._need_source()
        q = self.qweight[rows]
        q = q if self.bits == 8 else unpack_int4(q, self.in_features)
        return dequantize_weight(q, self.scales[rows], self.group_size, dtype)

    def weight_bytes(self) -> int:
        """Bytes of the quantized matrix and its scales (bias excluded), from the shapes (the same
        once the source is released for a CUDA kernel's layout)."""
        cols = self.in_features if self.bits == 8 else (self.in_features + 1) // 2
        return self.out_features * cols + self.scales.numel() * self.scales.element_size()

    # -- CUDA INT4 inference: the kernel's layout alone -------------------------------------------
    source_released = False

    def release_source(self, layout) -> None:
        """Keep only `layout` (the CUDA INT4 kernel's packed copy, built from `qweight`) and free
        `qweight`: otherwise INT4 weights sit in GPU memory twice, and the planner counts them
        once. The layer then serves inference only (compact_cuda_int4)."""
        self._cache["tinygemm"] = layout
        self.qweight = torch.empty(0, dtype=self.qweight.dtype, device=self.qweight.device)
        self.source_released = True

    def _need_source(self) -> None:
        if self.source_released:
            raise QuantizationError(
                "this INT4 layer keeps only the CUDA kernel's layout (its source was freed to halve its memory "
                "for inference): load the model again to save it, fine-tune it or read its weights")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._need_source()  # never write the empty placeholder as if it were the weights
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(dtype)` cast floating buffers; keep the scales in FP32.
        scales = self.scales
        layout = self._cache.get("tinygemm") if self.source_released else None
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32 and not self.scales.is_meta:
            self.scales = scales.to(self.scales.device)  # the FP32 values, not a round trip through the cast
        self._cache.clear()
        if layout:  # the only copy of the weights: moved along with the module, never cast
            device = self.scales.device
            self._cache["tinygemm"] = tuple(t.to(device) if torch.is_tensor(t) else t for t in layout)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_released and (x.device.type != "cuda" or (torch.is_grad_enabled() and x.requires_grad)):
            self._need_source()  # only the CUDA kernel's forward can run on the layout alone
        if torch.is_grad_enabled() and x.requires_grad:  # fine-tuning with frozen INT4/INT8 weights
            return _FrozenQuantizedProduct.apply(x, self)
        from glm130b.quant.kernels import quantized_linear

        return quantized_linear(x, self)

    def extra_repr(self) -> str:
        g = "per-row" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"bias={self.bias is not None}")


class _FrozenQuantizedProduct(torch.autograd.Function):
    """x @ dequant(W)^T + b with the gradient flowing to x only (QLoRA): the forward runs the
    quantized kernel; the backward dequantizes W for the one product it needs and drops it, so no
    full-precision copy of the model ever stays in memory. W and b are frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        from glm130b.quant.kernels import quantized_linear

        ctx.module = module
        return quantized_linear(x, module)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantized_weight(grad.dtype).to(grad.device)
        return grad @ weight, None


class DenseLinear(nn.Module):
    """nn.Linear that multiplies with the fast CPU GEMV of glm130b.quant.kernels (FP32 or BF16 weights).

    PyTorch's FP32 matrix-vector product reaches about half the memory bandwidth on some CPUs
    (and its BF16 one less); decoding at batch 1 is that product. Same state-dict names as
    nn.Linear (`weight`, `bias`) and the same Parameter objects, so checkpoints, optimizers and
    autograd are unaffected: when a gradient is needed, the forward is plain F.linear.
    The input may be FP32 while the weight is BF16 (the output is then FP32).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> DenseLinear:
        weight = linear.weight
        if dtype is not None and weight.dtype != dtype:
            weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        return cls(weight, linear.bias)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
            b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
            return F.linear(x, w, b)
        from glm130b.quant.kernels import dense_linear

        return dense_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------
def quantizable_linears(model: nn.Module):
    """(qualified name, parent module, attribute, module) of each matrix the GLM scheme quantizes."""
    for name, module in model.named_modules():
        for target in QUANTIZED_MODULES:
            parent_name, _, attr = target.rpartition(".")
            if name.endswith("." + parent_name) or name == parent_name:
                child = getattr(module, attr, None)
                if isinstance(child, (nn.Linear, QuantizedLinear, DenseLinear)):
                    yield f"{name}.{attr}", module, attr, child


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int | None = None,
                   head_bits: int | None = None) -> nn.Module:
    """Swap the QKV, attention-output and both FFN matrices of every layer for QuantizedLinear,
    and with `head_bits` the output head too (per-row scales; see the module docstring).

    In place; returns the model. On the meta device nothing is computed (the swapped modules
    are empty shells to load quantized tensors into). Quantizing an already quantized model is
    an error. The model's forward is unchanged: a QuantizedLinear is called like nn.Linear.
    """
    check_settings(bits, group_size)
    if head_bits is not None:
        check_settings(head_bits)
    found = 0
    for name, parent, attr, child in list(quantizable_linears(model)):
        if isinstance(child, QuantizedLinear):
            raise QuantizationError(f"{name} is already quantized ({child.bits}-bit)")
        if isinstance(child, DenseLinear):  # quantize its weight like an nn.Linear's
            child = _linear_of(child.weight, child.bias)
        setattr(parent, attr, QuantizedLinear.from_linear(child, bits, group_size))
        found += 1
    if not found:
        raise QuantizationError("the model has no query_key_value / dense / dense_h_to_4h / dense_4h_to_h layers")
    if head_bits is not None:
        quantize_head(model, head_bits)
    with_quantization_entry(model)
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap every QuantizedLinear matrix (and a quantized head) back for an nn.Linear holding its
    dequantized weight: the same products in full precision (merging a LoRA trained on a quantized
    base, then maybe quantizing again). In place; returns the model."""
    for _name, parent, attr, child in list(quantizable_linears(model)):
        if isinstance(child, QuantizedLinear):
            setattr(parent, attr, _linear_of(child.dequantized_weight(dtype), child.bias))
    head = getattr(model, "lm_head", None)
    if isinstance(head, QuantizedLinear):
        model.lm_head = None if model.config.tie_word_embeddings else _linear_of(head.dequantized_weight(dtype), None)
    with_quantization_entry(model)
    return model


@torch.no_grad()
def compact_cuda_int4(model) -> int:
    """For inference on a GPU: build every CUDA INT4 layer's tinygemm layout now and free the
    packed `qweight` it was built from, so the INT4 weights are held once (as the planner counts
    them), not twice. Layers tinygemm cannot take keep `qweight` (their dequantizing path needs
    it). Afterwards those layers refuse, with one line, to be saved, fine-tuned or dequantized.
    Returns the number of layers compacted."""
    from glm130b.quant.kernels import _tinygemm_layout

    count = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.bits == 4 and m.qweight.device.type == "cuda" \
                and not m.source_released:
            try:
                layout = _tinygemm_layout(m)
            except (RuntimeError, ValueError, AttributeError):
                m._cache["tinygemm"] = False
                continue
            m.release_source(layout)
            count += 1
    if count:
        torch.cuda.empty_cache()
    return count


def quantize_head(model: nn.Module, bits: int) -> None:
    """The output head as a per-row QuantizedLinear `lm_head` (from the tied embedding table, or
    the untied head's weight). A tied table then holds the head's dequantized rows (one table)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, QuantizedLinear):
        raise QuantizationError(f"the output head is already quantized ({head.bits}-bit)")
    weight = model.word_embeddings.weight if head is None else head.weight
    model.lm_head = QuantizedLinear.from_linear(_linear_of(weight, None), bits)
    if head is None:
        table_from_head(model.word_embeddings.weight, model.lm_head)


@torch.no_grad()
def table_from_head(table: torch.Tensor, head: QuantizedLinear) -> None:
    """A tied model with a quantized head: the lookup table (or this rank's rows of it) takes the
    head's dequantized rows, in the table's dtype, so lookups and logits read one table, which a
    folder stores once, as the head. Nothing happens on the meta device."""
    if table.is_meta or head.qweight.is_meta:
        return
    table.copy_(head.dequantized_weight(table.dtype).to(table.device))


def stores_table_as_head(model: nn.Module) -> bool:
    """Whether a saved folder leaves out the tied lookup table: it is the quantized head's rows
    (a table changed since, by full fine-tuning say, is stored)."""
    head = getattr(model, "lm_head", None)
    if not (getattr(model.config, "tie_word_embeddings", False) and isinstance(head, QuantizedLinear)):
        return False
    table = model.word_embeddings.weight
    if table.is_meta or head.qweight.is_meta:
        return True
    return bool(torch.equal(table.detach(), head.dequantized_weight(table.dtype).to(table.device)))


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around existing tensors (nothing allocated), for QuantizedLinear.from_linear."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return linear


def with_quantization_entry(model: nn.Module) -> None:
    """Record the model's quantization in `model.config.extra["quantization"]` (a new config)."""
    info = quantization_info(model)
    cfg = getattr(model, "config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return
    extra = {k: v for k, v in cfg.extra.items() if k != "quantization"}
    if info is not None:
        extra["quantization"] = info
    model.config = dataclasses.replace(cfg, extra=extra)


@torch.no_grad()
def use_fast_linears(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap the four matrices of every layer that are still nn.Linear for DenseLinear (in place).

    Same parameters (or, with `dtype=torch.bfloat16`, BF16 copies of them); the model's forward
    is unchanged, and its batch-1 products use the fast CPU GEMV. With a dtype, the word
    embeddings (and the tied output head) are cast too: BF16 weights, FP32 activations -- a
    layout the inference engine (glm130b.infer) runs; GLMModel.forward wants one dtype.
    """
    for _name, parent, attr, child in list(quantizable_linears(model)):
        if isinstance(child, nn.Linear):
            setattr(parent, attr, DenseLinear.from_linear(child, dtype))
        elif isinstance(child, DenseLinear) and dtype is not None and child.weight.dtype != dtype:
            child.weight = nn.Parameter(child.weight.detach().to(dtype), requires_grad=False)
    if dtype is not None:
        emb = getattr(model, "word_embeddings", None)
        if emb is not None and emb.weight.dtype != dtype:
            emb.weight = nn.Parameter(emb.weight.detach().to(dtype), requires_grad=False)
        head = getattr(model, "lm_head", None)
        if isinstance(head, nn.Linear) and head.weight.dtype != dtype:
            head.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
    return model


def quantization_info(model: nn.Module) -> dict | None:
    """{"bits", "group_size", "scheme", "modules"} of a quantized model, None if it is not."""
    head = getattr(model, "lm_head", None)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m is not head]
    if not layers:
        return None
    info = {"bits": layers[0].bits, "group_size": _model_group_size(layers), "scheme": SCHEME,
            "modules": list(QUANTIZED_MODULES)}
    if isinstance(head, QuantizedLinear):
        info["head_bits"] = head.bits
    return info


def _model_group_size(layers) -> int | None:
    sizes = {m.group_size for m in layers if m.group_size is not None}
    return max(sizes) if sizes else None


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of parameters and buffers by kind: quantized matrices (with scales) and the rest."""
    quantized = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            quantized += m.weight_bytes()
            seen.update({id(m.qweight), id(m.scales)})
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            other += t.numel() * t.element_size()
            seen.add(id(t))
    return {"quantized": quantized, "other": other, "total": quantized + other}
