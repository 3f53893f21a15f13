"""What a run shows: RUN/metrics.jsonl (one object per step), RUN/events.jsonl (skipped steps,
overflows, rollbacks, checkpoints), TensorBoard scalars when `tensorboard` is installed, and PNG
curves (`glm130b plot RUN`)."""

from __future__ import annotations

import json
from pathlib import Path

from glm130b.io import atomic_write_text

PLOTTED = (("loss", "loss"), ("grad_norm", "gradient norm"), ("lr", "learning rate"), ("loss_scale", "loss scale"))


def _step(line: str) -> float:
    """A record's step; infinity (dropped) for a blank or torn line."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.events_path = self.dir / "events.jsonl"
        # On resume, drop records of steps that are about to be redone, and a line torn by a
        # kill mid-write; rewritten atomically, so a kill now cannot lose the records kept.
        if resume_step and self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines() if _step(line) <= resume_step]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        elif not resume_step:
            for p in (self.metrics_path, self.events_path):
                p.unlink(missing_ok=True)
        self.metrics = open(self.metrics_path, "a", buffering=1)
        self.events = open(self.events_path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def step(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def event(self, step: int, kind: str, **detail) -> None:
        self.events.write(json.dumps({"step": step, "event": kind, **detail}) + "\n")

    def close(self) -> None:
        self.metrics.close()
        self.events.close()
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # blank, or torn by a kill mid-write
            continue
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/curves.png: loss, gradient norm, learning rate and loss scale per step,
    with skipped steps and rollbacks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glm130b.errors import GLMError
    from glm130b.io import atomic_write

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise GLMError(f"no metrics to plot in {run_dir} (expected {run_dir / 'metrics.jsonl'})")
    events = read_jsonl(run_dir / "events.jsonl")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in records]
    for ax, (key, title) in zip(axes.flat, PLOTTED, strict=True):
        values = [r.get(key) for r in records]
        ax.plot(steps, [v if v is not None else float("nan") for v in values], lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key in ("grad_norm", "loss_scale"):
            ax.set_yscale("log")
        for e in events:
            if e["event"] in ("spike", "rollback", "overflow"):
                ax.axvline(e["step"], color="red" if e["event"] == "rollback" else "orange", lw=0.5, alpha=0.6)
    fig.suptitle(f"{run_dir.name}: {len(records)} steps, {len(events)} events")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fmt = out.suffix[1:].lower() or "png"
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise GLMError(f"cannot write {out}: .{fmt} is not an image format matplotlib writes (use .png, .svg, .pdf)")
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt))  # missing folders are made
    finally:
        plt.close(fig)
    return out
