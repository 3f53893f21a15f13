"""Files in and out.

Writes are atomic: a crash or a full disk never leaves a half-written file in place. Every file
this project saves goes through here: write to a temporary name in the same folder, fsync, then
rename over the target (rename is atomic on POSIX file systems). Temporary names carry the
writer's PID, so the leftovers of a process that was killed mid-write (kill -9) are removed by
the next save to the same target. A full disk is a SaveError with one line that says so,
whichever library was writing (safetensors and torch raise their own error types).

Reads of the project's YAML and JSONL inputs turn every problem into one error naming the file
(and line), in the caller's error class.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from glm130b.errors import GLMError, first_line

# what a write can fail with: the OS's error, safetensors' own, torch.save's RuntimeError
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


class SaveError(GLMError, OSError):
    """Saving failed (disk full, permission denied); the previous file, if any, is untouched."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it into place atomically."""
    path = Path(path)
    _make_parent(path)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except WRITE_ERRORS as e:
        reason = why(e, path.parent)
        _remove_quietly(tmp)
        raise SaveError(f"could not save {path}: {reason}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextmanager
def staging_folder(target: str | Path, failure: str) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to build a multi-file save in; the caller renames
    it (or its files) into place inside the `with`. On any failure the folder is removed, and an
    OSError (disk full, permission denied) becomes SaveError("{failure}: reason")."""
    target = Path(target)
    _make_parent(target)
    _remove_leftovers(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 (and some callers rename the folder itself)
    except OSError as e:
        raise SaveError(f"{failure}: {why(e, target.parent)}") from e
    try:
        yield tmp
    except WRITE_ERRORS as e:
        reason = why(e, target.parent)  # (the space left before the partial files go)
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"{failure}: {reason}") from e
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
    except yaml.YAMLError as e:  # one line: the problem and where (PyYAML's message spans several)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{what} {path} is not valid YAML{where}: {problem}") from None
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
def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the usual permissions (it creates its files 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def why(e: BaseException, where: Path) -> str:
    """One line on why a write failed; a full disk is named as such, with the space left."""
    text = (e.strerror if isinstance(e, OSError) and e.strerror else None) or first_line(e)
    full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)
    try:
        free = shutil.disk_usage(_existing(where)).free
    except OSError:
        free = None
    if full or (free is not None and free < 1 << 20 and not isinstance(e, PermissionError)):
        left = f", {free / 2**20:.1f} MiB free" if free is not None else ""
        return f"No space left on device ({_existing(where)}{left})"
    if "inline_container" in text:  # torch.save's writer hides the OS error (disk full, file size limit)
        return f"the file could not be written out in full (torch: {text})"
    return text


def free_bytes(path: str | Path) -> int | None:
    """Free space on the disk that holds `path` (or would: its nearest existing folder)."""
    try:
        return shutil.disk_usage(_existing(Path(path))).free
    except OSError:
        return None


def check_output_file(path: str | Path, what: str = "--output") -> None:
    """A file a command will write at its end, checked at its start (a long run must not lose its
    results to a bad path): not a folder, not under a file, in a folder this process may write."""
    path = Path(path)
    if path.is_dir():
        raise SaveError(f"{what} {path} is a folder; give a file name")
    parent = _folder_above(path, f"{what} {path}")
    if parent is not None and not os.access(parent, os.W_OK):
        raise SaveError(f"{what} {path}: cannot write in {parent}")


def check_new_folder(path: str | Path, what: str = "--out") -> None:
    """A folder to write into: not a file, not under a file, and (for outputs that must not
    replace anything) empty. One-line SaveError otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaveError(f"{what} {path} is a file; give a folder")
    _folder_above(path, f"{what} {path}")


def _folder_above(path: Path, said: str) -> Path | None:
    """The nearest existing folder above `path` (None: none exists); a SaveError starting with
    `said` when the nearest existing thing there is a file."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SaveError(f"{said}: {parent} is a file, not a folder")
            return parent
    return None


def _make_parent(path: Path) -> None:
    """The folder a file goes in; a one-line SaveError when a file is in the way of it."""
    _folder_above(path, f"cannot save {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaveError(f"cannot save {path}: {why(e, path.parent)}") from e


LEFTOVER = re.compile(r"\..+\.(\d+)\.[a-z0-9_]{8}(\.tmp)?")  # .NAME.PID.<mkstemp/mkdtemp suffix>[.tmp]


def _remove_leftovers(target: Path) -> None:
    """Temporary files and folders beside `target` whose writer is dead (a kill -9 mid-save;
    the next checkpoint has another name, so the whole folder is swept, not just `target`'s)."""
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        m = LEFTOVER.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            leftover = target.parent / name
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                _remove_quietly(str(leftover))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
