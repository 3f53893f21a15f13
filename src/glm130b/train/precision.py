"""Mixed precision: fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling.

The parameters stay FP32 in every mode (they are the master weights) and AdamW keeps FP32
states; autocast runs the matmuls in half precision. For fp16, PyTorch's own GradScaler scales
the loss, skips a step whose gradients overflowed, halves the scale, and doubles it again after
`growth_interval` clean steps.

On a CPU without fast BF16 / FP16 matrix products (glm130b.cpu_precision: e.g. AVX2-only
CPUs, where a BF16 product runs ~200x slower than FP32) bf16 / fp16 warn once and run as fp32;
`requested` keeps what was asked for.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


class Precision:
    def __init__(self, mode: str, device_type: str = "cpu", init_scale: float = 2.0**16, growth_interval: int = 1000):
        if mode not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
        self.requested = mode
        if device_type == "cpu":
            from glm130b.cpu_precision import cpu_precision

            mode = cpu_precision(mode, "training")
        self.mode = mode
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(
            device_type, init_scale=init_scale, growth_interval=growth_interval, enabled=mode == "fp16"
        )

    def autocast(self):
        if self.mode == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer) -> None:
        """Bring gradients back to their true scale (before clipping and the spike check)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """Apply the update unless fp16 gradients overflowed; returns whether it was applied."""
        before = self.scale
        self.scaler.step(optimizer)
        self.scaler.update()
        return not (self.scaler.is_enabled() and self.scale < before)

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
