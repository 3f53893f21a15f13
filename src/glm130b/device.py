"""Which device and dtype a command runs on (`--device`, `--dtype` of every verb that runs a model).

`auto` is the first CUDA device when there is one, else the CPU. Activations default to FP32 on
the CPU (its fast kernels are FP32, and BF16 products crawl on CPUs without BF16 instructions)
and to BF16 on a GPU that has it (FP16 otherwise), as GLM-130B itself runs in FP16.
"""

from __future__ import annotations

import resource

import torch

from glm130b.errors import GLMError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(GLMError, ValueError):
    """A device that does not exist here, or a dtype it cannot run."""


def resolve_device(name: str | None = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible here (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise DeviceError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The activations' (and unquantized weights') dtype: `auto`, fp32, bf16 or fp16."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def add_device_flags(parser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (the first GPU if there is one; default auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="activations and unquantized weights (default auto: fp32 on CPU, bf16/fp16 on GPU)")


def proc_status_kib(field: str) -> int | None:
    """A KiB field of Linux's /proc/self/status (VmRSS, VmHWM, ...); None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far. Linux's VmHWM, which starts afresh at exec:
    ru_maxrss carries over the peak of the process that forked this one (a benchmark that built a
    large model and then started this run read the parent's peak)."""
    kib = proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024, 1)
