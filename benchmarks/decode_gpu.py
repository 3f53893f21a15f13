"""GPU decoding (`python benchmarks/decode.py --device cuda`): a ChatGLM-6B-shaped GLM with random
weights in BF16, INT8 and INT4, each eager and compiled (infer/compiled.py: static KV cache, one
CUDA graph per step), against the HBM roofline measured in the same run and Hugging Face
transformers on a model of the same shape.

For each variant: weight bytes read per decoded token, prefill tokens/s of one `--prompt`-token
prompt, decode tokens/s at batch 1 and batch `--batch` (rows of different lengths, greedy), and
the fraction of the roofline: tokens/s x bytes per token / bandwidth. The bandwidth is the best
of a device-to-device copy (read + write) and a sum (read) over a 4 GiB buffer, measured here.

The peer is transformers' GPTNeoXForCausalLM with ChatGLM-6B's shape (hidden 4096, 28 layers,
32 heads, GELU FFN of 16384, vocabulary 130528: the same matrices, so the same bytes per
token), BF16, eager `generate` with its KV cache; decode tokens/s = n / (time of n + 1 new
tokens - time of 1). ChatGLM-6B itself needs remote code, which nothing here downloads.

Timings: CUDA synchronised wall clock, best of `--rounds`, variants round-robin. `--json` prints
one JSON object. On a CPU (`--device cpu --quick`) the same code runs as a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time

import torch
from decode import bytes_per_token, cpu_name, make_rows  # benchmarks/decode.py: this script's CPU half

from glm130b.config import GLMConfig
from glm130b.infer.engine import Batch, Engine
from glm130b.model.glm import build_model
from glm130b.quant import quantize_model
from glm130b.quant.weights import compact_cuda_int4

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def cudagraph_skips() -> int:
    """CUDA graphs inductor declined so far in this process (each is only a logged warning)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def memory_bandwidth(device: torch.device, gib: float, repeats: int = 5) -> dict:
    """Bytes/s of a copy (counted read + write) and of a sum (read) over a buffer far larger than
    any cache; the best is the roofline's bandwidth."""
    n = int(gib * 2**30) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    out = {}
    for name, fn, moved in (("copy", lambda: dst.copy_(src), 2 * n * 2), ("sum", lambda: src.sum(dtype=torch.float32), n * 2)):
        fn()
        out[name] = moved / min(timed(fn, device) for _ in range(repeats))
    out["best"] = max(out.values())
    return out


def decode_seconds(engine: Engine, batch: int, prompt: int, steps: int, vocab: int, warmup: int) -> float:
    """Seconds for `steps` greedy steps of `batch` rows, after `warmup` untimed steps (a compiled
    step compiles and records its graph in those)."""
    b = Batch(engine, make_rows(batch, prompt, vocab), steps + warmup + 2)
    tokens = torch.full((batch,), 3, dtype=torch.long, device=engine.device)
    for _ in range(warmup):
        tokens = b.feed(tokens).argmax(dim=-1)

    def run():
        nonlocal tokens
        for _ in range(steps):
            tokens = b.feed(tokens).argmax(dim=-1)

    return timed(run, engine.device)


def prefill_seconds(engine: Engine, prompt: int, vocab: int) -> float:
    return timed(lambda: Batch(engine, make_rows(1, prompt, vocab), 2), engine.device)


def build_variants(base, names: list[str], dtype: torch.dtype, group_size: int | None) -> tuple[dict, dict]:
    """name -> (model, engine): `bf16`/`fp16`/`fp32`, `int8`, `int4`, each with `_compiled`; and
    name -> INT4 layers in tinygemm's layout (0 means the slow dequantizing path: say so)."""
    out, tinygemm = {}, {}
    for name in names:
        kind = name.removesuffix("_compiled")
        if kind in DTYPES:
            m = base if DTYPES[kind] == dtype else copy.deepcopy(base).to(DTYPES[kind])
        elif kind in ("int8", "int4"):
            m = quantize_model(copy.deepcopy(base), 8 if kind == "int8" else 4, group_size)
            compacted = compact_cuda_int4(m)  # as the CLI loads it: on a GPU, INT4 held once, tinygemm's layout
            if kind == "int4" and next(base.parameters()).is_cuda:
                tinygemm[name] = compacted
        else:
            raise SystemExit(f"unknown variant {name!r}: use bf16, fp16, fp32, int8, int4 (with _compiled)")
        out[name] = (m, Engine(m, fused_decode=False, compile_decode=name.endswith("_compiled") or False))
    return out, tinygemm


# --------------------------------------------------------------------------------------------
def hf_peer(cfg: GLMConfig, device, dtype, prompt: int, steps: int, batch: int, rounds: int) -> dict | None:
    """transformers' GPT-NeoX of the benchmark's shape, eager `generate` (greedy, its KV cache);
    None without transformers, {"error": ...} when it fails (the run goes on without it)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    try:
        return _hf_peer(cfg, device, dtype, prompt, steps, batch, rounds)
    except Exception as e:  # noqa: BLE001 - an API drift or out of memory in the peer must not lose our figures
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _hf_peer(cfg: GLMConfig, device, dtype, prompt: int, steps: int, batch: int, rounds: int) -> dict:
    import transformers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hc = GPTNeoXConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_hidden_size,
                       max_position_embeddings=prompt + steps + 8, rotary_pct=0.5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=None, pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the benchmark's dtype: no FP32 copy first
    try:
        with torch.device(device):
            model = GPTNeoXForCausalLM(hc).eval()
    finally:
        torch.set_default_dtype(default)
    out = {"version": transformers.__version__, "model": "GPTNeoXForCausalLM", "parameters": model.num_parameters()}
    for rows in (1, batch):
        ids = torch.randint(8, cfg.vocab_size, (rows, prompt), generator=torch.Generator().manual_seed(0)).to(device)
        mask = torch.ones_like(ids)

        def gen(n: int, ids=ids, mask=mask) -> float:
            with torch.no_grad():
                return timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                                    do_sample=False), device)

        gen(2)
        full = min(gen(steps + 1) for _ in range(rounds))
        one = min(gen(1) for _ in range(rounds))
        out["tok_s" if rows == 1 else f"batch{batch}_tok_s"] = rows * steps / max(full - one, 1e-9)
        if rows == 1:
            out["prefill_tok_s"] = prompt / one
    return out


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    return cpu_name()


def summarize(args, cfg, device, bw, res, peer, compile_failures, tinygemm) -> dict:
    """The JSON of the figures so far (written after each variant with --out, so a run cut short
    by a time limit still leaves what it measured)."""
    out: dict = {"device": gpu_name(device), "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype,
                 "model": {"parameters": sum(p.numel() for p in build_model(cfg, "meta").parameters()),
                           "layers": cfg.num_layers, "hidden": cfg.hidden_size, "ffn": cfg.ffn_hidden_size,
                           "vocab": cfg.vocab_size},
                 "bandwidth_gbs": bw["best"] / 1e9,
                 "bandwidth_sources_gbs": {k: x / 1e9 for k, x in bw.items() if k != "best"},
                 "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "batch": args.batch, "variants": {},
                 "compile_failures": compile_failures}
    key = f"batch{args.batch}_tok_s"
    for n, r in res.items():
        if r["error"] or r["b1"] == float("inf"):
            out["variants"][n] = {"error": r["error"] or "not measured"}
            continue
        b1 = args.new_tokens / r["b1"]
        roof = bw["best"] / r["bytes_per_token"]
        out["variants"][n] = {"cudagraph_skips_so_far": r.get("cudagraph_skips"),
                              "weight_bytes_per_token": r["bytes_per_token"], "prefill_tok_s": args.prompt / r["prefill"],
                              "tok_s": b1, key: args.batch * args.new_tokens / r["bn"] if r["bn"] < float("inf") else None,
                              "roofline_tok_s": roof, "roofline_fraction": b1 / roof}
        if n in tinygemm:
            out["variants"][n]["int4_layers_in_tinygemm_layout"] = tinygemm[n]
    v = {n: r for n, r in out["variants"].items() if "error" not in r}

    def best(kind: str) -> dict | None:
        cands = [r for n, r in v.items() if n.removesuffix("_compiled") == kind]
        return max(cands, key=lambda r: r["tok_s"]) if cands else None

    ref = best(args.dtype)
    if ref:
        out[f"{args.dtype}_roofline_fraction"] = ref["roofline_fraction"]
        for q in ("int8", "int4"):
            if best(q):
                out[f"{q}_vs_{args.dtype}"] = best(q)["tok_s"] / ref["tok_s"]
    for n in v:
        if n.endswith("_compiled") and n.removesuffix("_compiled") in v:
            out[f"{n}_vs_eager"] = v[n]["tok_s"] / v[n.removesuffix("_compiled")]["tok_s"]
    if peer:
        out["peer"] = peer
        if ref and "error" not in peer:
            out[f"{args.dtype}_vs_transformers"] = ref["tok_s"] / peer["tok_s"]
            if ref[key]:
                out[f"{args.dtype}_batch{args.batch}_vs_transformers"] = ref[key] / peer[key]
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def write_json(path: str | None, out: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="chatglm-6b", help="the model's shape (random weights)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="activations and unquantized weights")
    p.add_argument("--variants", default="bf16,bf16_compiled,int4_compiled,int8_compiled",
                   help="comma-separated: bf16, fp16, fp32, int8, int4, each optionally _compiled; measured in this order")
    p.add_argument("--group-size", type=int, default=None, help="INT8/INT4 group size (default per row)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--bandwidth-gib", type=float, default=4.0)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny model (a smoke test, e.g. on the CPU)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write the JSON here, after every variant (a cut-short run keeps its figures)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (run with --device cpu --quick for a smoke test)")
    cfg = GLMConfig.from_preset(args.preset)
    if args.quick:
        cfg = GLMConfig(name="quick", vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4,
                        ffn_hidden_size=1024, ffn_type=cfg.ffn_type, rotary=cfg.rotary, max_seq_len=128)
        args.prompt, args.new_tokens, args.rounds, args.bandwidth_gib = 32, 8, 1, 0.25
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.prompt + args.new_tokens + args.warmup + 4))
    dtype = DTYPES[args.dtype]
    t_start = time.perf_counter()
    torch.manual_seed(0)
    failures = {}
    # the peer first: it is the figure a run cut short by its time limit would lose otherwise
    peer = None if args.no_peers else hf_peer(cfg, device, dtype, args.prompt, args.new_tokens, args.batch,
                                               args.rounds)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with torch.no_grad():
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the benchmark's dtype: no FP32 copy first
        try:
            base = build_model(cfg, device=device).eval()
        finally:
            torch.set_default_dtype(default)
        names = [v for v in args.variants.split(",") if v]
        variants, tinygemm = build_variants(base, names, dtype, args.group_size)
        bw = memory_bandwidth(device, args.bandwidth_gib)
        res = {n: {"bytes_per_token": bytes_per_token(m), "prefill": float("inf"), "b1": float("inf"),
                   "bn": float("inf"), "error": None} for n, (m, _) in variants.items()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the peak of decoding, not of building
        for n, (_m, engine) in variants.items():  # first use loads kernels (cuBLAS, tinygemm): untimed
            try:
                prefill_seconds(engine, args.prompt, cfg.vocab_size)
            except Exception as e:  # noqa: BLE001 - recorded; the variant is skipped
                res[n]["error"] = f"{type(e).__name__}: {e}"[:300]
        # batch 1 (and prefill) of every variant first, then batch N: each compiled variant compiles
        # a graph per batch size, so a run cut short by its time limit loses batch-N figures first
        phases = [("prefill", lambda e: prefill_seconds(e, args.prompt, cfg.vocab_size)),
                  ("b1", lambda e: decode_seconds(e, 1, args.prompt, args.new_tokens, cfg.vocab_size, args.warmup)),
                  ("bn", lambda e: decode_seconds(e, args.batch, args.prompt, args.new_tokens, cfg.vocab_size,
                                                  args.warmup))]
        for _ in range(args.rounds):
            for group in (phases[:2], phases[2:]):
                for n, (_m, engine) in variants.items():
                    r = res[n]
                    if r["error"]:
                        continue
                    try:
                        for what, measure in group:
                            r[what] = min(r[what], measure(engine))
                    except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                        r["error"] = f"{type(e).__name__}: {e}"[:300]
                    if engine._decoder is not None and engine._decoder.failed:
                        failures[n] = engine._decoder.failed
                    if n.endswith("_compiled"):  # a skipped CUDA graph only logs: make it part of the figures
                        r["cudagraph_skips"] = cudagraph_skips()
                    write_json(args.out, summarize(args, cfg, device, bw, res, peer, failures, tinygemm))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        del variants, base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = summarize(args, cfg, device, bw, res, peer, failures, tinygemm)
    out["seconds"] = time.perf_counter() - t_start
    write_json(args.out, out)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['device']}, torch {out['torch']}; {args.preset}-shaped GLM, {out['model']['parameters'] / 1e9:.2f}B "
          f"parameters, random weights, {args.dtype} activations")
    src = ", ".join(f"{k} {x:.0f}" for k, x in out["bandwidth_sources_gbs"].items())
    print(f"memory bandwidth {out['bandwidth_gbs']:.0f} GB/s (best of {src}); prompt {args.prompt}, "
          f"{args.new_tokens} new tokens")
    print(f"{'variant':<16}{'GB/token':>9}{'prefill tok/s':>14}{'b1 tok/s':>10}{'roofline':>9}{f'b{args.batch} tok/s':>11}")
    for n, r in out["variants"].items():
        if "error" in r:
            print(f"{n:<16} failed: {r['error']}")
            continue
        bn = r[f"batch{args.batch}_tok_s"]
        print(f"{n:<16}{r['weight_bytes_per_token'] / 1e9:>9.2f}{r['prefill_tok_s']:>14.0f}{r['tok_s']:>10.1f}"
              f"{r['roofline_fraction']:>9.0%}{'-' if bn is None else f'{bn:.1f}':>11}"
              + ("" if r.get("int4_layers_in_tinygemm_layout", 1) else "  (INT4 NOT in tinygemm's layout: slow path)"))
    if peer and "error" in peer:
        print(f"peer transformers failed: {peer['error']}")
    elif peer:
        print(f"peer transformers {peer['version']} {peer['model']} (same shape, eager generate): "
              f"{peer['tok_s']:.1f} tok/s b1, {peer[f'batch{args.batch}_tok_s']:.1f} b{args.batch}, "
              f"prefill {peer['prefill_tok_s']:.0f}")
    for k, x in out.items():
        if isinstance(x, float) and ("_vs_" in k or k.endswith("roofline_fraction")):
            print(f"{k}: {x:.2f}")
    for n, why in failures.items():
        print(f"{n}: compiling failed, ran eagerly ({why})")
    print(f"{out['seconds']:.0f} s")

if __name__ == "__main__":
    main()
