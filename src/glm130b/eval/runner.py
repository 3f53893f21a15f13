"""Run tasks on a model: results, tables, JSON, precision comparison (`glm130b eval`)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from glm130b.errors import GLMError
from glm130b.eval.tasks import TaskConfig, TaskResult, load_task, run_task

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")


def evaluate(model, tokenizer, tasks: Sequence[str | Path | TaskConfig | dict], limit: int | None = None,
             progress: bool = False, with_samples: bool = False) -> dict:
    """Evaluate `model` on each task; returns {"tasks": {name: result dict}, "seconds": ...}.

    `tasks` are task names (tasks/NAME.yaml), YAML paths, dicts or TaskConfigs.
    """
    configs = [load_task(t) for t in tasks]
    model.eval()
    factory = _tqdm_factory() if progress else None
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for cfg in configs:
        result: TaskResult = run_task(model, tokenizer, cfg, limit=limit, progress_factory=factory)
        results[cfg.name] = result.to_dict(with_samples=with_samples)
    return {"tasks": results, "limit": limit, "seconds": time.perf_counter() - t0}


def _tqdm_factory():
    from tqdm import tqdm

    def make(name: str):
        return tqdm(desc=name, unit="row", file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5)

    return make


# ---------------------------------------------------------------------------------------------
# Model preparation
# ---------------------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(model) -> str:
    """Checksum of a model in memory: names, dtypes, shapes and bytes of every tensor."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def apply_precision(model, precision: str):
    """fp32 / bf16 / fp16 cast the model; int8 / int4 quantize it with glm130b.quant."""
    if precision == "fp32":
        return model.float()
    if precision in ("bf16", "fp16") and _on_cpu(model):
        from glm130b.cpu_precision import cpu_precision

        if cpu_precision(precision, "evaluation") == "fp32":  # no fast BF16/FP16 here: warned once
            return model.float()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "fp16":
        return model.to(torch.float16)
    if precision in ("int8", "int4"):
        from glm130b.quant import quantize_model

        return quantize_model(model, int(precision[3:]))
    raise GLMError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def _on_cpu(model) -> bool:
    p = next(iter(model.parameters()), None)
    return p is None or p.device.type in ("cpu", "meta")


def load_at_precision(model_dir: Path, precision: str, single: bool = True, device=None):
    """(model, tokenizer, precision label) from a model folder. int8/int4 quantize while reading
    (glm130b.checkpoint.load_model: no FP32 copy of the quantized matrices is kept); a folder
    saved quantized loads as saved (label int4/int8)."""
    from glm130b.checkpoint import is_quantized_folder
    from glm130b.interop.loader import load_any as load_model  # our folders, or SAT shards
    from glm130b.interop.sat import is_sat_folder

    device = device or "cpu"
    if precision in ("int8", "int4"):
        model, tokenizer = load_model(model_dir, device=device, bits=int(precision[3:]))
        return model.eval(), tokenizer, precision
    if not is_sat_folder(model_dir) and is_quantized_folder(model_dir):
        if not single:
            raise GLMError(f"{model_dir} is saved quantized; --compare needs the full-precision model folder")
        model, tokenizer = load_model(model_dir, device=device)
        info = (model.config.extra or {}).get("quantization") or {}
        return model.eval(), tokenizer, f"int{info.get('bits', '?')} (saved)"
    model, tokenizer = load_model(model_dir, device=device)
    model = apply_precision(model, precision).eval()
    if precision in ("bf16", "fp16") and next(iter(model.parameters())).dtype == torch.float32:
        precision = f"{precision}->fp32"  # no fast BF16 / FP16 on this CPU (warned)
    return model, tokenizer, precision


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def results_table(results: dict) -> str:
    """Markdown table: task, metric, value, stderr, items, items/s (every listed metric of every
    task, then the category groups of grouped tasks such as MMLU)."""
    rows = []
    for name, r in results["tasks"].items():
        metrics = r["config"].get("metrics") or []
        for k, m in enumerate(metrics):
            if m not in r["metrics"]:
                continue
            rows.append([name if k == 0 else "", m, _fmt(r["metrics"][m]), _fmt(r["metrics"].get(f"{m}_stderr")),
                         str(r["n"]) if k == 0 else "", f"{r['items_per_s']:.1f}" if k == 0 else ""])
        headline = metrics[0] if metrics else None
        for g, gr in r.get("groups", {}).items():
            rows.append([f"  {g}", headline, _fmt(gr.get(headline)), _fmt(gr.get(f"{headline}_stderr")), str(gr["n"]), ""])
        macro = r["metrics"].get(f"{headline}_macro")
        if macro is not None:
            rows.append(["  (subject average)", headline, _fmt(macro), "-", str(len(r.get("subtasks", {}))), ""])
    return _table(["task", "metric", "value", "stderr", "n", "items/s"], rows)


LOWER_IS_BETTER = ("ppl", "token_ppl", "word_ppl", "bits_per_byte")


def compare_table(runs: dict[str, dict]) -> str:
    """Score per precision per task (headline metric), and the change from the first precision."""
    names = list(runs)
    base = names[0]
    header = ["task", "metric", *names, *[f"Δ {n}" for n in names[1:]]]
    rows = []
    for task, r0 in runs[base]["tasks"].items():
        for m in (r0["config"].get("metrics") or [])[:2]:
            if m not in r0["metrics"]:
                continue
            values = [runs[n]["tasks"].get(task, {}).get("metrics", {}).get(m) for n in names]
            deltas = []
            for v in values[1:]:
                ok = v is not None and values[0] is not None and math.isfinite(v) and math.isfinite(values[0])
                deltas.append(f"{v - values[0]:+.4f}" if ok else "-")
            rows.append([task, m, *[_fmt(v) for v in values], *deltas])
    return _table(header, rows)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def limit_notes(configs, limit: int | None) -> list[str]:
    """For tasks whose --limit counts items per group (MMLU: per subject), how many that makes:
    `--limit 100` on MMLU is 57 x 100 items, which nobody guesses from the flag."""
    from glm130b.eval.tasks import load_items

    notes = []
    for cfg in configs:
        if limit is not None and cfg.limit_by == "group":
            items = load_items(cfg, limit)
            groups = len({item.group for item in items})
            notes.append(f"note: {cfg.name}: --limit {limit} counts items per subject: {len(items)} items "
                         f"from {groups} subjects")
    return notes


def run_command(model_dir: str | Path, tasks: Sequence[str], limit: int | None = None, output: str | None = None,
                bits: int | None = None, compare: str | None = None, progress: bool = True,
                with_samples: bool = False, out=None, precision: str | None = None, device=None,
                adapter: str | Path | None = None, compile_decode: bool = False) -> dict:
    """`glm130b eval`: load the model folder, evaluate, print the table, write JSON.
    `compile_decode`: generation tasks decode through the compiled step (infer/compiled.py)."""
    from glm130b.checkpoint import WEIGHTS
    from glm130b.quant.weights import compact_cuda_int4

    out = out or sys.stdout
    if not tasks:
        raise GLMError("name at least one task (or a task YAML)")
    if limit is not None and limit < 1:
        raise GLMError(f"--limit must be at least 1, got {limit}")
    if output:
        from glm130b.io import check_output_file

        check_output_file(output)  # before the evaluation, not after it
    configs = [load_task(t) for t in tasks]  # fail on a bad task before loading the model
    for note in limit_notes(configs, limit):
        print(note, file=sys.stderr)
    model_dir = Path(model_dir)
    if sum(x is not None for x in (compare, bits, precision)) > 1:
        raise GLMError("use one of --bits, --precision and --compare")
    if compare:
        precisions = [p.strip() for p in compare.split(",") if p.strip()]
    else:
        precisions = [f"int{bits}" if bits else (precision or "fp32")]
    for p in precisions:
        if p not in PRECISIONS:
            raise GLMError(f"unknown precision {p!r} in --compare; choose from {', '.join(PRECISIONS)}")
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    checksum = None
    runs: dict[str, dict] = {}
    for p in precisions:
        model, tokenizer, p = load_at_precision(model_dir, p, single=len(precisions) == 1, device=device)
        if adapter is not None:  # a fine-tuned adapter on the base (finetune/adapters.py)
            from glm130b.finetune.adapters import load_adapter

            load_adapter(model, adapter, log=lambda m: print(m, file=sys.stderr))
        compact_cuda_int4(model)  # on a GPU, INT4 held once: evaluation only runs the model
        model.compile_decode = compile_decode
        if checksum is None:
            checksum = file_sha256(model_dir / WEIGHTS)
        if len(precisions) > 1:
            print(f"== {p}", file=sys.stderr)
        runs[p] = evaluate(model, tokenizer, configs, limit=limit, progress=progress, with_samples=with_samples)
        runs[p]["precision"] = p
        del model

    report = {
        "model": {"path": str(model_dir), "weights_sha256": checksum, "adapter": None if adapter is None else str(adapter),
                  "config": json.loads((model_dir / "config.json").read_text())},
        "started": started,
        "seconds": time.perf_counter() - t0,
        "limit": limit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if len(runs) == 1:
        (p, run), = runs.items()
        report.update({"precision": p, "tasks": run["tasks"]})
        print(results_table(run), file=out)
    else:
        report["runs"] = runs
        for p, r in runs.items():
            print(f"\n{p}:", file=out)
            print(results_table(r), file=out)
        print("\n" + compare_table(runs), file=out)
    if output:
        from glm130b.io import atomic_write_text

        atomic_write_text(output, json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n")
    return report


def _jsonable(x):
    """NaN/inf are not JSON: write them as null / "inf"."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x
