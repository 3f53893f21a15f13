"""Build (at first use) and load the C++ CPU kernels: cpu_gemv.cpp, decode_step.cpp and gemv.h.

The extension is compiled with `torch.utils.cpp_extension.load` on the machine that runs it,
into a cache folder keyed by the source, the compiler flags, the torch version and the CPU's
flags: $GLM130B_KERNEL_CACHE, else $XDG_CACHE_HOME/glm130b/kernels, else
~/.cache/glm130b/kernels. The instruction sets come from the CPU's flags (/proc/cpuinfo), as
explicit compiler flags rather than -march=native: AVX-512 (F, BW, VL, DQ, + VNNI where
present), else AVX2 + FMA + F16C (+ AVX-VNNI where present), aarch64 NEON (+ the dot-product
extension), else plain C++. GLM130B_CPU_ISA=avx512|avxvnni|avx2|neon|scalar|native forces one
(native: -march=native), with its own cache entry; the tests build the avx2 variant this way
on AVX-512 machines. `make setup` builds the kernels once (so no later command compiles); a
first-use build stays as the fallback. The first build takes about 10-20 s. A build killed
half-way does not wedge later ones (buildlock.py).

GLM130B_INT_ACT=0 (or the older GLM130B_INT4_VNNI=0) keeps every product on the exact
FP32-activation kernels, where an integer-activation kernel (gemv.h) would run.
GLM130B_Q8_TILE_MIN_ROWS=N sets the rows of x from which the 8-bit-activation kernel runs on
8-row weight tiles (default 8; a large N keeps the one-row-at-a-time kernel everywhere).

If compilation fails (no compiler, no Python headers, GLM130B_NO_KERNELS=1) `get()` returns
None once with a warning, and callers fall back to plain PyTorch (correct, but slower).
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

from glm130b.quant.kernels.buildlock import build_lock

HERE = Path(__file__).parent
SOURCES = [HERE / "cpu_gemv.cpp", HERE / "decode_step.cpp"]
HEADERS = [HERE / "gemv.h"]
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]  # + isa_flags()
ISAS = ("auto", "native", "avx512", "avxvnni", "avx2", "neon", "scalar")

_lock = threading.Lock()
_state: dict = {}


def cache_root() -> Path:
    if os.environ.get("GLM130B_KERNEL_CACHE"):
        return Path(os.environ["GLM130B_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glm130b" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_features() -> set[str]:
    """The CPU's feature flags (x86 `flags`, ARM `Features` of /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_name(isa: str | None = None) -> str:
    """The instruction set the kernels are built for: $GLM130B_CPU_ISA, else detected."""
    isa = (isa or os.environ.get("GLM130B_CPU_ISA") or "auto").strip().lower()
    if isa not in ISAS:
        raise ValueError(f"GLM130B_CPU_ISA={isa!r}: expected one of {', '.join(ISAS)}")
    if isa != "auto":
        return isa
    f, machine = cpu_features(), platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"} <= f:
            return "avx512"
        if {"avx2", "fma", "f16c"} <= f:
            return "avxvnni" if "avx_vnni" in f else "avx2"
        return "scalar"
    if machine in ("aarch64", "arm64"):
        return "neon"
    return "scalar"


def isa_flags(isa: str | None = None) -> list[str]:
    """Compiler flags of that instruction set (see isa_name)."""
    isa, f = isa_name(isa), cpu_features()
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if isa == "native":
        return ["-march=native"]
    if isa == "avx512":
        vnni = ["-mavx512vnni"] if "avx512_vnni" in f else []
        return [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", *vnni]
    if isa == "avxvnni":
        return [*avx2, "-mavxvnni"]
    if isa == "avx2":
        return avx2
    if isa == "neon":
        return ["-march=armv8.2-a+dotprod"] if "asimddp" in f else []
    return []


def build_key(isa: str | None = None) -> str:
    import torch

    h = hashlib.sha256()
    flags = " ".join(FLAGS + isa_flags(isa))
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), flags.encode(), torch.__version__.encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def get():
    """The compiled module (`linear`, `dequantize`, `DecodeStack`, `DecodeWeight`, `isa`, `lanes`), or None."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("GLM130B_NO_KERNELS"):
            _state["error"] = "disabled by GLM130B_NO_KERNELS"
        else:
            try:
                module = _build()
            except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
                _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                warnings.warn(
                    f"glm130b: could not compile the C++ CPU kernels ({_state['error']}); "
                    "using the slower pure-PyTorch path", RuntimeWarning, stacklevel=3)
        if module is not None and "0" in (os.environ.get("GLM130B_INT_ACT"), os.environ.get("GLM130B_INT4_VNNI")):
            module.set_int_activations(False)  # the exact FP32-activation kernels everywhere
        for var, setter in (("GLM130B_Q8_MIN_ROWS", "set_int8_activation_min_rows"),  # AVX-512 VNNI: 8-bit kernel
                            ("GLM130B_Q8_TILE_MIN_ROWS", "set_int8_tile_min_rows")):  # 8-row tiles (where built)
            rows = os.environ.get(var, "")
            if module is not None and rows.isdigit() and hasattr(module, setter):
                getattr(module, setter)(int(rows))
        _state["module"] = module
        return module


def error() -> str | None:
    """Why the kernels are not available (None if they are or were never requested)."""
    return _state.get("error")


_variants: dict = {}


def variant(isa: str):
    """The kernels built for instruction set `isa` (see isa_name), loaded beside the default
    ones (the tests check the AVX2 build on AVX-512 machines); raises if the build fails."""
    with _lock:
        if isa not in _variants:
            _variants[isa] = _build(isa)
        return _variants[isa]


def _build(isa: str | None = None):
    import torch.utils.cpp_extension as ext

    key = build_key(isa)
    directory = cache_root() / key
    directory.mkdir(parents=True, exist_ok=True)
    with build_lock(directory):  # a killed build's torch lock is broken, a live one waited for
        return ext.load(
            name=f"glm130b_cpu_{key}",
            sources=[str(f) for f in SOURCES],
            extra_cflags=FLAGS + isa_flags(isa),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=bool(os.environ.get("GLM130B_KERNEL_VERBOSE")),
        )


def main() -> int:
    """Build (or load) the kernels now, as `make setup` does, so no later command compiles;
    prints what was built, returns 1 if the build failed."""
    from glm130b.quant.kernels import int_kernel_name  # (the package imports this module)

    module = get()
    if module is None:
        print(f"glm130b kernels: not built ({error()}); commands will use the PyTorch fallback")
        return 1
    print(f"glm130b kernels: {module.isa} ({' '.join(isa_flags()) or 'no ISA flags'}), "
          f"integer kernel: {int_kernel_name(module) or 'none'}, "
          f"cache {cache_root() / build_key()}")
    return 0

