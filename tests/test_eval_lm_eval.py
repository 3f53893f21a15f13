"""Cross-check against lm-evaluation-harness (optional: skipped unless `lm_eval` is installed).

lm_eval builds the requests (prompts, continuations, choices) from its own task configs, and
computes the metrics with its own aggregation; our harness does both on its own. Through the
adapter, both score with the same model, so the numbers must agree.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from glm130b.config import GLMConfig  # noqa: E402
from glm130b.eval.lm_eval_adapter import GLM130BLM  # noqa: E402
from glm130b.eval.tasks import load_task, run_task  # noqa: E402
from glm130b.model.glm import GLMModel  # noqa: E402
from glm130b.tokenizer import default_tokenizer  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LAMBADA = [
    "In the beginning God created the heaven and the earth",
    "And God said, Let there be light: and there was light",
    "And God called the light Day, and the darkness he called Night",
    "He opened the door slowly and saw his old friend standing in the rain",
    "She put the letter in the envelope and walked to the post office",
    "The children ran to the river, laughing all the way down the hill",
]
PIQA = [
    {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Kick the jar.", "label": 0},
    {"goal": "Dry wet hair", "sol1": "Use a towel.", "sol2": "Use a spoon of soup.", "label": 0},
    {"goal": "Boil water", "sol1": "Put it in the freezer.", "sol2": "Heat it on a stove.", "label": 1},
    {"goal": "Light a room", "sol1": "Switch on a lamp.", "sol2": "Close the curtains.", "label": 0},
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_preset("tiny", max_seq_len=128)).eval()
    return model, default_tokenizer()


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def simple_evaluate(lm, task: dict, **kw):
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0, log_samples=True, **kw)
    return out["results"][task["task"]], out["samples"][task["task"]]


def local(name: str, path: str, **cfg) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}},
            "test_split": "test", **cfg}


def test_lambada_loglikelihood_matches(setup, tmp_path):
    model, tok = setup
    path = write(tmp_path / "lambada.jsonl", [{"text": t} for t in LAMBADA])
    ours = run_task(model, tok, load_task({"name": "l", "type": "ll", "format": "lambada", "path": path}))
    theirs, _ = simple_evaluate(GLM130BLM(model=model, tokenizer=tok), local(
        "glm_lambada_local", path, output_type="loglikelihood",
        doc_to_text="{{text.split(' ')[:-1]|join(' ')}}", doc_to_target="{{' '+text.split(' ')[-1]}}",
        metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                     {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]))
    assert theirs["acc,none"] == pytest.approx(ours.metrics["acc"])
    assert math.log(theirs["perplexity,none"]) == pytest.approx(math.log(ours.metrics["ppl"]), abs=1e-4)


def test_multiple_choice_matches(setup, tmp_path):
    model, tok = setup
    path = write(tmp_path / "piqa.jsonl", PIQA)
    ours = run_task(model, tok, load_task({"name": "p", "type": "mul", "format": "piqa", "path": path,
                                           "mask": "[MASK]"}))
    theirs, samples = simple_evaluate(GLM130BLM(model=model, tokenizer=tok, mask="[MASK]"), local(
        "glm_piqa_local", path, output_type="multiple_choice", doc_to_text="Question: {{goal}}\nAnswer:",
        doc_to_choice="{{[sol1, sol2]}}", doc_to_target="label", target_delimiter=" ",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                     {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]))
    assert theirs["acc,none"] == pytest.approx(ours.metrics["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours.metrics["acc_norm"])
    ours_lp = {int(s["id"]): s["logprobs"] for s in ours.samples}
    for s in samples:  # every choice's log-likelihood, packed rows (ours) vs one request each (theirs)
        assert [r[0][0] for r in s["resps"]] == pytest.approx(ours_lp[s["doc_id"]], abs=1e-4)


def test_rolling_perplexity_matches(setup, tmp_path):
    model, tok = setup
    docs = [{"text": " ".join(LAMBADA[:3]) + "."}, {"text": " ".join(LAMBADA[3:]) + "."}]
    path = write(tmp_path / "docs.jsonl", docs)
    ours = run_task(model, tok, load_task({"name": "w", "type": "lm", "format": "text_jsonl", "path": path}))
    theirs, _ = simple_evaluate(GLM130BLM(model=model, tokenizer=tok), local(
        "glm_ppl_local", path, output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
        metric_list=[{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                     {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}]))
    assert theirs["bits_per_byte,none"] == pytest.approx(ours.metrics["bits_per_byte"], rel=1e-5)
    assert math.log(theirs["word_perplexity,none"]) == pytest.approx(math.log(ours.metrics["word_ppl"]), rel=1e-5)


def test_generation_matches(setup, tmp_path):
    model, tok = setup
    path = write(tmp_path / "qa.jsonl", [{"q": "In the beginning God created the", "a": "heaven"},
                                         {"q": "And God said, Let there be", "a": "light"}])
    ours = run_task(model, tok, load_task({"name": "g", "type": "gen", "format": "gen_jsonl", "path": path,
                                           "max_new_tokens": 6, "stop": ["\n"],
                                           "options": {"template": "{q}", "targets_field": "a"}}))
    _, samples = simple_evaluate(GLM130BLM(model=model, tokenizer=tok), local(
        "glm_gen_local", path, output_type="generate_until", doc_to_text="{{q}}", doc_to_target="{{a}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]))
    generated = {int(s["id"]): s["generated"].split("\n")[0] for s in ours.samples}
    for s in samples:
        assert s["resps"][0][0] == generated[s["doc_id"]]
