"""Built-in instruction pairs for multi-task instruction pretraining (MIP), as GLM-130B mixed in.

From the shipped corpus only: translation of parallel KJV/CUV verses in both directions, each
asked in English and in Chinese phrasing, and WordNet definitions. Dev-task verses and the
perplexity slice are excluded (glm130b.data.heldout). The first English->Chinese template is
the prompt the `bilingual_verse_match` task scores with.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from glm130b.data.corpus import iter_documents
from glm130b.data.heldout import is_ppl_heldout, training_verse_pairs

EN_TO_ZH = ("Translate into Chinese: {en}", "把下面的英文翻译成中文：{en}")
ZH_TO_EN = ("Translate into English: {zh}", "把下面的中文翻译成英文：{zh}")
DEFINE = ('Define the word "{word}".', "解释英文单词“{word}”的意思。")

# "lemma: gloss. next lemma: gloss; \"example\"." -> split before each "lemma: "
_GLOSS_SPLIT = re.compile(r'(?<=[.!?"]) (?=[^:.;"]{1,40}: )')


def verse_pairs(seed: int, root: Path | None = None) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for row in training_verse_pairs(root):
        template = rng.choice(EN_TO_ZH)
        pairs.append({"prompt": template.format(en=row["en"]), "answer": row["zh"]})
        template = rng.choice(ZH_TO_EN)
        pairs.append({"prompt": template.format(zh=row["zh"]), "answer": row["en"]})
    return pairs


def definition_pairs(seed: int, root: Path | None = None) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    docs = iter_documents(("en_wordnet",), root / "corpus" if root else None)
    for i, doc in enumerate(docs):
        if is_ppl_heldout(i):
            continue
        for sentence in _GLOSS_SPLIT.split(doc.text):
            word, sep, gloss = sentence.partition(": ")
            if sep and word and gloss:
                pairs.append({"prompt": rng.choice(DEFINE).format(word=word), "answer": gloss})
    return pairs


def builtin_instructions(seed: int = 0, root: Path | None = None) -> list[dict]:
    """All built-in pairs, shuffled with `seed`; a verse's two directions are separate pairs."""
    pairs = verse_pairs(seed, root) + definition_pairs(seed, root)
    random.Random(seed).shuffle(pairs)
    return pairs


def cycle(pairs: list[dict], encode) -> Iterator[tuple[list[int], list[int]]]:
    """Endless (prompt_ids, answer_ids), tokenised lazily."""
    while True:
        for pair in pairs:
            yield encode(pair["prompt"]), encode(pair["answer"])
