"""The shipped model (models/glm-small): it loads, reads as the corpus, and scores above chance."""

from __future__ import annotations

from pathlib import Path

import pytest

from glm130b.checkpoint import load_model
from glm130b.eval.runner import evaluate
from glm130b.infer.generate import generate, infill

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "glm-small"
SLICE = 60  # items per dev task: chance is 25% +- 5.6% (one standard error)


@pytest.fixture(scope="module")
def shipped():
    assert (SHIPPED / "model.safetensors").is_file(), "models/glm-small is part of the repository"
    return load_model(SHIPPED)


def test_shipped_model_is_small_fp16_and_complete(shipped):
    model, tokenizer = shipped
    assert (SHIPPED / "model.safetensors").stat().st_size <= 60e6
    assert model.config.name == "small" and 20e6 < model.num_parameters() < 40e6
    assert tokenizer.vocab_size == model.config.vocab_size
    for name in ("loss.png", "train_config.json", "meta.json", "tokenizer.json", "config.json"):
        assert (SHIPPED / name).is_file(), name


def test_shipped_model_scores_above_chance(shipped):
    """Dev tasks scored on a slice: both must beat 25% chance by more than 2 standard errors."""
    model, tokenizer = shipped
    results = evaluate(model, tokenizer, ["bilingual_verse_match", "zh_classics_cloze"], limit=SLICE)
    for name in ("bilingual_verse_match", "zh_classics_cloze"):
        acc = results["tasks"][name]["metrics"]["acc"]
        assert acc > 0.25 + 2 * 0.056, (name, acc)


def test_shipped_model_writes_the_corpus_languages(shipped):
    model, tokenizer = shipped
    english = generate(model, tokenizer, "And the LORD spake unto Moses, saying,", max_new_tokens=24)
    chinese = generate(model, tokenizer, "耶稣对门徒说：", max_new_tokens=24)
    assert sum(c.isascii() and c.isalpha() for c in english) > 20
    assert sum("\u4e00" <= c <= "\u9fff" for c in chinese) > 8
    filled = infill(model, tokenizer, "In the beginning God created the [MASK] and the earth.", max_new_tokens=8)
    assert filled.spans[0].strip() and "[MASK]" not in filled.text
