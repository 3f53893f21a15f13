"""BF16 / FP16 on CPUs without fast half-precision matrix products: warn once, run FP32."""

from __future__ import annotations

import warnings

import pytest
import torch

from glm130b import cpu_precision as CP
from glm130b.eval.runner import apply_precision
from glm130b.train.precision import Precision

AVX2_ONLY = {"avx", "avx2", "fma", "f16c"}  # a Zen 2
ZEN5 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}


def test_native_half_rules():
    assert not CP.native_half(torch.bfloat16, AVX2_ONLY, "x86_64")[0]
    assert not CP.native_half(torch.float16, AVX2_ONLY, "x86_64")[0]
    assert CP.native_half(torch.bfloat16, ZEN5, "x86_64")[0]
    assert not CP.native_half(torch.float16, ZEN5, "x86_64")[0]  # measured 1.6 GFLOP/s here
    assert CP.native_half(torch.float16, ZEN5 | {"avx512_fp16"}, "x86_64")[0]
    assert CP.native_half(torch.bfloat16, {"asimd", "bf16"}, "aarch64")[0]
    assert not CP.native_half(torch.bfloat16, {"asimd"}, "aarch64")[0]
    ok, reason = CP.native_half(torch.bfloat16, AVX2_ONLY, "x86_64")
    assert "AVX512_BF16" in reason and "slower" in reason


@pytest.fixture
def avx2_cpu(monkeypatch):
    monkeypatch.setattr(CP, "_features", lambda: AVX2_ONLY)
    monkeypatch.setattr(CP.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(CP, "_warned", set())
    monkeypatch.delenv("GLM130B_CPU_HALF", raising=False)


def test_bf16_training_on_an_avx2_cpu_warns_once_and_runs_fp32(avx2_cpu, monkeypatch):
    with pytest.warns(RuntimeWarning, match="training runs in fp32 instead of bf16"):
        p = Precision("bf16", "cpu")
    assert p.mode == "fp32" and p.requested == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Precision("bf16", "cpu").mode == "fp32"  # warned once
        assert Precision("fp32", "cpu").mode == "fp32"
    monkeypatch.setenv("GLM130B_CPU_HALF", "allow")
    assert Precision("bf16", "cpu").mode == "bf16"


def test_bf16_evaluation_on_an_avx2_cpu_stays_fp32(avx2_cpu):
    model = torch.nn.Linear(4, 4)
    with pytest.warns(RuntimeWarning, match="evaluation runs in fp32 instead of bf16"):
        out = apply_precision(model, "bf16")
    assert out.weight.dtype == torch.float32
    assert apply_precision(torch.nn.Linear(4, 4), "fp16").weight.dtype == torch.float32


def test_bf16_stays_bf16_where_it_is_fast(monkeypatch):
    monkeypatch.setattr(CP, "_features", lambda: ZEN5)
    monkeypatch.setattr(CP.platform, "machine", lambda: "x86_64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Precision("bf16", "cpu").mode == "bf16"
        assert apply_precision(torch.nn.Linear(4, 4), "bf16").weight.dtype == torch.bfloat16
