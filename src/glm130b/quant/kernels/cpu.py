"""Build (at first use) and load the C++ CPU kernels: cpu_gemv.cpp, decode_step.cpp and gemv.h.

The extension is compiled with `torch.utils.cpp_extension.load` on the machine that runs it,
with `-O3 -march=native` (so the AVX-512 or AVX2 path matches the CPU it runs on), into a
cache folder keyed by the source, the compiler flags, the torch version and the CPU's flags:
  $GLM130B_KERNEL_CACHE, else $XDG_CACHE_HOME/glm130b/kernels, else ~/.cache/glm130b/kernels.
It is never built at install time (building under pip's build isolation would pull torch from
PyPI). The first build takes about 10-20 s; later imports load the cached library.
A build killed half-way does not wedge later ones (buildlock.py).

GLM130B_INT4_VNNI=0 keeps INT4 products on the FP32-activation kernel even where the
AVX-512 VNNI one (16-bit fixed-point activations, see gemv.h) would run.

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
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]

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


def build_key() -> str:
    import torch

    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(FLAGS).encode(), torch.__version__.encode(), _cpu_flags().encode()):
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
        if module is not None and os.environ.get("GLM130B_INT4_VNNI") == "0":
            module.set_int4_vnni(False)  # the FP32-activation INT4 kernel everywhere
        _state["module"] = module
        return module


def error() -> str | None:
    """Why the kernels are not available (None if they are or were never requested)."""
    return _state.get("error")


def _build():
    import torch.utils.cpp_extension as ext

    key = build_key()
    directory = cache_root() / key
    directory.mkdir(parents=True, exist_ok=True)
    with build_lock(directory):  # a killed build's torch lock is broken, a live one waited for
        return ext.load(
            name=f"glm130b_cpu_{key}",
            sources=[str(f) for f in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=bool(os.environ.get("GLM130B_KERNEL_VERBOSE")),
        )
