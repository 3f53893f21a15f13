"""`glm130b demo`: the main job of `make run`.

With the shipped model (models/glm-small): fill blanks in English and Chinese, continue a
prompt, translate a verse, then the same in INT4, with tokens/s and weight memory of both.
Without it (a checkout that predates the model), train the `tiny` preset for a couple of
minutes first and show what it learned.
"""

from __future__ import annotations

import time
from pathlib import Path

from glm130b.checkpoint import load_model
from glm130b.device import peak_rss_mib

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "glm-small"
BLANKS = [
    "And God said, Let there be [MASK]: and there was light.",
    "In the beginning God created the [MASK] and the earth.",
    "起初，神创造[MASK]。",
    "子曰：“学而时习之，不亦[MASK]乎？”",
]
PROMPTS = ["And the LORD said unto Moses,", "耶稣对他们说："]
TRANSLATE = "Translate into Chinese: Blessed are the meek: for they shall inherit the earth."


def _show(model, tokenizer, label: str) -> None:
    from glm130b.infer.engine import GenerationConfig
    from glm130b.infer.generate import generate, infill
    from glm130b.quant.weights import weight_bytes

    print(f"== {label}: {weight_bytes(model)['total'] / 2**20:.1f} MiB of weights")
    for text in BLANKS:
        result = infill(model, tokenizer, text, max_new_tokens=12)
        print(f"   {text}\n     -> {result.text}")
    # greedy, but no 3-gram twice: a 27M model's greedy text otherwise loops within a sentence
    continuation = GenerationConfig(max_new_tokens=40, no_repeat_ngram_size=3)
    for prompt in PROMPTS + [TRANSLATE]:
        print(f"   {prompt}\n     -> {generate(model, tokenizer, prompt, config=continuation)}")
    n = 32
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
    t0 = time.perf_counter()
    generate(model, tokenizer, PROMPTS[0], config=cfg)
    dt = time.perf_counter() - t0
    gpu = ""
    if model.final_layernorm.weight.is_cuda:
        import torch

        gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    print(f"   speed: {n / dt:.0f} tokens/s (batch 1, greedy, {n} tokens); peak RSS so far {peak_rss_mib():.0f} MiB{gpu}")


def run_demo(steps: int | None = None, out: str | None = None, model_dir: str | None = None,
             device: str = "cpu") -> int:
    """The shipped (or --model) model; with --steps or --out, a tiny model trained for the demo
    (as README's `glm130b demo --steps 500 --out runs/demo`, then `glm130b info --model runs/demo`)."""
    from glm130b.errors import GLMError

    if model_dir and (steps is not None or out is not None):
        raise GLMError("--model shows an existing model; --steps and --out train a new one: give one or the other")
    if steps is not None and steps < 1:
        raise GLMError(f"--steps must be >= 1, got {steps}")
    directory = Path(model_dir) if model_dir else SHIPPED
    if steps is not None or out is not None or not (directory / "model.safetensors").is_file():
        if model_dir:
            raise GLMError(f"{directory} has no model.safetensors")
        return _train_tiny_demo(steps or 500, out or "runs/demo")
    from glm130b.device import resolve_device, resolve_dtype
    from glm130b.quant.weights import compact_cuda_int4, quantize_model, use_fast_linears

    where = resolve_device(device)
    dtype = resolve_dtype("auto", where)  # fp32 on the CPU, bf16 (or fp16) on a GPU
    model, tokenizer = load_model(directory, device=where, dtype=dtype)
    print(f"model: {directory} ({model.num_parameters():,} parameters) on {where}")
    label = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
    if where.type == "cpu":
        model = use_fast_linears(model)  # the same weights through the fast CPU GEMV
    _show(model, tokenizer, label)
    compact_cuda_int4(quantize_model(model, bits=4))  # on a GPU, INT4 held once
    _show(model, tokenizer, "int4 (per-row absmax, packed two per byte)")
    return 0


def _train_tiny_demo(steps: int, out: str) -> int:
    from glm130b.infer.generate import generate, infill
    from glm130b.tokenizer import default_tokenizer
    from glm130b.train.trainer import TrainConfig, train

    print(f"== training the tiny preset for {steps} steps -> {out}")
    summary = train(TrainConfig(preset="tiny", out=out, steps=steps, batch_size=8, seq_len=128, lr=3e-3),
                    default_tokenizer())
    print(f"   loss {summary['first_loss']:.2f} -> {summary['final_loss']:.2f} in {summary['seconds']:.0f}s "
          f"({summary['tokens_per_s']:.0f} tokens/s, {summary['parameters']:,} parameters)")
    model, tokenizer = load_model(out)
    for prompt in PROMPTS:
        print(f"   {prompt!r} -> {generate(model, tokenizer, prompt, max_new_tokens=24)!r}")
    for text in BLANKS[::2]:
        print(f"   {text!r}\n     -> {infill(model, tokenizer, text, max_new_tokens=8).text!r}")
    return 0
