import gzip
import itertools
import json

import pytest

from glm130b.data.corpus import (
    BASE_SOURCES,
    CORPORA,
    SOURCES,
    CorpusError,
    Document,
    corpus_dir,
    iter_documents,
    iter_parallel_verses,
    read_jsonl,
    resolve_sources,
)

RECORDS = [{"id": "a/1", "lang": "en", "text": "In the beginning"}, {"id": "b/1", "lang": "zh", "text": "起初"}]


def _write(path, lines):
    data = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_read_jsonl(tmp_path, name):
    path = _write(tmp_path / name, [json.dumps(r, ensure_ascii=False) for r in RECORDS[:1]] + ["", "  "]
                  + [json.dumps(RECORDS[1], ensure_ascii=False)])
    assert list(read_jsonl(path)) == RECORDS


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz"])
def test_malformed_line_names_the_line(tmp_path, name):
    path = _write(tmp_path / name, [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), '{"id": "c", "text": '])
    it = read_jsonl(path)
    assert next(it) == RECORDS[0]
    with pytest.raises(CorpusError, match=rf"{name}:3: not valid JSON"):
        list(it)


def test_non_object_line(tmp_path):
    path = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(CorpusError, match=r"list.jsonl:1: expected a JSON object"):
        list(read_jsonl(path))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        list(read_jsonl(tmp_path / "missing.jsonl"))
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"this is not gzip")
    with pytest.raises(CorpusError, match="cannot read"):
        list(read_jsonl(fake))


def test_iter_documents_with_root(tmp_path):
    _write(tmp_path / "mini.jsonl", [json.dumps(r) for r in RECORDS])
    assert list(iter_documents(("mini",), root=tmp_path)) == [Document(**r) for r in RECORDS]
    with pytest.raises(CorpusError, match="not found"):
        list(iter_documents(("absent",), root=tmp_path))
    _write(tmp_path / "nolang.jsonl", [json.dumps({"id": "x", "text": "y"})])
    with pytest.raises(CorpusError, match="no field 'lang'"):
        list(iter_documents(("nolang",), root=tmp_path))


def test_corpus_dir_env(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    monkeypatch.setenv("GLM130B_DATA", str(tmp_path))
    assert corpus_dir() == tmp_path / "corpus"
    monkeypatch.setenv("GLM130B_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(CorpusError, match="GLM130B_DATA"):
        corpus_dir()


def test_shipped_corpus_has_both_languages(monkeypatch):
    monkeypatch.delenv("GLM130B_DATA", raising=False)
    assert corpus_dir().name == "corpus"
    langs = set()
    for source in SOURCES:
        docs = list(itertools.islice(iter_documents((source,)), 3))
        assert len(docs) == 3
        assert all(d.id and d.text for d in docs)
        assert len({d.lang for d in docs}) == 1
        assert docs[0].lang == source[:2]
        langs.add(docs[0].lang)
    assert langs == {"en", "zh"}


def test_shipped_parallel_verses(monkeypatch):
    monkeypatch.delenv("GLM130B_DATA", raising=False)
    first = next(iter_parallel_verses())
    assert (first["book"], first["chapter"], first["verse"]) == ("Genesis", 1, 1)
    assert first["en"].startswith("In the beginning") and first["zh"].startswith("起初")


def test_named_corpora():
    assert resolve_sources("shipped") == resolve_sources(["shipped"]) == SOURCES
    assert resolve_sources(("base",)) == SOURCES + BASE_SOURCES == CORPORA["base"]
    assert resolve_sources("zh_cuv") == ("zh_cuv",)
    assert resolve_sources(["en_kjv", "zh_cuv"]) == ("en_kjv", "zh_cuv")


def test_base_sources_match_their_manifest(monkeypatch):
    """data/corpus_base.json (written by tools/build_corpus_base.py) records every added file's
    size and sha256, every package's version, licence and archive sha256."""
    import hashlib

    monkeypatch.delenv("GLM130B_DATA", raising=False)
    root = corpus_dir().parent
    manifest = json.loads((root / "corpus_base.json").read_text(encoding="utf-8"))
    files = {f["file"]: f for f in manifest["files"]}
    assert set(files) == {f"corpus/{s}.jsonl.gz" for s in BASE_SOURCES}
    for name, info in files.items():
        data = (root / name).read_bytes()
        assert len(data) == info["bytes_gz"] and hashlib.sha256(data).hexdigest() == info["sha256"], name
    for pkg in manifest["packages"]:
        assert pkg["version"] and pkg["licence"] and pkg["registry"]
        assert pkg["archive"] is None or len(pkg["sha256"]) == 64
        assert pkg["licence_file"] is None or (root / "LICENSES" / pkg["licence_file"]).is_file()
    for source in BASE_SOURCES:
        docs = list(itertools.islice(iter_documents((source,)), 3))
        assert len(docs) == 3 and all(d.lang == source[:2] and d.text for d in docs)
