"""Write data/eval/heldout_ppl.jsonl.gz: the held-out perplexity slice (glm130b.data.heldout).

Deterministic (gzip without a timestamp). Run after changing the held-out rule.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

from glm130b.data.heldout import heldout_ppl_documents

OUT = Path(__file__).resolve().parents[1] / "data" / "eval" / "heldout_ppl.jsonl.gz"


def main() -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        n = chars = 0
        for doc in heldout_ppl_documents():
            gz.write((json.dumps({"id": doc.id, "lang": doc.lang, "text": doc.text}, ensure_ascii=False) + "\n").encode())
            n += 1
            chars += len(doc.text)
    OUT.write_bytes(buf.getvalue())
    print(f"wrote {OUT}: {n} documents, {chars} characters")


if __name__ == "__main__":
    main()
