"""The GLM-vs-GPT table (issue #21): two runs of one model size on the same data and tokens, one
with the GLM objective and one with the plain causal one, scored on the dev tasks and held-out
perplexity (`glm130b eval --output`). Writes the table between the markers
`<!-- glm-vs-gpt:begin -->` and `<!-- glm-vs-gpt:end -->` of a Markdown file.

    python tools/compare_objectives.py --run glm=runs/base-glm:eval-glm.json \\
        --run gpt=runs/base-gpt:eval-gpt.json --doc docs/shipped-model.md

Each `--run LABEL=RUN_FOLDER:EVAL_JSON`. The training losses are not comparable between the
objectives (GLM's loss covers only Part B, a causal model's every token), so the table reports
the evaluation only, and the tokens each run trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- glm-vs-gpt:begin -->", "<!-- glm-vs-gpt:end -->"
COLUMNS = [  # (header, task, metric, format)
    ("held-out token ppl, shipped slice", "heldout_ppl", "token_ppl", "{:.1f}"),
    ("held-out token ppl, added sources", "heldout_ppl_base", "token_ppl", "{:.1f}"),
    ("held-out bits/byte (both slices)", None, "bits_per_byte", "{:.3f}"),
    ("verse_match acc", "bilingual_verse_match", "acc", "{:.1%}"),
    ("verse_match mutual-info", "bilingual_verse_match", "acc_mutual_info", "{:.1%}"),
    ("cloze acc", "zh_classics_cloze", "acc", "{:.1%}"),
    ("cloze mutual-info", "zh_classics_cloze", "acc_mutual_info", "{:.1%}"),
]


def _metric(tasks: dict, task: str, metric: str):
    try:
        return tasks[task]["metrics"][metric]
    except KeyError:
        return None


def _bits_per_byte(tasks: dict):
    """Both perplexity slices together: total NLL over total bytes (from each slice's own ratio)."""
    total_bits = total_bytes = 0.0
    for task in ("heldout_ppl", "heldout_ppl_base"):
        m = tasks.get(task, {}).get("metrics")
        if not m:
            return None
        total_bits += m["bits_per_byte"] * m["bytes"]
        total_bytes += m["bytes"]
    return total_bits / total_bytes


def row(label: str, run: Path, evaluation: dict) -> list[str]:
    tasks = evaluation["tasks"]
    train_cfg = json.loads((run / "train_config.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    tokens = metrics[-1].get("tokens") if metrics else None
    minutes = metrics[-1]["time_s"] / 60 if metrics and "time_s" in metrics[-1] else None
    cells = [label, train_cfg.get("objective", "glm"), train_cfg["preset"],
             (f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens:,}") if tokens else "?", f"{minutes:.1f}" if minutes else "?"]
    for _, task, metric, fmt in COLUMNS:
        value = _bits_per_byte(tasks) if task is None else _metric(tasks, task, metric)
        cells.append(fmt.format(value) if isinstance(value, (int, float)) else "-")
    return cells


def table(runs: list[tuple[str, Path, dict]]) -> str:
    header = ["run", "objective", "preset", "tokens", "train min"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    lines += ["| " + " | ".join(row(*r)) + " |" for r in runs]
    return "\n".join(lines)


def write_between_markers(doc: Path, text: str) -> None:
    """Replace what lies between the markers; a file that does not exist yet is made of them."""
    content = doc.read_text(encoding="utf-8") if doc.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{doc} lacks the markers {BEGIN} ... {END}")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="LABEL=RUN_FOLDER:EVAL_JSON (repeat)")
    p.add_argument("--doc", help="Markdown file to write the table into (between the markers); else print it")
    p.add_argument("--note", default="", help="a line under the table (hardware, date)")
    args = p.parse_args()
    runs = []
    for spec in args.run:
        label, _, paths = spec.partition("=")
        run, _, evaluation = paths.rpartition(":")
        if not (label and run and evaluation):
            raise SystemExit(f"--run wants LABEL=RUN_FOLDER:EVAL_JSON, got {spec!r}")
        runs.append((label, Path(run), json.loads(Path(evaluation).read_text())))
    text = table(runs) + (f"\n\n{args.note}" if args.note else "")
    if args.doc:
        write_between_markers(Path(args.doc), text)
        print(f"table written into {args.doc}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
