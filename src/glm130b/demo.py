"""`glm130b demo`: the main job of `make run`.

Until the shipped model exists, it trains the `tiny` preset on the shipped corpus (a couple of
minutes on a laptop CPU), then continues prompts and fills blanks in English and Chinese.
"""

from __future__ import annotations

import time

from glm130b.checkpoint import load_model
from glm130b.infer.generate import generate, infill
from glm130b.tokenizer import default_tokenizer
from glm130b.train.trainer import TrainConfig, train

PROMPTS = ["In the beginning God created", "起初，神创造"]
BLANKS = ["And God said, Let there be [MASK]: and there was light.", "子曰：“学而时习之，不亦[MASK]乎？”"]


def run_demo(steps: int = 500, out: str = "runs/demo") -> int:
    print(f"== training the tiny preset for {steps} steps on the shipped corpus -> {out}")
    summary = train(TrainConfig(preset="tiny", out=out, steps=steps, batch_size=8, seq_len=128, lr=3e-3), default_tokenizer())
    print(f"   loss {summary['first_loss']:.2f} -> {summary['final_loss']:.2f} in {summary['seconds']:.0f}s "
          f"({summary['tokens_per_s']:.0f} tokens/s, {summary['parameters']:,} parameters)")
    model, tokenizer = load_model(out)
    print("== continuing prompts ([gMASK], greedy)")
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        text = generate(model, tokenizer, prompt, max_new_tokens=24)
        print(f"   {prompt!r} -> {text!r}  ({time.perf_counter() - t0:.2f}s)")
    print("== filling blanks ([MASK], greedy)")
    for text in BLANKS:
        result = infill(model, tokenizer, text, max_new_tokens=8)
        print(f"   {text!r}\n     -> {result.text!r} (span {result.spans[0]!r})")
    print(f"== done: try `glm130b generate --model {out} \"your prompt\"`")
    return 0
