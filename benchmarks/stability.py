"""The paper's stability claim, reproduced small: Pre-LN vs Post-LN vs DeepNorm vs DeepNorm +
Embedding Gradient Shrink, same data, same seed, an aggressive learning rate.

The spike guard is switched off (we want to see the raw behaviour); gradient clipping stays at
1.0 for every run, as GLM-130B trained. Writes one PNG of loss and gradient-norm curves and
prints a table of which runs diverged or spiked; `--json` prints the table as JSON.

    python benchmarks/stability.py --steps 300 --lr 1e-2 --out runs/stability
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from glm130b.tokenizer import default_tokenizer
from glm130b.train.metrics import read_jsonl
from glm130b.train.trainer import TrainConfig, train

VARIANTS = {
    "Pre-LN": {"norm": "preln", "emb_grad_shrink": 1.0},
    "Post-LN": {"norm": "postln", "emb_grad_shrink": 1.0},
    "DeepNorm": {"norm": "deepnorm", "emb_grad_shrink": 1.0},
    "DeepNorm + EGS": {"norm": "deepnorm", "emb_grad_shrink": 0.1},
}


def spikes(losses: list[float], window: int = 20, factor: float = 1.3) -> int:
    """Steps whose loss exceeds `factor` x the median of the previous `window` losses."""
    count = 0
    for i in range(window, len(losses)):
        median = statistics.median(losses[i - window : i])
        if not math.isfinite(losses[i]) or losses[i] > factor * median:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=None, help="folder for the runs and stability.png")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="stability-"))
    tokenizer = default_tokenizer()
    rows, curves = [], {}
    for name, overrides in VARIANTS.items():
        run_dir = out / name.replace(" ", "").replace("+", "_")
        cfg = TrainConfig(
            preset="tiny", out=str(run_dir), steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr,
            warmup_steps=max(1, args.steps // 15), seed=args.seed, spike_factor=1e9, max_consecutive_spikes=10**9,
            model_overrides={"num_layers": args.layers, "hidden_size": args.hidden, "num_heads": max(1, args.hidden // 32),
                             "ffn_hidden_size": int(args.hidden * 8 / 3), **overrides},
        )
        train(cfg, tokenizer, progress=False)
        records = read_jsonl(run_dir / "metrics.jsonl")
        losses = [r["loss"] for r in records]
        norms = [r["grad_norm"] for r in records]
        curves[name] = (losses, norms)
        tail = losses[-20:]
        final = sum(tail) / len(tail)
        rows.append({
            "variant": name, "final_loss": final, "min_loss": min(losses), "max_grad_norm": max(norms),
            "spikes": spikes(losses), "diverged": not math.isfinite(final) or final > losses[0] - 0.5,
        })
    png = plot(curves, out / "stability.png", args)
    if args.json:
        print(json.dumps({"settings": vars(args), "runs": rows, "png": str(png)}))
        return
    print(f"{args.layers} layers x {args.hidden}, lr {args.lr}, {args.steps} steps, batch {args.batch} x {args.seq}")
    print(f"{'variant':<16} {'final loss':>10} {'min loss':>9} {'max |g|':>9} {'spikes':>7} {'diverged':>9}")
    for r in rows:
        print(f"{r['variant']:<16} {r['final_loss']:>10.3f} {r['min_loss']:>9.3f} {r['max_grad_norm']:>9.2f} "
              f"{r['spikes']:>7d} {str(r['diverged']):>9}")
    print(f"curves: {png}")


def plot(curves: dict, path: Path, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, (losses, norms) in curves.items():
        ax1.plot(range(1, len(losses) + 1), losses, label=name, lw=1)
        ax2.plot(range(1, len(norms) + 1), norms, label=name, lw=1)
    ax1.set(title="training loss", xlabel="step")
    ax2.set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    ax1.legend()
    fig.suptitle(f"{args.layers} layers x {args.hidden}, lr {args.lr}: same data and seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
