"""Loss-spike guard, the lesson of GLM-130B's training: skip bad steps, roll back if they repeat.

A step is a spike when its loss or gradient norm is not finite, or its loss is more than
`factor` times the median of the last `window` accepted losses. A spike's update is skipped.
`max_consecutive` spikes in a row ask the trainer to roll back to the last checkpoint; the data
stream is not rewound, so the batches that caused the spikes are skipped.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class SpikeGuard:
    def __init__(self, factor: float = 1.5, window: int = 50, warmup: int = 20, max_consecutive: int = 3):
        self.factor = factor
        self.window = deque(maxlen=window)
        self.warmup = warmup
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def check(self, loss: float, grad_norm: float) -> str:
        """Returns "ok", "skip" or "rollback" for this step."""
        reason = self.reason(loss, grad_norm)
        if reason is None:
            self.consecutive = 0
            self.window.append(loss)
            return "ok"
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            self.consecutive = 0
            return "rollback"
        return "skip"

    def reason(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return "non-finite loss"
        if not math.isfinite(grad_norm):
            return "non-finite gradient norm"
        if len(self.window) >= self.warmup:
            median = statistics.median(self.window)
            if loss > self.factor * median:
                return f"loss {loss:.3f} > {self.factor} x running median {median:.3f}"
        return None

    def state_dict(self) -> dict:
        return {"window": list(self.window), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state.get("window", []))
        self.consecutive = int(state.get("consecutive", 0))
