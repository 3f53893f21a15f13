"""gemv.h as a standalone C++ program (no PyTorch), against a double-precision reference:
built for this machine (AVX2 flags where the CPU has them) and, with Debian's aarch64
cross-compiler, for ARM NEON with and without the dot-product extension, run under qemu-aarch64.
This checks correctness on ARM; ARM performance is not measured anywhere (no ARM machine).
`make test` installs g++-aarch64-linux-gnu and qemu-user when it can; without them the ARM tests
skip with the reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).parent / "native" / "gemv_standalone.cpp"


def _build_and_run(compiler: str, flags: list[str], runner: list[str], out: Path) -> str:
    exe = out / "gemv_standalone"
    subprocess.run([compiler, "-O2", "-fopenmp", *flags, "-o", str(exe), str(SRC)], check=True,
                   capture_output=True, text=True, timeout=300)
    done = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_standalone_header_on_this_machine(tmp_path):
    from glm130b.quant.kernels.cpu import cpu_features

    avx2 = {"avx2", "fma", "f16c"} <= cpu_features()
    out = _build_and_run("g++", ["-mavx2", "-mfma", "-mf16c"] if avx2 else [], [], tmp_path)
    assert ("isa avx2" in out) == avx2 and ("tile 1" in out) == avx2


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs g++-aarch64-linux-gnu and qemu-user (Debian packages; `make test` installs them as root)")
@pytest.mark.parametrize("march,dot,tile", [("armv8.2-a+dotprod", "sdot", 1), ("armv8-a", "smull", 0)])
def test_arm_neon_kernels_under_qemu(tmp_path, march, dot, tile):
    """(The 8-row tile kernel needs sdot's 4 bytes per lane: without it, the row kernel at every batch.)"""
    out = _build_and_run("aarch64-linux-gnu-g++", ["-static", f"-march={march}"], ["qemu-aarch64", "-cpu", "max"],
                         tmp_path)
    assert "isa neon" in out and f"dot {dot} (NEON)" in out and "q8 1" in out and f"tile {tile}" in out
