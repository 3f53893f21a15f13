"""`glm130b eval` end to end on a small random model folder, with --limit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from glm130b.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from glm130b.checkpoint import save_model
    from glm130b.config import GLMConfig
    from glm130b.model.glm import GLMModel
    from glm130b.tokenizer import default_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eval-model") / "tiny"
    save_model(out, GLMModel(GLMConfig.from_preset("tiny", max_seq_len=128)), default_tokenizer())
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_table_and_writes_json(model_dir, tmp_path, capsys):
    out_json = tmp_path / "results.json"
    code, out, err = run(capsys, "eval", "--model", model_dir, "--limit", 3, "--output", out_json, "--no-progress",
                         "lambada_openai", "lambada", "mmlu", "zh_classics_cloze", "heldout_ppl")
    assert code == 0, err
    assert out.startswith("| task") and "lambada_openai" in out and "STEM" in out and "items/s" in out
    report = json.loads(out_json.read_text())
    assert len(report["model"]["weights_sha256"]) == 64 and report["model"]["config"]["name"] == "tiny"
    assert report["limit"] == 3 and report["precision"] == "fp32" and report["seconds"] > 0
    tasks = report["tasks"]
    assert set(tasks) == {"lambada_openai", "lambada", "mmlu", "zh_classics_cloze", "heldout_ppl"}
    assert tasks["lambada_openai"]["n"] == 3 and {"acc", "acc_stderr", "ppl", "ppl_stderr"} <= set(tasks["lambada_openai"]["metrics"])
    assert tasks["mmlu"]["n"] == 3 * 57 and set(tasks["mmlu"]["groups"]) == {"STEM", "humanities", "social sciences", "other"}
    assert tasks["heldout_ppl"]["config"]["type"] == "lm" and "bits_per_byte" in tasks["heldout_ppl"]["metrics"]
    assert all("samples" not in t for t in tasks.values())


def test_eval_a_yaml_file_with_samples(model_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"q": "In the beginning God created the heaven and the", "a": "earth"}\n')
    yaml_path = tmp_path / "qa.yaml"
    yaml_path.write_text("name: my_qa\ntype: gen\nformat: gen_jsonl\npath: qa.jsonl\nmax_new_tokens: 4\n"
                         "options: {template: '{q}', targets_field: a}\n")
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, "eval", "--model", model_dir, "--output", out_json, "--samples", "--no-progress", yaml_path)
    assert code == 0, err
    sample = json.loads(out_json.read_text())["tasks"]["my_qa"]["samples"][0]
    assert sample["targets"] == ["earth"] and isinstance(sample["prediction"], str)


def test_compare_precisions(model_dir, capsys):
    code, out, err = run(capsys, "eval", "--model", model_dir, "--limit", 2, "--no-progress", "--compare", "fp32,bf16",
                         "piqa")
    assert code == 0, err
    assert "Δ bf16" in out and out.count("piqa") >= 3


@pytest.mark.skipif(importlib.util.find_spec("glm130b.quant") is not None, reason="glm130b.quant exists")
def test_bits_without_quantization_is_a_clear_error(model_dir, capsys):
    code, _, err = run(capsys, "eval", "--model", model_dir, "--bits", 4, "piqa")
    assert code == 2 and err.startswith("error: ") and "glm130b.quant" in err and err.count("\n") == 1
    code, _, err = run(capsys, "eval", "--model", model_dir, "--compare", "fp32,int8", "piqa")
    assert code == 2 and "glm130b.quant" in err


@pytest.mark.skipif(importlib.util.find_spec("glm130b.quant") is None, reason="glm130b.quant not built yet")
def test_bits_with_quantization(model_dir, capsys):
    code, out, err = run(capsys, "eval", "--model", model_dir, "--limit", 2, "--no-progress", "--compare",
                         "fp32,int8,int4", "piqa")
    assert code == 0, err
    assert "Δ int8" in out and "Δ int4" in out


def test_bad_eval_input_gives_one_line_errors(model_dir, tmp_path, capsys):
    for argv, needle in [
        (["eval", "--model", model_dir, "no_such_task"], "unknown task"),
        (["eval", "--model", tmp_path / "missing", "piqa"], "not found"),
        (["eval", "--model", model_dir, "--compare", "fp32,fp8", "piqa"], "unknown precision"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_eval_compile_decodes_generation_tasks_through_the_compiled_step(model_dir, tmp_path, capsys, monkeypatch):
    """`eval --compile`: the gen task's predictions come from the static-cache step (uncompiled
    here, GLM130B_COMPILE_MODE=eager: the plumbing, not inductor) and equal the plain ones."""
    from glm130b.infer import compiled

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": "x"}) + "\n" for q in
                            ("In the beginning God created the", "And God said, Let there be", "起初，神创造")))
    yaml_path = tmp_path / "qa.yaml"
    yaml_path.write_text("name: my_qa\ntype: gen\nformat: gen_jsonl\npath: qa.jsonl\nmax_new_tokens: 5\n"
                         "options: {template: '{q}', targets_field: a}\n")
    steps = []
    step = compiled.CompiledDecoder.step

    def counted(self, *args):
        steps.append(1)
        return step(self, *args)

    predictions = []
    for extra in ([], ["--compile"]):
        out_json = tmp_path / f"r{len(extra)}.json"
        code, _, err = run(capsys, "eval", "--model", model_dir, "--output", out_json, "--samples", "--no-progress",
                           *extra, yaml_path)
        assert code == 0, err
        predictions.append([s["prediction"] for s in json.loads(out_json.read_text())["tasks"]["my_qa"]["samples"]])
        if not extra:  # from here on, count the compiled decoder's steps
            monkeypatch.setenv(compiled.MODE_ENV, "eager")
            monkeypatch.setattr(compiled.CompiledDecoder, "step", counted)
    assert predictions[1] == predictions[0] and len(predictions[0]) == 3
    assert steps  # the compiled decoder ran the decode steps
