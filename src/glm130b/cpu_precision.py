"""BF16 / FP16 on CPUs that cannot multiply them fast: detect it, warn once, run FP32.

PyTorch's CPU matrix products in BF16 go through oneDNN only where the CPU has AVX-512 BW/VL/DQ
(or native BF16: AVX512_BF16, AMX-BF16, ARM BF16); FP16 only with AVX512_FP16 / AMX-FP16 (ARM:
FP16 arithmetic). Elsewhere they fall back to a scalar loop: measured 0.7 GFLOP/s for BF16
against 130 FP32 on an AVX2-only Zen 2, and 1.6 GFLOP/s for FP16 against 14-46 FP32 on this
project's Zen 5 (AVX-512 BF16, no AVX512_FP16). Training (`--precision bf16|fp16`) and
evaluation at bf16 / fp16 therefore ask `cpu_precision` first: on such a CPU they warn once and
run in FP32 (same results up to rounding, at FP32 speed) instead of crawling. The decode
kernels (quant/kernels) are not affected: BF16 weights there are widened to FP32 in registers.

GLM130B_CPU_HALF=allow keeps the requested precision anyway (e.g. to measure the slow path).
"""

from __future__ import annotations

import os
import platform
import warnings

import torch

_warned: set = set()


def _features() -> set[str]:
    from glm130b.quant.kernels.cpu import cpu_features

    return cpu_features()


def native_half(dtype: torch.dtype, features: set[str] | None = None, machine: str | None = None) -> tuple[bool, str]:
    """(whether PyTorch multiplies `dtype` matrices fast on this CPU, the reason in words)."""
    f = _features() if features is None else features
    machine = (machine or platform.machine()).lower()
    name = "BF16" if dtype == torch.bfloat16 else "FP16"
    if machine in ("x86_64", "amd64"):
        if dtype == torch.bfloat16:
            ok = bool({"avx512_bf16", "amx_bf16"} & f) or {"avx512bw", "avx512vl", "avx512dq"} <= f
            need = "AVX-512 (BW/VL/DQ) or AVX512_BF16"
        else:
            ok = bool({"avx512_fp16", "amx_fp16"} & f)
            need = "AVX512_FP16 or AMX-FP16"
    elif machine in ("aarch64", "arm64"):
        ok = ("bf16" if dtype == torch.bfloat16 else "asimdhp") in f
        need = "the ARM BF16 extension" if dtype == torch.bfloat16 else "ARM FP16 arithmetic"
    else:
        ok, need = False, "a CPU PyTorch has fast kernels for"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch: the flags alone decide
        cap = "unknown"
    if ok:
        return True, f"{name} matrix products are native on this CPU (torch capability {cap})"
    return False, (f"this CPU lacks {need} (torch capability {cap}): PyTorch's {name} matrix products "
                   "run 20-200x slower than FP32 here")


def cpu_precision(mode: str, what: str = "this run") -> str:
    """`mode` ('fp32', 'bf16', 'fp16', ...) for CPU work, or 'fp32' (with one warning per mode and
    `what`) where the CPU has no fast BF16 / FP16 matrix products."""
    if mode not in ("bf16", "fp16") or os.environ.get("GLM130B_CPU_HALF", "").lower() == "allow":
        return mode
    ok, reason = native_half(torch.bfloat16 if mode == "bf16" else torch.float16)
    if ok:
        return mode
    if (mode, what) not in _warned:
        _warned.add((mode, what))
        warnings.warn(f"glm130b: {what} runs in fp32 instead of {mode}: {reason} "
                      f"(GLM130B_CPU_HALF=allow keeps {mode})", RuntimeWarning, stacklevel=2)
    return "fp32"
