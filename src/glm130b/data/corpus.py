"""Reading the shipped bilingual corpus (JSON Lines, optionally gzipped).

The corpus lives in `data/corpus/` of the repository (or `$GLM130B_DATA/corpus/`):
  en_kjv, en_wordnet, zh_cuv, zh_classics   one document per line: {"id", "lang", "text"}
  parallel_kjv_cuv                          one verse per line: {"book", "chapter", "verse", "en", "zh"}
  zh_song_poems, zh_later_classics,         the `base` corpus's added sources, same format
  en_shakespeare, en_dictionaries           (tools/build_corpus_base.sh builds them)
Named corpora (`CORPORA`): "shipped" (the four sources every default uses) and "base" (those
plus the added four); a training config's `sources` may name one.
Everything here streams line by line, so no file is ever held in memory whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from glm130b.errors import GLMError
from glm130b.io import read_jsonl as read_jsonl_lines

SOURCES = ("en_kjv", "en_wordnet", "zh_cuv", "zh_classics")
BASE_SOURCES = ("zh_song_poems", "zh_later_classics", "en_shakespeare", "en_dictionaries")
CORPORA = {"shipped": SOURCES, "base": SOURCES + BASE_SOURCES}
PARALLEL = "parallel_kjv_cuv"


class CorpusError(GLMError, ValueError):
    """The corpus is missing or a file in it is malformed."""


@dataclass
class Document:
    id: str
    lang: str
    text: str


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one dict per non-blank line of a `.jsonl` or `.jsonl.gz` file (glm130b.io.read_jsonl)."""
    for _, obj in read_jsonl_lines(path, CorpusError):
        yield obj


def corpus_dir() -> Path:
    """The folder holding the corpus files: `$GLM130B_DATA/corpus` if set, else the repo's `data/corpus`."""
    env = os.environ.get("GLM130B_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "data"
    corpus = root / "corpus"
    if not corpus.is_dir():
        hint = "GLM130B_DATA" if env else "the repository's data/ folder (or set GLM130B_DATA)"
        raise CorpusError(f"corpus folder not found: {corpus} (check {hint})")
    return corpus


def resolve_sources(sources) -> tuple[str, ...]:
    """Source names from a corpus name ("shipped", "base"), one source name, or a sequence of
    names (a one-element sequence may hold a corpus name, as a YAML list would)."""
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(sources)
    if len(sources) == 1 and sources[0] in CORPORA:
        return CORPORA[sources[0]]
    return sources


def check_sources(sources) -> tuple[str, ...]:
    """The resolved source names, each with its file in the corpus folder, or a CorpusError now
    (before a run creates its folder, not at its first batch)."""
    names = resolve_sources(sources)
    if not names:
        raise CorpusError("no corpus sources given")
    root = corpus_dir()
    for name in names:
        _source_file(root, name)
    return names


def _source_file(root: Path, source: str) -> Path:
    for suffix in (".jsonl", ".jsonl.gz"):
        p = root / f"{source}{suffix}"
        if p.is_file():
            return p
    raise CorpusError(f"corpus source {source!r} not found in {root} (expected {source}.jsonl or .jsonl.gz)")


def _field(obj: dict, key: str, path: Path, n: int):
    if key not in obj:
        raise CorpusError(f"{path}: record {n} has no field {key!r}")
    return obj[key]


def iter_documents(sources=SOURCES, root: str | Path | None = None) -> Iterator[Document]:
    """Yield the documents of each source in turn, in file order (deterministic)."""
    root = Path(root) if root is not None else corpus_dir()
    for source in resolve_sources(sources):
        path = _source_file(root, source)
        for n, obj in enumerate(read_jsonl(path), start=1):
            yield Document(
                id=str(_field(obj, "id", path, n)),
                lang=str(_field(obj, "lang", path, n)),
                text=str(_field(obj, "text", path, n)),
            )


def iter_parallel_verses(root: str | Path | None = None) -> Iterator[dict]:
    """Yield aligned KJV/CUV verses: dicts with book, chapter, verse, en, zh."""
    root = Path(root) if root is not None else corpus_dir()
    path = _source_file(root, PARALLEL)
    for n, obj in enumerate(read_jsonl(path), start=1):
        for key in ("book", "chapter", "verse", "en", "zh"):
            _field(obj, key, path, n)
        yield obj
