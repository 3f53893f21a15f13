"""One INT8 / INT4 matrix product on our CPU kernels, kernel against kernel, side by side.

For each build (this CPU's own, and with `--isa avx2` the AVX2-only variant it can also run),
format, shape and number of rows of x, the best of `--repeat` timings of
* `row`:  the 8-bit-activation kernel one weight row at a time (GLM130B_Q8_TILE_MIN_ROWS large),
* `tile`: the same kernel on interleaved 8-row weight tiles (gemv.h, `q8_tile`),
* `blas`: the long-prefill path (dequantize the rows to FP32, then PyTorch's BLAS),
and the ratios row / tile and blas / tile (above 1: the tile kernel takes less time).
`--json` prints one JSON object instead of the table.

    python benchmarks/kernels.py --threads 1 --isa default,avx2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import best_time  # noqa: E402 - the benchmarks' one timer (best of n after a warm-up)

from glm130b.quant.kernels import FMT  # noqa: E402
from glm130b.quant.kernels import cpu as cpu_build  # noqa: E402

SHAPES = [(2752, 1024), (1024, 2752)]  # (out, in): the benchmark model's FFN matrices


def measure(ext, bits: int, n: int, k: int, rows: int, threads: int, repeat: int) -> dict:
    torch.manual_seed(0)
    if bits == 8:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    else:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scales = torch.rand(n, 1) * 0.01
    x = torch.randn(rows, k)
    fmt = FMT[f"int{bits}"]

    def product():
        return ext.linear(x, w, scales, 0, None, fmt, threads)

    def blas():
        return x @ ext.dequantize(w, scales, 0, fmt, k, 0, n, threads).t()

    before = ext.int8_tile_min_rows()
    try:
        ext.set_int8_tile_min_rows(2**62)
        row = best_time(product, repeat)
        ext.set_int8_tile_min_rows(1)
        tile = best_time(product, repeat)
    finally:
        ext.set_int8_tile_min_rows(before)
    dense = best_time(blas, repeat)
    return {"bits": bits, "shape": [n, k], "rows": rows, "row_ms": row * 1e3, "tile_ms": tile * 1e3,
            "blas_ms": dense * 1e3, "row_over_tile": row / tile, "blas_over_tile": dense / tile,
            "tile_gmac_s": rows * n * k / tile / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", default="default", help="comma-separated: default (this CPU's build), avx2, avxvnni")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,8,16,32,128,256")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "builds": {}}
    for isa in args.isa.split(","):
        ext = cpu_build.get() if isa == "default" else cpu_build.variant(isa)
        if ext is None or not getattr(ext, "q8_tile", False):
            print(f"{isa}: no 8-bit-activation tile kernel in this build ({cpu_build.error() or 'not built'})",
                  file=sys.stderr)
            continue
        label = f"{isa} ({ext.isa}, {ext.q8_dot})"
        results = [measure(ext, int(b), n, k, int(m), args.threads, args.repeat)
                   for b in args.bits.split(",") for n, k in SHAPES for m in args.rows.split(",")]
        report["builds"][label] = results
        if not args.json:
            print(f"\n{label}, {args.threads} thread(s), best of {args.repeat}")
            print(f"{'weights':>7} {'shape':>11} {'rows':>5} {'row ms':>8} {'tile ms':>8} {'blas ms':>8} "
                  f"{'row/tile':>9} {'blas/tile':>9} {'tile GMAC/s':>11}")
            for r in results:
                print(f"{'int' + str(r['bits']):>7} {'x'.join(map(str, r['shape'])):>11} {r['rows']:>5} "
                      f"{r['row_ms']:8.2f} {r['tile_ms']:8.2f} {r['blas_ms']:8.2f} {r['row_over_tile']:9.2f} "
                      f"{r['blas_over_tile']:9.2f} {r['tile_gmac_s']:11.1f}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if report["builds"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
