"""What a training mixture spends its tokens on: real tokens against padding, the instruction
share of the real tokens, and how much of the document stream and how many pairs N samples read,
for several instruction shares with and without packing, side by side in one run.

    python benchmarks/data_mixture.py --config configs/base.yaml --samples 2000

Each variant is `SHARE:pack` or `SHARE:nopack` (`--variants 0.2:nopack,0.05:pack`); the rest of
the mixture (corpus, window, gMASK share, instructions, seed) comes from the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import warnings

from glm130b.config import GLMConfig
from glm130b.io import read_yaml
from glm130b.tokenizer import default_tokenizer
from glm130b.train.trainer import PretrainingData, TrainConfig


def measure(cfg: TrainConfig, samples: int, tokenizer) -> dict:
    data = PretrainingData(cfg, tokenizer, GLMConfig.from_preset(cfg.preset, **cfg.model_overrides))
    real = instruction = total = rows = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (pairs longer than the window are passed over)
        for s in itertools.islice(data.samples(), samples):
            n = int((s.input_ids != tokenizer.pad_id).sum())
            real, total = real + n, total + s.input_ids.numel()
            if s.mode == "instruction":
                instruction, rows = instruction + n, rows + 1
    state = data.builder.state_dict()
    return {"instruction_share": cfg.instruction_share, "pack_instructions": cfg.pack_instructions,
            "real_token_share": real / total, "instruction_share_of_real": instruction / max(1, real),
            "instruction_rows": rows, "pairs_read": state["instructions"], "stream_tokens_read": state["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--variants", default="0.2:nopack,0.05:pack,0.2:pack")
    parser.add_argument("--seq-len", type=int, default=None, help="override the config's window")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = read_yaml(args.config)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: (tuple(v) if isinstance(v, list) else v) for k, v in base.items() if k in fields}
    if args.seq_len:
        base["seq_len"] = args.seq_len
    base.setdefault("instructions", "builtin")
    tokenizer = default_tokenizer()
    results = []
    for variant in args.variants.split(","):
        share, _, pack = variant.partition(":")
        if pack not in ("pack", "nopack"):
            parser.error(f"a variant is SHARE:pack or SHARE:nopack, got {variant!r}")
        cfg = TrainConfig(**{**base, "instruction_share": float(share), "pack_instructions": pack == "pack"})
        results.append(measure(cfg, args.samples, tokenizer))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    first = results[0]
    cfg = TrainConfig(**base)
    print(f"{args.samples} samples of {cfg.seq_len} tokens, {args.config} (sources {', '.join(cfg.sources)}):\n")
    print("| instruction share (rows) | packed | real tokens | instructions, of real | instruction rows | pairs read | "
          "stream tokens read | stream tokens / first row's |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['instruction_share']:g} | {'yes' if r['pack_instructions'] else 'no'} | "
              f"{r['real_token_share']:.1%} | {r['instruction_share_of_real']:.1%} | {r['instruction_rows']} | "
              f"{r['pairs_read']} | {r['stream_tokens_read']:,} | "
              f"{r['stream_tokens_read'] / max(1, first['stream_tokens_read']):.2f}x |")


if __name__ == "__main__":
    main()
