"""SDPA vs the official step-by-step attention math, side by side in one run.

Prints forward time of both paths on the same GLM-masked inputs and their ratio, and the max
difference (which tests/test_model.py bounds). `--json` prints one object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glm130b.model.attention import attention_reference, attention_sdpa
from glm130b.model.masks import attention_allowed


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, args.seq, args.head_dim) for _ in range(3))
    allowed = attention_allowed(args.seq, torch.randint(1, args.seq, (args.batch,)))
    with torch.no_grad():
        t_ref = best_of(lambda: attention_reference(q, k, v, allowed, 3), args.repeats)
        t_sdpa = best_of(lambda: attention_sdpa(q, k, v, allowed, 3), args.repeats)
        diff = (attention_reference(q, k, v, allowed, 3) - attention_sdpa(q, k, v, allowed, 3)).abs().max().item()
    result = {"shape": [args.batch, args.heads, args.seq, args.head_dim], "reference_ms": t_ref * 1e3,
              "sdpa_ms": t_sdpa * 1e3, "sdpa_speedup": t_ref / t_sdpa, "max_abs_diff": diff}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"attention {result['shape']}: reference {t_ref * 1e3:.1f} ms, sdpa {t_sdpa * 1e3:.1f} ms, "
              f"speedup {t_ref / t_sdpa:.2f}x, max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
