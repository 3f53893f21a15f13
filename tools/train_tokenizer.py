"""Train the shipped tokenizer: byte-level BPE, 16384 ids, on the four shipped corpus sources.

    .venv/bin/python tools/train_tokenizer.py            # writes src/glm130b/assets/tokenizer.json

Deterministic: documents are read in file order and BPE training breaks ties by a fixed rule, so a
rerun writes the same file byte for byte (the sha256 is printed to check).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from glm130b.data.corpus import SOURCES, CorpusError, iter_documents, iter_parallel_verses
from glm130b.tokenizer import TokenizerError, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "glm130b" / "assets" / "tokenizer.json"


def compression(tok, texts: list[str]) -> str:
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    ntok = sum(len(ids) for ids in tok.encode_batch(texts))
    return f"{chars / ntok:.2f} chars/token, {ntok / nbytes:.3f} tokens/byte ({ntok} tokens)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    try:
        texts = [doc.text for doc in iter_documents(SOURCES)]
        t0 = time.time()
        tok = train_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
        dt = time.time() - t0
        path = tok.save(args.out)
        verses = [v for _, v in zip(range(2000), iter_parallel_verses(), strict=False)]
    except (CorpusError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    data = path.read_bytes()
    print(f"trained on {len(texts)} documents ({sum(map(len, texts)):,} chars) in {dt:.1f}s")
    print(f"wrote {path}: vocab_size={tok.vocab_size}, {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    print("English (first 2000 KJV verses):", compression(tok, [v["en"] for v in verses]))
    print("Chinese (first 2000 CUV verses):", compression(tok, [v["zh"] for v in verses]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
