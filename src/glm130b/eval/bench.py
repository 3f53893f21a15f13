"""Scoring speed: LAMBADA (lm-evaluation-harness protocol) on a preset with random weights.

    python -m glm130b.eval.bench                      # full LAMBADA (5153 items), `small` preset
    python -m glm130b.eval.bench --limit 500 --batch-tokens 4096 --preset tiny

Random weights score at chance but cost the same as trained ones, so this measures the
harness (tokenising, batching, masks, the forward pass) on the shape that ships.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glm130b.config import GLMConfig
from glm130b.eval.tasks import load_items, load_task, run_task
from glm130b.model.glm import GLMModel
from glm130b.tokenizer import default_tokenizer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--task", default="lambada_openai")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-tokens", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_preset(args.preset)).eval()
    if args.dtype == "bf16":
        from glm130b.cpu_precision import cpu_precision

        if cpu_precision("bf16", "the evaluation benchmark") == "bf16":  # else FP32, warned
            model = model.to(torch.bfloat16)
    tokenizer = default_tokenizer()
    cfg = load_task(args.task)
    if args.batch_tokens:
        cfg.batch_tokens = args.batch_tokens
    if args.batch_size:
        cfg.batch_size = args.batch_size
    n = len(load_items(cfg, args.limit))
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_task(model, tokenizer, cfg, limit=args.limit)
    seconds = time.perf_counter() - t0  # includes reading and tokenising the data
    cpu = time.process_time() - c0  # CPU seconds of all threads: on a shared machine, wall / cpu shows our share
    out = {"task": cfg.name, "preset": args.preset, "items": n, "seconds": round(seconds, 1),
           "items_per_s": round(n / seconds, 1), "cpu_seconds": round(cpu, 1),
           "items_per_cpu_s": round(n / cpu, 2), "threads": torch.get_num_threads(), "dtype": args.dtype,
           "batch_tokens": cfg.batch_tokens, "batch_size": cfg.batch_size,
           "metrics": {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
