"""Make the shipped model folder from a finished training run (how models/glm-small was made).

    python tools/ship_model.py runs/glm-small models/glm-small

Writes the weights in FP16 safetensors (the card's size limit is 60 MB), the config and the
tokenizer (the config's context set to the training windows' length), `train_config.json` (the exact options of the run), `meta.json` (steps, tokens,
time, first and last loss) and `loss.png` (the run's curves). Scores are added by
`glm130b eval ... --output` and copied into models/README.md by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from glm130b.checkpoint import load_model, save_model
from glm130b.train.metrics import plot_run, read_jsonl


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the training run folder (glm130b train --out)")
    p.add_argument("out", help="the model folder to write")
    args = p.parse_args()
    run, out = Path(args.run), Path(args.out)
    model, tokenizer = load_model(run)
    train_cfg = json.loads((run / "train_config.json").read_text())
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    if not rows:
        raise SystemExit(f"{run}/metrics.jsonl has no training steps")
    tail = [r["loss"] for r in rows[-100:]]
    training = {
        "steps": rows[-1]["step"], "tokens": rows[-1].get("tokens"), "hours": round(rows[-1]["time_s"] / 3600, 2),
        "first_loss": rows[0]["loss"], "final_loss_mean_last_100": sum(tail) / len(tail),
        "parameters": model.num_parameters(), "weights_dtype": "float16",
    }
    # the context it was trained on (runs before the trainer recorded it keep the preset's)
    save_model(out, model, tokenizer, dtype=torch.float16, extra=training, context=train_cfg["seq_len"])
    shutil.copyfile(run / "train_config.json", out / "train_config.json")
    plot_run(run, out / "loss.png")
    size = (out / "model.safetensors").stat().st_size
    print(json.dumps({**training, "out": str(out), "weights_mb": round(size / 1e6, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
