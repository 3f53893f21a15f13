"""Every weight kernel against the plain dequantize-then-matmul reference.

CPU: the C++ kernels (built at first use; GLM130B_NO_KERNELS=1 skips them), FP32 / BF16 / INT8 /
INT4, per-row and group scales, batch 1 and larger, odd shapes, 1 and 2 threads. CUDA tests run
only where a GPU is present.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from glm130b.quant import QuantizedLinear
from glm130b.quant import kernels as K
from glm130b.quant.kernels import cpu as cpu_build

needs_kernels = pytest.mark.skipif(bool(os.environ.get("GLM130B_NO_KERNELS")), reason="GLM130B_NO_KERNELS is set")


@pytest.fixture(scope="module")
def ext():
    module = cpu_build.get()
    assert module is not None, f"the C++ kernels did not build: {cpu_build.error()}"
    return module


def _layer(n, k, bits, group, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.1, 3.0, k))  # uneven columns: groups matter
    return QuantizedLinear.from_linear(lin, bits, group)


SHAPES = [  # (out, in): tiny, odd inputs, not a multiple of any vector width, GLM-like
    (1, 1), (7, 5), (33, 1365), (64, 128), (130, 344), (96, 1000), (256, 2048),
]


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 32, 64, 6])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_kernel_matches_reference(ext, bits, group, shape):
    n, k = shape
    layer = _layer(n, k, bits, group)
    for batch in (1, 2, 3, 8, 13):
        x = torch.randn(batch, k)
        ref = K.reference_linear(x, layer)
        for threads in (1, 2):
            K.set_num_threads(threads)
            before = K.set_int4_vnni(False)  # the FP32-activation kernel: rounding only
            try:
                y = K.quantized_linear(x, layer)
            finally:
                K.set_num_threads(None)
                K.set_int4_vnni(before)
            tol = 2e-6 * (k ** 0.5) * ref.abs().max().item() + 1e-6
            assert (y - ref).abs().max().item() <= tol, (shape, batch, threads)


def vnni_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The INT4 VNNI kernel's bound (gemv.h): each input is rounded to a multiple of its block's
    step = absmax / 32639 (blocks of 64 even or 64 odd inputs), so |error| <= sum |w| step / 2."""
    k = x.shape[1]
    ku = (k + 1) // 2
    nb = -(-ku // 64)
    step = torch.zeros_like(x)
    for h in (0, 1):
        half = x[:, h::2]
        padded = torch.zeros(x.shape[0], nb * 64)
        padded[:, : half.shape[1]] = half.abs()
        amax = padded.view(x.shape[0], nb, 64).amax(-1) / 32639
        step[:, h::2] = amax.repeat_interleave(64, dim=1)[:, : half.shape[1]]
    return (step / 2) @ w.abs().t()


@needs_kernels
@pytest.mark.parametrize("group", [None, 128, 256, 32])
@pytest.mark.parametrize("shape", SHAPES + [(64, 2752)])
def test_int4_vnni_kernel_within_its_bound(ext, group, shape):
    """Where the CPU has AVX-512 VNNI, INT4 products round x to 16-bit fixed point per block:
    within the bound above of the reference (and exact FP32 rounding for groups it does not take)."""
    if not ext.int4_vnni:
        pytest.skip("no AVX-512 VNNI on this CPU")
    before_rows = ext.int8_activation_min_rows()
    ext.set_int8_activation_min_rows(2**62)  # the 16-bit kernel at every batch (the 8-bit one is the default)
    try:
        _check_vnni16_bound(group, shape)
    finally:
        ext.set_int8_activation_min_rows(before_rows)


def _check_vnni16_bound(group, shape):
    n, k = shape
    layer = _layer(n, k, 4, group)
    w = layer.dequantized_weight()
    for batch in (1, 3, 4, 6, 8):
        x = torch.randn(batch, k) * torch.linspace(0.01, 4.0, k)  # small and large inputs side by side
        x[0, : k // 3] = 0.0  # a zero block
        ref = K.reference_linear(x, layer)
        for threads in (1, 2):
            K.set_num_threads(threads)
            try:
                y = K.quantized_linear(x, layer)
            finally:
                K.set_num_threads(None)
            rounding = 2e-6 * (k ** 0.5) * ref.abs().max().item() + 1e-6
            bound = vnni_error_bound(x, w) + rounding
            assert bool(((y - ref).abs() <= bound).all()), (shape, group, batch, threads)
    if group in (None, 128, 256) and k >= 128:  # the VNNI path ran: its error is not FP32 rounding
        before = K.set_int4_vnni(False)
        try:
            exact = K.quantized_linear(x, layer)
        finally:
            K.set_int4_vnni(before)
        assert not torch.equal(exact, y)


def _x86_variants() -> list[str]:
    """Instruction sets this CPU can also run, built beside the default (AVX-512) kernels."""
    f = cpu_build.cpu_features()
    out = ["avx2"] if {"avx2", "fma", "f16c"} <= f else []
    return out + (["avxvnni"] if "avx_vnni" in f and out else [])


@pytest.fixture(scope="module", params=_x86_variants() or [pytest.param("avx2", marks=pytest.mark.skip("no AVX2"))])
def variant(request):
    """The kernels built with GLM130B_CPU_ISA=<variant> flags (e.g. AVX2 only, no AVX-512)."""
    if os.environ.get("GLM130B_NO_KERNELS"):
        pytest.skip("GLM130B_NO_KERNELS is set")
    return cpu_build.variant(request.param)


def q8_error_bound(x: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """The 8-bit-activation kernel's bound (gemv.h): each input is rounded to a multiple of its
    block's step = absmax / 127 (blocks of 32 inputs for INT8, 64 for INT4), so
    |error| <= sum |w| step / 2."""
    k = x.shape[1]
    block = 32 if bits == 8 else 64
    nb = -(-k // block)
    padded = torch.zeros(x.shape[0], nb * block)
    padded[:, :k] = x.abs()
    step = (padded.view(x.shape[0], nb, block).amax(-1) / 127).repeat_interleave(block, dim=1)[:, :k]
    return (step / 2) @ w.abs().t()


def _variant_linear(ext, x, layer, threads):
    fmt = K.FMT[f"int{layer.bits}"]
    return ext.linear(x, layer.qweight, layer.scales, layer.group_size or 0, layer.bias, fmt, threads)


@pytest.fixture(scope="module", params=["default"] + _x86_variants())
def q8_build(request):
    """Every build here with the 8-bit-activation kernel: this CPU's own (AVX-512 VNNI: vpdpbusd)
    and the x86 variants it can also run (AVX2: maddubs; AVX-VNNI)."""
    if os.environ.get("GLM130B_NO_KERNELS"):
        pytest.skip("GLM130B_NO_KERNELS is set")
    ext = cpu_build.get() if request.param == "default" else cpu_build.variant(request.param)
    if ext is None or not ext.q8 or (ext.int4_vnni and ext.int8_activation_min_rows() > 1):
        pytest.skip("this build does not take the 8-bit-activation kernel at every batch")
    return ext


def _with_tile_rows(ext, rows, x, layer, threads):
    """The product with the 8-row tile kernel taking products from `rows` rows of x."""
    before = ext.int8_tile_min_rows()
    ext.set_int8_tile_min_rows(rows)
    try:
        return _variant_linear(ext, x, layer, threads)
    finally:
        ext.set_int8_tile_min_rows(before)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 64, 128, 6])
@pytest.mark.parametrize("shape", SHAPES + [(64, 2752)])
def test_int8_activation_kernels_within_their_bound(q8_build, bits, group, shape):
    """INT8 / INT4 x 8-bit activations (decode batches and prefills) within the bound above, on
    the row kernel (small batches) and the 8-row tile kernel (from 8 rows of x), which sum the
    same integers and so agree to FP32 rounding; with integer activations off, the exact FP32
    kernels (rounding only)."""
    ext = q8_build
    n, k = shape
    layer = _layer(n, k, bits, group)
    w = layer.dequantized_weight()
    tile = ext.q8_tile
    assert tile or ext.isa in ("scalar", "neon")
    for batch in (1, 2, 4, 5, 8, 9, 19):
        x = torch.randn(batch, k) * torch.linspace(0.01, 4.0, k)  # small and large inputs side by side
        x[0, : k // 3] = 0.0  # zero blocks
        ref = K.reference_linear(x, layer)
        rounding = 2e-6 * (k ** 0.5) * ref.abs().max().item() + 1e-6
        for threads in (1, 2):
            y = _variant_linear(ext, x, layer, threads)
            bound = q8_error_bound(x, w, bits) + rounding
            assert bool(((y - ref).abs() <= bound).all()), (shape, group, batch, threads)
            if tile:
                rows = _with_tile_rows(ext, 2**62, x, layer, threads)
                assert (rows - y).abs().max().item() <= rounding, (shape, group, batch, threads)
            before = ext.int_activations_enabled()
            ext.set_int_activations(False)
            try:
                exact = _variant_linear(ext, x, layer, threads)
            finally:
                ext.set_int_activations(before)
            assert (exact - ref).abs().max().item() <= rounding, (shape, group, batch, threads)
        takes = group in (None, 64, 128) or group >= k  # whole blocks of 32 units, or per row
        if takes and k >= 64:  # the integer path ran: its error is not FP32 rounding
            assert not torch.equal(exact, y)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variant_dense_kernels_match_reference(variant, dtype):
    """FP32 / BF16 weights on the AVX2 build's float kernels."""
    for n, k in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k).to(dtype)
        b = torch.randn(n)
        for batch in (1, 4, 9):
            x = torch.randn(batch, k)
            y = variant.linear(x, w, None, 0, b, K.FMT[dtype], 2)
            torch.testing.assert_close(y, F.linear(x, w.float(), b), rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_long_prefills_stay_on_the_int8_activation_kernel_where_it_runs():
    from types import SimpleNamespace

    def ext(q8, vnni, on=True, q8_from=1):
        return SimpleNamespace(q8=q8, int4_vnni=vnni, int_activations_enabled=lambda: on,
                               int8_activation_min_rows=lambda: q8_from)

    assert K._int8_activation_gemm(ext(True, False), _layer(8, 256, 4, None))
    assert K._int8_activation_gemm(ext(True, False), _layer(8, 256, 4, 128))
    assert K._int8_activation_gemm(ext(True, False), _layer(8, 256, 8, 32))
    assert not K._int8_activation_gemm(ext(True, False), _layer(8, 256, 4, 32))  # half a block
    assert K._int8_activation_gemm(ext(True, True), _layer(8, 256, 4, None))  # AVX-512 VNNI: the 8-bit one too
    assert not K._int8_activation_gemm(ext(True, True, q8_from=2**62), _layer(8, 256, 4, None))  # 16-bit: BLAS
    assert not K._int8_activation_gemm(ext(True, False, on=False), _layer(8, 256, 8, None))
    assert not K._int8_activation_gemm(ext(False, False), _layer(8, 256, 8, None))


def test_isa_selection(monkeypatch):
    """GLM130B_CPU_ISA picks the compile flags (a cache entry of its own); auto follows the CPU."""
    monkeypatch.setenv("GLM130B_CPU_ISA", "avx2")
    assert cpu_build.isa_flags() == ["-mavx2", "-mfma", "-mf16c"]
    key = cpu_build.build_key()
    monkeypatch.setenv("GLM130B_CPU_ISA", "scalar")
    assert cpu_build.isa_flags() == [] and cpu_build.build_key() != key
    monkeypatch.setenv("GLM130B_CPU_ISA", "native")
    assert cpu_build.isa_flags() == ["-march=native"]
    monkeypatch.setenv("GLM130B_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="GLM130B_CPU_ISA"):
        cpu_build.isa_flags()
    monkeypatch.delenv("GLM130B_CPU_ISA")
    monkeypatch.setattr(cpu_build, "cpu_features", lambda: {"avx", "avx2", "fma", "f16c"})
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    assert cpu_build.isa_name() == "avx2" and not any("512" in f for f in cpu_build.isa_flags())
    monkeypatch.setattr(cpu_build, "cpu_features", lambda: {"avx2", "fma", "f16c", "avx_vnni"})
    assert cpu_build.isa_name() == "avxvnni"
    monkeypatch.setattr(cpu_build, "cpu_features",
                        lambda: {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
    assert cpu_build.isa_name() == "avx512" and "-mavx512vnni" not in cpu_build.isa_flags()
    monkeypatch.setattr(cpu_build, "cpu_features", lambda: {"sse2"})
    assert cpu_build.isa_name() == "scalar"
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu_build, "cpu_features", lambda: {"fp", "asimd", "asimddp"})
    assert cpu_build.isa_flags() == ["-march=armv8.2-a+dotprod"]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_kernel_matches_reference(ext, dtype, shape):
    n, k = shape
    torch.manual_seed(0)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n)
    for batch in (1, 4, 9):
        x = torch.randn(batch, k)
        ref = F.linear(x, w.float(), b)
        y = K.dense_linear(x, w, b)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_kernels
def test_kernel_does_not_touch_its_inputs(ext):
    layer = _layer(64, 256, 4, 32)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 256)
    x0 = x.clone()
    K.quantized_linear(x, layer)
    K.quantized_linear(x, layer)
    assert torch.equal(x, x0)
    for name, t in layer.state_dict().items():
        assert torch.equal(t, state[name]), name


@needs_kernels
def test_non_contiguous_and_3d_inputs(ext):
    layer = _layer(48, 96, 8, None)
    x = torch.randn(2, 96, 5).transpose(1, 2)  # [2, 5, 96], not contiguous
    before = K.set_int_activations(False)  # the layout is under test, not the 8-bit activations' rounding
    try:
        torch.testing.assert_close(layer(x), K.reference_linear(x, layer), rtol=1e-5, atol=1e-5)
    finally:
        K.set_int_activations(before)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 6, 64])
def test_dequantize_kernel_is_exact(ext, bits, group):
    layer = _layer(37, 301, bits, group)
    full = layer.dequantized_weight()
    fmt = K.FMT[f"int{bits}"]
    assert torch.equal(ext.dequantize(layer.qweight, layer.scales, group or 0, fmt, 301, 0, 37, 2), full)
    assert torch.equal(ext.dequantize(layer.qweight, layer.scales, group or 0, fmt, 301, 5, 9, 1), full[5:9])


def test_long_prefill_uses_blas_blocks_and_matches():
    layer = _layer(200, 300, 4, 64)
    x = torch.randn(K.BLAS_MIN_ROWS + 3, 300)
    before = K.set_int_activations(False)  # else CPUs without AVX-512 VNNI keep it on the integer kernel
    try:
        torch.testing.assert_close(K.quantized_linear(x, layer), K.reference_linear(x, layer), rtol=1e-4, atol=1e-4)
    finally:
        K.set_int_activations(before)
    torch.testing.assert_close(K._blocked_blas_linear(x, layer, block_elems=7 * 300), K.reference_linear(x, layer),
                               rtol=1e-4, atol=1e-4)


def test_fallback_when_the_build_fails(monkeypatch):
    """No compiler: a warning once, then the PyTorch reference path gives the same results."""
    monkeypatch.setattr(cpu_build, "_state", {})
    monkeypatch.setattr(cpu_build, "_build", lambda: (_ for _ in ()).throw(RuntimeError("no compiler here")))
    layer = _layer(16, 40, 4, None)
    x = torch.randn(2, 40)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        y = K.quantized_linear(x, layer)
    torch.testing.assert_close(y, K.reference_linear(x, layer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.quantized_linear(x, layer)  # warned once only
    assert "no compiler" in K.backend_info()["cpu"]
    monkeypatch.setattr(cpu_build, "_state", {})  # let later tests build again


def test_build_key_changes_with_flags(monkeypatch):
    key = cpu_build.build_key()
    monkeypatch.setattr(cpu_build, "FLAGS", [*cpu_build.FLAGS, "-DEXTRA"])
    assert cpu_build.build_key() != key


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 64, 128])
@pytest.mark.parametrize("shape", [(256, 1024), (4096, 4096), (96, 1000)])
def test_cuda_kernels_match_reference(bits, group, shape):
    n, k = shape
    layer = _layer(n, k, bits, group).cuda()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for batch in (1, 8, 40):
            x = torch.randn(batch, k, device="cuda", dtype=dtype)
            ref = K.reference_linear(x.float(), layer)
            y = K.quantized_linear(x, layer)
            assert y.dtype == dtype and y.shape == (batch, n)
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            assert err < 2e-2, (dtype, batch, err)


@pytest.mark.parametrize("bias", [False, True])
def test_int8_row_scaled_form_equals_the_reference(bias):
    """The GPU's per-row INT8 product, (x @ q^T) * s, is the dequantized product reordered: checked
    here on the CPU in FP32 (exact up to rounding) and BF16 (within BF16's rounding)."""
    layer = _layer(96, 200, 8, None, bias=bias)
    x = torch.randn(3, 200)
    ref = K.reference_linear(x, layer)
    torch.testing.assert_close(K._int8_row_scaled_linear(x, layer), ref, rtol=1e-5, atol=1e-4)
    y = K._int8_row_scaled_linear(x.bfloat16(), layer)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max().item() / ref.abs().max().item() < 2e-2


def test_a_released_int4_source_refuses_to_be_saved_or_read():
    """After compact_cuda_int4 an INT4 layer keeps only the kernel's layout: saving, dequantizing
    or a backward is refused with one line instead of writing or using an empty placeholder; a
    cast keeps the layout (in the kernel's dtypes); set_weight makes the layer whole again. (The
    layout is faked here: tinygemm runs on CUDA only; the CUDA test below uses the real one.)"""
    from glm130b.quant import QuantizationError

    layer = _layer(16, 64, 4, None)
    size = layer.weight_bytes()
    packed, sz = torch.arange(8, dtype=torch.int32), torch.ones(2, 16, 2, dtype=torch.bfloat16)
    layer.release_source((packed, sz, 32))
    assert layer.qweight.numel() == 0 and layer.weight_bytes() == size
    for action in (layer.state_dict, layer.dequantized_weight, layer.int_weight):
        with pytest.raises(QuantizationError, match="load the model again"):
            action()
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(QuantizationError, match="load the model again"):
        layer(x).sum().backward()
    scales = layer.scales.clone()
    layer.half()
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales)  # not via FP16
    p2, sz2, g = layer._cache["tinygemm"]
    assert torch.equal(p2, packed) and sz2.dtype == torch.bfloat16 and g == 32
    layer.set_weight(torch.randn(16, 64))
    assert not layer.source_released and "qweight" in layer.state_dict()


@cuda
def test_compacted_cuda_int4_model_decodes_the_same_in_half_the_weight_memory():
    from helpers import varied_model

    from glm130b.infer.engine import GenerationConfig
    from glm130b.infer.generate import generate_batch
    from glm130b.quant import QuantizationError, quantize_model
    from glm130b.quant.weights import compact_cuda_int4
    from glm130b.tokenizer import default_tokenizer

    tok = default_tokenizer()
    model = quantize_model(varied_model("1d", seed=1).cuda().to(torch.bfloat16), 4)
    prompts, cfg = ["In the beginning", "起初，神创造天地。"], GenerationConfig(max_new_tokens=8)
    before = generate_batch(model, tok, prompts, cfg)  # builds the layouts beside qweight
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    n = compact_cuda_int4(model)
    assert n > 0
    freed = held - torch.cuda.memory_allocated()
    sources = sum(m.weight_bytes() for m in model.modules() if getattr(m, "source_released", False))
    assert freed >= 0.8 * sources  # the packed sources (less their scales) are gone
    assert generate_batch(model, tok, prompts, cfg) == before
    with pytest.raises(QuantizationError):
        model.state_dict()


@cuda
def test_cuda_int4_uses_tinygemm_where_it_can():
    layer = _layer(256, 1024, 4, 128).cuda()
    layer(torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16))
    assert layer._cache.get("tinygemm"), "tinygemm path was not taken for a supported shape"


@needs_kernels
def test_kernel_benchmark_runs_and_times_both_kernels(ext):
    """benchmarks/kernels.py: row and tile kernel (and BLAS) for each shape; timings not asserted.
    The knob it turns is restored afterwards."""
    import importlib.util
    from pathlib import Path

    if not ext.q8_tile:
        pytest.skip("no tile kernel in this build")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = ext.int8_tile_min_rows()
    r = bench.measure(ext, 4, 64, 256, 9, 1, 1)
    assert ext.int8_tile_min_rows() == before
    assert r["rows"] == 9 and r["shape"] == [64, 256]
    assert all(r[key] > 0 for key in ("row_ms", "tile_ms", "blas_ms", "row_over_tile", "blas_over_tile"))


def test_decode_benchmark_quick_run_has_the_keys():
    """benchmarks/decode.py --quick --json runs end to end (timings are not asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--json", "--threads", "1"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    result = json.loads(out)
    for key in ("fp32_tok_s", "bf16_tok_s", "int8_tok_s", "int4_tok_s", "int4_vs_fp32", "fp32_roofline_fraction",
                "int4_roofline_fraction", "int4_weight_bytes_vs_fp16", "fp32_batch8_tok_s", "read_bw_gbs",
                "peak_rss_mb", "gemv_4096"):
        assert key in result, key
    assert result["int4_weight_bytes_vs_fp16"] <= 0.3
    assert all(v["tok_s"] > 0 for v in result["variants"].values())


def test_gpu_decode_benchmark_runs_on_the_cpu():
    """benchmarks/decode.py's GPU half (decode_gpu.py) runs end to end at a tiny shape on the CPU,
    so the script a GPU session runs is exercised by every test run (timings are not asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_gpu.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--dtype", "fp32", "--json",
                          "--variants", "fp32,fp32_compiled,int4", "--no-peers"], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    result = json.loads(out)
    assert set(result["variants"]) == {"fp32", "fp32_compiled", "int4"}
    for r in result["variants"].values():
        assert "error" not in r, r
        assert r["tok_s"] > 0 and r["batch8_tok_s"] > 0 and r["prefill_tok_s"] > 0 and 0 < r["roofline_fraction"]
    assert result["variants"]["int4"]["weight_bytes_per_token"] < result["variants"]["fp32"]["weight_bytes_per_token"]
    assert result["compile_failures"] == {}
    assert {"int4_vs_fp32", "fp32_compiled_vs_eager", "bandwidth_gbs"} <= set(result)


def test_gpu_decode_benchmark_keeps_its_figures_when_the_peer_fails_or_batch_n_is_cut(monkeypatch):
    """A failing transformers peer is recorded as an error (no ratio against it) instead of ending
    the run; a variant measured at batch 1 but cut before batch N keeps its batch-1 figures."""
    import argparse
    import sys
    from pathlib import Path

    from glm130b.config import GLMConfig

    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    decode_gpu = __import__("decode_gpu")

    def broken(*_a, **_k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(decode_gpu, "_hf_peer", broken)
    cfg = GLMConfig(name="t", vocab_size=256, hidden_size=64, num_layers=1, num_heads=2, ffn_hidden_size=128)
    peer = decode_gpu.hf_peer(cfg, torch.device("cpu"), torch.float32, 8, 4, 2, 1)
    assert peer == {"error": "RuntimeError: CUDA out of memory"}
    args = argparse.Namespace(preset="t", dtype="fp32", prompt=8, new_tokens=4, batch=2)
    res = {"fp32": {"bytes_per_token": 1e6, "prefill": 0.1, "b1": 0.2, "bn": float("inf"), "error": None}}
    out = decode_gpu.summarize(args, cfg, torch.device("cpu"), {"best": 1e9, "copy": 1e9}, res, peer, {}, {})
    assert out["variants"]["fp32"]["tok_s"] == pytest.approx(20.0) and out["variants"]["fp32"]["batch2_tok_s"] is None
    assert out["peer"] == peer and not any("transformers" in k for k in out)
    sys.modules.pop("decode_gpu", None)


def test_fp16_int8_on_a_gpu_scales_before_the_product_so_large_activations_stay_finite():
    """The row-scaled INT8 form sums unscaled integers: with FP16 activations of GLM-130B's size
    those sums pass 65504 (inf), so the CUDA routing takes the scaled (dequantized) product for
    FP16. Checked on the CPU by calling the CUDA router (`_cuda_linear`) on CPU tensors."""
    layer = _layer(64, 4096, 8, None)
    layer.qweight.fill_(100)  # every product 100 * x: a row's unscaled sum is 100 * sum(x)
    x = torch.full((2, 4096), 40.0)  # 4096 * 40 * 100 = 1.6e7 unscaled; scaled it stays small
    ref = K.reference_linear(x, layer)
    assert torch.isinf(K._int8_row_scaled_linear(x.half(), layer)).any()  # the hazard is real
    y = K._cuda_linear(x.half(), layer)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=1e-2)
    assert K._cuda_linear(x.bfloat16(), layer).dtype == torch.bfloat16  # BF16 keeps the row-scaled form
