"""Task configs (YAML) and the four task types.

* `mul` — multiple choice, GLM-130B's way: context + mask token (default [MASK]), each choice
  after `<sop>` in its own causal block, scored as its summed log-probability; all choices of
  an item in one row (scoring.py); single-token choices share one `<sop>` (the fast path).
  Metrics: `acc` (summed log-prob), `acc_norm` (divided by the choice's length in characters, as
  lm-evaluation-harness), `acc_tok` (divided by its token count), `mc_grade` (BIG-bench
  multiple_choice_grade, when the data has target scores), and on request (`metrics:` in the
  YAML) `acc_mutual_info`: the log-prob minus the choice's log-prob after the mask token alone
  (lm-evaluation-harness's name; GPT-3's calibration for choices whose prior differs).
* `ll` — log-likelihood of one continuation after context + [gMASK] (lm-evaluation-harness's
  protocol for lambada_openai): `acc` = the greedy continuation is the target, `ppl` =
  exp(-mean log-likelihood).
* `gen` — greedy generation after the mask token (glm130b.infer.generate.generate_block):
  `acc` (the post-processed prediction equals a reference exactly), `em` and `f1` (SQuAD
  normalisation, maximum over references).
* `lm` — perplexity with a sliding window (GLM-130B's LanguageModelTaskDataset): each window is
  `prompt + [gMASK]` (bidirectional) then `<sop>` + the scored text; the first window scores
  max_length - 1 tokens, each next one `stride` new tokens with the max_length - 1 - stride
  tokens before them as its prompt; every token is scored exactly once. `token_ppl`,
  `word_ppl` (GLM-130B's denominator: `len(text.strip().split(" "))`; `word_split: cjk`
  counts each CJK character as a word), `bits_per_byte` (UTF-8 bytes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from glm130b.config import check_types
from glm130b.errors import GLMError
from glm130b.eval import metrics as M
from glm130b.eval.formats import BLANK, CATEGORY_MAPS, READERS, DataError, Item, read_items
from glm130b.eval.scoring import Row, RowScore, choice_row, is_causal, score_rows, single_token_row
from glm130b.io import read_yaml

TASK_TYPES = ("mul", "ll", "gen", "lm")
MASK_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]")
DEFAULT_METRICS = {
    "mul": ["acc", "acc_norm"],
    "ll": ["acc", "ppl"],
    "gen": ["em", "f1"],
    "lm": ["token_ppl", "word_ppl", "bits_per_byte"],
}
# what each task type computes (a metric a YAML lists must be one of these)
KNOWN_METRICS = {
    "mul": ["acc", "acc_norm", "acc_tok", "mc_grade", "acc_mutual_info"],
    "ll": ["acc", "ppl", "loglikelihood"],
    "gen": ["acc", "em", "f1"],
    "lm": ["token_ppl", "word_ppl", "bits_per_byte"],
}
TASKS_DIR = Path(__file__).resolve().parents[3] / "tasks"


class TaskError(GLMError, ValueError):
    """A task YAML that is missing, malformed or names something unknown."""


@dataclass
class TaskConfig:
    name: str
    type: str
    format: str
    path: str
    description: str = ""
    mask: str | None = None  # default: [MASK] for mul, [gMASK] otherwise
    target_delimiter: str = " "  # put before each choice/continuation (lm-evaluation-harness)
    num_fewshot: int = 0
    fewshot_path: str | None = None
    max_length: int | None = None  # default: the model's max_seq_len
    batch_tokens: int = 8192  # padded tokens per forward pass
    batch_size: int = 64  # rows per forward pass
    metrics: list[str] | None = None  # the first is the headline metric
    categories: str | None = None  # a map from item group to category ("mmlu")
    limit_by: str = "item"  # --limit counts items, or items per group ("group", MMLU subjects)
    single_token: bool = True  # use the single-token fast path when every choice is one token
    max_new_tokens: int = 32
    gen_batch_size: int = 32  # gen: prompts generated together (1 = one at a time through generate_block)
    postprocess: str | None = None  # gen: "first_word" (GLM-130B LAMBADA), "first_line" or none
    stop: list[str] = field(default_factory=list)  # gen: cut (and stop) at the first of these
    stride: int | None = None  # lm: new tokens per window (default: max_length // 2)
    word_split: str = "glm"  # lm: "glm" (split on " ") or "cjk" (each CJK character is a word)
    options: dict = field(default_factory=dict)  # format-specific (template, fields, answers_path)
    source: str | None = None  # the YAML file

    def __post_init__(self) -> None:
        where = f"task {self.name!r}" + (f" ({self.source})" if self.source else "")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check_types(self, TaskError, where)
        if self.type not in TASK_TYPES:
            raise TaskError(f"{where}: type must be one of {', '.join(TASK_TYPES)}, got {self.type!r}")
        if self.format not in READERS:
            raise TaskError(f"{where}: unknown format {self.format!r}; choose from {', '.join(sorted(READERS))}")
        if self.mask is None:
            self.mask = "[MASK]" if self.type == "mul" else "[gMASK]"
        if self.mask not in MASK_TOKENS:
            raise TaskError(f"{where}: mask must be one of {', '.join(MASK_TOKENS)}, got {self.mask!r}")
        if self.type == "lm" and self.mask != "[gMASK]":
            raise TaskError(f"{where}: lm tasks score text after [gMASK] (GLM-130B); mask must be [gMASK]")
        if self.postprocess not in (None, "first_word", "first_line"):
            raise TaskError(f"{where}: postprocess must be first_word, first_line or absent")
        if self.word_split not in ("glm", "cjk"):
            raise TaskError(f"{where}: word_split must be glm or cjk")
        if self.limit_by not in ("item", "group"):
            raise TaskError(f"{where}: limit_by must be item or group")
        if self.categories is not None and self.categories not in CATEGORY_MAPS:
            raise TaskError(f"{where}: unknown categories {self.categories!r}; known: {', '.join(CATEGORY_MAPS)}")
        if self.metrics is None:
            self.metrics = list(DEFAULT_METRICS[self.type])
        for key in ("num_fewshot", "batch_tokens", "batch_size", "max_new_tokens", "gen_batch_size"):
            if getattr(self, key) < 0:
                raise TaskError(f"{where}: {key} must be a non-negative integer")
        for key in ("max_length", "stride"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise TaskError(f"{where}: {key} must be a positive integer or absent, got {getattr(self, key)}")
        unknown = [m for m in self.metrics if m not in KNOWN_METRICS[self.type]]
        if unknown or not self.metrics:
            raise TaskError(f"{where}: metrics for a {self.type} task are some of "
                            f"{', '.join(KNOWN_METRICS[self.type])}; got {self.metrics}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def resolve(self, value: str | None) -> Path | None:
        """A data path: environment variables and ~ expanded, relative to the YAML's folder."""
        if value is None:
            return None
        expanded = os.path.expanduser(os.path.expandvars(value))
        unset = re.findall(r"\$\{?(\w+)\}?", expanded)
        if unset:
            raise DataError(f"task {self.name!r}: set the environment variable {unset[0]} "
                            f"(the path {value!r} points at your copy of the data) or edit {self.source or 'the task'}")
        path = Path(expanded)
        return path if path.is_absolute() else (self.base_dir() / path).resolve()


def available_tasks() -> list[str]:
    dirs = _task_dirs()
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def _task_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("GLM130B_TASKS", "").split(os.pathsep) if p]
    return extra + [TASKS_DIR]


def load_task(spec: str | Path | TaskConfig | dict) -> TaskConfig:
    """A TaskConfig from a task name (tasks/NAME.yaml), a YAML path, a dict or a TaskConfig."""
    if isinstance(spec, TaskConfig):
        return spec
    if isinstance(spec, dict):
        return _from_dict(dict(spec), None)
    spec = str(spec)
    path = Path(spec)
    if not (spec.endswith((".yaml", ".yml")) or path.is_file()):
        for d in _task_dirs():
            if (d / f"{spec}.yaml").is_file():
                path = d / f"{spec}.yaml"
                break
        else:
            known = ", ".join(available_tasks()) or "none"
            raise TaskError(f"unknown task {spec!r}: not a YAML file and not in tasks/ (known: {known})")
    return _from_dict(read_yaml(path, TaskError, "task file"), path)


def _from_dict(data: dict, path: Path | None) -> TaskConfig:
    where = str(path) if path else "task"
    if path is not None:
        data.setdefault("name", path.stem)
        data["source"] = str(path)
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TaskError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'source'}))}")
    missing = [k for k in ("name", "type", "format", "path") if k not in data]
    if missing:
        raise TaskError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        return TaskConfig(**data)
    except TypeError as e:
        raise TaskError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Loading items
# ---------------------------------------------------------------------------------------------
def load_items(cfg: TaskConfig, limit: int | None = None) -> list[Item]:
    options = dict(cfg.options)
    options["num_fewshot"] = cfg.num_fewshot
    if cfg.fewshot_path:
        options["fewshot_path"] = cfg.resolve(cfg.fewshot_path)
    if options.get("answers_path"):
        options["answers_path"] = cfg.resolve(options["answers_path"])
    items = read_items(cfg.format, cfg.resolve(cfg.path), options)
    if not items:
        raise DataError(f"task {cfg.name!r}: {cfg.path} holds no usable (labelled) items")
    if limit is not None:
        if cfg.limit_by == "group":
            seen: dict = {}
            kept = []
            for item in items:
                seen[item.group] = seen.get(item.group, 0) + 1
                if seen[item.group] <= limit:
                    kept.append(item)
            items = kept
        else:
            items = items[:limit]
    return items


# ---------------------------------------------------------------------------------------------
# Context encoding
# ---------------------------------------------------------------------------------------------
def mask_token_id(tokenizer, mask: str) -> int:
    return {"[MASK]": tokenizer.mask_id, "[gMASK]": tokenizer.gmask_id, "[sMASK]": tokenizer.smask_id}[mask]


def _encode_with_blank(tokenizer, text: str, mask_id: int) -> tuple[list[int], int | None]:
    if BLANK not in text:
        return tokenizer.encode(text) if text else [], None
    before, _, after = text.partition(BLANK)
    if BLANK in after:
        raise DataError("a context may hold one blank only")
    ids = (tokenizer.encode(before) if before else []) + [mask_id]
    return ids + (tokenizer.encode(after) if after else []), len(ids) - 1


def encode_context(tokenizer, item: Item, mask_id: int, budget: int) -> tuple[list[int], int]:
    """Token ids of the prompt (preamble + as many shots as fit + context) with the mask token,
    at most `budget` tokens; returns (ids, mask position). The mask token is appended unless the
    context holds a blank. Shots are dropped from the end first (Hendrycks' MMLU rule), then the
    prompt is cut from the left."""
    if budget < 1:
        raise DataError(f"no room for the context (budget {budget} tokens)")
    ids: list[int] = []
    mask_pos = None
    for k in range(len(item.shots), -1, -1):
        text = item.preamble + "".join(item.shots[:k]) + item.context
        ids, mask_pos = _encode_with_blank(tokenizer, text, mask_id)
        if mask_pos is None:
            ids = ids + [mask_id]
            mask_pos = len(ids) - 1
        if len(ids) <= budget:
            return ids, mask_pos
    # still too long with no shots: keep the last `budget` tokens, or a window around the blank
    start = max(0, min(len(ids) - budget, mask_pos))
    return ids[start : start + budget], mask_pos - start


# ---------------------------------------------------------------------------------------------
# Task types
# ---------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    name: str
    type: str
    n: int
    metrics: dict
    subtasks: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    seconds: float = 0.0
    items_per_s: float = 0.0
    config: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


class Progress:
    """What runners need of a progress bar (tqdm fits): a settable `total` and `update(k)`."""

    total: int | None

    def update(self, n: int = 1): ...


def _set_total(progress, total: int) -> None:
    if progress is not None:
        progress.total = total
        if hasattr(progress, "refresh"):
            progress.refresh()


def _max_length(model, cfg: TaskConfig) -> int:
    return min(cfg.max_length or model.config.max_seq_len, model.config.max_seq_len)


def _with_stderr(name: str, values: list[float]) -> dict:
    return {name: M.mean(values), f"{name}_stderr": M.mean_stderr(values)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def run_mul(model, tokenizer, cfg: TaskConfig, items: list[Item], progress: Progress | None = None) -> TaskResult:
    max_len = _max_length(model, cfg)
    mask_id = mask_token_id(tokenizer, cfg.mask)
    rows: list[Row] = []
    choice_chars, choice_ids = [], []
    for idx, item in enumerate(items):
        if len(item.choices) < 1:
            raise DataError(f"task {cfg.name!r}: item {item.id or idx} has no choices")
        conts = [tokenizer.encode(cfg.target_delimiter + c) or [tokenizer.eop_id] for c in item.choices]
        choice_ids.append(conts)
        choice_chars.append([max(len(c), 1) for c in item.choices])
        if cfg.single_token and all(len(c) == 1 for c in conts):
            ctx, mpos = encode_context(tokenizer, item, mask_id, max_len - 1)
            rows.append(single_token_row(ctx, mpos, cfg.mask == "[gMASK]", [c[0] for c in conts],
                                         tokenizer.sop_id, tag=idx))
            continue
        longest = max(len(c) for c in conts)
        if longest >= max_len:
            raise DataError(f"task {cfg.name!r}: a choice of item {item.id or idx} is {longest} tokens; "
                            f"the model's context is {max_len}")
        ctx, mpos = encode_context(tokenizer, item, mask_id, max(max_len - sum(len(c) for c in conts), max_len - longest))
        # pack the choices into as few rows as fit in max_len (usually one)
        chunk, chunk_owners = [], []
        for owner, cont in enumerate(conts):
            if chunk and len(ctx) + sum(map(len, chunk)) + len(cont) > max_len:
                rows.append(choice_row(ctx, mpos, cfg.mask == "[gMASK]", chunk, tokenizer.sop_id, chunk_owners, tag=idx))
                chunk, chunk_owners = [], []
            chunk.append(cont)
            chunk_owners.append(owner)
        rows.append(choice_row(ctx, mpos, cfg.mask == "[gMASK]", chunk, tokenizer.sop_id, chunk_owners, tag=idx))

    conditional = len(rows)
    mutual_info = "acc_mutual_info" in (cfg.metrics or [])
    if mutual_info:  # each choice once more, after the mask token alone: its prior
        ctx, mpos = encode_context(tokenizer, Item(), mask_id, max_len)  # the mask token alone
        for idx, conts in enumerate(choice_ids):
            for owner, cont in enumerate(conts):
                rows.append(choice_row(ctx, mpos, cfg.mask == "[gMASK]", [cont], tokenizer.sop_id, [owner], tag=idx))
    scores = _score(model, tokenizer, cfg, rows, progress)
    logprob = [[0.0] * len(item.choices) for item in items]
    prior = [[0.0] * len(item.choices) for item in items]
    ntok = [[0] * len(item.choices) for item in items]
    for k, (row, s) in enumerate(zip(rows, scores, strict=True)):
        for owner in set(row.owners):
            if k < conditional:
                logprob[row.tag][owner] += s.logprob[owner]
                ntok[row.tag][owner] += s.num_tokens[owner]
            else:
                prior[row.tag][owner] += s.logprob[owner]

    per_item: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_tok": [], "mc_grade": [], "acc_mutual_info": []}
    samples = []
    for idx, item in enumerate(items):
        lp = logprob[idx]
        pred = _argmax(lp)
        pred_norm = _argmax([v / c for v, c in zip(lp, choice_chars[idx], strict=True)])
        pred_tok = _argmax([v / n for v, n in zip(lp, ntok[idx], strict=True)])
        per_item["acc"].append(float(pred == item.label))
        per_item["acc_norm"].append(float(pred_norm == item.label))
        per_item["acc_tok"].append(float(pred_tok == item.label))
        if item.choice_scores is not None:
            per_item["mc_grade"].append(item.choice_scores[pred])
        if mutual_info:
            pred_mi = _argmax([v - u for v, u in zip(lp, prior[idx], strict=True)])
            per_item["acc_mutual_info"].append(float(pred_mi == item.label))
        samples.append({"id": item.id, "label": item.label, "pred": pred, "logprobs": lp})
    return _summarise(cfg, items, per_item, samples)


def _summarise(cfg: TaskConfig, items: list[Item], per_item: dict[str, list[float]], samples: list) -> TaskResult:
    metrics: dict = {}
    for name, values in per_item.items():
        if values:
            metrics.update(_with_stderr(name, values))
    result = TaskResult(cfg.name, cfg.type, len(items), metrics, samples=samples)
    groups = [item.group for item in items]
    if any(g is not None for g in groups):
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(str(g), []).append(i)
        for g, idxs in sorted(by_group.items()):
            result.subtasks[g] = {"n": len(idxs)}
            for name, values in per_item.items():
                if values:
                    result.subtasks[g].update(_with_stderr(name, [values[i] for i in idxs]))
        headline = next(m for m in (cfg.metrics or []) + list(per_item) if per_item.get(m))
        if cfg.categories and len(by_group) > 1:
            metrics[f"{headline}_macro"] = M.mean([result.subtasks[g][headline] for g in by_group])
        if cfg.categories:
            cmap = CATEGORY_MAPS[cfg.categories]
            by_cat: dict[str, list[int]] = {}
            for i, g in enumerate(groups):
                by_cat.setdefault(cmap.get(str(g), "unknown"), []).append(i)
            for c, idxs in sorted(by_cat.items()):
                result.groups[c] = {"n": len(idxs), **_with_stderr(headline, [per_item[headline][i] for i in idxs])}
    return result


def _score(model, tokenizer, cfg: TaskConfig, rows: list[Row], progress: Progress | None,
           keep_token_logprobs: bool = False) -> list[RowScore]:
    _set_total(progress, len(rows))

    def on_batch(batch_rows):
        if progress is not None:
            progress.update(len(batch_rows))

    return score_rows(model, rows, tokenizer.pad_id, cfg.batch_tokens, cfg.batch_size or 64,
                      keep_token_logprobs=keep_token_logprobs, on_batch=on_batch,
                      causal_bos=tokenizer.eos_id if is_causal(model) else None)


def run_ll(model, tokenizer, cfg: TaskConfig, items: list[Item], progress: Progress | None = None) -> TaskResult:
    max_len = _max_length(model, cfg)
    mask_id = mask_token_id(tokenizer, cfg.mask)
    rows = []
    for idx, item in enumerate(items):
        if len(item.choices) != 1:
            raise DataError(f"task {cfg.name!r}: an ll item needs exactly one continuation")
        cont = tokenizer.encode(cfg.target_delimiter + item.choices[0]) or [tokenizer.eop_id]
        ctx, mpos = encode_context(tokenizer, item, mask_id, max_len - len(cont))
        rows.append(choice_row(ctx, mpos, cfg.mask == "[gMASK]", [cont], tokenizer.sop_id, tag=idx))
    scores = _score(model, tokenizer, cfg, rows, progress)
    lls = [s.logprob[0] for s in scores]
    greedy = [float(s.greedy[0]) for s in scores]
    metrics = _with_stderr("acc", greedy)
    ppl, ppl_se = M.perplexity_and_stderr(-M.mean(lls), M.mean_stderr(lls))
    metrics.update({"ppl": ppl, "ppl_stderr": ppl_se, "loglikelihood": M.mean(lls)})
    samples = [{"id": it.id, "loglikelihood": ll, "greedy": bool(g)} for it, ll, g in zip(items, lls, greedy, strict=True)]
    return TaskResult(cfg.name, cfg.type, len(items), metrics, samples=samples)


class _Stop(Exception):
    pass


def greedy_generate(model, tokenizer, ids: list[int], mask_position: int, continues: bool, max_new_tokens: int,
                    should_stop: Callable[[str], bool] | None = None) -> list[int]:
    """Greedy Part-B tokens for the blank at `mask_position`, through the inference engine's
    `generate_block`; stops at <eop>/<eos>, after max_new_tokens, or once `should_stop(text)`."""
    from glm130b.infer.generate import generate_block
    from glm130b.model.masks import Block

    out: list[int] = []

    def on_token(token: int) -> None:
        out.append(token)
        if should_stop is not None and should_stop(tokenizer.decode(out)):
            raise _Stop

    stop_ids = {tokenizer.eop_id, tokenizer.eos_id}
    try:
        tokens = generate_block(model, ids, Block(mask_position, 0, continues=continues), tokenizer.sop_id,
                                stop_ids, max_new_tokens, on_token=on_token)
    except _Stop:
        return out
    return list(tokens)


_FIRST_WORD_DONE = re.compile(r"^\s*\S+\s")
_EDGE_PUNCT = "".join(sorted(set(".,!?;:\"'()[]{}“”‘’«»…—–-`")))


def postprocess(text: str, how: str | None, stop: list[str]) -> str:
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    if how == "first_word":
        words = text.strip().split()
        return words[0].strip(_EDGE_PUNCT) if words else ""
    if how == "first_line":
        return text.strip().split("\n")[0].strip()
    return text.strip()


def run_gen(model, tokenizer, cfg: TaskConfig, items: list[Item], progress: Progress | None = None) -> TaskResult:
    if is_causal(model):
        raise DataError(f"task {cfg.name!r}: generation tasks decode GLM blanks; this model was trained with the "
                        "causal objective (score it with mul, ll and lm tasks)")
    max_len = _max_length(model, cfg)
    mask_id = mask_token_id(tokenizer, cfg.mask)
    max_new = min(cfg.max_new_tokens, max_len - 2)

    def should_stop(text: str) -> bool:
        if any(s and s in text for s in cfg.stop):
            return True
        if cfg.postprocess == "first_word":
            return bool(_FIRST_WORD_DONE.match(text))
        if cfg.postprocess == "first_line":
            return "\n" in text.lstrip()
        return False

    encoded = [encode_context(tokenizer, item, mask_id, max_len - max_new - 1) for item in items]
    _set_total(progress, len(items))
    raws = _generate_batched(model, tokenizer, cfg, encoded, max_new, progress)
    if raws is None:
        raws = []
        for ids, mpos in encoded:
            out = greedy_generate(model, tokenizer, ids, mpos, ids[mpos] == tokenizer.gmask_id, max_new, should_stop)
            raws.append(tokenizer.decode(out))
            if progress is not None:
                progress.update(1)

    per_item: dict[str, list[float]] = {"acc": [], "em": [], "f1": []}
    samples = []
    for item, raw in zip(items, raws, strict=True):
        pred = postprocess(raw, cfg.postprocess, cfg.stop)
        refs = [t.strip() for t in item.targets]
        per_item["acc"].append(float(pred in refs))
        per_item["em"].append(M.max_over_references(M.exact_match, pred, refs))
        per_item["f1"].append(M.max_over_references(M.f1_score, pred, refs))
        samples.append({"id": item.id, "prediction": pred, "generated": raw, "targets": refs})
    return _summarise(cfg, items, per_item, samples)


def _generate_batched(model, tokenizer, cfg: TaskConfig, encoded: list[tuple[list[int], int]], max_new: int,
                      progress) -> list[str] | None:
    """Generate for many prompts at once with the inference engine's `generate_batch` (greedy,
    prompts sorted by length, `gen_batch_size` at a time). Only for continuations (the [gMASK]
    appended at the end); None when that does not apply or the engine has no batched API, and
    the caller generates one prompt at a time. Rows stop at <eop>/<eos> or max_new tokens; the
    answer is cut out afterwards (postprocess), so the predictions equal the one-at-a-time ones."""
    if cfg.gen_batch_size <= 1 or not all(mpos == len(ids) - 1 and ids[mpos] == tokenizer.gmask_id
                                          for ids, mpos in encoded):
        return None
    try:
        from glm130b.infer.generate import GenerationConfig, generate_batch
    except ImportError:
        return None
    gen_cfg = GenerationConfig(max_new_tokens=max_new, stop_strings=tuple(s for s in cfg.stop if s))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    raws: list[str] = [""] * len(encoded)
    for start in range(0, len(order), cfg.gen_batch_size):
        chunk = order[start : start + cfg.gen_batch_size]
        # generate_batch takes text and appends the [gMASK]; decode(encode(text)) == text exactly
        prompts = [tokenizer.decode(encoded[i][0][:-1]) for i in chunk]
        for i, text in zip(chunk, generate_batch(model, tokenizer, prompts, config=gen_cfg), strict=True):
            raws[i] = text
        if progress is not None:
            progress.update(len(chunk))
    return raws


def count_words(text: str, how: str) -> int:
    if how == "glm":
        return len(text.strip().split(" "))
    # "cjk": each CJK character is a word; other words are whitespace-separated runs holding a
    # letter or digit (so "，" or "—" standing alone is not a word)
    cjk = sum(1 for ch in text if M._is_cjk(ch))
    rest = "".join(" " if M._is_cjk(ch) else ch for ch in text)
    return cjk + sum(1 for w in rest.split() if any(ch.isalnum() for ch in w))


def lm_windows(tokens: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, scored text) windows over a document: GLM-130B's sliding window. The first
    window scores the first max_length - 1 tokens; window w > 0 scores `stride` new tokens with
    the max_length - 1 - stride tokens before them as its prompt. Every token is scored once."""
    width = max_length - 1  # prompt + text; the row adds [gMASK] and <sop> and drops text's last token
    if width < 1 or not 0 < stride <= width:
        raise ValueError(f"bad window: max_length {max_length}, stride {stride}")
    windows = [([], tokens[:width])]
    start = width
    while start < len(tokens):
        windows.append((tokens[max(0, start - (width - stride)) : start], tokens[start : start + stride]))
        start += stride
    return [w for w in windows if w[1]]


def lm_row(prompt: list[int], text: list[int], gmask_id: int, sop_id: int, tag=None) -> Row:
    return choice_row(list(prompt) + [gmask_id], len(prompt), True, [text], sop_id, tag=tag)


def run_lm(model, tokenizer, cfg: TaskConfig, items: list[Item], progress: Progress | None = None) -> TaskResult:
    max_len = _max_length(model, cfg)
    stride = cfg.stride or max(1, max_len // 2)
    stride = min(stride, max_len - 1)
    rows, doc_tokens = [], []
    for idx, item in enumerate(items):
        tokens = tokenizer.encode(item.text)
        doc_tokens.append(len(tokens))
        for prompt, text in lm_windows(tokens, max_len, stride):
            rows.append(lm_row(prompt, text, tokenizer.gmask_id, tokenizer.sop_id, tag=idx))
    scores = _score(model, tokenizer, cfg, rows, progress)  # progress counts windows
    nll = [0.0] * len(items)
    for r, s in zip(rows, scores, strict=True):
        nll[r.tag] -= s.logprob[0]
    words = [count_words(it.text, cfg.word_split) for it in items]
    nbytes = [len(it.text.encode("utf-8")) for it in items]

    def summary(idxs: list[int]) -> dict:
        n_nll = [nll[i] for i in idxs]
        out = {"documents": len(idxs), "tokens": sum(doc_tokens[i] for i in idxs),
               "words": sum(words[i] for i in idxs), "bytes": sum(nbytes[i] for i in idxs)}
        for name, denom in (("token_ppl", doc_tokens), ("word_ppl", words)):
            d = [denom[i] for i in idxs]
            mean_nll = sum(n_nll) / max(sum(d), 1)
            ppl, se = M.perplexity_and_stderr(mean_nll, M.ratio_stderr(n_nll, d))
            out[name], out[f"{name}_stderr"] = ppl, se
        b = [nbytes[i] for i in idxs]
        out["bits_per_byte"] = sum(n_nll) / max(sum(b), 1) / math.log(2)
        out["bits_per_byte_stderr"] = M.ratio_stderr(n_nll, b) / math.log(2)
        return out

    metrics = summary(list(range(len(items))))
    result = TaskResult(cfg.name, cfg.type, len(items), metrics,
                        samples=[{"id": it.id, "nll": nll[i], "tokens": doc_tokens[i]} for i, it in enumerate(items)])
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.group is not None:
            groups.setdefault(it.group, []).append(i)
    for g, idxs in sorted(groups.items()):
        result.subtasks[g] = summary(idxs)
    return result


RUNNERS = {"mul": run_mul, "ll": run_ll, "gen": run_gen, "lm": run_lm}


def run_task(model, tokenizer, cfg: TaskConfig, limit: int | None = None, progress_factory=None) -> TaskResult:
    """Load a task's items, score them and return the result (timed). `progress_factory(name)`
    returns a bar with `update(k)`, a settable `total` and `close()` (tqdm) or None."""
    items = load_items(cfg, limit)
    bar = progress_factory(cfg.name) if progress_factory else None
    t0 = time.perf_counter()
    try:
        result = RUNNERS[cfg.type](model, tokenizer, cfg, items, bar)
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    result.items_per_s = len(items) / result.seconds if result.seconds > 0 else float("inf")
    result.config = cfg.to_dict()
    return result
