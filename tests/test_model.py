"""The model against the official GLM-130B code (tests/fixtures/oracle) and its own invariants."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm130b.checkpoint import CheckpointError
from glm130b.config import GLMConfig
from glm130b.interop.sat import config_from_official_shapes, load_official
from glm130b.model.attention import attention_reference, attention_sdpa
from glm130b.model.glm import GLMModel, build_model, glm_loss
from glm130b.model.masks import Block, attention_allowed, position_ids

ORACLE = Path(__file__).parent / "fixtures" / "oracle"


@pytest.fixture(scope="module")
def oracle():
    weights = load_file(ORACLE / "reference.safetensors")
    ref = load_file(ORACLE / "reference_logits.safetensors")
    meta = json.loads((ORACLE / "reference.json").read_text())
    cfg = config_from_official_shapes(weights, num_heads=meta["config"]["num_attention_heads"], max_seq_len=64)
    model = GLMModel(cfg)
    load_official(model, weights)
    model.eval()
    return model, ref, meta


@pytest.mark.parametrize("kind", ["gmask", "mask"])
@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_logits_match_official_code(oracle, kind, impl):
    model, ref, meta = oracle
    model.set_attention_impl(impl)
    layout = meta["layouts"][kind]
    ids = ref[f"{kind}.input_ids"]
    # Build positions and mask from our own masks module, not from the stored ones...
    p = layout["prefix_length_P"]
    block = Block(layout["mask_position"], ids.shape[1] - p, continues=(kind == "gmask"))
    pos = position_ids(p, [block]).unsqueeze(0)
    allowed = attention_allowed(ids.shape[1], p)
    # ...and check they equal the official ones.
    assert torch.equal(pos, ref[f"{kind}.position_ids"])
    assert torch.equal(allowed[0, 0], ref[f"{kind}.attention_allowed"].bool())
    with torch.no_grad():
        logits, hidden = model(ids, pos, allowed=allowed, return_hidden=True)
    assert (logits - ref[f"{kind}.logits"]).abs().max().item() < 1e-4
    for i, h in enumerate(hidden):
        assert (h - ref[f"{kind}.hidden_states.layer{i}"]).abs().max().item() < 1e-4
    model.set_attention_impl("sdpa")


def test_oracle_is_sensitive_to_layout(oracle):
    """A wrong mask (causal only) must fail the 1e-4 check by a wide margin."""
    model, ref, meta = oracle
    ids = ref["mask.input_ids"]
    with torch.no_grad():
        logits = model(ids, ref["mask.position_ids"], context_lengths=torch.tensor([0]))
    assert (logits - ref["mask.logits"]).abs().max().item() > 0.5


def test_loader_rejects_wrong_shapes(oracle):
    model, _, _ = oracle
    weights = load_file(ORACLE / "reference.safetensors")
    weights["transformer.final_layernorm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match="final_layernorm.weight"):
        load_official(model, weights)
    del weights["transformer.final_layernorm.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        load_official(model, weights)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_equals_reference_attention(dtype, tol):
    torch.manual_seed(0)
    b, nh, length, d = 2, 4, 12, 16
    q, k, v = (torch.randn(b, nh, length, d).to(dtype) for _ in range(3))
    allowed = attention_allowed(length, torch.tensor([5, 9]))
    for layer_id in (0, 3):
        ref = attention_reference(q, k, v, allowed, layer_id).float()
        out = attention_sdpa(q, k, v, allowed, layer_id).float()
        assert (ref - out).abs().max().item() < tol


def test_context_is_independent_of_part_b():
    """No leakage: changing Part-B tokens leaves every Part-A hidden state unchanged."""
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_preset("tiny")).eval()
    ids = torch.randint(10, 1000, (1, 20))
    other = ids.clone()
    other[0, 12:] = torch.randint(10, 1000, (8,))
    ctx = torch.tensor([12])
    with torch.no_grad():
        _, h1 = model(ids, context_lengths=ctx, return_hidden=True)
        _, h2 = model(other, context_lengths=ctx, return_hidden=True)
    for a, b in zip(h1, h2, strict=True):
        assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
        assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("rotary", ["1d", "2d"])
def test_kv_cache_decoding_matches_full_forward(rotary):
    torch.manual_seed(0)
    cfg = GLMConfig.from_preset("tiny", rotary=rotary)
    model = GLMModel(cfg).eval()
    ids = torch.randint(10, 1000, (1, 14))
    ctx = 8
    pos = position_ids(ctx, [Block(3, 14 - ctx)], two_d=rotary == "2d").unsqueeze(0)
    with torch.no_grad():
        full = model(ids, pos, context_lengths=torch.tensor([ctx]))
        cache = model.new_kv_cache(1, 14)
        steps = [model(ids[:, :ctx], pos[..., :ctx], context_lengths=torch.tensor([ctx]), cache=cache)]
        for t in range(ctx, 14):
            allowed = torch.ones(1, 1, 1, t + 1, dtype=torch.bool)
            steps.append(model(ids[:, t : t + 1], pos[..., t : t + 1], allowed=allowed, cache=cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_embedding_gradient_shrink_scales_only_the_gradient():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 10))
    targets = torch.randint(0, 100, (2, 10))
    grads = {}
    for alpha in (1.0, 0.1):
        torch.manual_seed(1)
        model = GLMModel(GLMConfig.from_preset("tiny", emb_grad_shrink=alpha, vocab_size=128, tie_word_embeddings=False))
        logits = model(ids, context_lengths=torch.tensor([4, 4]))
        glm_loss(logits, targets, torch.ones_like(targets)).backward()
        grads[alpha] = (logits.detach(), model.word_embeddings.weight.grad.clone())
    assert torch.allclose(grads[1.0][0], grads[0.1][0], atol=1e-6)
    assert torch.allclose(grads[0.1][1], 0.1 * grads[1.0][1], atol=1e-7)


def test_deepnorm_init():
    cfg = GLMConfig.from_preset("tiny", num_layers=8, hidden_size=256, num_heads=4, ffn_hidden_size=1024)
    torch.manual_seed(0)
    model = GLMModel(cfg)
    beta = (2 * 8) ** -0.5
    block = model.layers[0]
    qkv = block.attention.query_key_value.weight.view(4, 3, 64, 256)
    xavier = (2 / (256 + 256)) ** 0.5
    assert abs(qkv[:, 0].std().item() - xavier) < 0.05 * xavier
    assert abs(qkv[:, 2].std().item() - beta * xavier) < 0.05 * beta * xavier
    ffn = (2 / (1024 + 256)) ** 0.5 * beta
    assert abs(block.mlp.dense_4h_to_h.weight.std().item() - ffn) < 0.05 * ffn
    assert block.attention.query_key_value.bias.abs().max().item() == 0.0


def test_glm_130b_parameter_count_on_meta():
    cfg = GLMConfig.from_preset("glm-130b")
    model = build_model(cfg, "meta")
    h, f, v, n = 12288, 32768, 150528, 70
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (2 * f * h + 2 * f) + (h * f + h) + 4 * h
    assert model.num_parameters() == v * h + n * per_layer + 2 * h == 128_697_794_560


def test_base_preset_is_glm_130b_architecture_at_about_110m():
    cfg = GLMConfig.from_preset("base")
    assert 100e6 <= build_model(cfg, "meta").num_parameters() <= 150e6
    assert (cfg.norm, cfg.ffn_type, cfg.gelu_approximate, cfg.rotary) == ("deepnorm", "geglu", "none", "1d")
    assert cfg.ffn_hidden_size == 8 * cfg.hidden_size // 3 and cfg.head_dim == 64
    assert cfg.emb_grad_shrink == 0.1 and cfg.tie_word_embeddings


def test_chatglm_6b_shapes_on_meta():
    model = build_model(GLMConfig.from_preset("chatglm-6b"), "meta")
    assert model.layers[0].mlp.dense_h_to_4h.weight.shape == (16384, 4096)
    # 2D rotary: each half of the 128-dim head rotates over 64 dims -> 32 frequencies.
    assert model.layers[0].attention.inv_freq.shape == (32,)


def test_model_can_overfit_one_batch():
    """The whole forward/backward path learns: one fixed GLM batch is memorised quickly."""
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_preset("tiny", vocab_size=256))
    ids = torch.randint(8, 256, (4, 32))
    ctx = torch.tensor([10, 12, 14, 16])
    targets = torch.roll(ids, -1, dims=1)
    loss_mask = (torch.arange(32).unsqueeze(0) >= ctx.unsqueeze(1)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = glm_loss(model(ids, context_lengths=ctx), targets, loss_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


@pytest.mark.parametrize("kind", ["gmask", "mask"])
def test_fp16_rotary_matches_the_official_fp16_angles(oracle, kind):
    """rotary_precision="fp16" reproduces SAT's FP16 cos/sin (the official models' angles)."""
    model, ref, _ = oracle
    half = GLMModel(dataclasses.replace(model.config, rotary_precision="fp16"))
    half.load_state_dict(model.state_dict())
    ids, pos = ref[f"{kind}.input_ids"], ref[f"{kind}.position_ids"]
    allowed = ref[f"{kind}.attention_allowed"].bool().view(1, 1, *ids.shape[1:] * 2)
    with torch.no_grad():
        got = half.eval()(ids, pos, allowed=allowed)
    assert (got - ref[f"{kind}.logits_fp16rope"]).abs().max().item() < 1e-4
    assert (got - ref[f"{kind}.logits"]).abs().max().item() > 1e-4  # the two targets differ: a real check


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rotary_frequencies_move_with_the_model_and_keep_dtype_and_values(precision):
    """`.to(device)`/`.to_empty()` move each layer's frequencies (a plain attribute); `.half()`
    and `.to(dtype)` leave their dtype and values alone."""
    cfg = GLMConfig.from_preset("tiny", vocab_size=256, rotary_precision=precision)
    model = GLMModel(cfg)
    want = [m.attention.inv_freq.clone() for m in model.layers]
    model.to(torch.bfloat16).half()
    assert all(torch.equal(m.attention.inv_freq, w) for m, w in zip(model.layers, want, strict=True))
    model.to("meta")
    assert all(m.attention.inv_freq.device.type == "meta" for m in model.layers)
    model.to_empty(device="cpu")  # computed again, exactly as built
    got = [m.attention.inv_freq for m in model.layers]
    assert all(g.device.type == "cpu" and g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_a_compiled_model_moved_to_a_device_compiles_once():
    """The frequencies move with `.to(device)`, so a compiled forward does not find them on the CPU
    at its first call and compile again at the second (as training with --compile on a GPU did).
    The meta device stands in for a GPU."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = GLMModel(GLMConfig.from_preset("tiny", vocab_size=256)).to("meta")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    ctx = torch.tensor([4, 6], device="meta")
    for _ in range(2):
        compiled(ids, context_lengths=ctx)
    assert counter.frame_count == 1
    torch._dynamo.reset()
