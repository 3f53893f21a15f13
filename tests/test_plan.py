"""The memory planner reproduces GLM-130B's published hardware facts (README and paper)."""

from __future__ import annotations

import json

import pytest

from glm130b.cli import main
from glm130b.config import GLMConfig
from glm130b.plan import GiB, Gpus, PlanError, count_parameters, plan_inference, plan_training

GLM = GLMConfig.from_preset("glm-130b")


def _plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("bits,gpus,fits", [
    (16, "8x40GB", True),   # FP16 on 8x A100-40G
    (8, "8x24GB", True),    # INT8 on 8x RTX 3090
    (4, "4x24GB", True),    # INT4 on 4x RTX 3090
    (4, "8x11GB", True),    # INT4 on 8x RTX 2080 Ti
    (16, "4x24GB", False),  # FP16 on 4x RTX 3090
    (8, "4x24GB", False),   # INT8 needs more than 4x 3090
])
def test_published_inference_facts(bits, gpus, fits, capsys):
    plan = _plan_json(capsys, "--preset", "glm-130b", "--bits", str(bits), "--gpus", gpus)
    assert plan["fits"] is fits
    assert plan["per_gpu_bytes"] == pytest.approx(sum(plan["per_gpu"].values()))
    assert (plan["margin_bytes"] >= 0) is fits


def test_published_training_fact(capsys):
    """TP 4 x PP 8 on 96 nodes of 8x A100-40G: fits with our FSDP2 and with GLM-130B's ZeRO-1, not
    with plain DDP, and not without activation checkpointing."""
    args = ["--preset", "glm-130b", "--train", "--tp", "4", "--pp", "8", "--nodes", "96", "--gpus", "8x40GB"]
    full = _plan_json(capsys, *args)
    assert full["fits"] and full["dp"] == 24 and full["gpus"] == 768
    assert not full["other_checkpointing"]["fits"]
    assert _plan_json(capsys, *args, "--shard", "optimizer")["fits"]
    assert not _plan_json(capsys, *args, "--shard", "none")["fits"]


def test_weights_scale_with_bits_and_gpus():
    gpus = Gpus(8, 80)
    w = {b: plan_inference(GLM, gpus, bits=b).per_gpu["weights"] for b in (16, 8, 4)}
    c = count_parameters(GLM)
    assert c.total == 128_697_794_560
    # FP16 weights are exactly 2 bytes/parameter over 8 GPUs
    assert w[16] == pytest.approx(2 * c.total / 8)
    # quantizing only the matrices: INT8 saves a byte and INT4 1.5 bytes per matrix weight (+ scales)
    matrices = GLM.num_layers * c.layer_matrices
    assert w[16] - w[8] == pytest.approx(matrices * 1.0 / 8, rel=1e-3)
    assert w[16] - w[4] == pytest.approx(matrices * 1.5 / 8, rel=1e-3)
    half = plan_inference(GLM, Gpus(4, 80), bits=16).per_gpu["weights"]
    assert half == pytest.approx(2 * w[16])
    # the KV cache grows with batch and sequence
    one = plan_inference(GLM, gpus, batch=1, seq=1024).per_gpu["kv_cache"]
    assert plan_inference(GLM, gpus, batch=4, seq=2048).per_gpu["kv_cache"] == pytest.approx(8 * one)
    assert one == pytest.approx(2 * 70 * 1024 * 12288 * 2 / 8)


def test_training_states_and_checkpointing():
    gpus = Gpus(64, 80)
    full = plan_training(GLM, gpus, tp=8, pp=8)
    ddp = plan_training(GLM, gpus, tp=8, pp=8, shard="none")
    assert full.dp == 1 and full.per_gpu["optimizer"] == pytest.approx(ddp.per_gpu["optimizer"])
    wide = plan_training(GLM, Gpus(512, 80), tp=8, pp=8)
    assert wide.dp == 8 and wide.per_gpu["optimizer"] == pytest.approx(full.per_gpu["optimizer"] / 8)
    off = plan_training(GLM, gpus, tp=8, pp=8, checkpointing=False)
    assert off.per_gpu["activations"] > 3 * full.per_gpu["activations"]


def test_small_models_and_errors(capsys):
    plan = _plan_json(capsys, "--preset", "small", "--gpus", "1x2")
    assert plan["fits"] and plan["per_gpu"]["weights"] < 0.1 * GiB
    for bad in (["--gpus", "banana"], ["--gpus", "0x24"], ["--train", "--tp", "3", "--gpus", "8x40"],
                ["--train", "--tp", "5", "--pp", "1", "--gpus", "5x40"], ["--tp", "16", "--gpus", "8x40"],
                ["--pp", "2", "--gpus", "8x40"]):
        assert main(["plan", "--preset", "glm-130b", *bad]) == 2, bad
        assert "error:" in capsys.readouterr().err
    with pytest.raises(PlanError):
        plan_inference(GLM, Gpus(8, 40), bits=3)


def test_text_output(capsys):
    assert main(["plan", "--preset", "glm-130b", "--bits", "4", "--gpus", "4x24GB"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "kv_cache" in out and "fits" in out


@pytest.mark.parametrize("bits,group_size", [(16, None), (8, None), (4, None), (8, 32), (4, 64)])
@pytest.mark.parametrize("ffn_type", ["geglu", "gelu"])
def test_weights_and_kv_lines_are_the_real_bytes(bits, group_size, ffn_type):
    """The plan's weights and kv_cache lines are, to the byte, the tensors of the model built in the
    planned layout (16-bit, or INT8/INT4 matrices with FP32 scales) and of the engine's KV cache.
    benchmarks/plan_vs_reality.py builds its models this way and compares the same two lines."""
    import torch

    from glm130b.infer.engine import Engine
    from glm130b.model.glm import build_model
    from glm130b.quant import quantize_model
    from glm130b.quant.weights import weight_bytes

    cfg = GLMConfig.from_preset("tiny", ffn_type=ffn_type, rotary="2d" if ffn_type == "gelu" else "1d")
    model = build_model(cfg, "meta").to(torch.bfloat16)
    if bits != 16:
        quantize_model(model, bits, group_size)
    model = model.to_empty(device="cpu")
    batch, seq = 3, 40
    plan = plan_inference(cfg, Gpus(1, 1), bits=bits, batch=batch, seq=seq, group_size=group_size)
    assert weight_bytes(model)["total"] == plan.per_gpu["weights"]
    cache = Engine(model).new_cache(batch, seq)
    assert sum(t.numel() * t.element_size() for t in cache.k + cache.v) == plan.per_gpu["kv_cache"]
