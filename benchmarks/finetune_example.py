"""The fine-tuning worked example, measured: LoRA, P-Tuning v2, LoRA on INT4 and full fine-tuning
of the shipped model on `verse_book` (tools/make_finetune_example.py), each scored with
`glm130b eval verse_book --adapter` against the base model, in one run.

    python benchmarks/finetune_example.py [--steps 150] [--methods lora,ptuning,lora-int4,full] [--json]

Each method trains in its own process, so its peak resident memory (Linux VmHWM) is its own.
Prints: dev accuracy (and its standard error) before and after, the gain in standard errors,
training time and peak memory. Timings depend on the machine and its load; the script names the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "finetune" / "verse_book_train.jsonl.gz"
METHODS = {
    "lora": ["--method", "lora", "--lr", "2e-3"],
    "ptuning": ["--method", "ptuning", "--lr", "1e-1", "--pre-seq-len", "16"],
    "lora-int4": ["--method", "lora", "--lr", "2e-3", "--bits", "4"],
    "full": ["--method", "full", "--lr", "1e-4"],
}


def cli(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "glm130b.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"glm130b {' '.join(map(str, args[:2]))} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def evaluate(work: Path, name: str, *extra) -> dict:
    out = work / f"eval_{name}.json"
    cli("eval", "verse_book", "--no-progress", "--device", "cpu", "--output", out, *extra)
    metrics = json.loads(out.read_text())["tasks"]["verse_book"]["metrics"]
    return {"acc": metrics["acc"], "stderr": metrics["acc_stderr"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="glm130b-finetune-"))
    rows = {"base": {**evaluate(work, "base"), "seconds": 0.0, "peak_rss_mib": None, "trainable": 0}}
    for name in args.methods.split(","):
        out = work / name
        t0 = time.perf_counter()
        summary = json.loads(cli("finetune", "--data", DATA, "--out", out, "--steps", args.steps, "--batch-size",
                                 args.batch_size, "--seq-len", 128, *METHODS[name]))
        seconds = time.perf_counter() - t0
        extra = ["--model", out] if name == "full" else ["--adapter", out]
        rows[name] = {**evaluate(work, name, *extra), "seconds": round(seconds, 1),
                      "train_seconds": round(summary["seconds"], 1), "peak_rss_mib": summary["peak_rss_mib"],
                      "trainable": summary.get("trainable_parameters", summary["parameters"]),
                      "final_loss": round(summary["final_loss"], 3)}
    base = rows["base"]
    for row in rows.values():
        row["gain_in_stderr"] = round((row["acc"] - base["acc"]) / max(row["stderr"], base["stderr"]), 1)
    if args.json:
        print(json.dumps({"cpu": cpu_name(), "steps": args.steps, "rows": rows}, indent=2))
        return
    print(f"verse_book dev accuracy, {args.steps} steps x batch {args.batch_size}, {cpu_name()}")
    print("| method | acc | stderr | gain (SE) | trainable params | train s | total s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['acc']:.4f} | {r['stderr']:.4f} | {r['gain_in_stderr']} | {r['trainable']:,} | "
              f"{r.get('train_seconds', 0)} | {r['seconds']} | {r['peak_rss_mib'] or '-'} |")


if __name__ == "__main__":
    main()
