"""Peak memory of fine-tuning one model four ways, side by side: full fine-tuning, LoRA on FP32
weights, LoRA on frozen INT8 weights and LoRA on frozen INT4 weights (QLoRA-style), plus P-Tuning v2.

    python benchmarks/finetune_memory.py [--hidden 1024 --layers 16] [--steps 2] [--json]

A random-weight model with GLM-130B's architecture is written to a temporary folder (about 220M
parameters by default, where the weights, not the runtime, dominate memory); each method then
trains a few steps on short examples in its own process, which reports its peak resident memory
(Linux VmHWM). The weights alone are printed beside it: 16 bytes a parameter for full fine-tuning
with AdamW (weights, gradients, two moments), 4 for frozen FP32, about 0.56 for INT4 with its scales.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "full": ["--method", "full"],
    "lora-fp32": ["--method", "lora"],
    "lora-int8": ["--method", "lora", "--bits", "8"],
    "lora-int4": ["--method", "lora", "--bits", "4"],
    "ptuning-fp32": ["--method", "ptuning"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from glm130b.checkpoint import save_model
    from glm130b.config import GLMConfig
    from glm130b.model.glm import build_model
    from glm130b.tokenizer import default_tokenizer

    work = Path(tempfile.mkdtemp(prefix="glm130b-ftmem-"))
    torch.manual_seed(0)
    cfg = GLMConfig.from_preset("tiny", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=args.hidden // 64, ffn_hidden_size=int(args.hidden * 8 / 3))
    model = build_model(cfg)
    n = model.num_parameters()
    save_model(work / "base", model, default_tokenizer())
    del model
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "response": str(2 * i)})
                            + "\n" for i in range(64)))
    rows = {}
    for name in args.methods.split(","):
        done = subprocess.run([sys.executable, "-m", "glm130b.cli", "finetune", "--model", work / "base", "--data",
                               data, "--out", work / name, "--steps", str(args.steps), "--batch-size", "4",
                               "--seq-len", "64", *METHODS[name]], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        summary = json.loads(done.stdout)
        rows[name] = {"peak_rss_mib": summary["peak_rss_mib"],
                      "trainable": summary.get("trainable_parameters", summary["parameters"]),
                      "seconds": round(summary["seconds"], 1)}
    full = rows.get("full", {}).get("peak_rss_mib")
    if args.json:
        print(json.dumps({"parameters": n, "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
                          "rows": rows}, indent=2))
        return
    print(f"model: {n:,} parameters (hidden {args.hidden}, {args.layers} layers), {args.steps} steps of 4 x <=64 tokens")
    print("| method | peak RSS MiB | vs full | trainable params | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        ratio = f"{r['peak_rss_mib'] / full:.2f}x" if full else "-"
        print(f"| {name} | {r['peak_rss_mib']:,.0f} | {ratio} | {r['trainable']:,} | {r['seconds']} |")


if __name__ == "__main__":
    main()
