"""Model folders carry the size and sha256 of their weights (`checksums.json`), checked on load.

safetensors checks a file's header and lengths, not its bytes: 64 flipped bytes in the weights
loaded and generated (badly) without a word. A folder without `checksums.json` (written before
this existed) loads unchecked. GLM130B_VERIFY_WEIGHTS=0 skips the check (hashing reads the
whole file once more: about 1 s a GB).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHECKSUMS = "checksums.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str | Path, names: tuple[str, ...]) -> None:
    """Record the files `names` of `folder` (a staging folder, before it is moved into place)."""
    folder = Path(folder)
    entries = {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}
    (folder / CHECKSUMS).write_text(json.dumps(entries, indent=1) + "\n")


def verify_checksums(folder: str | Path) -> None:
    """CheckpointError when a recorded file's size or sha256 differs from what was saved."""
    from glm130b.errors import CheckpointError

    folder = Path(folder)
    if os.environ.get("GLM130B_VERIFY_WEIGHTS") == "0" or not (folder / CHECKSUMS).is_file():
        return
    try:
        entries = json.loads((folder / CHECKSUMS).read_text())
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise CheckpointError(f"{folder / CHECKSUMS} is corrupt or unreadable") from None
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.is_file():
            continue  # a missing file is reported by the loader
        if path.stat().st_size != size or sha256_file(path) != digest:
            raise CheckpointError(f"{path} is corrupt: it does not match the checksum saved with it "
                                  f"({CHECKSUMS}); copy or save the model again")
