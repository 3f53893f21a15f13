"""Batch-1 and batch-8 greedy decoding: FP32 / BF16 / INT8 / INT4 weights, against the roofline.

A GLM of about 118M parameters (8 layers, hidden 1024, GeGLU inner 2752, vocabulary 16384,
random weights: its FP32 weights, 470 MB, are far bigger than the CPU caches) decodes greedily
through the inference engine (glm130b.infer.engine) with

* `fp32_torch`: nn.Linear and PyTorch's own products everywhere (the baseline),
* `fp32`: FP32 weights through our GEMV kernel,
* `bf16`: BF16 weights (FP32 activations),
* `int8` / `int4`: GLM-130B's weight-only quantization of the four matrices of every layer,
  the unquantized rest (embeddings = the tied output head) in BF16, as GLM-130B keeps it in FP16,
* `int4_head8` / `int8_head8`: int4 / int8 with an INT8 output head (`quantize_model(...,
  head_bits=8)`; llama.cpp's Q4_0 and Q8_0 files likewise carry a 6.5-bit Q6_K output head).
A name ending in `_unfused` decodes through the modules one by one instead of the fused step.

For each: weight bytes read per decoded token (every matrix and the output head), prefill
tokens/s, decode tokens/s at batch 1 and batch 8, and the fraction of the memory-bandwidth
roofline (bytes per step / read bandwidth measured in the same run) achieved. Also a
4096 x 4096 matrix-vector micro-benchmark of each kernel against PyTorch's (the issue's case),
with the weights streamed from DRAM.

Peers in the same run, when installed (`pip install -e '.[peers]'`): Hugging Face transformers'
Llama of the same shape (random weights, FP32, `generate` with its KV cache) and llama.cpp
(llama-cpp-python) on a random-weight Llama GGUF of that shape written with the `gguf` package
and quantized by llama.cpp itself to Q8_0 and Q4_0.

`--device cuda` runs benchmarks/decode_gpu.py instead (a ChatGLM-6B shape in BF16 / INT8 / INT4,
eager and compiled, the HBM roofline, transformers as the peer; its own flags).

Timings are the best of `--rounds` rounds, run round-robin over the variants so that load from
other processes hits all of them alike; ratios are measured side by side. `--json` prints one
JSON object. The default run takes about 1-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from glm130b.config import GLMConfig
from glm130b.cpu_precision import native_half
from glm130b.device import peak_rss_mib
from glm130b.infer.engine import Batch, Engine, Row
from glm130b.model.glm import build_model
from glm130b.model.masks import Block
from glm130b.quant import QuantizedLinear, quantize_model, use_fast_linears
from glm130b.quant import kernels as K
from glm130b.quant.kernels import cpu as _cpu_build
from glm130b.quant.weights import DenseLinear, dequantize_weight, pack_int4, quantize_weight


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(mb: int = 512, repeats: int = 5) -> dict:
    """Bytes/s of reading a buffer far bigger than the caches: torch's sum on every core and on
    one thread, numpy's sum, and our FP32 matrix-vector kernel over it (a pure streaming read on
    every core, and the fastest reader on some machines); the best is the roofline's bandwidth
    (a strict one)."""
    buf = torch.ones(mb * 2**20 // 4)
    nbytes = buf.numel() * 4
    threads = torch.get_num_threads()
    out = {}
    try:
        for name, n in (("torch_sum_all_cores", os.cpu_count() or 1), ("torch_sum_1_thread", 1)):
            torch.set_num_threads(n)
            out[name] = nbytes / best_time(lambda: buf.sum(), repeats)
    finally:
        torch.set_num_threads(threads)
    arr = buf.numpy()
    out["numpy_sum"] = nbytes / best_time(lambda: arr.sum(), repeats)
    if K.cpu_kernels_available():
        matrix, x = buf.view(-1, 4096), torch.ones(1, 4096)
        out["gemv_fp32_all_cores"] = nbytes / best_time(lambda: K.dense_linear(x, matrix, None), repeats)
    out["best"] = max(out.values())
    return out


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every matrix, and the output head (the embedding row
    lookups are negligible)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.weight_bytes()
        elif isinstance(m, (DenseLinear, torch.nn.Linear)):
            total += m.weight.numel() * m.weight.element_size()
    if isinstance(model.lm_head, QuantizedLinear):
        return total  # counted above
    head = model.word_embeddings.weight if model.lm_head is None else model.lm_head.weight
    return total + head.numel() * head.element_size()


def quantized_vs_fp16(model) -> float:
    q = sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    fp16 = sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, QuantizedLinear))
    return q / fp16


# --------------------------------------------------------------------------------------------
def make_rows(batch: int, prompt: int, vocab: int = 16384) -> list[Row]:
    """Rows of different lengths (prompt down to prompt/2), each ending in [gMASK] (id 6)."""
    rows = []
    for i in range(batch):
        n = prompt - (i * prompt) // (2 * max(1, batch))  # different lengths: prompt .. prompt/2
        ids = [8 + (7 * j + i) % (vocab - 16) for j in range(n - 1)] + [6]  # ... [gMASK]
        rows.append(Row(ids, Block(n - 1, 0, continues=True)))
    return rows


def prefill_time(engine: Engine, prompt: int) -> float:
    def run():
        Batch(engine, make_rows(1, prompt), 2)

    return best_time(run, 1)


def decode_time(engine: Engine, batch: int, prompt: int, steps: int) -> float:
    """Seconds for `steps` greedy decode steps of `batch` rows (after the prefill)."""
    b = Batch(engine, make_rows(batch, prompt), steps + 2)
    tokens = torch.full((batch,), 3, dtype=torch.long)
    b.feed(tokens)  # <sop>; the first step also warms up
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = b.feed(tokens).argmax(dim=-1)
    return time.perf_counter() - t0


def gemv_microbench(repeats: int, stream_mb: int = 96) -> dict:
    """One 4096-vector times a 4096 x 4096 matrix, each kernel vs torch's FP32 F.linear.

    Each case cycles over enough distinct copies of its matrix to read at least `stream_mb` MB
    (3x this CPU's L3), so the weights come from DRAM as in decoding; the time is per matrix.
    """
    torch.manual_seed(0)
    n = k = 4096
    w = torch.randn(n, k)
    x = torch.randn(1, k)
    q8, s8 = quantize_weight(w, 8)
    q4, s4 = quantize_weight(w, 4)
    p4 = pack_int4(q4)
    # PyTorch's own INT4 CPU kernel (group size 128, values 0..15 = q + 8, zero 0)
    q4g, s4g = quantize_weight(w, 4, 128)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q4g.to(torch.int32) + 8).contiguous(), 2)
    sz = torch.stack((s4g.t().contiguous(), torch.zeros_like(s4g.t())), dim=-1).contiguous()
    err = (torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz) - x @ dequantize_weight(q4g, s4g, 128).t())
    assert err.abs().max().item() < 1e-2

    def copies(nbytes: int) -> int:
        return max(1, -(-stream_mb * 2**20 // nbytes))

    def quantized(qw, scales, bits):
        layer = QuantizedLinear(k, n, bits, None, bias=False)
        layer.qweight, layer.scales = qw.clone(), scales
        return layer

    def case(make, nbytes, call):
        items = [make() for _ in range(copies(nbytes))]

        def run():
            for item in items:
                call(item)

        return run, nbytes, len(items)

    cases = {
        "torch_fp32": case(lambda: w.clone(), n * k * 4, lambda m: torch.nn.functional.linear(x, m)),
        "torch_bf16": case(lambda: w.bfloat16(), n * k * 2, lambda m: torch.nn.functional.linear(x.bfloat16(), m)),
        "torch_int4pack": case(lambda: packed.clone(), n * k // 2,
                               lambda m: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m, 128, sz)),
        "ours_fp32": case(lambda: w.clone(), n * k * 4, lambda m: K.dense_linear(x, m, None)),
        "ours_bf16": case(lambda: w.bfloat16(), n * k * 2, lambda m: K.dense_linear(x, m, None)),
        "ours_int8": case(lambda: quantized(q8, s8, 8), n * k + 4 * n, lambda m: m(x)),
        "ours_int4": case(lambda: quantized(p4, s4, 4), n * k // 2 + 4 * n, lambda m: m(x)),
    }
    bf16_ok, why = native_half(torch.bfloat16)
    if not bf16_ok:  # PyTorch's BF16 product would crawl here (glm130b.cpu_precision)
        del cases["torch_bf16"]
    out = {} if bf16_ok else {"torch_bf16": {"skipped": why}}
    for name, (fn, nbytes, count) in cases.items():
        t = best_time(fn, repeats) / count
        out[name] = {"ms": t * 1e3, "gb_s": nbytes / t / 1e9}
    base = out["torch_fp32"]["ms"]
    for v in out.values():
        if "ms" in v:
            v["speedup_vs_torch_fp32"] = base / v["ms"]
    return out


# --------------------------------------------------------------------------------------------
# Peers (optional extras): transformers' Llama and llama.cpp on a Llama of the same shape
# --------------------------------------------------------------------------------------------
def hf_peer(cfg: GLMConfig, prompt: int, steps: int, rounds: int) -> dict | None:
    """Hugging Face transformers' LlamaForCausalLM (random weights, FP32, `generate` with its KV
    cache): decode tokens/s = steps / (time of steps + 1 new tokens - time of 1)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    import transformers

    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_heads, max_position_embeddings=prompt + steps + 8,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(lc).eval()
    ids = torch.randint(8, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    gen(2)
    full = min(gen(steps + 1) for _ in range(rounds))
    one = min(gen(1) for _ in range(rounds))
    return {"version": transformers.__version__, "parameters": model.num_parameters(),
            "tok_s": steps / max(full - one, 1e-9), "prefill_tok_s": prompt / one}


def write_llama_gguf(path: str, cfg: GLMConfig, n_ctx: int) -> None:
    """A random-weight Llama of the benchmark's shape in GGUF (F32), with a placeholder vocabulary
    (SentencePiece-style, byte tokens included, which llama.cpp looks up when loading)."""
    import gguf

    rng = np.random.default_rng(0)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(h)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(f)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_heads)
    w.add_rope_dimension_count(h // cfg.num_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(v - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (v - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * v)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(v, h))
    for i in range(cfg.num_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", mat(h, h))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(f, h))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(f, h))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(h, f))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class quiet_stderr:
    """Silence a C library's stderr (llama.cpp's quantizer logs every tensor) for a block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def llamacpp_peer(cfg: GLMConfig, prompt: int, steps: int, rounds: int) -> dict | None:
    """llama.cpp (llama-cpp-python) on that Llama in F32, Q8_0 and Q4_0: decode tokens/s of
    single-token evals after a prefill of `prompt` tokens, with this run's thread count."""
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError:
        return None
    import tempfile

    out = {"version": llama_cpp.__version__}
    n_ctx = prompt + steps + 8
    threads = K.num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "f32.gguf")
        write_llama_gguf(f32, cfg, n_ctx)
        files = {"f32": f32}
        for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = threads
            files[name] = os.path.join(tmp, f"{name}.gguf")
            with quiet_stderr():
                status = llama_cpp.llama_model_quantize(f32.encode(), files[name].encode(), params)
            if status != 0:
                raise RuntimeError(f"llama.cpp could not quantize to {name}")
        ids = [259 + (7 * j) % (cfg.vocab_size - 259) for j in range(prompt)]
        for name, path in files.items():
            with quiet_stderr():
                llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=prompt, n_threads=threads,
                                      n_threads_batch=threads, verbose=False)
            best_decode, best_prefill = float("inf"), float("inf")
            for _ in range(rounds):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(ids)
                t1 = time.perf_counter()
                for j in range(steps):
                    llm.eval([259 + j])
                best_prefill = min(best_prefill, t1 - t0)
                best_decode = min(best_decode, time.perf_counter() - t1)
            out[name] = {"tok_s": steps / best_decode, "prefill_tok_s": prompt / best_prefill,
                         "file_mb": os.path.getsize(path) / 1e6}
            del llm
    return out


# --------------------------------------------------------------------------------------------
def build_variants(base, names: list[str], group_size: int | None) -> dict:
    """name -> (model, engine). A name ending in `_unfused` runs its decode steps through the
    modules one by one instead of the fused C++ step (infer/fused.py), for the comparison."""
    variants = {}
    for name in names:
        fused = not name.endswith("_unfused")
        kind = name.removesuffix("_unfused")
        kv = None
        if kind.endswith("_kv16"):  # an FP16 KV cache
            kind, kv = kind[: -len("_kv16")], torch.float16
        if kind == "fp32_torch":
            variants[name] = (base, Engine(base, fused_decode=False))
            continue
        m = copy.deepcopy(base)
        if kind == "fp32":
            use_fast_linears(m)
        elif kind == "bf16":
            use_fast_linears(m, torch.bfloat16)
        elif kind in ("int8", "int4", "int4_head8", "int8_head8"):
            quantize_model(m, 8 if kind.startswith("int8") else 4, group_size,
                           head_bits=8 if kind.endswith("_head8") else None)
            use_fast_linears(m, torch.bfloat16)  # the unquantized rest (embeddings, head) in BF16
        else:
            raise ValueError(name)
        variants[name] = (m, Engine(m, fused_decode=fused, kv_dtype=kv))
    return variants


def main() -> None:
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="cpu")
    known, rest = device.parse_known_args()
    if known.device != "cpu":  # the GPU benchmark: a ChatGLM-6B shape, compiled decoding, its own flags
        from decode_gpu import main as gpu_main

        return gpu_main(["--device", known.device, *rest])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (this benchmark) or cuda (benchmarks/decode_gpu.py)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2752)  # a multiple of 32: llama.cpp's block size
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill; batch rows vary down to half)")
    parser.add_argument("--new-tokens", type=int, default=48, help="decode steps timed per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=None, help="INT8/INT4 group size (default per row)")
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--variants", default="fp32_torch,fp32,bf16,int8,int8_head8,int4,int4_head8")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (a smoke test)")
    parser.add_argument("--no-peers", action="store_true", help="skip transformers and llama.cpp even if installed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 2, 256, 4, 682, 4096
        args.new_tokens, args.prompt, args.rounds = 8, 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    K.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    cfg = GLMConfig(name="bench", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, ffn_hidden_size=args.ffn, max_seq_len=args.prompt + args.new_tokens + 8)
    with torch.no_grad():
        base = build_model(cfg).eval()
        names = [v for v in args.variants.split(",") if v]
        variants = build_variants(base, names, args.group_size)
        bw = read_bandwidth()
        results = {n: {"bytes_per_token": bytes_per_token(m), "decode_b1": float("inf"), "decode_bn": float("inf"),
                       "prefill": float("inf")} for n, (m, _) in variants.items()}
        for _ in range(args.rounds):
            for n, (_m, engine) in variants.items():
                r = results[n]
                r["prefill"] = min(r["prefill"], prefill_time(engine, args.prompt))
                r["decode_b1"] = min(r["decode_b1"], decode_time(engine, 1, args.prompt, args.new_tokens))
                r["decode_bn"] = min(r["decode_bn"], decode_time(engine, args.batch, args.prompt, args.new_tokens))
        micro = gemv_microbench(repeats=5 if not args.quick else 2, stream_mb=96 if not args.quick else 8)
    peers = {}
    if not args.no_peers:
        peers = {"transformers": hf_peer(cfg, args.prompt, args.new_tokens, args.rounds),
                 "llama_cpp": llamacpp_peer(cfg, args.prompt, args.new_tokens, args.rounds)}

    out: dict = {
        "model": {"parameters": base.num_parameters(), "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "ffn": cfg.ffn_hidden_size, "vocab": cfg.vocab_size},
        "threads": {"torch": torch.get_num_threads(), "kernels": K.num_threads()},
        "kernel_backend": K.backend_info()["cpu"], "cpu": cpu_name(),
        "kernel_isa_flags": " ".join(_cpu_build.isa_flags()),
        "read_bw_gbs": bw["best"] / 1e9, "read_bw_sources_gbs": {k: v / 1e9 for k, v in bw.items() if k != "best"},
        "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "batch": args.batch,
        "variants": {},
    }
    for n, r in results.items():
        b1 = args.new_tokens / r["decode_b1"]
        bn = args.batch * args.new_tokens / r["decode_bn"]
        roof1 = bw["best"] / r["bytes_per_token"]
        out["variants"][n] = {
            "weight_bytes_per_token": r["bytes_per_token"], "prefill_tok_s": args.prompt / r["prefill"],
            "tok_s": b1, f"batch{args.batch}_tok_s": bn, "roofline_tok_s": roof1, "roofline_fraction": b1 / roof1,
            f"batch{args.batch}_roofline_fraction": bn / (args.batch * roof1),
        }
        out[f"{n}_tok_s"] = b1
        out[f"{n}_batch{args.batch}_tok_s"] = bn
        out[f"{n}_roofline_fraction"] = b1 / roof1
    v = out["variants"]
    if "fp32" in v and "int4" in v:
        out["int4_vs_fp32"] = v["int4"]["tok_s"] / v["fp32"]["tok_s"]
    if "fp32" in v and "fp32_torch" in v:
        out["fp32_vs_fp32_torch"] = v["fp32"]["tok_s"] / v["fp32_torch"]["tok_s"]
    if "int4" in v and "fp32_torch" in v:
        out["int4_vs_fp32_torch"] = v["int4"]["tok_s"] / v["fp32_torch"]["tok_s"]
    for bits in ("int8", "int4"):
        if bits in variants:
            out[f"{bits}_weight_bytes_vs_fp16"] = quantized_vs_fp16(variants[bits][0])
    out["peers"] = {k: p for k, p in peers.items() if p is not None}
    if peers.get("transformers"):
        out["hf_tok_s"] = peers["transformers"]["tok_s"]
        out["fp32_vs_hf"] = v["fp32"]["tok_s"] / out["hf_tok_s"] if "fp32" in v else None
    if peers.get("llama_cpp"):
        for q in ("f32", "q8_0", "q4_0"):
            out[f"llamacpp_{q}_tok_s"] = peers["llama_cpp"][q]["tok_s"]
        out["llamacpp_q4_tok_s"] = out["llamacpp_q4_0_tok_s"]
        if "int4" in v:
            out["int4_vs_llamacpp_q4_0"] = v["int4"]["tok_s"] / out["llamacpp_q4_0_tok_s"]
        if "int4_head8" in v:
            out["int4_head8_vs_llamacpp_q4_0"] = v["int4_head8"]["tok_s"] / out["llamacpp_q4_0_tok_s"]
        if "int8" in v:
            out["int8_vs_llamacpp_q8_0"] = v["int8"]["tok_s"] / out["llamacpp_q8_0_tok_s"]
        if "int8_head8" in v:
            out["int8_head8_vs_llamacpp_q8_0"] = v["int8_head8"]["tok_s"] / out["llamacpp_q8_0_tok_s"]
        if "fp32" in v:
            out["fp32_vs_llamacpp_f32"] = v["fp32"]["tok_s"] / out["llamacpp_f32_tok_s"]
        for ours, q in (("fp32", "f32"), ("int8", "q8_0"), ("int8_head8", "q8_0"), ("int4", "q4_0"),
                        ("int4_head8", "q4_0")):
            if ours in v:  # prefill of the same prompt, side by side
                out[f"llamacpp_{q}_prefill_tok_s"] = peers["llama_cpp"][q]["prefill_tok_s"]
                out[f"{ours}_prefill_vs_llamacpp_{q}"] = v[ours]["prefill_tok_s"] / peers["llama_cpp"][q]["prefill_tok_s"]
    out["gemv_4096"] = micro
    out["peak_rss_mb"] = peak_rss_mib()
    out["seconds"] = time.perf_counter() - t_start

    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"CPU: {out['cpu']}; kernels built with {out['kernel_isa_flags'] or 'no ISA flags'}")
    print(f"GLM {out['model']['parameters'] / 1e6:.0f}M parameters ({cfg.num_layers} layers, hidden {cfg.hidden_size}), "
          f"threads torch={out['threads']['torch']} kernels={out['threads']['kernels']}, {out['kernel_backend']}")
    sources = ", ".join(f"{k} {v:.1f}" for k, v in out["read_bw_sources_gbs"].items())
    print(f"read bandwidth {out['read_bw_gbs']:.1f} GB/s (best of {sources}); "
          f"prompt {args.prompt}, {args.new_tokens} new tokens")
    hdr = (f"{'weights':<11}{'MB/token':>9}{'prefill tok/s':>14}{'b1 tok/s':>10}{'b1 roofline':>12}"
           f"{f'b{args.batch} tok/s':>11}{f'b{args.batch} roofline':>12}")
    print(hdr)
    for n, r in v.items():
        print(f"{n:<11}{r['weight_bytes_per_token'] / 1e6:>9.1f}{r['prefill_tok_s']:>14.0f}{r['tok_s']:>10.1f}"
              f"{r['roofline_fraction']:>11.0%} {r[f'batch{args.batch}_tok_s']:>10.1f}"
              f"{r[f'batch{args.batch}_roofline_fraction']:>11.0%}")
    for key in ("int4_vs_fp32", "fp32_vs_fp32_torch", "int4_vs_fp32_torch", "int8_weight_bytes_vs_fp16",
                "int4_weight_bytes_vs_fp16"):
        if key in out:
            print(f"{key}: {out[key]:.2f}")
    if "transformers" in out["peers"]:
        p = out["peers"]["transformers"]
        ref = v.get("fp32") or v.get("fp32_torch")
        roof = f", {p['tok_s'] / ref['roofline_tok_s']:.0%} of the fp32 roofline" if ref else ""
        print(f"peer transformers {p['version']} Llama fp32 (same shape, generate): {p['tok_s']:.1f} tok/s b1{roof}")
    if "llama_cpp" in out["peers"]:
        p = out["peers"]["llama_cpp"]
        print(f"peer llama.cpp {p['version']} (same shape): " + ", ".join(
            f"{q} {p[q]['tok_s']:.1f} tok/s b1, prefill {p[q]['prefill_tok_s']:.0f}" for q in ("f32", "q8_0", "q4_0")))
    for key in ("fp32_vs_hf", "fp32_vs_llamacpp_f32", "int8_vs_llamacpp_q8_0", "int8_head8_vs_llamacpp_q8_0",
                "int4_vs_llamacpp_q4_0", "int4_head8_vs_llamacpp_q4_0", "fp32_prefill_vs_llamacpp_f32",
                "int8_prefill_vs_llamacpp_q8_0", "int8_head8_prefill_vs_llamacpp_q8_0",
                "int4_prefill_vs_llamacpp_q4_0", "int4_head8_prefill_vs_llamacpp_q4_0"):
        if out.get(key):
            print(f"{key}: {out[key]:.2f}")
    if not out["peers"]:
        print("peers: not installed (pip install -e '.[peers]' for transformers and llama.cpp)")
    print("4096x4096 matrix-vector product (batch 1, weights streamed from DRAM):")
    for n, r in micro.items():
        if "skipped" in r:
            print(f"  {n:<16} skipped: {r['skipped']}")
            continue
        print(f"  {n:<16}{r['ms']:>8.3f} ms {r['gb_s']:>7.1f} GB/s  {r['speedup_vs_torch_fp32']:>5.2f}x torch fp32")
    print(f"peak RSS {out['peak_rss_mb']:.0f} MB, {out['seconds']:.0f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
