"""Readers for the standard data-set formats, each on a small file written in that format,
and each task YAML pointed at such a file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from glm130b.eval.formats import BLANK, DataError, read_items, read_json_records
from glm130b.eval.tasks import load_items, load_task, run_task
from glm130b.tokenizer import default_tokenizer


def write_jsonl(path: Path, records: list) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_json_lines_json_arrays_and_gzip(tmp_path):
    recs = [{"a": 1, "t": "x\u2028y"}, {"a": 2}]
    assert read_json_records(write_jsonl(tmp_path / "a.jsonl", recs)) == recs
    assert read_json_records(write_jsonl(tmp_path / "a.jsonl.gz", recs)) == recs
    (tmp_path / "b.json").write_text(json.dumps(recs, indent=1))
    assert read_json_records(tmp_path / "b.json") == recs
    (tmp_path / "c.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match="c.jsonl:2"):
        read_json_records(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_json_records(tmp_path / "missing.jsonl")


def test_lambada(tmp_path):
    p = write_jsonl(tmp_path / "l.jsonl", [{"text": "He opened the door and saw his old friend Harlin"}])
    (item,) = read_items("lambada", p)
    assert item.context == "He opened the door and saw his old friend" and item.choices == ["Harlin"]
    assert item.targets == ["Harlin"]


def test_mmlu_zero_and_few_shot(tmp_path):
    q = {"subject": "college_physics", "question": "What is 1+1?", "choices": ["1", "2", "3", "4"], "answer": 1}
    dev = [{"subject": "college_physics", "question": f"Dev {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}
           for i in range(5)]
    test_path, dev_path = write_jsonl(tmp_path / "t.jsonl", [q]), write_jsonl(tmp_path / "d.jsonl", dev)
    (zero,) = read_items("mmlu", test_path)
    assert zero.context == "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    assert zero.choices == ["A", "B", "C", "D"] and zero.label == 1 and zero.group == "college_physics"
    assert zero.preamble.endswith("about college physics.\n\n") and zero.shots == []
    (five,) = read_items("mmlu", test_path, {"fewshot_path": dev_path, "num_fewshot": 5})
    assert len(five.shots) == 5 and five.shots[1] == "Dev 1?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
    with pytest.raises(DataError, match="6-shot"):
        read_items("mmlu", test_path, {"fewshot_path": dev_path, "num_fewshot": 6})


def test_hellaswag_and_piqa(tmp_path):
    h = write_jsonl(tmp_path / "h.jsonl", [{"ctx": "A man [header] is on a roof. he", "endings": ["sits.", "is  up."],
                                            "label": 1, "activity_label": "Roofing"}])
    (item,) = read_items("hellaswag", h)
    assert item.context == "Roofing: A man is on a roof. he" and item.choices == ["sits.", "is up."] and item.label == 1
    p = write_jsonl(tmp_path / "p.jsonl", [{"goal": "Open a jar", "sol1": "twist", "sol2": "kick", "label": 0}])
    (item,) = read_items("piqa", p)
    assert item.context == "Question: Open a jar\nAnswer:" and item.choices == ["twist", "kick"] and item.label == 0


def test_generic_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"en": "In the beginning", "choices": ["起初", "末后"], "answer": "起初"}])
    (item,) = read_items("mul_jsonl", p, {"template": "Translate into Chinese: {en}"})
    assert item.context == "Translate into Chinese: In the beginning" and item.label == 0
    with pytest.raises(DataError, match="template field"):
        read_items("mul_jsonl", p, {"template": "{nope}"})
    g = write_jsonl(tmp_path / "g.jsonl", [{"q": "2+2=", "a": ["4", "four"]}])
    (item,) = read_items("gen_jsonl", g, {"template": "{q}", "targets_field": "a"})
    assert item.context == "2+2=" and item.targets == ["4", "four"]
    (tmp_path / "doc.txt").write_text("a whole file\n")
    assert read_items("text", tmp_path / "doc.txt")[0].text == "a whole file\n"


# ---------------------------------------------------------------------------------------------
# CLUE
# ---------------------------------------------------------------------------------------------
def test_clue_afqmc_cmnli_ocnli(tmp_path):
    p = write_jsonl(tmp_path / "afqmc.json", [{"sentence1": "花呗怎么还款", "sentence2": "花呗如何还钱", "label": "1"},
                                              {"sentence1": "借呗", "sentence2": "花呗", "label": "0"}])
    items = read_items("clue_afqmc", p)
    assert [i.label for i in items] == [1, 0] and items[0].choices == ["不同", "相同"]
    p = write_jsonl(tmp_path / "cmnli.json", [
        {"sentence1": "他在北京工作。", "sentence2": "他有工作", "label": "entailment"},
        {"sentence1": "a", "sentence2": "b", "label": "-"},  # unlabelled: skipped
        {"sentence1": "天很冷", "sentence2": "天很热", "label": "contradiction"}])
    items = read_items("clue_cmnli", p)
    assert [i.label for i in items] == [0, 2]
    assert items[0].context == f"他在北京工作？{BLANK}，他有工作" and items[0].choices == ["对", "或许", "错"]
    o = write_jsonl(tmp_path / "ocnli.json", [{"level": "medium", "sentence1": "s", "sentence2": "t", "label": "neutral",
                                               "label0": "neutral", "genre": "news", "prem_id": "n1", "id": 0}])
    (item,) = read_items("clue_ocnli", o)
    assert item.label == 1 and item.group == "news"


def test_clue_wsc_csl(tmp_path):
    p = write_jsonl(tmp_path / "wsc.json", [{"target": {"span2_index": 9, "span1_index": 0, "span1_text": "小明",
                                                        "span2_text": "他"}, "idx": 3, "label": "true",
                                             "text": "小明去了商店，因为他饿了。"}])
    (item,) = read_items("clue_cluewsc", p)
    assert "“他”指的是“小明”" in item.context and item.label == 1 and item.choices == ["不是", "是"]
    p = write_jsonl(tmp_path / "csl.json", [{"id": 1, "abst": "本文研究了模型。", "keyword": ["模型", "研究"], "label": "1"}])
    (item,) = read_items("clue_csl", p)
    assert "关键词：模型，研究" in item.context and item.label == 1


def test_clue_c3(tmp_path):
    data = [[["男：你好。", "女：你好，请问去哪儿？"], [{"question": "女的在问什么？", "choice": ["去哪儿", "几点", "多少钱"],
                                                  "answer": "去哪儿"}], "m1-1"]]
    p = tmp_path / "d-dev.json"
    p.write_text(json.dumps(data, ensure_ascii=False))
    (item,) = read_items("clue_c3", p)
    assert item.context.startswith("男：你好。\n女：") and item.context.endswith("问题：女的在问什么？\n答案：")
    assert item.choices == ["去哪儿", "几点", "多少钱"] and item.label == 0 and item.id == "m1-1/0"


def test_clue_chid(tmp_path):
    rec = {"candidates": ["一帆风顺", "通力合作", "有的放矢"],
           "content": ["各方面密切配合、#idiom000001#。还要#idiom000002#地工作。"]}
    p = write_jsonl(tmp_path / "dev.json", [rec])
    (tmp_path / "dev_answer.json").write_text(json.dumps({"#idiom000001#": 1, "#idiom000002#": 2}))
    items = read_items("clue_chid", p)
    assert [i.label for i in items] == [1, 2]
    assert items[0].context == f"各方面密切配合、{BLANK}。还要____地工作。"
    assert items[1].context == f"各方面密切配合、____。还要{BLANK}地工作。"


# ---------------------------------------------------------------------------------------------
# BIG-bench
# ---------------------------------------------------------------------------------------------
def test_bigbench_multiple_choice_and_generative(tmp_path):
    task = {"name": "toy", "description": "toy", "keywords": ["toy"], "metrics": ["multiple_choice_grade"],
            "preferred_score": "multiple_choice_grade",
            "examples": [{"input": "2+2?", "target_scores": {"3": 0, "4": 1, "5": 0}},
                         {"input": "Sky colour?", "target_scores": {"blue": 1, "red": 0}}]}
    p = tmp_path / "task.json"
    p.write_text(json.dumps(task, indent=2))
    items = read_items("bigbench", p)
    assert items[0].context == "\nQ: 2+2?\n  choice: 3\n  choice: 4\n  choice: 5\nA:"
    assert items[0].choices == ["3", "4", "5"] and items[0].label == 1 and items[0].choice_scores == [0, 1, 0]
    gen = {"name": "g", "task_prefix": "Answer briefly.", "example_input_prefix": "\nQuestion: ",
           "example_output_prefix": "\nAnswer: ", "examples": [{"input": "Capital of France?", "target": ["Paris", "paris"]}]}
    p.write_text(json.dumps(gen))
    (item,) = read_items("bigbench", p)
    assert item.context == "Answer briefly.\nQuestion: Capital of France?\nAnswer:" and item.targets == ["Paris", "paris"]
    p.write_text(json.dumps({"examples": [{"input": "x"}]}))
    with pytest.raises(DataError, match="neither"):
        read_items("bigbench", p)


# ---------------------------------------------------------------------------------------------
# The user-data task YAMLs, pointed at small files through their environment variables
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from glm130b.config import GLMConfig
    from glm130b.model.glm import GLMModel

    torch.manual_seed(0)
    return GLMModel(GLMConfig.from_preset("tiny", max_seq_len=128)).eval()


@pytest.fixture
def clue_dir(tmp_path, monkeypatch):
    root = tmp_path / "clue"
    for name, recs in {
        "afqmc_public/dev.json": [{"sentence1": "花呗", "sentence2": "借呗", "label": "0"}],
        "cmnli_public/dev.json": [{"sentence1": "下雨了。", "sentence2": "地湿了", "label": "entailment"}],
        "ocnli_public/dev.json": [{"sentence1": "下雨了。", "sentence2": "地干了", "label": "contradiction"}],
        "cluewsc2020_public/dev.json": [{"target": {"span1_text": "狗", "span2_text": "它", "span1_index": 0,
                                                    "span2_index": 3}, "idx": 0, "label": "true", "text": "狗说它饿了。"}],
        "csl_public/dev.json": [{"id": 0, "abst": "摘要。", "keyword": ["摘要"], "label": "1"}],
        "chid_public/dev.json": [{"candidates": ["一帆风顺", "通力合作"], "content": ["大家#idiom000007#。"]}],
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(root / name, recs)
    (root / "chid_public/dev_answer.json").write_text('{"#idiom000007#": 1}')
    (root / "c3_public").mkdir()
    (root / "c3_public/d-dev.json").write_text(json.dumps(
        [[["甲：吃了吗？"], [{"question": "甲问什么？", "choice": ["吃饭", "睡觉"], "answer": "吃饭"}], "d1"]], ensure_ascii=False))
    monkeypatch.setenv("CLUE_DATA", str(root))
    return root


@pytest.mark.parametrize("name", ["clue_afqmc", "clue_cmnli", "clue_ocnli", "clue_cluewsc", "clue_csl", "clue_c3",
                                  "clue_chid"])
def test_clue_task_yamls_run(name, clue_dir, model):
    result = run_task(model, default_tokenizer(), load_task(name))
    assert result.n == 1 and 0.0 <= result.metrics["acc"] <= 1.0


def test_bigbench_task_yamls_run(tmp_path, monkeypatch, model):
    p = tmp_path / "task.json"
    p.write_text(json.dumps({"examples": [{"input": "1+1?", "target_scores": {"2": 1, "3": 0.5}},
                                          {"input": "Say hi", "target": "hi"}]}))
    monkeypatch.setenv("BIGBENCH_TASK", str(p))
    with pytest.raises(DataError):  # a task mixing both kinds is read, but mul needs choices for every item
        run_task(model, default_tokenizer(), load_task("bigbench_mul"))
    p.write_text(json.dumps({"examples": [{"input": "1+1?", "target_scores": {"2": 1, "3": 0.5}}]}))
    result = run_task(model, default_tokenizer(), load_task("bigbench_mul"))
    assert result.metrics["mc_grade"] in (1.0, 0.5)
    p.write_text(json.dumps({"examples": [{"input": "Say hi", "target": "hi"}]}))
    result = run_task(model, default_tokenizer(), load_task("bigbench_gen"))
    assert set(result.metrics) >= {"em", "f1"} and len(load_items(load_task("bigbench_gen"))) == 1
