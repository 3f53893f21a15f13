"""Evaluation harness: the scoring rules (masks, positions, packing, fast paths), task types,
task YAMLs and the shipped evaluation data."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch

from glm130b.config import GLMConfig
from glm130b.eval import metrics as M
from glm130b.eval.formats import BLANK, MMLU_CATEGORIES, Item, read_json_records
from glm130b.eval.scoring import (
    choice_row,
    score_batch,
    score_rows,
    single_token_row,
)
from glm130b.eval.tasks import (
    TaskConfig,
    TaskError,
    available_tasks,
    encode_context,
    greedy_generate,
    lm_windows,
    load_items,
    load_task,
    postprocess,
    run_gen,
    run_ll,
    run_lm,
    run_mul,
)
from glm130b.model.glm import GLMModel
from glm130b.model.masks import Block, attention_allowed, position_ids
from glm130b.tokenizer import default_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def tiny(rotary: str = "1d", seed: int = 0) -> GLMModel:
    torch.manual_seed(seed)
    cfg = GLMConfig.from_preset("tiny", rotary=rotary, num_layers=2, max_seq_len=128)
    return GLMModel(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A tiny model trained for 30 steps: clearly better than random weights on Bible text."""
    from glm130b.checkpoint import load_model
    from glm130b.train.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("eval-run") / "tiny"
    train(TrainConfig(preset="tiny", steps=30, batch_size=4, seq_len=64, warmup_steps=3, lr=3e-3, out=str(out)),
          default_tokenizer())
    return load_model(out)


# ---------------------------------------------------------------------------------------------
# Packed scoring == one choice at a time with the model's own forward and masks.py
# ---------------------------------------------------------------------------------------------
def reference_logprob(model, context, mask_position, continues, cont, sop_id):
    """Score one continuation the plain way: model(...) with masks.position_ids and context_lengths."""
    ids = list(context) + [sop_id] + list(cont[:-1])
    two_d = model.config.rotary == "2d"
    pos = position_ids(len(context), [Block(mask_position, len(cont), continues)], two_d=two_d)
    logits = model(torch.tensor([ids]), pos.unsqueeze(0), context_lengths=torch.tensor([len(context)]))
    logp = torch.log_softmax(logits[0].float(), -1)
    p = len(context)
    return sum(float(logp[p + i, t]) for i, t in enumerate(cont))


@pytest.mark.parametrize("rotary", ["1d", "2d"])
@pytest.mark.parametrize("layout", ["mask_end", "mask_middle", "gmask_end"])
@torch.no_grad()
def test_packed_choices_equal_separate_scoring(rotary, layout, tok):
    model = tiny(rotary)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(10, 16000, (9,), generator=g).tolist()
    if layout == "mask_end":
        context, mpos, continues = text + [tok.mask_id], 9, False
    elif layout == "mask_middle":
        context, mpos, continues = text[:4] + [tok.mask_id] + text[4:], 4, False
    else:
        context, mpos, continues = text + [tok.gmask_id], 9, True
    choices = [torch.randint(10, 16000, (n,), generator=g).tolist() for n in (1, 4, 2, 3)]
    row = choice_row(context, mpos, continues, choices, tok.sop_id)
    (score,) = score_batch(model, [row], tok.pad_id)
    for k, cont in enumerate(choices):
        ref = reference_logprob(model, context, mpos, continues, cont, tok.sop_id)
        assert score.logprob[k] == pytest.approx(ref, abs=1e-4), (k, layout, rotary)
        assert score.num_tokens[k] == len(cont)


@torch.no_grad()
def test_single_token_fast_path_equals_general_path(model, tok):
    context = tok.encode("The capital of France is") + [tok.mask_id]
    choices = [[t] for t in tok.encode(" Paris London Rome")]
    assert len(choices) == 3
    fast = score_batch(model, [single_token_row(context, len(context) - 1, False, [c[0] for c in choices], tok.sop_id)],
                       tok.pad_id)[0]
    slow = score_batch(model, [choice_row(context, len(context) - 1, False, choices, tok.sop_id)], tok.pad_id)[0]
    assert fast.logprob == pytest.approx(slow.logprob, abs=1e-5)
    assert len(fast.logprob) == 3


@torch.no_grad()
def test_batching_and_padding_do_not_change_scores(model, tok):
    g = torch.Generator().manual_seed(2)
    rows = []
    for n_ctx in (3, 17, 8, 30, 12):
        ctx = torch.randint(10, 16000, (n_ctx,), generator=g).tolist() + [tok.gmask_id]
        conts = [torch.randint(10, 16000, (n,), generator=g).tolist() for n in (2, 5)]
        rows.append(choice_row(ctx, n_ctx, True, conts, tok.sop_id))
    rows.append(single_token_row([5, 6, 7, tok.mask_id], 3, False, [100, 200], tok.sop_id))
    one_by_one = score_rows(model, rows, tok.pad_id, batch_tokens=1)
    together = score_rows(model, rows, tok.pad_id, batch_tokens=10_000)
    for a, b in zip(one_by_one, together, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.greedy == b.greedy


@torch.no_grad()
def test_head_skipping_forward_equals_model_forward(model, tok):
    ids = torch.randint(10, 16000, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    allowed = attention_allowed(12, torch.tensor([5, 9]))
    h = model.final_layernorm(model.run_blocks(model.embed(ids), pos, allowed))
    logits = model.head(h)
    assert torch.allclose(logits, model(ids, pos, allowed=allowed), atol=1e-5)

    class Wrapped(torch.nn.Module):  # no GLMModel attributes: the scorer falls back to model(...)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, *a, **k):
            return self.inner(*a, **k)

    row = choice_row(tok.encode("a b c") + [tok.gmask_id], 3, True, [[40, 41, 42], [50]], tok.sop_id)
    assert score_batch(Wrapped(model), [row], 0)[0].logprob == pytest.approx(score_batch(model, [row], 0)[0].logprob, abs=1e-5)


@torch.no_grad()
def test_greedy_flag_marks_the_models_own_continuation(model, tok):
    context = tok.encode("In the beginning") + [tok.gmask_id]
    greedy = greedy_generate(model, tok, context, len(context) - 1, True, 4)
    greedy = [t for t in greedy if t not in (tok.eop_id, tok.eos_id)][:3] or [100]
    other = list(greedy)
    other[-1] = 100 if other[-1] != 100 else 101
    s = score_batch(model, [choice_row(context, len(context) - 1, True, [greedy, other], tok.sop_id)], tok.pad_id)[0]
    assert s.greedy == [True, False]


# ---------------------------------------------------------------------------------------------
# Context encoding
# ---------------------------------------------------------------------------------------------
def test_encode_context_appends_mask_drops_shots_then_truncates(tok):
    item = Item(context="Question?\nAnswer:", preamble="Header.\n\n", shots=["Shot one. " * 5, "Shot two. " * 5])
    ids, mpos = encode_context(tok, item, tok.mask_id, 1000)
    assert ids[-1] == tok.mask_id and mpos == len(ids) - 1
    assert tok.decode(ids[:-1]) == item.preamble + "".join(item.shots) + item.context
    full = len(ids)
    ids2, _ = encode_context(tok, item, tok.mask_id, full - 1)  # the last shot no longer fits
    assert tok.decode(ids2[:-1]) == item.preamble + item.shots[0] + item.context
    ids3, mpos3 = encode_context(tok, Item(context="word " * 50), tok.mask_id, 10)
    assert len(ids3) == 10 and ids3[-1] == tok.mask_id and mpos3 == 9  # cut from the left


def test_encode_context_inline_blank(tok):
    ids, mpos = encode_context(tok, Item(context=f"Paris is the {BLANK} of France."), tok.mask_id, 100)
    assert ids[mpos] == tok.mask_id and ids.count(tok.mask_id) == 1
    assert tok.decode(ids[mpos + 1:]) == " of France."


# ---------------------------------------------------------------------------------------------
# Task types end to end (random tiny model)
# ---------------------------------------------------------------------------------------------
def mul_cfg(**kw) -> TaskConfig:
    return TaskConfig(name="t", type="mul", format="mul_jsonl", path="x", **kw)


@torch.no_grad()
def test_mul_scores_match_reference_and_metrics(model, tok):
    items = [Item(context="The sky is", choices=["blue", "green", "a colour of the evening"], label=0),
             Item(context="One plus one is", choices=["two", "three"], label=1)]
    result = run_mul(model, tok, mul_cfg(), items)
    for item, sample in zip(items, result.samples, strict=True):
        ctx = tok.encode(item.context) + [tok.mask_id]
        for k, choice in enumerate(item.choices):
            ref = reference_logprob(model, ctx, len(ctx) - 1, False, tok.encode(" " + choice), tok.sop_id)
            assert sample["logprobs"][k] == pytest.approx(ref, abs=1e-4)
    expected = [float(s["pred"] == it.label) for s, it in zip(result.samples, items, strict=True)]
    assert result.metrics["acc"] == pytest.approx(sum(expected) / 2)
    assert {"acc", "acc_stderr", "acc_norm", "acc_tok"} <= set(result.metrics)


@torch.no_grad()
def test_mul_mutual_info_subtracts_each_choices_prior(model, tok):
    """acc_mutual_info picks argmax(log p(choice | prompt) - log p(choice | mask token alone))."""
    items = [Item(context=f"Question {i}: the sky is", choices=["blue", "green", "a colour of the evening", "grey"],
                  label=i % 4) for i in range(8)]
    result = run_mul(model, tok, mul_cfg(metrics=["acc", "acc_mutual_info"]), items)
    hits = []
    for item, sample in zip(items, result.samples, strict=True):
        prior = [reference_logprob(model, [tok.mask_id], 0, False, tok.encode(" " + c), tok.sop_id)
                 for c in item.choices]
        calibrated = [lp - p for lp, p in zip(sample["logprobs"], prior, strict=True)]
        hits.append(float(max(range(4), key=lambda k: (calibrated[k], -k)) == item.label))
    assert result.metrics["acc_mutual_info"] == pytest.approx(sum(hits) / len(hits))
    assert "acc_mutual_info" not in run_mul(model, tok, mul_cfg(), items[:1]).metrics  # only on request


@torch.no_grad()
def test_mul_splits_rows_when_choices_do_not_fit(tok):
    model = tiny()
    model.config.max_seq_len = 40
    long_choices = ["word " * 12, "other " * 12, "third " * 12]
    item = Item(context="Pick one:", choices=long_choices, label=2)
    packed = run_mul(model, tok, mul_cfg(), [item]).samples[0]["logprobs"]
    for k, choice in enumerate(long_choices):
        ctx = tok.encode(item.context) + [tok.mask_id]
        ref = reference_logprob(model, ctx, len(ctx) - 1, False, tok.encode(" " + choice), tok.sop_id)
        assert packed[k] == pytest.approx(ref, abs=1e-4)


@torch.no_grad()
def test_ll_task_acc_and_perplexity(model, tok):
    items = [Item(context="And God said, Let there be", choices=["light"]), Item(context="Hello", choices=["world"])]
    cfg = TaskConfig(name="l", type="ll", format="lambada", path="x")
    result = run_ll(model, tok, cfg, items)
    lls = [s["loglikelihood"] for s in result.samples]
    ctx = tok.encode(items[0].context) + [tok.gmask_id]
    assert lls[0] == pytest.approx(reference_logprob(model, ctx, len(ctx) - 1, True, tok.encode(" light"), tok.sop_id),
                                   abs=1e-4)
    assert result.metrics["ppl"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-6)


@torch.no_grad()
def test_gen_stops_early_and_matches_plain_generation(model, tok):
    from glm130b.infer.generate import generate_block

    ctx = tok.encode("The word is") + [tok.gmask_id]
    full = generate_block(model, ctx, Block(len(ctx) - 1, 0, True), tok.sop_id, {tok.eop_id, tok.eos_id}, 12)
    short = greedy_generate(model, tok, ctx, len(ctx) - 1, True, 12, should_stop=lambda text: len(text) >= 1)
    assert short == full[: len(short)] and 1 <= len(short) <= len(full)
    items = [Item(context="The word is", targets=[tok.decode(full).strip().split(" ")[0].strip(".,!?;:") or "x"])]
    cfg = TaskConfig(name="g", type="gen", format="lambada", path="x", postprocess="first_word", max_new_tokens=12,
                     gen_batch_size=1)
    result = run_gen(model, tok, cfg, items)
    assert result.samples[0]["prediction"] == postprocess(tok.decode(full), "first_word", [])
    assert set(result.metrics) >= {"acc", "em", "f1", "acc_stderr"}


@torch.no_grad()
def test_batched_generation_gives_the_one_at_a_time_predictions(tok):
    model = tiny(seed=3)
    items = [Item(context=c, targets=["x"]) for c in
             ("And God said, Let there be", "In the beginning", "He opened the door and saw his old friend",
              "起初，神创造")]
    results = {}
    for bs in (1, 3):
        cfg = TaskConfig(name="g", type="gen", format="lambada", path="x", postprocess="first_word",
                         max_new_tokens=6, gen_batch_size=bs)
        results[bs] = [s["prediction"] for s in run_gen(model, tok, cfg, items).samples]
    assert results[1] == results[3]


def test_postprocess():
    assert postprocess(" light. And it", "first_word", []) == "light"
    assert postprocess("“Harlin,” he said", "first_word", []) == "Harlin"
    assert postprocess("answer\nmore", "first_line", []) == "answer"
    assert postprocess("abc STOP def", None, ["STOP"]) == "abc"


# ---------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100])
def test_lm_windows_score_every_token_once(n):
    tokens = list(range(100, 100 + n))
    windows = lm_windows(tokens, max_length=32, stride=10)
    scored = [t for _, text in windows for t in text]
    assert scored == tokens
    for prompt, text in windows:
        assert len(prompt) + len(text) <= 31
        if prompt:  # the prompt is exactly the tokens before the scored ones
            start = tokens.index(text[0])
            assert prompt == tokens[start - len(prompt) : start]


@torch.no_grad()
def test_lm_task_equals_hand_computed_windows(tok, tmp_path):
    model = tiny()
    model.config.max_seq_len = 24
    en = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    zh = "起初，神创造天地。地是空虚混沌，渊面黑暗。"
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "lang": lang, "text": t}, ensure_ascii=False)
                              for i, (lang, t) in enumerate([("en", en), ("zh", zh)])) + "\n")
    cfg = load_task({"name": "h", "type": "lm", "format": "text_jsonl", "path": str(path), "stride": 8,
                     "word_split": "cjk", "options": {"group_field": "lang"}})
    result = run_lm(model, tok, cfg, load_items(cfg))
    total = 0.0
    for text in (en, zh):
        tokens = tok.encode(text)
        for prompt, scored in lm_windows(tokens, 24, 8):
            ctx = prompt + [tok.gmask_id]
            total -= reference_logprob(model, ctx, len(prompt), True, scored, tok.sop_id)
    n_tokens = len(tok.encode(en)) + len(tok.encode(zh))
    assert result.metrics["token_ppl"] == pytest.approx(math.exp(total / n_tokens), rel=1e-4)
    n_bytes = len(en.encode()) + len(zh.encode())
    assert result.metrics["bits_per_byte"] == pytest.approx(total / n_bytes / math.log(2), rel=1e-4)
    words = len(en.split()) + sum(1 for ch in zh if "\u4e00" <= ch <= "\u9fff")
    assert result.metrics["words"] == words
    assert set(result.subtasks) == {"en", "zh"}


@pytest.mark.slow  # trains for 30 steps: 10-25 s on a busy 2-core machine
def test_trained_model_beats_random_on_heldout_text(trained_tiny, tok, tmp_path):
    trained, _ = trained_tiny
    docs = [{"id": "a", "lang": "en", "text": "And God said, Let there be light: and there was light. " * 3},
            {"id": "b", "lang": "zh", "text": "神说：“要有光”，就有了光。神看光是好的，就把光暗分开了。"}]
    path = tmp_path / "h.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    cfg = load_task({"name": "h", "type": "lm", "format": "text_jsonl", "path": str(path)})
    random_ppl = run_lm(tiny(), tok, cfg, load_items(cfg)).metrics["token_ppl"]
    trained_ppl = run_lm(trained, tok, cfg, load_items(cfg)).metrics["token_ppl"]
    assert trained_ppl < random_ppl / 2, (trained_ppl, random_ppl)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def test_squad_metrics():
    assert M.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert M.exact_match("the Fox.", "fox") == 1.0
    assert M.f1_score("quick brown dog", "the quick brown fox") == pytest.approx(2 / 3)
    assert M.max_over_references(M.f1_score, "fox", ["dog", "a fox"]) == 1.0
    assert M.f1_score("北京大学", "北京") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))


def test_stderr():
    values = [1.0, 0.0, 1.0, 1.0]
    p, n = 0.75, 4
    assert M.mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert math.isnan(M.mean_stderr([1.0]))
    assert M.ratio_stderr([2.0, 4.0], [1.0, 2.0]) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# Task YAMLs and shipped data
# ---------------------------------------------------------------------------------------------
SHIPPED = {"lambada": 5153, "lambada_openai": 5153, "mmlu": 14042, "mmlu_5shot": 14042, "hellaswag": 10042,
           "piqa": 1838, "zh_classics_cloze": 500, "bilingual_verse_match": 500}
USER_DATA = ["clue_afqmc", "clue_cmnli", "clue_ocnli", "clue_cluewsc", "clue_csl", "clue_c3", "clue_chid",
             "bigbench_mul", "bigbench_gen"]


def test_every_task_yaml_loads():
    names = available_tasks()
    assert set(SHIPPED) | set(USER_DATA) | {"heldout_ppl"} <= set(names)
    for name in names:
        cfg = load_task(name)
        assert cfg.name == name and cfg.source.endswith(f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_tasks_read_their_data(name):
    cfg = load_task(name)
    assert cfg.resolve(cfg.path).is_relative_to(ROOT / "data" / "eval")
    items = load_items(cfg)
    assert len(items) == SHIPPED[name]
    if cfg.type == "mul":
        assert all(0 <= it.label < len(it.choices) for it in items)


def test_shipped_task_prompts(tok):
    verse = load_items(load_task("bilingual_verse_match"), limit=1)[0]
    assert verse.context.startswith("Translate into Chinese: ") and len(verse.choices) == 4
    mmlu = load_items(load_task("mmlu_5shot"), limit=1)
    assert len(mmlu) == 57 and {it.group for it in mmlu} == set(MMLU_CATEGORIES)
    assert len(mmlu[0].shots) == 5 and mmlu[0].context.endswith("\nAnswer:")
    assert mmlu[0].preamble == "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    lam = load_items(load_task("lambada_openai"), limit=1)[0]
    assert lam.context + " " + lam.choices[0] == read_json_records(ROOT / "data/eval/lambada_openai_test.jsonl.gz")[0]["text"]


def test_user_data_tasks_name_the_variable_to_set(monkeypatch):
    from glm130b.eval.formats import DataError

    monkeypatch.delenv("CLUE_DATA", raising=False)
    with pytest.raises(DataError, match="CLUE_DATA"):
        load_items(load_task("clue_afqmc"))


def test_bad_task_files(tmp_path):
    with pytest.raises(TaskError, match="unknown task"):
        load_task("no_such_task")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntype: mul\nformat: mul_jsonl\npath: a\nbogus: 1\n")
    with pytest.raises(TaskError, match="bogus"):
        load_task(bad)
    bad.write_text("name: x\ntype: mul\nformat: nope\npath: a\n")
    with pytest.raises(TaskError, match="unknown format"):
        load_task(bad)
    bad.write_text("name: x\ntype: lm\nformat: text\npath: a\nmask: '[MASK]'\n")
    with pytest.raises(TaskError, match=r"\[gMASK\]"):
        load_task(bad)


@pytest.mark.parametrize("extra,needle", [
    ("options: [1, 2]", "option options must be a dict"),
    ("target_delimiter: 5", "option target_delimiter must be a string"),
    ("stop: 5", "option stop must be a list of strings"),
    ("path: 5", "option path must be a string"),
    ("metrics: acc", "option metrics must be a list of strings"),
    ("metrics: [bogus]", "metrics for a mul task are some of acc"),
    ("max_length: -5", "max_length must be a positive integer"),
    ("batch_size: true", "option batch_size must be an integer"),
])
def test_task_options_of_the_wrong_kind_are_task_errors(tmp_path, extra, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\ntype: mul\nformat: mul_jsonl\npath: a\n{extra}\n")
    with pytest.raises(TaskError, match=re.escape(needle)):
        load_task(bad)


@pytest.mark.parametrize("options,record,needle", [
    ({"template": "{0}"}, {}, "does not fill from the record"),
    ({"template": "{q"}, {}, "does not fill from the record"),
    ({"choices_field": [1]}, {}, "cannot use this file with these options"),
    ({}, {"choices": 5}, "cannot use this file with these options"),
])
def test_records_and_options_that_do_not_fit_are_data_errors(tmp_path, options, record, needle):
    from glm130b.eval.formats import DataError, read_items

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"context": "c", "choices": ["a", "b"], "answer": 0, **record}) + "\n")
    with pytest.raises(DataError, match=needle):
        read_items("mul_jsonl", data, options)


def test_shipped_data_is_small_and_gzip():
    files = sorted((ROOT / "data" / "eval").glob("*"))
    assert all(f.name.endswith(".jsonl.gz") for f in files)
    assert sum(f.stat().st_size for f in files) < 10_000_000
