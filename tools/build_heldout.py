"""Write the held-out perplexity slices (glm130b.data.heldout):

    python tools/build_heldout.py            # data/eval/heldout_ppl.jsonl.gz: the shipped corpus's slice
    python tools/build_heldout.py --base     # data/eval/heldout_ppl_base.jsonl.gz: the base corpus's added sources

Deterministic (gzip without a timestamp). Run after changing the held-out rule or the corpus.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

from glm130b.data.corpus import BASE_SOURCES, SOURCES
from glm130b.data.heldout import heldout_ppl_documents

EVAL = Path(__file__).resolve().parents[1] / "data" / "eval"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", action="store_true", help="the slice of the base corpus's added sources")
    args = p.parse_args()
    out = EVAL / ("heldout_ppl_base.jsonl.gz" if args.base else "heldout_ppl.jsonl.gz")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        n = chars = 0
        for doc in heldout_ppl_documents(BASE_SOURCES if args.base else SOURCES):
            gz.write((json.dumps({"id": doc.id, "lang": doc.lang, "text": doc.text}, ensure_ascii=False) + "\n").encode())
            n += 1
            chars += len(doc.text)
    out.write_bytes(buf.getvalue())
    print(f"wrote {out}: {n} documents, {chars} characters")


if __name__ == "__main__":
    main()
