"""A C++ kernel build killed half-way must not wedge later commands; a live build is waited for.

The fast tests replace `torch.utils.cpp_extension.load` with a stand-in that takes torch's own
build baton exactly as torch's JIT build does (FileBaton on `<folder>/lock`) and then "compiles"
by sleeping, so no compiler runs. The slow test kills a real build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import glm130b

SRC = str(Path(glm130b.__file__).resolve().parents[1])  # the code under test

FAKE_BUILD = textwrap.dedent("""
    import os, sys, time, types
    import torch.utils.cpp_extension as ext
    from torch.utils.file_baton import FileBaton
    from glm130b.quant.kernels import cpu

    def fake_load(name, sources, build_directory, **kw):  # torch's _jit_compile, minus the compiler
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            try:
                print("building", flush=True)
                while sys.argv[1] != "-" and not os.path.exists(sys.argv[1]):  # compiling until released
                    time.sleep(0.05)
            finally:
                baton.release()
        else:
            baton.wait()
        return types.SimpleNamespace(set_int4_vnni=lambda on: None)

    ext.load = fake_load
    print("module" if cpu.get() is not None else "fallback: " + str(cpu.error()), flush=True)
""")


def _env(cache: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC, "GLM130B_KERNEL_CACHE": str(cache), **extra}
    env.pop("GLM130B_NO_KERNELS", None)
    return env


def _start(cache: Path, release: Path | str = "-", **extra) -> subprocess.Popen:
    """A stand-in build that compiles until the file `release` exists ("-": not at all)."""
    return subprocess.Popen([sys.executable, "-c", FAKE_BUILD, str(release)], env=_env(cache, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until_said(proc: subprocess.Popen, needle: str, timeout: float = 60) -> list[str]:
    """Read proc's stderr until a line holds `needle`; the lines read."""
    lines: list[str] = []

    def read():
        for line in proc.stderr:
            lines.append(line)
            if needle in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert any(needle in line for line in lines), lines
    return lines


def _wait_building(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "building", proc.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_build_does_not_wedge_the_next_one(tmp_path, sig):
    first = _start(tmp_path, tmp_path / "never")
    _wait_building(first)
    first.send_signal(sig)
    first.wait(timeout=30)
    assert list(tmp_path.glob("*/lock")), "the killed build should have left torch's lock behind"
    # before the fix the next build waited on that lock forever
    second = subprocess.run([sys.executable, "-c", FAKE_BUILD, "-"], env=_env(tmp_path), capture_output=True,
                            text=True, timeout=30)
    assert second.stdout.splitlines()[-1] == "module", second.stderr
    assert "kernel build was killed" in second.stderr
    assert not list(tmp_path.glob("*/lock"))


def test_a_live_build_is_waited_for_with_a_message(tmp_path):
    release = tmp_path / "release"
    first = _start(tmp_path, release)
    _wait_building(first)
    second = _start(tmp_path)
    said = _until_said(second, f"waiting for the C++ kernel build of process {first.pid}")
    release.touch()  # the first build ends only now
    assert first.wait(timeout=60) == 0
    assert first.stdout.read().strip() == "module"
    assert second.wait(timeout=60) == 0
    assert second.stdout.read().splitlines()[-1] == "module"
    assert "killed" not in "".join(said) + second.stderr.read()  # the live build's lock was not broken


def test_a_build_that_never_ends_is_given_up_with_a_message(tmp_path):
    first = _start(tmp_path, tmp_path / "never")
    try:
        _wait_building(first)
        second = subprocess.run([sys.executable, "-c", FAKE_BUILD, "-"], capture_output=True, text=True, timeout=60,
                                env=_env(tmp_path, GLM130B_KERNEL_LOCK_TIMEOUT="1"))
        assert "fallback: TimeoutError" in second.stdout, (second.stdout, second.stderr)
        assert "slower pure-PyTorch path" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=30)


@pytest.mark.slow
def test_a_real_build_killed_half_way_then_the_next_one_builds(tmp_path):
    """kill -9 a real first-use compile, then the next process compiles and loads the kernels."""
    code = "from glm130b.quant.kernels import cpu; m = cpu.get(); print('module' if m else cpu.error())"
    first = subprocess.Popen([sys.executable, "-c", code], env=_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/lock")):
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.1)
    time.sleep(2)  # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)  # python, ninja and the compilers, as a closed terminal would
    first.wait(timeout=30)
    second = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=900)
    assert second.stdout.strip() == "module", second.stderr
    assert "kernel build was killed" in second.stderr


def test_a_live_build_without_our_lock_is_not_broken(tmp_path):
    """A process that holds only torch's lock (an older glm130b building in the same cache) is
    waited for, not robbed of its lock."""
    from glm130b.quant.kernels import cpu

    folder = tmp_path / cpu.build_key()
    folder.mkdir()
    hold = ("import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); "
            "sys.stdin.read(); os.close(fd); os.remove(sys.argv[1])")  # holds until its stdin closes
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder / "lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    second = _start(tmp_path)
    said = _until_said(second, f"waiting for process {holder.pid}")
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0  # its own lock was still there to remove
    assert second.wait(timeout=60) == 0
    assert second.stdout.read().splitlines()[-1] == "module"
    assert "killed" not in "".join(said) + second.stderr.read()
