"""Files in and out. Writes are atomic: a crash or a full disk never leaves a half-written file
in place (every file this project saves goes through here: write to a temporary name in the
same folder, fsync, then rename over the target; rename is atomic on POSIX file systems).
Reads of the project's YAML and JSONL inputs turn every problem into one error naming the file
(and line), in the caller's error class.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from glm130b.errors import GLMError


class SaveError(GLMError, OSError):
    """Saving failed (disk full, permission denied); the previous file, if any, is untouched."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _remove_quietly(tmp)
        raise SaveError(f"could not save {path}: {e.strerror or e}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextmanager
def staging_folder(target: str | Path, failure: str) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to build a multi-file save in; the caller renames
    it (or its files) into place inside the `with`. On any failure the folder is removed, and an
    OSError (disk full, permission denied) becomes SaveError("{failure}: reason")."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"{failure}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_yaml(path: str | Path, error: type[Exception] = GLMError, what: str = "config file") -> dict:
    """The mapping in a YAML file; `error(...)` for a missing, unreadable or non-mapping file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path}: {e}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of key: value")
    return data


def read_jsonl(path: str | Path, error: type[Exception] = GLMError) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a `.jsonl` or `.jsonl.gz` file (gzip chosen
    by suffix); `error(...)` names the file and line of the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
                yield where, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:
        # a truncated gzip stream, a file that is not gzip at all, or bytes that are not UTF-8
        raise error(f"{path}: cannot read ({e})") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
