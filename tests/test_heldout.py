"""Training data never contains the dev tasks' items or the perplexity slice."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from glm130b.data.corpus import iter_documents
from glm130b.data.heldout import (
    DEV_BOOKS,
    cloze_signatures,
    dev_verses,
    heldout_ppl_documents,
    training_documents,
)
from glm130b.data.instructions import _GLOSS_SPLIT, EN_TO_ZH, verse_pairs

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def bible_docs():
    original = {d.id: d.text for d in iter_documents(("en_kjv", "zh_cuv"))}
    training = {d.id: d.text for d in training_documents(("en_kjv", "zh_cuv"))}
    return original, training


def test_every_dev_item_is_located(bible_docs):
    items = [json.loads(line) for line in gzip.open(DATA / "eval" / "bilingual_verse_match_dev.jsonl.gz", "rt")]
    located = {(en, zh) for en, zh in dev_verses().values()}
    assert all((it["en"], it["choices"][it["answer"]]) in located for it in items)
    # the distractors are held out too (a model that saw them would prefer them)
    located_zh = {zh for _, zh in located}
    assert all(choice in located_zh for it in items for choice in it["choices"])


def test_dev_verses_are_removed_from_their_chapters(bible_docs):
    original, training = bible_docs
    for (book, chapter, _), (en, zh) in dev_verses().items():
        for prefix, text in (("kjv", en), ("cuv", zh)):
            doc_id = f"{prefix}/{book.replace(' ', '_')}/{chapter}"
            if doc_id not in training:  # the whole chapter is in the perplexity slice
                continue
            assert training[doc_id].count(text) < original[doc_id].count(text), (doc_id, text)


def test_only_dev_verses_leave_a_chapter(bible_docs):
    """Every other verse of a dev chapter stays whole: a short dev verse that also opens a longer
    one ("耶和华对摩西说：", Leviticus 21) must not cut the longer one."""
    from glm130b.data.corpus import iter_parallel_verses

    original, training = bible_docs
    dev = dev_verses()
    rows: dict = {}
    for r in iter_parallel_verses():
        if r["book"] in DEV_BOOKS:
            rows.setdefault((r["book"], r["chapter"]), []).append(r)
    checked = 0
    for (book, chapter), verses in rows.items():
        verses.sort(key=lambda r: r["verse"])
        for prefix, lang, sep in (("kjv", "en", " "), ("cuv", "zh", "")):
            doc_id = f"{prefix}/{book.replace(' ', '_')}/{chapter}"
            if doc_id not in training or sep.join(r[lang] for r in verses) != original[doc_id]:
                continue
            kept = [r[lang] for r in verses if (book, chapter, r["verse"]) not in dev]
            assert training[doc_id] == sep.join(kept), doc_id
            checked += 1
    assert checked > 300


def test_perplexity_slice_is_disjoint_from_training(bible_docs):
    _, training = bible_docs
    held = {d.id for d in heldout_ppl_documents(("en_kjv", "zh_cuv"))}
    assert held and not held & set(training)
    shipped = [json.loads(line)["id"] for line in gzip.open(DATA / "eval" / "heldout_ppl.jsonl.gz", "rt")]
    assert set(shipped) == {d.id for d in heldout_ppl_documents()}


def test_base_perplexity_slice_file_is_the_added_sources_slice():
    from glm130b.data.corpus import BASE_SOURCES

    shipped = [json.loads(line)["id"] for line in gzip.open(DATA / "eval" / "heldout_ppl_base.jsonl.gz", "rt")]
    assert shipped == [d.id for d in heldout_ppl_documents(BASE_SOURCES)]
    assert {i.split("/")[0] for i in shipped} == {"song_poems", "later", "shakespeare", "dict"}


def test_added_chinese_sources_are_held_out_like_the_classics(tmp_path):
    """Every Chinese source, not only zh_classics, loses the documents holding a cloze item, and
    each added source gives up every 100th document to the perplexity slice."""
    sig = cloze_signatures()[0]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("parallel_kjv_cuv", "zh_cuv"):
        (corpus / f"{name}.jsonl.gz").write_bytes((DATA / "corpus" / f"{name}.jsonl.gz").read_bytes())
    (tmp_path / "eval").mkdir()
    for name in ("bilingual_verse_match_dev", "zh_classics_cloze_dev"):
        (tmp_path / "eval" / f"{name}.jsonl.gz").write_bytes((DATA / "eval" / f"{name}.jsonl.gz").read_bytes())
    docs = [{"id": f"song/{i}", "lang": "zh", "text": f"题\n春风{i}。" + (sig[:3] + "\n" + sig[3:] if i == 7 else "")}
            for i in range(120)]
    with gzip.open(corpus / "zh_song_poems.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    kept = {d.id for d in training_documents(("zh_song_poems",), root=tmp_path)}
    held = {d.id for d in heldout_ppl_documents(("zh_song_poems",), root=tmp_path)}
    assert held == {"song/50"} and "song/7" not in kept and len(kept) == 118 and not kept & held


def test_instruction_pairs_exclude_dev_verses():
    dev_en = {en for en, _ in dev_verses().values()}
    pairs = verse_pairs(seed=0)
    prompts = {p["prompt"] for p in pairs}
    for en in dev_en:
        for template in EN_TO_ZH:
            assert template.format(en=en) not in prompts
    assert len(pairs) > 50_000


def test_wordnet_gloss_split():
    text = 'thing: an action; "how could you do such a thing?". kindness: a kind act. gift tax: a tax.'
    assert [s.partition(": ")[0] for s in _GLOSS_SPLIT.split(text)] == ["thing", "kindness", "gift tax"]
