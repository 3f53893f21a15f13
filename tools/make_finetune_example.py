"""Build the fine-tuning worked example: which book of the Bible a verse comes from (bilingual).

The shipped model read these verses in pretraining but was never asked which book they are
from. Items: a KJV verse with English book names, or its CUV translation with Chinese book names,
from four books of distinct voice (Psalms, Proverbs, Matthew, Acts). The dev items' verses are
held out of the training file in both languages (a dev verse's translation would leak its label).

    python tools/make_finetune_example.py   # writes data/finetune/verse_book_{train,dev}.jsonl.gz

Deterministic (seed 0); the dev set is what tasks/verse_book.yaml scores.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from glm130b.data.corpus import iter_parallel_verses

BOOKS = {"Psalms": "诗篇", "Proverbs": "箴言", "Matthew": "马太福音", "Acts": "使徒行传"}
QUESTION = {"en": "Which book of the Bible is this verse from? {verse}", "zh": "这节经文出自圣经哪一卷？{verse}"}
DEV_PER_BOOK_AND_LANGUAGE = 50
TRAIN_PER_BOOK_AND_LANGUAGE = 300
OUT = Path(__file__).resolve().parents[1] / "data" / "finetune"


def main() -> None:
    rng = random.Random(0)
    by_book: dict[str, list[dict]] = {b: [] for b in BOOKS}
    for row in iter_parallel_verses():
        if row["book"] in BOOKS and 20 <= len(row["en"]) <= 200:
            by_book[row["book"]].append(row)
    dev, train, held_texts, chosen = [], [], set(), {}
    for book, rows in by_book.items():
        rng.shuffle(rows)
        n_dev = 2 * DEV_PER_BOOK_AND_LANGUAGE
        chosen[book] = rows[:n_dev]
        held_texts |= {row[lang] for row in rows[:n_dev] for lang in ("en", "zh")}
    for book, rows in by_book.items():
        for i, row in enumerate(chosen[book]):  # half of the dev verses in English, half in Chinese
            lang = "en" if i % 2 == 0 else "zh"
            dev.append(_item(row, lang, book))
        # refrains repeat word for word ("for his mercy endureth for ever"): no training verse may
        # equal a dev verse in either language
        rest = [row for row in rows[2 * DEV_PER_BOOK_AND_LANGUAGE:] if row["en"] not in held_texts
                and row["zh"] not in held_texts]
        for lang in ("en", "zh"):
            for row in rest[:TRAIN_PER_BOOK_AND_LANGUAGE] if lang == "en" else rest[-TRAIN_PER_BOOK_AND_LANGUAGE:]:
                item = _item(row, lang, book)
                train.append({"prompt": item["question"], "response": item["choices"][item["answer"]]})
    rng.shuffle(dev)
    rng.shuffle(train)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("verse_book_dev", dev), ("verse_book_train", train)):
        with gzip.GzipFile(OUT / f"{name}.jsonl.gz", "wb", mtime=0) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        print(f"{name}: {len(rows)} items")


def _item(row: dict, lang: str, book: str) -> dict:
    names = list(BOOKS) if lang == "en" else list(BOOKS.values())
    answer = list(BOOKS).index(book)
    return {"question": QUESTION[lang].format(verse=row[lang]), "choices": names, "answer": answer, "lang": lang}


if __name__ == "__main__":
    main()
