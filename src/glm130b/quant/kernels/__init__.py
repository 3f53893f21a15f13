"""Matrix products with INT8 / INT4 / BF16 / FP32 weights: the fastest correct kernel per device.

* CPU: the fused dequantizing GEMV/GEMM of gemv.h (compiled at first use, see cpu.py), for
  every batch size up to `BLAS_MIN_ROWS` rows of x; above that (long prefills) the weight is
  dequantized in row blocks and multiplied with PyTorch's BLAS, which is faster there. INT8 and
  INT4 (decoding, prefills) use integer dot products with 8-bit activations per block of 32
  units (llama.cpp's Q8_0 scheme: AVX-512 VL or AVX-VNNI vpdpbusd, AVX2 maddubs, NEON sdot);
  from 8 rows of x on tiles of 8 weight rows (GLM130B_Q8_TILE_MIN_ROWS).
  With AVX-512 VNNI, GLM130B_Q8_MIN_ROWS=N keeps products of fewer than N rows on the earlier
  kernels (INT4 x 16-bit fixed-point activations with VNNI, a smaller error; INT8 on the FP32
  kernel). `set_int_activations(False)` or GLM130B_INT_ACT=0 turns the integer kernels off.
* CUDA: INT4 through PyTorch's tinygemm kernel `torch._weight_int4pack_mm` (BF16 activations;
  the packed layout is built once per module and cached); INT8 and anything tinygemm cannot
  take (odd shapes, group sizes other than 32/64/128/256) dequantize in the activation dtype
  and use cuBLAS. (`torch._weight_int8pack_mm`'s CUDA kernel is a one-thread-per-output loop
  with uncoalesced reads, slower than dequantize + cuBLAS.)
* Anything else, or when the C++ build failed: `reference_linear`, the plain
  dequantize-then-matmul that every kernel is tested against.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from glm130b.quant.kernels import cpu as _cpu

FMT = {torch.float32: 0, torch.bfloat16: 1, "int8": 2, "int4": 3}
BLAS_MIN_ROWS = 256  # rows of x from which the CPU path dequantizes blocks and calls BLAS
# FP32 / BF16 weights: from this many rows of x PyTorch's BLAS beats our GEMV (measured with one
# thread on the Zen 5, AVX2 and AVX-512 builds alike: ours 1.15-1.6x faster at 32 rows, BLAS 1.05-1.15x faster at 64-128)
DENSE_BLAS_MIN_ROWS = 32
USE_ONEDNN = torch.backends.mkldnn.is_available() and os.environ.get("GLM130B_ONEDNN") != "0"
_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Threads of the CPU kernels (None: torch.get_num_threads(), or $GLM130B_KERNEL_THREADS)."""
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _threads = n


def num_threads() -> int:
    if _threads is not None:
        return _threads
    if _ENV_THREADS:
        return _ENV_THREADS
    return torch.get_num_threads()


_env = os.environ.get("GLM130B_KERNEL_THREADS", "")
_ENV_THREADS = int(_env) if _env.isdigit() and int(_env) > 0 else None


def cpu_kernels_available() -> bool:
    return _cpu.get() is not None


def set_int_activations(on: bool) -> bool:
    """Use (default) or skip the integer-activation kernels: INT8 / INT4 x 8-bit activations
    (and INT4 x 16-bit activations with AVX-512 VNNI below GLM130B_Q8_MIN_ROWS rows).
    Off, every product runs on the exact FP32-activation kernels. Returns the previous setting."""
    ext = _cpu.get()
    if ext is None:
        return False
    before = ext.int_activations_enabled()
    ext.set_int_activations(bool(on))
    return before


set_int4_vnni = set_int_activations  # the earlier name (it covered the INT4 VNNI kernel only)


def int_kernel_name(ext) -> str:
    """Which integer-activation kernel this build runs (empty: none)."""
    if ext is None or not ext.int_activations_enabled():
        return ""
    q8 = f"int8/int4 x int8 {ext.q8_dot}" if ext.q8 else ""
    if ext.int4_vnni:
        rows = ext.int8_activation_min_rows()
        if rows > 1 or not q8:
            return "int4 x int16 VNNI" + (f", {q8} from {rows} rows" if q8 and rows < 2**40 else "")
    return q8


def backend_info() -> dict:
    ext = _cpu.get()
    kind = int_kernel_name(ext)
    kind = f", {kind}" if kind else ""
    info = {"cpu": f"C++ {ext.isa} ({ext.lanes} lanes{kind})" if ext else f"PyTorch fallback ({_cpu.error()})",
            "cpu_threads": num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = "tinygemm int4 / cuBLAS dequantized int8"
    return info


# --------------------------------------------------------------------------------------------
def reference_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Dequantize the whole matrix in x's dtype, then F.linear: the reference for every kernel."""
    w = module.dequantized_weight(x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, w, bias)


def quantized_linear(x: torch.Tensor, module) -> torch.Tensor:
    """y = x @ dequant(W)^T + b for a QuantizedLinear `module`, in x's dtype. Inside a compiled
    graph (infer/compiled.py) the CPU extension is left out: dynamo cannot trace it, and inductor
    fuses the dequantization into its own product instead."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        ext = _cpu.get() if module.qweight.device.type == "cpu" else None
        if ext is not None:
            fmt = FMT["int8" if module.bits == 8 else "int4"]
            rows = x.numel() // max(1, x.shape[-1])
            if rows >= BLAS_MIN_ROWS and not _int8_activation_gemm(ext, module):
                return _blocked_blas_linear(x, module)
            return _cpu_call(ext, x, module.qweight, module.scales, module.group_size, module.bias, fmt,
                             module.out_features)
        return reference_linear(x, module)
    if x.device.type == "cuda":
        return _cuda_linear(x, module)
    return reference_linear(x, module)


def _int8_activation_gemm(ext, module) -> bool:
    """Whether the 8-bit-activation kernel takes this long prefill too: it beats dequantize + BLAS
    (one thread, 256 rows of a 2752 x 1024 product on a Zen 4, 8-row tile kernel: AVX2 build
    1.15-1.3x for INT8, 1.8-2.9x for INT4; AVX-512 build 2.5-3.5x and 3.3-4.1x; benchmarks/kernels.py).
    With AVX-512 VNNI, only where
    GLM130B_Q8_MIN_ROWS lets it run (by default it does)."""
    if not (ext.q8 and ext.int_activations_enabled()):
        return False
    if ext.int4_vnni and ext.int8_activation_min_rows() > BLAS_MIN_ROWS:
        return False
    g, k = module.group_size, module.in_features
    return g is None or g >= k or g % (64 if module.bits == 4 else 32) == 0


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with the CPU GEMV for FP32 / BF16 weights at small batch; PyTorch otherwise (and
    inside a compiled graph, which cannot trace the extension)."""
    if x.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and \
            not torch.compiler.is_compiling():
        rows = x.numel() // max(1, x.shape[-1])
        ext = _cpu.get() if rows < DENSE_BLAS_MIN_ROWS else None
        if ext is not None:
            return _cpu_call(ext, x, weight, None, None, bias, FMT[weight.dtype], weight.shape[0])
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if x.device.type == "cpu" and x.dtype == torch.float32 and USE_ONEDNN and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        try:  # oneDNN's FP32 GEMM: 1.1-1.2x MKL's (F.linear) at 32-512 rows on the Zen 5, AVX2 or AVX-512
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except (RuntimeError, AttributeError):  # not built with oneDNN, or an unsupported shape
            pass
    return F.linear(x, weight, bias)


def _cpu_call(ext, x, w, scales, group_size, bias, fmt, n_out) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    if scales is not None and scales.dtype != torch.float32:
        scales = scales.float()
    y = ext.linear(x2, w, scales, group_size or 0, bias, fmt, num_threads())
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*shape[:-1], n_out)


def _blocked_blas_linear(x: torch.Tensor, module, block_elems: int = 1 << 22) -> torch.Tensor:
    """Long prefills: dequantize ~16 MB of rows at a time (in C++ when built) and let BLAS multiply."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty(x2.shape[0], module.out_features, dtype=x.dtype, device=x.device)
    step = max(1, block_elems // max(1, module.in_features))
    ext = _cpu.get() if module.qweight.device.type == "cpu" else None
    scales = module.scales if module.scales.dtype == torch.float32 else module.scales.float()
    for r0 in range(0, module.out_features, step):
        r1 = min(module.out_features, r0 + step)
        if ext is not None:
            w = ext.dequantize(module.qweight, scales, module.group_size or 0, FMT[f"int{module.bits}"],
                               module.in_features, r0, r1, num_threads())
            w = w if x.dtype == torch.float32 else w.to(x.dtype)
        else:
            w = module.dequantized_weight(x.dtype, slice(r0, r1))
        b = None if module.bias is None else module.bias[r0:r1].to(x.dtype)
        out[:, r0:r1] = F.linear(x2, w, b)
    return out.view(*shape[:-1], module.out_features)


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
TINYGEMM_GROUPS = (32, 64, 128, 256)


def _cuda_linear(x: torch.Tensor, module) -> torch.Tensor:
    if module.source_released:  # tinygemm's layout is the only copy: no fallback to give up for
        return _tinygemm_linear(x, module)
    if module.bits == 4 and module._cache.get("tinygemm") is not False:
        try:
            return _tinygemm_linear(x, module)
        except (RuntimeError, ValueError, AttributeError):  # shape or build not supported: fall back once
            module._cache["tinygemm"] = False
    if module.bits == 8 and (module.group_size is None or module.scales.shape[1] == 1) and x.dtype != torch.float16:
        return _int8_row_scaled_linear(x, module)
    return reference_linear(x, module)  # (FP16: the unscaled sums below can pass FP16's 65504)


def _int8_row_scaled_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Per-row INT8: (x @ q^T) * s, gpt-fast's form. The scale of a row factors out of its dot
    product, so the integers (exact in BF16) go into the product and the FP32 matrix is never
    built; compiled (infer/compiled.py), inductor fuses the cast into the product (at one row of
    x; at more rows the BF16 matrix is built). Not for FP16 activations: the unscaled dot products
    (|q| up to 127 over thousands of inputs, GLM-130B's activations reach the hundreds) can pass
    FP16's 65504, so FP16 dequantizes first (scaled weights, as the official kernels do)."""
    y = F.linear(x, module.qweight.to(x.dtype)) * module.scales.view(-1).to(x.dtype)
    return y if module.bias is None else y + module.bias.to(x.dtype)


def _tinygemm_layout(module):
    """(packed int32 weight, scales-and-zeros [K/G, N, 2] BF16, G) for torch._weight_int4pack_mm."""
    cached = module._cache.get("tinygemm")
    if cached:
        return cached
    n, k = module.out_features, module.in_features
    g = module.group_size
    if g is None:  # per-row scale = the same scale repeated over groups of 256 (exact)
        g = next((c for c in reversed(TINYGEMM_GROUPS) if k % c == 0), None)
    if g not in TINYGEMM_GROUPS or k % g or k % 2 or n % 8:
        raise ValueError("shape not supported by tinygemm")
    inner_k_tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
    if inner_k_tiles is None:
        raise ValueError("in_features not a multiple of 32")
    p = module.qweight
    swapped = ((p & 0x0F) << 4) | (p >> 4)  # tinygemm wants input 2j in the HIGH nibble
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
    scales = module.scales.float()
    if module.group_size is None:
        scales = scales.expand(n, k // g)
    sz = torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=-1).to(torch.bfloat16).contiguous()
    module._cache["tinygemm"] = (packed, sz, g)
    return module._cache["tinygemm"]


def _tinygemm_linear(x: torch.Tensor, module) -> torch.Tensor:
    packed, sz, g = _tinygemm_layout(module)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm(x2, packed, g, sz)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y.to(x.dtype).view(*shape[:-1], module.out_features)
