"""Load test of `glm130b serve`: aggregate tokens/s and p50/p95 latency at 1, 8 and 32 clients.

Starts the server as a subprocess on 127.0.0.1 (the shipped model unless --model), then for each
concurrency level runs that many clients, each sending non-streaming /v1/completions requests
back to back, and prints one row per level plus the throughput ratio of each level to one client,
all measured in this run. Continuous batching is what makes 8 clients faster than 1.

    python benchmarks/serve_load.py                     # shipped model, levels 1 8 32
    python benchmarks/serve_load.py --model runs/tiny --levels 1 8 --requests 16 --bits 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying", "Blessed are the poor in spirit",
           "起初，神创造天地。", "子曰：学而时习之", "The word of the LORD came unto", "天地玄黄，宇宙洪荒",
           "a small animal that"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "glm130b.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-queue", "256", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.bits:
        cmd += ["--bits", str(args.bits)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


async def level(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent loops share `requests` requests; returns throughput and latencies."""
    latencies, tokens, queue = [], 0, list(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            r = await http.post(f"{base}/v1/completions", json={
                "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "min_tokens": max_tokens,
                "temperature": 0})  # every request does the same work
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": requests, "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--bits", type=int, choices=[4, 8])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 8 per client, >= 64; short runs are noisy)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    port = free_port()
    server = start_server(args, port)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(level(base, 2, 4, 4))  # warm-up: kernels built, caches touched
        for n in args.levels:
            rows.append(asyncio.run(level(base, n, args.requests or max(64, 8 * n), args.max_tokens)))
    finally:
        server.terminate()
        server.wait(timeout=30)
    one = next((r for r in rows if r["clients"] == 1), rows[0])
    print(f"serve_load: {args.model or 'shipped model'}{f' int{args.bits}' if args.bits else ''}, "
          f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs")
    print(f"{'clients':>8} {'requests':>9} {'tokens':>7} {'tok/s':>8} {'x 1 client':>10} {'p50 s':>7} {'p95 s':>7}")
    for r in rows:
        r["speedup_vs_1"] = round(r["tokens_per_s"] / one["tokens_per_s"], 2)
        print(f"{r['clients']:>8} {r['requests']:>9} {r['tokens']:>7} {r['tokens_per_s']:>8} "
              f"{r['speedup_vs_1']:>10} {r['p50_s']:>7} {r['p95_s']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
