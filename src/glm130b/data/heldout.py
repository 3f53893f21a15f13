"""What training must never see: the dev tasks' items and a held-out perplexity slice.

* `bilingual_verse_match_dev`: each item's verse (English and its Chinese answer) and the three
  distractor verses are located in the parallel corpus (Genesis-Deuteronomy) and removed from
  their KJV and CUV chapters and from the parallel pairs; a verse whose Chinese equals a
  distractor's goes too. Identical wording outside those books (refrains) stays, as the data
  README warns it will.
* `zh_classics_cloze_dev`: every Chinese document (the shipped classics and every added
  Chinese source; the Bible chapters are rebuilt verse by verse instead) that contains an
  item's context tail plus its answer line is dropped.
* Perplexity slice: every 100th document of each source (index 50, 150, ...), by file order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from glm130b.data.corpus import (
    SOURCES,
    Document,
    corpus_dir,
    iter_documents,
    iter_parallel_verses,
    read_jsonl,
    resolve_sources,
)

HELDOUT_EVERY = 100
HELDOUT_OFFSET = 50
DEV_BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy")


def eval_dir(root: Path | None = None) -> Path:
    return (Path(root) if root else corpus_dir().parent) / "eval"


def is_ppl_heldout(index: int) -> bool:
    return index % HELDOUT_EVERY == HELDOUT_OFFSET


@lru_cache(maxsize=4)
def dev_verses(root: Path | None = None) -> dict[tuple[str, int, int], tuple[str, str]]:
    """(book, chapter, verse) -> (en, zh) of every verse a bilingual_verse_match dev item shows:
    its target and its three distractors.

    The distractors are held out too: they are neighbouring verses, and a model that has seen
    them (but, by design, never the answer) scores the familiar text higher and lands below
    chance; measured on a GPU-trained model, 20.4% with the distractors in training.
    """
    targets, shown = set(), set()
    for item in read_jsonl(_eval_file(root, "bilingual_verse_match_dev")):
        targets.add((item["en"], item["choices"][item["answer"]]))
        shown.update(item["choices"])
    found = {}
    for row in iter_parallel_verses(root / "corpus" if root else None):
        if row["book"] in DEV_BOOKS and ((row["en"], row["zh"]) in targets or row["zh"] in shown):
            found[(row["book"], row["chapter"], row["verse"])] = (row["en"], row["zh"])
    return found


@lru_cache(maxsize=4)
def cloze_signatures(root: Path | None = None) -> tuple[str, ...]:
    """Context tail + answer of every cloze item: a document containing one is held out."""
    sigs = []
    for item in read_jsonl(_eval_file(root, "zh_classics_cloze_dev")):
        sigs.append(item["context"][-6:] + item["choices"][item["answer"]])
    return tuple(sigs)


def _eval_file(root: Path | None, name: str) -> Path:
    directory = eval_dir(root)
    gz = directory / f"{name}.jsonl.gz"
    return gz if gz.exists() else directory / f"{name}.jsonl"


def _chapter_key(doc_id: str) -> tuple[str, int] | None:
    parts = doc_id.split("/")  # kjv/1_Samuel/3, cuv/Genesis/1
    if len(parts) != 3 or parts[0] not in ("kjv", "cuv"):
        return None
    return parts[1].replace("_", " "), int(parts[2])


def _strip_dev_verses(doc: Document, by_chapter: dict[tuple[str, int], dict[int, tuple[str, str]]],
                      verses: dict[tuple[str, int], list[tuple[int, str, str]]]) -> Document:
    """The chapter without its dev verses. A chapter document is its verses joined (with spaces
    in English), so it is rebuilt from the verse list without them: cutting text out would hit
    the first occurrence, and short formula verses ("耶和华对摩西说：") also open longer ones.
    A chapter whose text is not its verses joined falls back to cutting the first occurrence."""
    key = _chapter_key(doc.id)
    if key is None or key not in by_chapter:
        return doc
    sep = " " if doc.lang == "en" else ""
    rows = verses.get(key, [])
    texts = [en if doc.lang == "en" else zh for _, en, zh in rows]
    if rows and sep.join(texts) == doc.text:
        dropped = by_chapter[key]
        kept = [t for (verse, _, _), t in zip(rows, texts, strict=True) if verse not in dropped]
        return Document(doc.id, doc.lang, sep.join(kept))
    text = doc.text
    for en, zh in by_chapter[key].values():
        if doc.lang == "en":
            text = text.replace(en + " ", "", 1) if (en + " ") in text else text.replace(en, "", 1)
        else:
            text = text.replace(zh, "", 1)
    return Document(doc.id, doc.lang, text)


def training_documents(sources: Iterable[str] = SOURCES, root: Path | None = None) -> Iterator[Document]:
    """The corpus minus the dev items and the perplexity slice."""
    by_chapter: dict[tuple[str, int], dict[int, tuple[str, str]]] = {}
    for (book, chapter, verse), pair in dev_verses(root).items():
        by_chapter.setdefault((book, chapter), {})[verse] = pair
    verses: dict[tuple[str, int], list[tuple[int, str, str]]] = {}
    for row in iter_parallel_verses(root / "corpus" if root else None):
        if (row["book"], row["chapter"]) in by_chapter:
            verses.setdefault((row["book"], row["chapter"]), []).append((row["verse"], row["en"], row["zh"]))
    for rows in verses.values():
        rows.sort()
    sigs = cloze_signatures(root)
    for source in resolve_sources(sources):
        for i, doc in enumerate(iter_documents((source,), root / "corpus" if root else None)):
            if is_ppl_heldout(i):
                continue
            if doc.lang == "zh" and source != "zh_cuv":
                flat = doc.text.replace("\n", "")
                if any(sig in flat for sig in sigs):
                    continue
            yield _strip_dev_verses(doc, by_chapter, verses)


def heldout_ppl_documents(sources: Iterable[str] = SOURCES, root: Path | None = None) -> Iterator[Document]:
    """The perplexity slice: every 100th document of each source."""
    for source in resolve_sources(sources):
        for i, doc in enumerate(iter_documents((source,), root / "corpus" if root else None)):
            if is_ppl_heldout(i):
                yield doc


def training_verse_pairs(root: Path | None = None) -> Iterator[dict]:
    """Parallel KJV/CUV verses minus the chapters of the perplexity slice and any verse whose
    English or Chinese equals a dev target's (so refrains cannot teach a dev answer)."""
    dev = dev_verses(root)
    dev_en = {en for en, _ in dev.values()}
    dev_zh = {zh for _, zh in dev.values()}
    heldout_chapters = {
        _chapter_key(doc.id) for doc in heldout_ppl_documents(("en_kjv", "zh_cuv"), root)
    }
    for row in iter_parallel_verses(root / "corpus" if root else None):
        if row["en"] in dev_en or row["zh"] in dev_zh:
            continue
        if (row["book"], row["chapter"]) in heldout_chapters:
            continue
        yield row
