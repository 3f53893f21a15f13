"""Training throughput and model FLOPs utilisation (MFU), measured side by side in one run.

Model FLOPs per token = 6 * parameters + 12 * layers * hidden * seq_len (attention scores and
values, forward + backward; PaLM's formula). Peak = the best matmul FLOP/s measured in this run
on this machine (fp32, and bf16 for the bf16 run). MFU = achieved model FLOP/s / peak.

    python benchmarks/train_throughput.py                 # small preset, CPU, fp32 and bf16
    python benchmarks/train_throughput.py --json          # one JSON object
    python benchmarks/train_throughput.py --device cuda --precision bf16 --layers 24 --hidden 2048 --heads 16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from glm130b.config import GLMConfig
from glm130b.model.glm import GLMModel, glm_loss
from glm130b.train.optimizer import parameter_groups


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure(cfg: GLMConfig, precision: str, device: str, batch: int, seq: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = GLMModel(cfg).to(device).train()
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    ids = torch.randint(8, cfg.vocab_size, (batch, seq), device=device)
    ctx = torch.randint(1, seq // 2, (batch,), device=device)
    mask = (torch.arange(seq, device=device) >= ctx[:, None]).float()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=precision != "fp32"):
            logits = model(ids, context_lengths=ctx)
        loss = glm_loss(logits, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync(device)
        if step >= 2:  # the first steps allocate and warm up
            times.append(time.perf_counter() - t0)
    params = model.num_parameters()
    flops_per_token = 6 * params + 12 * cfg.num_layers * cfg.hidden_size * seq
    tokens_per_s = batch * seq / (sum(times) / len(times))
    return {"precision": precision, "parameters": params, "tokens_per_s": tokens_per_s,
            "model_flops_per_s": tokens_per_s * flops_per_token}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    overrides = {}
    if args.layers:
        overrides["num_layers"] = args.layers
    if args.hidden:
        overrides.update(hidden_size=args.hidden, ffn_hidden_size=int(args.hidden * 8 / 3))
    if args.heads:
        overrides["num_heads"] = args.heads
    cfg = GLMConfig.from_preset(args.preset, max_seq_len=max(args.seq, 512), **overrides)
    n = 4096 if args.device == "cuda" else 1024
    peaks = {"fp32": matmul_peak(args.device, torch.float32, n)}
    runs, skipped = [], {}
    for precision in args.precision.split(","):
        if args.device == "cpu" and precision in ("bf16", "fp16") and os.environ.get("GLM130B_CPU_HALF") != "allow":
            from glm130b.cpu_precision import native_half

            ok, reason = native_half(torch.bfloat16 if precision == "bf16" else torch.float16)
            if not ok:  # it would crawl (minutes per step), not measure anything useful
                skipped[precision] = reason
                continue
        if precision != "fp32":
            peaks[precision] = matmul_peak(args.device, torch.bfloat16 if precision == "bf16" else torch.float16, n)
        run = measure(cfg, precision, args.device, args.batch, args.seq, args.steps)
        run["mfu"] = run["model_flops_per_s"] / peaks["fp32"]
        run["mfu_vs_own_precision_peak"] = run["model_flops_per_s"] / peaks[precision]
        runs.append(run)
    if not runs:
        print(json.dumps({"device": args.device, "runs": [], "skipped": skipped}) if args.json else
              "\n".join(f"{k}: skipped: {why}" for k, why in skipped.items()))
        return
    best = max(runs, key=lambda r: r["tokens_per_s"])
    result = {"device": args.device, "threads": torch.get_num_threads(), "preset": cfg.name,
              "batch": args.batch, "seq": args.seq, "peak_flops": peaks["fp32"], "peaks": peaks,
              "tokens_per_s": best["tokens_per_s"], "mfu": best["mfu"], "runs": runs, "skipped": skipped}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{cfg.name} ({runs[0]['parameters']:,} parameters) on {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.seq}")
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    for r in runs:
        print(f"  {r['precision']:>5}: {r['tokens_per_s']:8.0f} tokens/s  {r['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  "
              f"MFU {100 * r['mfu']:5.1f}% of the fp32 peak, {100 * r['mfu_vs_own_precision_peak']:5.1f}% of its own")
    for k, why in skipped.items():
        print(f"  {k:>5}: skipped: {why} (GLM130B_CPU_HALF=allow runs it anyway)")


if __name__ == "__main__":
    main()
