"""The fused C++ decode step (infer/fused.py) against the module-by-module engine."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import varied_model

from glm130b.config import GLMConfig
from glm130b.infer.engine import Batch, Engine, GenerationConfig, Row, beam_search, generate_rows
from glm130b.infer.fused import FusedDecoder, why_not
from glm130b.model.glm import build_model
from glm130b.model.masks import Block
from glm130b.quant import kernels as K
from glm130b.quant import quantize_model, use_fast_linears

pytestmark = pytest.mark.skipif(not K.cpu_kernels_available(), reason="C++ CPU kernels not built")


def _prepare(model, weights: str):
    m = copy.deepcopy(model)
    if weights == "fp32_linear":
        return m  # plain nn.Linear everywhere
    if weights == "fp32":
        return use_fast_linears(m)
    if weights == "bf16":
        return use_fast_linears(m, torch.bfloat16)
    bits, group = {"int8": (8, None), "int4": (4, None), "int4_g32": (4, 32), "int8_g16": (8, 16)}[weights]
    quantize_model(m, bits, group)
    return use_fast_linears(m, torch.bfloat16)


def _rows():
    # different context lengths (padding masked), a [gMASK] block and a [MASK] block
    return [Row([5, 6, 7, 8, 9, 10, 11, 12, 13], Block(8, 0, continues=True)),
            Row([5, 6, 7, 30, 8], Block(3, 3, continues=False)),
            Row([9, 10, 11, 12], Block(3, 0, continues=True))]


def _step_logits(model, fused: bool, steps: int = 6, kv_dtype=torch.float32) -> torch.Tensor:
    engine = Engine(model, fused_decode=fused, kv_dtype=kv_dtype)
    batch = Batch(engine, _rows(), steps + 1)
    tokens = torch.full((3,), 3, dtype=torch.long)
    out = []
    for _ in range(steps):
        logits = batch.feed(tokens)
        out.append(logits)
        tokens = logits.argmax(-1)
    assert bool(engine._fused) == fused
    return torch.stack(out)


@pytest.mark.parametrize("cfg_kw", [{}, {"norm": "preln"}, {"norm": "postln"},
                                    {"rotary": "2d", "ffn_type": "gelu", "gelu_approximate": "tanh"}],
                         ids=["deepnorm", "preln", "postln", "chatglm"])
@pytest.mark.parametrize("weights", ["fp32_linear", "fp32", "bf16", "int8", "int4", "int4_g32", "int8_g16"])
def test_fused_step_matches_the_modules(cfg_kw, weights):
    torch.manual_seed(0)
    cfg = GLMConfig(name="t", vocab_size=300, hidden_size=96, num_layers=3, num_heads=3, ffn_hidden_size=80,
                    max_seq_len=64, **cfg_kw)
    model = _prepare(build_model(cfg).eval(), weights)
    with torch.no_grad():
        model.final_layernorm.weight.mul_(4.0)  # spread the logits so a wrong step shows
    assert why_not(model) is None
    before = K.set_int4_vnni(False)  # both paths on the FP32-activation kernels: rounding differences only
    try:
        ref, got = _step_logits(model, False), _step_logits(model, True)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
        # an FP16 cache on both paths: a key 1e-7 apart may round to neighbouring FP16 values
        ref, got = _step_logits(model, False, kv_dtype=torch.float16), _step_logits(model, True, kv_dtype=torch.float16)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=5e-4)
    finally:
        K.set_int4_vnni(before)
    if weights.startswith("int4"):  # with the VNNI kernel, x's 16-bit rounding may differ by a step
        ref, got = _step_logits(model, False), _step_logits(model, True)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_untied_head_and_generation_match():
    """An untied head (ChatGLM-style checkpoint layout); greedy tokens of generate_rows agree."""
    model = varied_model("1d")
    torch.testing.assert_close(_step_logits(model, True), _step_logits(model, False), rtol=1e-5, atol=1e-4)
    cfg = GenerationConfig(max_new_tokens=12)
    runs = [generate_rows(Engine(model, fused_decode=f, kv_dtype=torch.float32), _rows(), cfg, 3, set())
            for f in (False, True)]
    assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]]


def test_beam_search_reorders_the_cache_the_fused_step_reads():
    model = varied_model("2d")
    cfg = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=8)
    row = Row([5, 6, 7, 8, 9, 10], Block(5, 0, continues=True))
    a = beam_search(Engine(model, fused_decode=False, kv_dtype=torch.float16), row, cfg, 3, set())
    b = beam_search(Engine(model, fused_decode=True, kv_dtype=torch.float16), row, cfg, 3, set())
    assert a.tokens == b.tokens


def test_models_the_fused_step_does_not_take(monkeypatch):
    model = build_model(GLMConfig.from_preset("tiny")).eval()
    assert why_not(model) is None
    ref = copy.deepcopy(model)
    ref.set_attention_impl("reference")
    assert "reference attention" in why_not(ref)
    assert "not FP32" in why_not(copy.deepcopy(model).bfloat16())
    monkeypatch.setenv("GLM130B_FUSED_DECODE", "0")
    assert "turned off" in why_not(model)
    assert FusedDecoder.for_model(model) is None
    engine = Engine(model)  # falls back to the modules and still decodes
    batch = Batch(engine, [Row([5, 6, 7], Block(2, 0, continues=True))], 2)
    assert batch.feed(torch.tensor([3])).shape == (1, model.config.vocab_size)
    assert engine._fused is False


def test_bad_inputs_are_errors_not_crashes():
    model = build_model(GLMConfig.from_preset("tiny")).eval()
    engine = Engine(model)
    batch = Batch(engine, [Row([5, 6, 7], Block(2, 0, continues=True))], 2)
    with pytest.raises(RuntimeError, match="out of range"):
        batch.feed(torch.tensor([model.config.vocab_size + 5]))
    fused = engine._fused
    cache = batch.cache
    with pytest.raises(RuntimeError, match="allowed"):
        fused.step(torch.tensor([[3]]), torch.tensor([[3]]), torch.ones(1, 1, 1, 2, dtype=torch.bool), cache,
                   torch.tensor([0]))
    full = Batch(engine, [Row([5, 6, 7], Block(2, 0, continues=True))], 1)
    full.feed(torch.tensor([3]))
    with pytest.raises(ValueError, match="KV cache full"):
        full.feed(torch.tensor([3]))


def test_fp16_kv_cache_is_the_fused_default_and_stays_close(monkeypatch):
    """Where the fused step decodes, the cache is FP16 (half the memory and reads); its logits stay
    within FP16 rounding of an FP32 cache's. $GLM130B_KV_CACHE overrides; elsewhere the cache
    keeps the activations' dtype."""
    model = varied_model("1d")
    assert Engine(model).kv_dtype == torch.float16
    assert Engine(model, fused_decode=False).kv_dtype == torch.float32
    monkeypatch.setenv("GLM130B_KV_CACHE", "fp32")
    assert Engine(model).kv_dtype == torch.float32
    monkeypatch.setenv("GLM130B_KV_CACHE", "int3")
    with pytest.raises(ValueError, match="fp16 or fp32"):
        Engine(model)
    monkeypatch.delenv("GLM130B_KV_CACHE")
    engine = Engine(model)
    batch = Batch(engine, _rows(), 4)
    assert batch.cache.k[0].dtype == torch.float16
    half, full = _step_logits(model, True, kv_dtype=torch.float16), _step_logits(model, True)
    scale = full.abs().max().item()
    assert (half - full).abs().max().item() <= 2e-3 * scale
    assert (half - full).abs().max().item() > 0  # the cache really is narrower


def test_replaced_weights_rebuild_the_stack_at_the_next_prefill():
    """The stack holds the weights it was built from; a prefill that finds them replaced
    (load_state_dict(assign=True), quantize_model, ...) builds it again."""
    model = varied_model("1d")
    engine = Engine(model, kv_dtype=torch.float32)
    first = _feed_once(engine)
    other = varied_model("1d", seed=5)
    model.load_state_dict(other.state_dict(), assign=True)
    again = _feed_once(engine)
    fresh = _feed_once(Engine(model, kv_dtype=torch.float32))
    torch.testing.assert_close(again, fresh)
    assert (again - first).abs().max() > 1e-2
    quantize_model(model, 4)
    torch.testing.assert_close(_feed_once(engine), _feed_once(Engine(model, kv_dtype=torch.float32)))


def _feed_once(engine) -> torch.Tensor:
    batch = Batch(engine, _rows(), 2)
    return batch.feed(torch.full((3,), 3, dtype=torch.long))


def test_hooks_subclasses_and_failed_builds_fall_back_to_the_modules(monkeypatch):
    model = build_model(GLMConfig.from_preset("tiny")).eval()
    hooked = copy.deepcopy(model)
    hooked.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in why_not(hooked)

    class MyLinear(torch.nn.Linear):
        pass

    sub = copy.deepcopy(model)
    old = sub.layers[1].attention.dense
    sub.layers[1].attention.dense = MyLinear(old.in_features, old.out_features)
    assert "MyLinear" in why_not(sub)
    monkeypatch.setattr(FusedDecoder, "__init__", lambda self, m: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.warns(RuntimeWarning, match="boom"):
        engine = Engine(model)
        logits = _feed_once_tiny(engine)
    assert engine._fused is False and torch.isfinite(logits).all()


def _feed_once_tiny(engine) -> torch.Tensor:
    batch = Batch(engine, [Row([5, 6, 7], Block(2, 0, continues=True))], 2)
    return batch.feed(torch.tensor([3]))


def test_fp16_cache_clamps_instead_of_overflowing():
    from glm130b.model.kv_cache import KVCache

    cache = KVCache(1, 1, 2, 4, 8, torch.float16, "cpu")
    big = torch.full((1, 2, 1, 8), 1e6)
    k, _ = cache.update(0, big, -big)
    assert torch.isfinite(cache.k[0]).all() and torch.isfinite(cache.v[0]).all()
    assert k.dtype == torch.float32 and k.max().item() == 65504.0


@pytest.mark.parametrize("rotary,kv", [("1d", torch.float32), ("2d", torch.float32), ("1d", torch.float16)])
def test_short_prefills_run_fused_and_match(rotary, kv, monkeypatch):
    """A short prefill (rows of different lengths, padding masked) runs as one fused call: the same
    logits at each row's last token and the same cache as the modules'; a long one uses the modules."""
    from glm130b.infer import engine as engine_module
    from glm130b.infer import fused as fused_module

    model = varied_model(rotary)
    contexts = [r.context for r in _rows()]
    last = torch.tensor([len(c) - 1 for c in contexts])
    calls = []
    real = fused_module.FusedDecoder.step
    monkeypatch.setattr(fused_module.FusedDecoder, "step",
                        lambda self, *a, **k: calls.append(a[0].shape) or real(self, *a, **k))
    results = []
    for fused in (False, True):
        engine = Engine(model, fused_decode=fused, kv_dtype=kv)
        cache = engine.new_cache(len(contexts), 12)
        logits = engine.forward(*engine.prefill_inputs(contexts), cache, logits_at=last)
        results.append((logits, cache.k[1][:, :, :9].clone(), cache.seen))
        assert calls == ([torch.Size([3, 9])] if fused else [])
    (ref, ref_k, ref_seen), (got, got_k, got_seen) = results
    assert ref_seen == got_seen == 9
    tol = 1e-4 if kv == torch.float32 else 5e-3  # FP16: a key may round to a neighbouring value
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(got_k.float(), ref_k.float(), rtol=tol, atol=tol)
    monkeypatch.setattr(engine_module, "FUSED_PREFILL_WORK", 10)  # now too long: the modules run it
    engine = Engine(model, kv_dtype=torch.float32)
    calls.clear()
    engine.forward(*engine.prefill_inputs(contexts), engine.new_cache(3, 12))
    assert calls == []
