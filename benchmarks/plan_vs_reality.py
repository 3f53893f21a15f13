"""`glm130b plan` against reality: the planner's per-GPU bytes next to the measured peak.

For each configuration, in a fresh subprocess (so that one run's peak never mixes with the
next's), the planner (glm130b.plan) gives its per-GPU lines, and then the planned workload runs:

* inference: the model is built on the meta device in the planned layout (16-bit weights, or
  INT8 / INT4 matrices through quantize_model), materialised on the device with random values
  (no full-precision copy anywhere), and the real engine (infer/engine.py) prefills `seq - new`
  tokens for each of `batch` rows and then decodes `new` tokens greedily, so the KV cache holds
  the planned `seq` positions and the prefill is the planned one;
* training (`--training`): the single-process trainer's own pieces (SingleProcessTraining,
  Precision) run `--train-steps` optimizer steps on random tokens at the planned micro-batch and
  sequence, with the trainer's mixed precision (FP32 master weights, BF16 autocast, AdamW).
  The single-process trainer keeps every state on the one GPU and no activation checkpointing,
  so it is planned with `shard="none"` and `checkpointing=False`. The first step creates
  AdamW's moments; the second is the steady state the plan describes, hence two by default.

Measured peak: on CUDA `torch.cuda.max_memory_reserved()` plus what the process holds outside
the caching allocator (the CUDA context and kernel images: the device's used memory at the end,
from `torch.cuda.mem_get_info()`, minus the reserved bytes then), against the plan's total. On
the CPU, the growth of the peak resident set (VmHWM in /proc/self/status, reset after the
imports) over the resident set after the imports, against the plan's total less its GPU
`overhead` line. The CPU child first runs the same path on a one-layer model (so code loaded on
first use sits in the baseline, as the CUDA context is the GPU's overhead), and runs with glibc's
mmap threshold fixed at 64 KiB, so that a freed tensor leaves the resident set at once instead
of staying in the heap (which would make the peak depend on the order of allocations). Each run
also reports the real model's tensor bytes and the real KV cache's bytes (training: parameters
and AdamW states), to check those plan lines exactly.

A benchmark, not a test: it exits 0 even when a ratio is outside 10% (the table marks it), and
a configuration that fails (out of memory, a crash) is recorded with its error while the others
go on. `--json` prints one JSON object (`--out FILE` writes it beside the table). GPU:

    python benchmarks/plan_vs_reality.py --device cuda --training --out plan_vs_reality.json

CPU smoke run (a few seconds a configuration):

    python benchmarks/plan_vs_reality.py --device cpu --preset tiny --seq 128 --new 16 --bits 16,4 --batch 1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

GiB = 1024**3
MiB = 1024**2
TOLERANCE = 0.10


# --------------------------------------------------------------------------------------------
# The child: one configuration, measured in its own process
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    from glm130b.device import proc_status_kib

    kib = proc_status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return kib


def _reset_cpu_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: '5' to clear_refs), so that the imports' own peak
    does not count; False where the kernel refuses (the peak then includes them)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fill_random(model) -> None:
    """Random values for every tensor of a model materialised with to_empty: LayerNorm weights
    at 1, other floating tensors N(0, 0.02), quantized weights uniform integers, scales small
    (only the bytes matter here, but NaNs from uninitialised memory would slow some kernels)."""
    import torch

    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("scales"):
                t.uniform_(1e-3, 1e-2)
            elif t.dtype == torch.int8:
                t.random_(-127, 128)
            elif t.dtype == torch.uint8:
                t.random_(0, 256)
            elif "layernorm" in name and name.endswith("weight"):
                t.fill_(1.0)
            elif t.is_floating_point():
                t.normal_(0.0, 0.02)


def build_inference_model(cfg, bits: int, dtype, device, group_size: int | None = None):
    """The model in the planned layout straight on `device`: built on the meta device, cast to
    the 16-bit dtype, the four matrices of every layer swapped for INT8/INT4 shells, and only
    then allocated (to_empty), so no full-precision copy ever exists."""
    from glm130b.model.glm import build_model
    from glm130b.quant import quantize_model
    from glm130b.quant.weights import compact_cuda_int4

    model = build_model(cfg, "meta").to(dtype)  # before quantizing: .to() would cast the FP32 scales
    if bits != 16:
        quantize_model(model, bits, group_size)
    model = model.to_empty(device=device)
    _fill_random(model)
    compact_cuda_int4(model)  # as the CLI loads it: on a GPU, INT4 held once, in tinygemm's layout
    return model.eval()


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def run_inference(spec: dict, device, dtype) -> dict:
    import torch

    from glm130b.config import GLMConfig
    from glm130b.infer.engine import Batch, Engine, GenerationConfig, Row, generate_rows
    from glm130b.model.masks import Block

    cfg = GLMConfig.from_dict(spec["config"])
    model = build_inference_model(cfg, spec["bits"], dtype, device, spec.get("group_size"))
    layouts = [t for m in model.modules() if getattr(m, "source_released", False)
               for t in m._cache["tinygemm"][:2]]  # a compacted CUDA INT4 layer's only copy
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()) + layouts)
    prompt, new = spec["seq"] - spec["new"], spec["new"]
    rows = []
    for i in range(spec["batch"]):
        ids = [8 + (7 * j + i) % (cfg.vocab_size - 8) for j in range(prompt - 1)] + [6]  # ... [gMASK]
        rows.append(Row(ids, Block(prompt - 1, 0, continues=True)))
    engine = Engine(model)
    batch = Batch(engine, rows, new)  # the prefill: seq - new tokens in every row
    kv = tensor_bytes(batch.cache.k + batch.cache.v)
    generate_rows(engine, rows, GenerationConfig(max_new_tokens=new), sop_id=5, stop_ids=set(), batch=batch,
                  first_position=[len(r.context) for r in rows])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"real_weights_bytes": weights, "real_kv_cache_bytes": kv, "kv_dtype": str(batch.cache.k[0].dtype),
            "cache_positions": batch.cache.max_len}


def run_training(spec: dict, device, dtype) -> dict:
    import torch

    from glm130b.config import GLMConfig
    from glm130b.model.glm import build_model, default_position_ids
    from glm130b.train.precision import Precision
    from glm130b.train.trainer import SingleProcessTraining, TrainConfig

    cfg = GLMConfig.from_dict(spec["config"])
    precision_name = "bf16" if dtype == torch.bfloat16 else "fp16"
    train_cfg = TrainConfig(preset=cfg.name, device=device.type, precision=precision_name,
                            batch_size=spec["batch"], seq_len=spec["seq"])
    model = build_model(cfg, device)  # FP32 master weights, initialised on the device
    model.train()
    engine = SingleProcessTraining(model, train_cfg, device)
    precision = Precision(train_cfg.precision, device_type=device.type)
    b, s = spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(8, cfg.vocab_size, (b, s), generator=g),
        "position_ids": default_position_ids(b, s, cfg.rotary == "2d").clone(),
        "context_lengths": torch.full((b,), s // 2, dtype=torch.long),
        "targets": torch.randint(8, cfg.vocab_size, (b, s), generator=g),
        "loss_mask": torch.ones(b, s, dtype=torch.long),
    }
    losses = []
    for _ in range(spec["steps"]):
        engine.zero_grad()
        losses.append(engine.forward_backward(batch, precision, 1))
        engine.unscale_and_clip(precision, train_cfg.grad_clip)
        engine.optimizer_step(precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    states = [v for st in engine.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return {"real_parameters_bytes": tensor_bytes(model.parameters()),
            "real_optimizer_bytes": tensor_bytes(t for t in states if t.dim() > 0),
            "precision": precision.mode, "losses": losses}


def warm_up(spec: dict, device, dtype) -> None:
    """On the CPU: run the same path once on a one-layer model of the same kind, so the code it
    loads on first use (the C++ kernels, oneDNN, BLAS) is in the baseline -- the CPU's share of
    what the plan's GPU `overhead` line covers -- and not in the measured growth."""
    import gc

    small = dict(spec, config=dict(spec["config"], num_layers=1), batch=1)
    if spec["mode"] == "inference":
        small.update(seq=min(spec["seq"], 288), new=min(spec["new"], 4))  # 284 prompt rows: the BLAS path
        run_inference(small, device, dtype)
    else:
        small.update(seq=min(spec["seq"], 64), steps=1)
        run_training(small, device, dtype)
    gc.collect()


def child(spec: dict) -> dict:
    """Measure one configuration in this (fresh) process; returns the measured figures."""
    import torch

    import glm130b.infer.engine  # noqa: F401 - imports counted in the baseline, not the peak
    import glm130b.train.trainer  # noqa: F401

    device = torch.device(spec["device"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.init()
        free0, total = torch.cuda.mem_get_info(device)
        out["device_total_bytes"], out["used_before_bytes"] = total, total - free0
        torch.cuda.reset_peak_memory_stats(device)
    else:
        warm_up(spec, device, dtype)
        out["peak_reset"] = _reset_cpu_peak()
        base = _status_kib("VmRSS") * 1024
        out["rss_after_imports_bytes"] = base
    t0 = time.perf_counter()
    try:
        run = run_inference if spec["mode"] == "inference" else run_training
        out.update(run(spec, device, dtype))
    except Exception as e:  # noqa: BLE001 - out of memory, or any failure: recorded, the peak so far kept
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    out["seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved_now = torch.cuda.memory_reserved(device)
        out["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        out["context_bytes"] = (total - free) - reserved_now  # the context, kernel images (and other processes)
        out["measured_bytes"] = out["max_reserved_bytes"] + out["context_bytes"]
    else:
        out["peak_rss_bytes"] = _status_kib("VmHWM") * 1024
        out["measured_bytes"] = out["peak_rss_bytes"] - base
    return out


# --------------------------------------------------------------------------------------------
# The parent: plans, one subprocess per configuration, the table
# --------------------------------------------------------------------------------------------
def model_config(preset: str, args, training: bool = False):
    from glm130b.config import GLMConfig

    overrides = {}
    for key, name in (("num_layers", "layers"), ("hidden_size", "hidden"), ("num_heads", "heads"),
                      ("ffn_hidden_size", "ffn"), ("vocab_size", "vocab")):
        value = getattr(args, name)
        if value is not None and not training:
            overrides[key] = value
    seq = args.train_seq if training else args.seq
    cfg = GLMConfig.from_preset(preset, **overrides)
    if seq and seq > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq)
    return cfg


def configurations(args) -> list[tuple]:
    """(name, spec for the child, plan) of every configuration asked for."""
    from glm130b.plan import Gpus, plan_inference, plan_training

    gpus = Gpus(1, 80.0)  # one GPU; its size only decides the plan's fits verdict, not used here
    out = []
    cfg = model_config(args.preset, args)
    seq = args.seq or cfg.max_seq_len
    if args.new >= seq:
        raise SystemExit(f"--new {args.new} must be below --seq {seq}")
    for bits in args.bits:
        for batch in args.batch:
            plan = plan_inference(cfg, gpus, bits=bits, batch=batch, seq=seq, tp=1, group_size=args.group_size)
            spec = {"mode": "inference", "config": cfg.to_dict(), "bits": bits, "batch": batch, "seq": seq,
                    "new": args.new, "group_size": args.group_size}
            weights = "16-bit" if bits == 16 else f"int{bits}"
            out.append((f"{cfg.name} {weights} b{batch} s{seq}", spec, plan))
    if args.training:
        tcfg = model_config(args.train_preset, args, training=True)
        tseq = args.train_seq or tcfg.max_seq_len
        plan = plan_training(tcfg, gpus, tp=1, pp=1, dp=1, micro_batch=args.train_batch, seq=tseq,
                             checkpointing=False, shard="none")
        spec = {"mode": "training", "config": tcfg.to_dict(), "batch": args.train_batch, "seq": tseq,
                "steps": args.train_steps}
        out.append((f"{tcfg.name} train mb{args.train_batch} s{tseq}", spec, plan))
    return out


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if spec["device"] == "cpu":  # freed tensors leave the resident set at once (see the docstring)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def compare(name: str, spec: dict, plan, measured: dict) -> dict:
    """One result: the plan's lines, the total it is held to (on the CPU: without the GPU
    overhead line), the measured peak and their ratio."""
    lines = dict(plan.per_gpu)
    on_cpu = spec["device"] == "cpu"
    target = plan.per_gpu_bytes - (lines.get("overhead", 0.0) if on_cpu else 0.0)
    row = {"config": name, "mode": spec["mode"], "device": spec["device"], "plan": lines,
           "plan_per_gpu_bytes": plan.per_gpu_bytes, "plan_total_bytes": target,
           "compared_without_overhead": on_cpu, "measured": measured}
    peak = measured.get("measured_bytes")
    if peak is not None and peak > 0 and target > 0:
        row["measured_bytes"] = peak
        row["ratio"] = peak / target
        row["within_10pct"] = abs(row["ratio"] - 1.0) <= TOLERANCE
    else:
        row["ratio"], row["within_10pct"] = None, False
    if "error" in measured:
        row["error"] = measured["error"]
    checks = {}
    if "real_weights_bytes" in measured:
        checks["weights"] = (measured["real_weights_bytes"], lines["weights"])
        checks["kv_cache"] = (measured["real_kv_cache_bytes"], lines["kv_cache"])
    if "real_parameters_bytes" in measured:
        checks["parameters"] = (measured["real_parameters_bytes"], lines["parameters"])
        checks["optimizer"] = (measured["real_optimizer_bytes"], lines["optimizer"])
    row["line_checks"] = {k: {"real_bytes": r, "plan_bytes": p, "ratio": r / p if p else None}
                          for k, (r, p) in checks.items()}
    return row


def print_table(results: list[dict], header: str) -> None:
    big = max((max(r["plan_total_bytes"], r.get("measured_bytes") or 0) for r in results), default=0)
    unit, scale = ("GiB", GiB) if big >= GiB else ("MiB", MiB)
    keys: list[str] = []
    for r in results:
        keys += [k for k in r["plan"] if k not in keys]
    fmt = lambda v: "" if v is None else f"{v / scale:.2f}"  # noqa: E731
    width = max([len(r["config"]) for r in results] + [6])
    cols = [f"{'config':<{width}}"] + [f"{k[:11]:>11}" for k in keys] + \
        [f"{'plan':>10}", f"{'measured':>10}", f"{'ratio':>7}", "  within 10%"]
    print(header)
    print(f"(plan lines, plan total and measured peak in {unit}; on the CPU the plan total leaves out "
          "the GPU overhead line)")
    print(" ".join(cols))
    for r in results:
        cells = [f"{r['config']:<{width}}"]
        for k in keys:
            v = r["plan"].get(k)
            if k == "overhead" and r["compared_without_overhead"] and v is not None:
                cells.append(f"{'(' + fmt(v) + ')':>11}")
            else:
                cells.append(f"{fmt(v):>11}")
        cells += [f"{fmt(r['plan_total_bytes']):>10}", f"{fmt(r.get('measured_bytes')):>10}",
                  f"{r['ratio']:>7.2f}" if r["ratio"] is not None else f"{'-':>7}"]
        if "error" in r:
            verdict = f"  FAILED: {r['error']}"
        else:
            verdict = "  yes" if r["within_10pct"] else "  NO (outside 10%)"
        print(" ".join(cells) + verdict)
    for r in results:
        checks = ", ".join(f"{k} {c['real_bytes'] / scale:.3f} vs plan {c['plan_bytes'] / scale:.3f}"
                           for k, c in r["line_checks"].items())
        if checks:
            print(f"  {r['config']}: real tensors: {checks}")


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def write_out(path: str | None, out: dict) -> None:
    if path:
        with open(f"{path}.tmp", "w") as f:
            f.write(json.dumps(out, indent=2) + "\n")
        os.replace(f"{path}.tmp", path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                        help="the 16-bit dtype of weights and activations (the plan's FP16 bytes)")
    parser.add_argument("--preset", default="chatglm-6b", help="inference preset (default chatglm-6b)")
    parser.add_argument("--layers", type=int, help="override the inference preset's layers")
    parser.add_argument("--hidden", type=int, help="... hidden size")
    parser.add_argument("--heads", type=int, help="... heads")
    parser.add_argument("--ffn", type=int, help="... FFN inner size")
    parser.add_argument("--vocab", type=int, help="... vocabulary")
    parser.add_argument("--seq", type=int, default=2048, help="planned sequence: prompt + new tokens (default 2048)")
    parser.add_argument("--new", type=int, default=64, help="tokens decoded after the prompt (default 64)")
    parser.add_argument("--bits", type=parse_list, default=[16, 8, 4], help="comma list (default 16,8,4)")
    parser.add_argument("--batch", type=parse_list, default=[1, 8], help="comma list (default 1,8)")
    parser.add_argument("--group-size", type=int, default=None, help="INT8/INT4 group size (default per row)")
    parser.add_argument("--training", action="store_true", help="also one single-GPU training configuration")
    parser.add_argument("--train-preset", default="base", help="training preset (default base)")
    parser.add_argument("--train-batch", type=int, default=8, help="training micro-batch (default 8)")
    parser.add_argument("--train-seq", type=int, default=None, help="training sequence (default the preset's)")
    parser.add_argument("--train-steps", type=int, default=2, help="optimizer steps (default 2: the first "
                        "creates AdamW's moments)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", help="also write the JSON object to this file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    # a time limit's SIGTERM ends the parent through an exception, so subprocess.run kills the running
    # child too (else it would go on holding its GPU memory under whatever runs next)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    if args.device is None:
        import torch  # is_available() creates no CUDA context here (the children measure theirs)

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    t_start = time.perf_counter()

    def summary() -> dict:
        return {"device": args.device, "dtype": args.dtype, "tolerance": TOLERANCE, "results": results,
                "seconds": time.perf_counter() - t_start}

    for name, spec, plan in configurations(args):
        spec.update(device=args.device, dtype=args.dtype)
        measured = run_child(spec, args.timeout)
        results.append(compare(name, spec, plan, measured))
        if not args.json:
            print(f"... {name}: {measured.get('seconds', 0):.1f} s", file=sys.stderr, flush=True)
        write_out(args.out, summary())  # after each one: a run cut by a time limit keeps its figures
    out = summary()
    write_out(args.out, out)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print_table(results, f"plan against reality on {args.device} ({args.dtype}), {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
