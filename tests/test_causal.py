"""The causal (GPT) baseline: its samples, its training, and its scoring as a causal LM.

Samples use synthetic ids 100..999 (specials 0..6) as tests/test_objective.py does.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from glm130b.config import GLMConfig
from glm130b.data.objective import GLMSampleBuilder, ObjectiveConfig, SpecialIds, collate
from glm130b.eval.scoring import causal_rows, choice_row, is_causal, score_rows, single_token_row
from glm130b.model.glm import GLMModel
from glm130b.model.masks import attention_allowed

IDS = SpecialIds(mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6, pad=0)


def docs(seed: int, n: int, max_len: int = 200) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randint(100, 999) for _ in range(r.randint(1, max_len))] for _ in range(n)]


def stream_of(documents) -> list[int]:
    return [t for d in documents for t in d + [IDS.eos]]


def causal_builder(seq_len: int = 32, seed: int = 0, **kw) -> GLMSampleBuilder:
    return GLMSampleBuilder(ObjectiveConfig(seq_len, objective="causal", **kw), IDS, seed)


def test_causal_samples_predict_the_next_token_everywhere():
    documents = docs(1, 60)
    stream = stream_of(documents)
    samples = list(causal_builder(32).samples(documents))
    assert {s.mode for s in samples} == {"causal"}
    seen = []
    for k, s in enumerate(samples):
        n = s.num_source_tokens
        start = len(seen)
        seen += s.input_ids[:n].tolist()
        assert s.context_length == 0 and s.blocks == ()
        assert s.position_ids.tolist() == list(range(n)) + [0] * (32 - n)
        # every input token predicts the stream token after it; only the stream's last has none
        targets = stream[start + 1 : start + n + 1]
        assert s.targets[: len(targets)].tolist() == targets
        assert s.loss_mask.tolist() == [1.0] * len(targets) + [0.0] * (32 - len(targets))
        assert s.input_ids[n:].eq(IDS.pad).all() and s.targets[len(targets):].eq(IDS.pad).all()
        if k < len(samples) - 1:
            assert n == 32 and len(targets) == 32
    assert seen == stream  # every stream token is an input exactly once


def test_causal_batch_attention_is_causal():
    batch = collate(list(causal_builder(16).samples(docs(2, 10)))[:3])
    assert batch["context_lengths"].tolist() == [0, 0, 0]
    allowed = attention_allowed(16, batch["context_lengths"])
    assert torch.equal(allowed[0, 0], torch.ones(16, 16, dtype=torch.bool).tril())


def test_causal_instruction_sample():
    b = causal_builder(16)
    s = b.causal_instruction_sample(list(range(100, 120)), [500, 501, 502])
    assert s.mode == "instruction" and s.num_source_tokens == 0 and s.context_length == 0
    # prompt + answer + <eos> = 17 tokens (the prompt lost its first 7): inputs 16, targets the 16 after
    assert s.input_ids.tolist() == list(range(107, 120)) + [500, 501, 502]
    assert s.targets.tolist() == list(range(108, 120)) + [500, 501, 502, IDS.eos]
    assert s.loss_mask.tolist() == [0.0] * 12 + [1.0] * 4  # the answer and <eos> only
    empty = b.causal_instruction_sample([], [500])
    assert empty.input_ids[:2].tolist() == [IDS.eos, 500] and empty.targets[:2].tolist() == [500, IDS.eos]
    assert b.max_answer_tokens == 15  # the answer and <eos> fill the window
    assert b.causal_instruction_sample([100], list(range(100, 115))).loss_mask.sum() == 16
    with pytest.raises(ValueError, match="cannot fit seq_len 16"):
        b.causal_instruction_sample([100], list(range(100, 116)))
    mixed = list(causal_builder(32, instruction_share=0.3).samples(docs(3, 40), iter([([100], [200, 201])] * 1000)))
    assert {s.mode for s in mixed} == {"causal", "instruction"}


def test_causal_resume_is_exact():
    documents = docs(4, 80)
    pairs = [([100 + i], [200 + i]) for i in range(300)]
    full = list(causal_builder(24, seed=3, instruction_share=0.2).samples(documents, iter(pairs)))
    first = causal_builder(24, seed=3, instruction_share=0.2)
    it = first.samples(documents, iter(pairs))
    head = [next(it) for _ in range(41)]
    resumed = causal_builder(24, seed=3, instruction_share=0.2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = list(resumed.samples(documents, iter(pairs)))
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.loss_mask, b.loss_mask)


def test_bad_objective():
    with pytest.raises(ValueError, match="objective"):
        ObjectiveConfig(32, objective="gpt")
    with pytest.raises(ValueError, match="2D"):
        ObjectiveConfig(32, objective="causal", two_d=True)


# ---------------------------------------------------------------------------------------------
# Scoring a causal model
# ---------------------------------------------------------------------------------------------
def causal_model() -> GLMModel:
    torch.manual_seed(0)
    cfg = GLMConfig(name="t", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48,
                    max_seq_len=64, extra={"objective": "causal"})
    return GLMModel(cfg).eval()


def reference_logprob(model, ids: list[int], targets: list[int]) -> float:
    """log p(targets | ids) by a plain causal forward over ids + targets[:-1]."""
    seq = ids + targets[:-1]
    n = len(seq)
    with torch.no_grad():
        logits = model(torch.tensor([seq]), torch.arange(n).unsqueeze(0), allowed=attention_allowed(n, 0))
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(targets))


def test_causal_scoring_is_a_plain_causal_lm():
    model = causal_model()
    assert is_causal(model) and not is_causal(GLMModel(GLMConfig.from_preset("tiny", vocab_size=64)))
    bos, sop, gmask = 6, 4, 2
    context, choices = [10, 11, 12, 13], [[20, 21, 22], [30], [40, 41]]
    packed = choice_row(context + [gmask], len(context), True, choices, sop)  # GLM layout: one row
    (scores,) = score_rows(model, [packed], pad_id=0, causal_bos=bos)
    for k, cont in enumerate(choices):
        assert math.isclose(scores.logprob[k], reference_logprob(model, [bos] + context, cont), abs_tol=1e-4)
        assert scores.num_tokens[k] == len(cont)
    # one-token choices through the single-token row, and the mutual-information prior (blank only)
    (single,) = score_rows(model, [single_token_row(context + [gmask], 4, True, [20, 30], sop)], 0, causal_bos=bos)
    assert math.isclose(single.logprob[1], reference_logprob(model, [bos] + context, [30]), abs_tol=1e-4)
    (prior,) = score_rows(model, [choice_row([gmask], 0, True, [[20, 21]], sop)], 0, causal_bos=bos)
    assert math.isclose(prior.logprob[0], reference_logprob(model, [bos], [20, 21]), abs_tol=1e-4)


def test_causal_rows_drop_the_blank_and_keep_targets():
    row = choice_row([10, 11, 1, 12, 13], 2, False, [[20, 21], [30]], sop_id=4, tag="x")
    parts = causal_rows(row, bos_id=6)
    assert [p.ids for p in parts] == [[6, 10, 11, 20], [6, 10, 11]]  # the text after a [MASK] is not seen
    assert [p.pairs for p in parts] == [[(2, 20), (3, 21)], [(2, 30)]]
    assert [p.owners for p in parts] == [[0, 0], [1]] and all(p.context_length == 0 for p in parts)
    assert all(p.tag == "x" for p in parts)


# ---------------------------------------------------------------------------------------------
# Training and evaluating a causal run
# ---------------------------------------------------------------------------------------------
def test_a_causal_run_is_recorded_and_evaluated_as_causal(tmp_path):
    from glm130b.checkpoint import load_model
    from glm130b.eval.runner import evaluate
    from glm130b.tokenizer import default_tokenizer
    from glm130b.train.trainer import TrainConfig, train

    out = tmp_path / "gpt"
    train(TrainConfig(preset="tiny", out=str(out), steps=3, batch_size=2, seq_len=32, warmup_steps=2,
                      objective="causal", sources=("en_kjv", "zh_cuv"),
                      model_overrides={"num_layers": 1, "hidden_size": 64, "num_heads": 2, "ffn_hidden_size": 96}),
          default_tokenizer(), progress=False)
    assert json.loads((out / "config.json").read_text())["extra"]["objective"] == "causal"
    assert json.loads((out / "train_config.json").read_text())["objective"] == "causal"
    model, tokenizer = load_model(out)
    assert is_causal(model)
    tasks = evaluate(model, tokenizer, ["zh_classics_cloze", "heldout_ppl"], limit=3)["tasks"]
    assert 0.0 <= tasks["zh_classics_cloze"]["metrics"]["acc"] <= 1.0
    assert 1.0 < tasks["heldout_ppl"]["metrics"]["token_ppl"] < float("inf")


def test_comparison_table_is_written_between_the_markers(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "compare_objectives.py"
    spec = importlib.util.spec_from_file_location("compare_objectives", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    runs = []
    for label, objective, ppl in (("GLM", "glm", 80.0), ("GPT", "causal", 90.0)):
        run = tmp_path / label
        run.mkdir()
        (run / "train_config.json").write_text(json.dumps({"preset": "base", "objective": objective}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "tokens": 40_000_000, "time_s": 600}) + "\n")
        ppl_metrics = {"token_ppl": ppl, "bits_per_byte": 2.0, "bytes": 1000}
        tasks = {"heldout_ppl": {"metrics": ppl_metrics}, "heldout_ppl_base": {"metrics": {**ppl_metrics, "bits_per_byte": 1.0}},
                 "bilingual_verse_match": {"metrics": {"acc": 0.3, "acc_mutual_info": 0.4}}}
        runs.append((label, run, {"tasks": tasks}))
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{tool.BEGIN}\nold\n{tool.END}\nafter\n")
    tool.write_between_markers(doc, tool.table(runs))
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| GLM | glm | base | 40.0M | 10.0 | 80.0 | 80.0 | 1.500 | 30.0% | 40.0% | - | - |" in text
    assert "| GPT | causal | base |" in text


@pytest.mark.slow  # two tiny training runs side by side for 30 s, their evaluation and packaging
def test_the_base_plan_runs_in_a_time_budget_and_returns_few_files(tmp_path):
    """tools/train_base.sh as a lent GPU runs it, at the tiny scale on the CPU: both runs sized by
    one time budget train equal steps; the table has both rows; what comes back (RETURN) is at
    most 8 files, and the gzipped weight parts join into the packaged model's file."""
    import gzip
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    work, back, doc = tmp_path / "work", tmp_path / "return", tmp_path / "table.md"
    env = {**os.environ, "PY": sys.executable, "TIME_BUDGET": "30", "PRESET": "tiny", "SEQ": "64", "BATCH": "4",
           "DEVICE": "cpu", "PRECISION": "fp32", "COMPILE": "", "EVAL_LIMIT": "3", "SIDE_BY_SIDE": "1",
           "DOC": str(doc), "WORK": str(work), "RETURN": str(back), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(root / "tools" / "train_base.sh")], env=env, capture_output=True, text=True,
                         errors="replace", timeout=600)  # (a log's tail may cut a character)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    shared = json.loads((work / "steps.json").read_text())["steps"]
    for n in ("glm", "gpt"):  # the shared count, unless the run overran its budget and stopped (noisy CPU)
        steps = json.loads((work / f"run-{n}" / "train_config.json").read_text())["steps"]
        assert steps == shared or (steps < shared and "stopping at step" in (work / f"train-{n}.log").read_text())
    text = doc.read_text()
    assert "| GLM | glm | tiny |" in text and "| GPT | causal | tiny |" in text
    files = sorted(p.name for p in back.iterdir())
    assert len(files) <= 8 and "base.tgz" in files
    joined = gzip.decompress(b"".join((back / f).read_bytes() for f in files if f.startswith("weights.gz.part-")))
    assert joined == (work / "ship" / "glm-base" / "model.safetensors").read_bytes()


def _train_base(tmp_path, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PY": sys.executable, "PRESET": "tiny", "DEVICE": "cpu", "PRECISION": "fp32", "COMPILE": "",
           "EVAL_LIMIT": "3", "DOC": str(tmp_path / "table.md"), "OMP_NUM_THREADS": "1", **env}
    for name in ("TIME_BUDGET", "TOKENS", "STEPS", "SEQ", "BATCH", "LR", "WARMUP"):
        if name not in env or env[name] is None:
            env.pop(name, None)
    return subprocess.run(["bash", str(root / "tools" / "train_base.sh")], env=env, capture_output=True, text=True,
                          errors="replace", timeout=600)


def _record(folder, objective="glm", seq_len=64, **data):
    """An earlier run's record as base.tgz brings it back (train_config.json, metrics, eval), its
    data settings those of configs/base.yaml unless `data` says otherwise."""
    folder.mkdir(parents=True)
    label = "gpt" if objective == "causal" else "glm"
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "base.yaml").read_text())
    cfg = {"preset": "tiny", "seq_len": seq_len, "batch_size": 4, "steps": 3, "lr": 0.001, "warmup_steps": 1,
           "objective": objective, "grad_accum": 1,
           **{k: base[k] for k in ("sources", "instructions", "instruction_share", "pack_instructions", "gmask_prob")},
           **data}
    (folder / "train_config.json").write_text(json.dumps(cfg))
    (folder / "metrics.jsonl").write_text("")
    (folder / f"eval-{label}.json").write_text("{}")
    return folder


@pytest.mark.parametrize("env, says", [
    ({"OBJECTIVES": "glm bert"}, "OBJECTIVES takes glm and/or gpt, not 'bert'"),
    ({"OBJECTIVES": "gpt", "SEQ": "128"}, "SEQ=128, but the earlier glm run"),
    ({"OBJECTIVES": "glm"}, "is a glm run; OBJECTIVES must then name only the other one"),
    ({"OBJECTIVES": "gpt", "TIME_BUDGET": "60"}, "leave TOKENS and TIME_BUDGET unset"),
    ({"OBJECTIVES": "gpt", "PREVIOUS": "missing"}, "is not an earlier run's record"),
    ({"OBJECTIVES": "gpt", "record": {"pack_instructions": False}}, "configs/base.yaml has pack_instructions: True"),
])
def test_the_base_plan_refuses_a_previous_run_it_cannot_equal(tmp_path, env, says):
    """PREVIOUS (an earlier call's run of the other objective) fixes the sizes of this call's run;
    a setting that would break equal tokens (sizes, or data settings that configs/base.yaml no
    longer shares with the record), or a record that is not one, stops before training."""
    env = dict(env)
    record = _record(tmp_path / "rec", **env.pop("record", {}))
    env = {"PREVIOUS": str(record), "WORK": str(tmp_path / "work"), **env}
    if env["PREVIOUS"] == "missing":
        env["PREVIOUS"] = str(tmp_path / "nothing")
    out = _train_base(tmp_path, **env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert says in out.stderr
    assert not (tmp_path / "work" / "run-gpt").exists()


@pytest.mark.slow  # two tiny training runs in two calls, each evaluated and (GLM) packaged
def test_the_base_plan_over_two_calls_trains_equal_tokens_and_writes_one_table(tmp_path):
    """OBJECTIVES=glm in one call (the whole GPU to the shipped model), then OBJECTIVES=gpt with
    PREVIOUS = the first call's record from base.tgz: the GPT run trains the recorded steps of the
    recorded shape, and the table holds both rows; the second call packages nothing."""
    import tarfile

    common = {"EVAL_LIMIT": "3", "SIDE_BY_SIDE": "1"}
    first = _train_base(tmp_path, OBJECTIVES="glm", SEQ="64", BATCH="4", STEPS="3", WORK=str(tmp_path / "w1"),
                        RETURN=str(tmp_path / "r1"), **common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4. no table: only glm here" in first.stdout
    assert not (tmp_path / "w1" / "run-gpt").exists()
    with tarfile.open(tmp_path / "r1" / "base.tgz") as tar:
        tar.extractall(tmp_path / "rec", filter="data")
    second = _train_base(tmp_path, OBJECTIVES="gpt", PREVIOUS=str(tmp_path / "rec" / "glm"), WORK=str(tmp_path / "w2"),
                         RETURN=str(tmp_path / "r2"), **common)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    glm = json.loads((tmp_path / "rec" / "glm" / "train_config.json").read_text())
    gpt = json.loads((tmp_path / "w2" / "run-gpt" / "train_config.json").read_text())
    assert gpt["objective"] == "causal"
    for key in ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "preset"):
        assert gpt[key] == glm[key], key
    text = (tmp_path / "table.md").read_text()
    assert "| GLM | glm | tiny |" in text and "| GPT | causal | tiny |" in text and "GLM in an earlier call" in text
    assert sorted(p.name for p in (tmp_path / "r2").iterdir()) == ["base.tgz"]  # nothing packaged
