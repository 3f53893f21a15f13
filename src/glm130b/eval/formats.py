"""Readers: standard data-set files -> evaluation items.

Every reader takes a path (JSON lines, JSON, optionally gzip-compressed) and the task's
`options` mapping and returns a list of `Item`s. Readers only turn records into text; the
task types (tasks.py) tokenise, add the mask token and score. A context may hold the blank
placeholder `BLANK`: the task puts its mask token there (GLM blank infilling) instead of
appending it at the end.

Formats (the `format:` key of a task YAML):

| format | records | item |
|---|---|---|
| lambada | `{"text"}` (lm-evaluation-harness lambada_openai) | context = text up to the last space, choice/target = the last word |
| mmlu | `{"subject","question","choices","answer"}` | the Hendrycks prompt, choices A-D, few-shot shots from `fewshot_path` |
| hellaswag | `{"ctx","endings","label","activity_label"}` | lm-evaluation-harness preprocessing |
| piqa | `{"goal","sol1","sol2","label"}` | "Question: ...\\nAnswer:" |
| mul_jsonl | any; `template`, `choices_field`, `answer_field` options | generic multiple choice |
| gen_jsonl | any; `template`, `targets_field` | generic generation |
| text_jsonl | `{"text", ...}`; `text_field`, `group_field` | one document per line (perplexity) |
| text | a plain text file | the whole file is one document |
| clue_afqmc, clue_cmnli, clue_ocnli, clue_cluewsc, clue_csl, clue_c3, clue_chid | CLUE's files | see each reader |
| bigbench | BIG-bench `task.json` | `target_scores` -> multiple choice, `target` -> generation |
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from glm130b.errors import GLMError

BLANK = "\u0000BLANK\u0000"  # where the task's mask token goes inside a context


class DataError(GLMError, ValueError):
    """A data file is missing, unreadable or not in the format its task names."""


@dataclass
class Item:
    """One evaluation example. Which fields matter depends on the task type:

    mul: context, choices, label (or choice_scores); ll: context, choices[0] (the continuation);
    gen: context, targets; lm: text. `preamble` + `shots` are few-shot text put before the
    context (shots are dropped from the end when the prompt would not fit). `group` names a
    sub-score (MMLU subject, document language).
    """

    context: str = ""
    choices: list[str] = field(default_factory=list)
    label: int | None = None
    targets: list[str] = field(default_factory=list)
    text: str = ""
    group: str | None = None
    choice_scores: list[float] | None = None
    preamble: str = ""
    shots: list[str] = field(default_factory=list)
    id: str | None = None


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _open_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_json_records(path: str | Path) -> list:
    """Records of a JSON-lines file, or the value of a JSON file (CLUE names JSON lines `.json`)."""
    path = Path(path)
    text = _open_text(path)
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and "\n" not in stripped.strip()):
        try:
            value = json.loads(text)
            return value if isinstance(value, list) else [value]
        except json.JSONDecodeError:
            pass  # JSON lines whose first record happens to start with "[": fall through
    if stripped.startswith("{"):
        try:  # a single (pretty-printed) JSON object, e.g. a BIG-bench task.json
            return [json.loads(text)]
        except json.JSONDecodeError:
            pass
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is inside strings
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return records


def _need(record: dict, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(sorted(record)) or 'none'})")


def _label_index(value, choices: list[str], where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: answer must be an index or one of the choices, got {value!r}")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value in choices:
        index = choices.index(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value)
    else:
        raise DataError(f"{where}: answer {value!r} is neither an index nor one of the choices")
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: answer index {index} outside the {len(choices)} choices")
    return index


# ---------------------------------------------------------------------------------------------
# Shipped English and Chinese tasks
# ---------------------------------------------------------------------------------------------
def read_lambada(path, options: dict) -> list[Item]:
    """lm-evaluation-harness `lambada_openai`: target = text.split(" ")[-1], context = the rest."""
    items = []
    for n, rec in enumerate(read_json_records(path)):
        _need(rec, ("text",), f"{path}: record {n}")
        context, _, word = rec["text"].rpartition(" ")
        if not context:
            raise DataError(f"{path}: record {n} has no space, so no last word to predict")
        items.append(Item(context=context, choices=[word], targets=[word], id=str(n)))
    return items


MMLU_CATEGORIES: dict[str, str] = {}
_MMLU_GROUPS = {
    # Hendrycks et al. (2021), categories.py: subject -> subcategory -> one of four groups.
    "STEM": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
             "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
             "virology",
}
for _group, _subjects in _MMLU_GROUPS.items():
    for _s in _subjects.split():
        MMLU_CATEGORIES[_s] = _group
assert len(MMLU_CATEGORIES) == 57

CATEGORY_MAPS = {"mmlu": MMLU_CATEGORIES}


def _mmlu_question(rec: dict) -> str:
    lines = [rec["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip("ABCDEFGH", rec["choices"], strict=False)]
    return "\n".join(lines) + "\nAnswer:"


def read_mmlu(path, options: dict) -> list[Item]:
    """MMLU as Hendrycks' evaluate.py prompts it; few-shot examples from `fewshot_path` (the dev
    split, same subject, in file order); the choices are the letters, scored after the mask."""
    shots_by_subject: dict[str, list[str]] = {}
    if options.get("fewshot_path"):
        for n, rec in enumerate(read_json_records(options["fewshot_path"])):
            _need(rec, ("subject", "question", "choices", "answer"), f"{options['fewshot_path']}: record {n}")
            answer = "ABCDEFGH"[_label_index(rec["answer"], rec["choices"], f"dev record {n}")]
            shots_by_subject.setdefault(rec["subject"], []).append(f"{_mmlu_question(rec)} {answer}\n\n")
    k = int(options.get("num_fewshot", 0))
    items = []
    for n, rec in enumerate(read_json_records(path)):
        where = f"{path}: record {n}"
        _need(rec, ("subject", "question", "choices", "answer"), where)
        subject = rec["subject"]
        shots = shots_by_subject.get(subject, [])[:k]
        if k and len(shots) < k:
            raise DataError(f"{where}: {k}-shot needs {k} dev examples of {subject}, found {len(shots)}")
        letters = list("ABCDEFGH"[: len(rec["choices"])])
        items.append(Item(
            context=_mmlu_question(rec), choices=letters,
            label=_label_index(rec["answer"], rec["choices"], where), group=subject,
            preamble=f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
            shots=shots, id=str(n),
        ))
    return items


def _hellaswag_preprocess(text: str) -> str:
    # lm-evaluation-harness tasks/hellaswag/utils.py
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path, options: dict) -> list[Item]:
    """HellaSwag with lm-evaluation-harness's preprocessing. Our copy has `ctx` only (not ctx_a and
    ctx_b), so ctx_b is not capitalised as the harness does."""
    items = []
    for n, rec in enumerate(read_json_records(path)):
        where = f"{path}: record {n}"
        _need(rec, ("ctx", "endings", "label"), where)
        ctx = rec["ctx"]
        if "ctx_a" in rec and "ctx_b" in rec:
            ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
        label_text = rec.get("activity_label", "")
        context = _hellaswag_preprocess(f"{label_text}: {ctx}" if label_text else ctx)
        choices = [_hellaswag_preprocess(e) for e in rec["endings"]]
        items.append(Item(context=context, choices=choices, label=_label_index(int(rec["label"]), choices, where),
                          id=str(n)))
    return items


def read_piqa(path, options: dict) -> list[Item]:
    items = []
    for n, rec in enumerate(read_json_records(path)):
        where = f"{path}: record {n}"
        _need(rec, ("goal", "sol1", "sol2", "label"), where)
        choices = [rec["sol1"], rec["sol2"]]
        items.append(Item(context=f"Question: {rec['goal']}\nAnswer:", choices=choices,
                          label=_label_index(int(rec["label"]), choices, where), id=str(n)))
    return items


def _render(template: str, rec: dict, where: str) -> str:
    try:
        return template.replace("{blank}", BLANK).format_map(rec)
    except KeyError as e:
        raise DataError(f"{where}: template field {e} not in the record (has {', '.join(sorted(rec))})") from None
    except (ValueError, IndexError, AttributeError, TypeError) as e:  # "{0}", "{q.x}", "{q"
        raise DataError(f"{where}: the template {template!r} does not fill from the record ({e})") from None


def read_mul_jsonl(path, options: dict) -> list[Item]:
    """Generic multiple choice: `template` (str.format over the record; `{blank}` marks an inline
    blank), `choices_field` (a list), `answer_field` (an index or the right choice's text)."""
    template = options.get("template", "{context}")
    cf, af = options.get("choices_field", "choices"), options.get("answer_field", "answer")
    gf = options.get("group_field")
    items = []
    for n, rec in enumerate(read_json_records(path)):
        where = f"{path}: record {n}"
        _need(rec, (cf, af), where)
        choices = [str(c) for c in rec[cf]]
        items.append(Item(context=_render(template, rec, where), choices=choices,
                          label=_label_index(rec[af], choices, where), group=rec.get(gf) if gf else None,
                          id=str(rec.get("id", n))))
    return items


def read_gen_jsonl(path, options: dict) -> list[Item]:
    """Generic generation: `template` and `targets_field` (a string or a list of references)."""
    template = options.get("template", "{context}")
    tf = options.get("targets_field", "targets")
    items = []
    for n, rec in enumerate(read_json_records(path)):
        where = f"{path}: record {n}"
        _need(rec, (tf,), where)
        targets = rec[tf] if isinstance(rec[tf], list) else [rec[tf]]
        items.append(Item(context=_render(template, rec, where), targets=[str(t) for t in targets],
                          id=str(rec.get("id", n))))
    return items


def read_text_jsonl(path, options: dict) -> list[Item]:
    """Perplexity documents, one per line: `text_field` (default "text"), `group_field` (e.g. "lang")."""
    tf, gf = options.get("text_field", "text"), options.get("group_field")
    items = []
    for n, rec in enumerate(read_json_records(path)):
        where = f"{path}: record {n}"
        _need(rec, (tf,), where)
        if rec[tf]:
            items.append(Item(text=rec[tf], group=str(rec[gf]) if gf and gf in rec else None,
                              id=str(rec.get("id", n))))
    return items


def read_text(path, options: dict) -> list[Item]:
    """A plain text file as one document (GLM-130B's language-modelling tasks read files this way)."""
    return [Item(text=_open_text(Path(path)), id=Path(path).name)]


# ---------------------------------------------------------------------------------------------
# CLUE (JSON lines; C3 is a JSON array; CHID's answers are in a separate file)
# ---------------------------------------------------------------------------------------------
def _clue_labelled(records, path, keys, label_map=None):
    """Yield (n, record, label) for records with a usable label (CLUE test files have none;
    CMNLI/OCNLI mark unlabelled pairs with "-")."""
    for n, rec in enumerate(records):
        _need(rec, keys, f"{path}: record {n}")
        label = rec.get("label")
        if label is None or label == "-" or label == "":
            continue
        if label_map is not None:
            if str(label) not in label_map:
                raise DataError(f"{path}: record {n} has label {label!r}; expected one of {', '.join(label_map)}")
            label = label_map[str(label)]
        yield n, rec, label


def read_clue_afqmc(path, options: dict) -> list[Item]:
    """AFQMC (ant financial question matching): label "0" different, "1" same meaning."""
    items = []
    for n, rec, label in _clue_labelled(read_json_records(path), path, ("sentence1", "sentence2"), {"0": 0, "1": 1}):
        context = f"问题一：{rec['sentence1']}\n问题二：{rec['sentence2']}\n这两个问题的意思"
        items.append(Item(context=context, choices=["不同", "相同"], label=label, id=str(rec.get("id", n))))
    return items


_NLI = {"entailment": 0, "neutral": 1, "contradiction": 2}


def read_clue_cmnli(path, options: dict) -> list[Item]:
    """CMNLI / OCNLI: premise？[blank]，hypothesis — the blank is 对 / 或许 / 错 (entailment /
    neutral / contradiction), the cloze form of GPT-3's and GLM's zero-shot NLI prompts."""
    items = []
    for n, rec, label in _clue_labelled(read_json_records(path), path, ("sentence1", "sentence2"), _NLI):
        premise = rec["sentence1"].rstrip("。！？!?.")
        context = f"{premise}？{BLANK}，{rec['sentence2']}"
        items.append(Item(context=context, choices=["对", "或许", "错"], label=label,
                          group=rec.get("genre"), id=str(rec.get("id", n))))
    return items


read_clue_ocnli = read_clue_cmnli


def read_clue_cluewsc(path, options: dict) -> list[Item]:
    """CLUEWSC2020: does the pronoun (span2) refer to span1? label "true"/"false"."""
    items = []
    records = read_json_records(path)
    for n, rec, label in _clue_labelled(records, path, ("text", "target"), {"false": 0, "true": 1}):
        t = rec["target"]
        context = f"{rec['text']}\n问题：这里的“{t['span2_text']}”指的是“{t['span1_text']}”吗？\n回答："
        items.append(Item(context=context, choices=["不是", "是"], label=label, id=str(rec.get("idx", n))))
    return items


def read_clue_csl(path, options: dict) -> list[Item]:
    """CSL: are all the keywords real keywords of the abstract? label "0"/"1"."""
    items = []
    for n, rec, label in _clue_labelled(read_json_records(path), path, ("abst", "keyword"), {"0": 0, "1": 1}):
        context = f"摘要：{rec['abst']}\n关键词：{'，'.join(rec['keyword'])}\n这些关键词都是这篇摘要的关键词吗？回答："
        items.append(Item(context=context, choices=["不是", "是"], label=label, id=str(rec.get("id", n))))
    return items


def read_clue_c3(path, options: dict) -> list[Item]:
    """C3: a JSON array of [paragraphs, [{"question", "choice", "answer"}...], id] (d-dev.json,
    m-dev.json); JSON lines of the same triples are read too."""
    items = []
    for n, entry in enumerate(read_json_records(path)):
        if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[1], list)):
            raise DataError(f"{path}: entry {n} is not [paragraphs, questions, id]")
        paragraphs = entry[0] if isinstance(entry[0], list) else [entry[0]]
        doc_id = entry[2] if len(entry) > 2 else str(n)
        for q_n, q in enumerate(entry[1]):
            where = f"{path}: entry {n} question {q_n}"
            _need(q, ("question", "choice"), where)
            if not q.get("answer"):
                continue
            context = "\n".join(paragraphs) + f"\n问题：{q['question']}\n答案："
            choices = list(q["choice"])
            items.append(Item(context=context, choices=choices, label=_label_index(q["answer"], choices, where),
                              id=f"{doc_id}/{q_n}"))
    return items


_IDIOM = re.compile(r"#idiom\d+#")


def read_clue_chid(path, options: dict) -> list[Item]:
    """CHID (CLUE): lines {"candidates": [...], "content": [passages with #idiomNNNNNN# blanks]};
    the answers are in `answers_path` (default: beside the data file, `dev.json` -> `dev_answer.json`)
    as {"#idiomNNNNNN#": candidate index}. One item per blank: that blank is the mask (GLM blank
    infilling), the others read "____"; the choices are the candidate idioms."""
    path = Path(path)
    answers_path = Path(options.get("answers_path") or path.with_name(path.stem + "_answer" + path.suffix))
    answers_records = read_json_records(answers_path)
    answers = {}
    for rec in answers_records:
        if isinstance(rec, dict):
            answers.update(rec)
    items = []
    for n, rec in enumerate(read_json_records(path)):
        _need(rec, ("candidates", "content"), f"{path}: record {n}")
        contents = rec["content"] if isinstance(rec["content"], list) else [rec["content"]]
        for passage in contents:
            for blank in _IDIOM.findall(passage):
                if blank not in answers:
                    raise DataError(f"{answers_path}: no answer for {blank}")
                text = passage.replace(blank, BLANK)
                text = _IDIOM.sub("____", text)
                items.append(Item(context=text, choices=list(rec["candidates"]),
                                  label=_label_index(int(answers[blank]), rec["candidates"], f"{path}: {blank}"),
                                  id=blank))
    return items


# ---------------------------------------------------------------------------------------------
# BIG-bench JSON tasks
# ---------------------------------------------------------------------------------------------
def read_bigbench(path, options: dict) -> list[Item]:
    """A BIG-bench `task.json`: examples with `target_scores` (multiple choice; the label is the
    highest-scoring choice, `choice_scores` keeps the scores for multiple_choice_grade) or `target`
    (generation; a string or a list). Prompts as BIG-bench's JSON tasks build them:
    task_prefix + example_input_prefix ("\\nQ: ") + input [+ choices] + example_output_prefix ("\\nA: ")."""
    records = read_json_records(path)
    if len(records) != 1 or not isinstance(records[0], dict) or "examples" not in records[0]:
        raise DataError(f"{path}: not a BIG-bench JSON task (an object with an \"examples\" list)")
    task = records[0]
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    prefix = task.get("task_prefix", "")
    items = []
    for n, ex in enumerate(task["examples"]):
        where = f"{path}: example {n}"
        _need(ex, ("input",), where)
        context = prefix + in_prefix + ex["input"]
        if "target_scores" in ex:
            choices = list(ex["target_scores"])
            scores = [float(ex["target_scores"][c]) for c in choices]
            if append_choices:
                context += "".join(choice_prefix + c for c in choices)
            context = (context + out_prefix).rstrip(" ")
            best = max(range(len(choices)), key=lambda i: scores[i])
            targets = ex.get("target", [])
            items.append(Item(context=context, choices=choices, label=best, choice_scores=scores,
                              targets=targets if isinstance(targets, list) else [targets], id=str(n)))
        elif "target" in ex:
            targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
            items.append(Item(context=(context + out_prefix).rstrip(" "), targets=[str(t) for t in targets],
                              id=str(n)))
        else:
            raise DataError(f"{where}: neither target_scores nor target")
    return items


READERS: dict[str, Callable[[Path, dict], list[Item]]] = {
    "lambada": read_lambada,
    "mmlu": read_mmlu,
    "hellaswag": read_hellaswag,
    "piqa": read_piqa,
    "mul_jsonl": read_mul_jsonl,
    "gen_jsonl": read_gen_jsonl,
    "text_jsonl": read_text_jsonl,
    "text": read_text,
    "clue_afqmc": read_clue_afqmc,
    "clue_cmnli": read_clue_cmnli,
    "clue_ocnli": read_clue_ocnli,
    "clue_cluewsc": read_clue_cluewsc,
    "clue_csl": read_clue_csl,
    "clue_c3": read_clue_c3,
    "clue_chid": read_clue_chid,
    "bigbench": read_bigbench,
}


def read_items(format_name: str, path: str | Path, options: dict | None = None) -> list[Item]:
    if format_name not in READERS:
        raise DataError(f"unknown data format {format_name!r}; choose from {', '.join(sorted(READERS))}")
    try:
        return READERS[format_name](Path(path), dict(options or {}))
    except GLMError:
        raise
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:  # a field or option of the wrong kind
        raise DataError(f"{path}: the {format_name} reader cannot use this file with these options "
                        f"({type(e).__name__}: {e}); check the task's options (template, fields) and the "
                        "records' fields") from None
