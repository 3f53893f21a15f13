"""One build of the C++ kernels at a time, and no wedge when a build is killed.

torch's JIT build guards its folder with a plain file, `<folder>/lock` (its "baton"), created
with O_EXCL and removed when the build ends. A build killed on the way (kill -9, SIGTERM,
a closed terminal) never removes it, and every later build waits on it forever with no message.

So every build here first takes an flock on `<folder>/owner.lock`. The kernel releases an flock
when its process dies, however it dies, so:
  * held by a live process: that build is running; wait for it, saying so on stderr, up to
    $GLM130B_KERNEL_LOCK_TIMEOUT seconds (default 900), then give up (callers fall back to PyTorch);
  * ours: nobody else of ours is building. A torch `lock` file still there that no process has
    open (torch keeps it open while it builds) was left by a dead build: remove it, saying so,
    and build. One that a live process holds (a build by an older glm130b) is waited for.
The flock file holds the owner's PID, for the messages.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER = "owner.lock"
TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in the build folder
POLL_S = 0.2


def _say(message: str) -> None:
    print(f"glm130b: {message}", file=sys.stderr, flush=True)


def default_timeout() -> float:
    value = os.environ.get("GLM130B_KERNEL_LOCK_TIMEOUT", "")
    try:
        return float(value) if value else 900.0
    except ValueError:
        return 900.0


@contextmanager
def build_lock(directory: str | Path, timeout: float | None = None,
               say: Callable[[str], None] = _say) -> Iterator[None]:
    """Hold the build folder's lock for the `with` body (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    timeout = default_timeout() if timeout is None else timeout
    fd = os.open(directory / OWNER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            owner = _owner(fd)
            say(f"waiting for the C++ kernel build of process {owner} in {directory} "
                f"(first use compiles them; up to {timeout:.0f} s)")
            deadline = time.monotonic() + timeout
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"process {owner} has been building the kernels in {directory} for over "
                                       f"{timeout:.0f} s (GLM130B_KERNEL_LOCK_TIMEOUT)")
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _clear_torch_lock(directory / TORCH_LOCK, timeout, say)
        yield
    finally:
        os.close(fd)  # releases the flock


def _clear_torch_lock(lock: Path, timeout: float, say: Callable[[str], None]) -> None:
    """Remove torch's lock file when no process has it open. (torch keeps it open for the whole
    build; a process without our flock, such as an older glm130b, may still be building.)"""
    if not lock.exists():
        return
    holders = _holders(lock)
    if holders:
        say(f"waiting for process {holders[0]}, which is building the kernels in {lock.parent}")
        deadline = time.monotonic() + timeout
        while lock.exists() and _holders(lock):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {holders[0]} has held {lock} for over {timeout:.0f} s")
            time.sleep(POLL_S)
    if lock.exists():
        say(f"removing {lock}: a kernel build was killed before it finished (no live process holds it); "
            "building again")
        lock.unlink(missing_ok=True)


def _holders(path: Path) -> list[str]:
    """PIDs of the processes with `path` open (Linux /proc; elsewhere none can be seen)."""
    target, found = str(path.resolve()), []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _owner(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    except OSError:
        return "?"
