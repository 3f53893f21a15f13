"""3D parallelism (glm130b.train.parallel_plan) against a single-process run of the same seeded model.

Each test starts gloo processes on CPU with `torch.multiprocessing.spawn` and a `file://`
rendezvous in tmp_path. Every rank rebuilds the seeded reference model, computes the
single-process loss and gradients, and compares its parallel run to them (1e-5), gradients
gathered with `full_tensor()` and the GeGLU row permutation undone (`full_grads`).
Workers leave with `os._exit` after a barrier: gloo can abort during interpreter teardown.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import spawn_ranks
from torch.distributed.tensor import DTensor

from glm130b.config import GLMConfig
from glm130b.model.glm import GLMModel, glm_loss
from glm130b.model.masks import Block, position_ids
from glm130b.train import parallel_plan as P

BATCH, LENGTH, VOCAB = 8, 16, 512
TOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny_config(tied: bool = True) -> GLMConfig:
    return GLMConfig.from_preset("tiny", num_layers=4, vocab_size=VOCAB, tie_word_embeddings=tied)


def seeded_model(seed: int = 0, tied: bool = True) -> GLMModel:
    torch.manual_seed(seed)
    return GLMModel(tiny_config(tied))


def make_batch():
    """GLM batch: per-sample context lengths, half [gMASK] (positions continue), half [MASK]
    (the block repeats the blank's position); loss on Part B only, so ranks and microbatches
    hold different numbers of loss tokens."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    targets = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    ctx = torch.randint(3, LENGTH - 2, (BATCH,), generator=g)
    pos = []
    for i, c in enumerate(ctx.tolist()):
        gmask = i % 2 == 0
        block = Block(mask_position=c - 1 if gmask else c // 2, length=LENGTH - c, continues=gmask)
        pos.append(position_ids(c, [block]))
    pos = torch.stack(pos)
    loss_mask = (torch.arange(LENGTH)[None] >= ctx[:, None]).long()
    return {"input_ids": ids, "position_ids": pos, "context_lengths": ctx, "targets": targets, "loss_mask": loss_mask}


def reference(tied: bool = True):
    """Single-process logits, loss and gradients of the seeded model on the whole batch."""
    model = seeded_model(tied=tied)
    b = make_batch()
    logits = model(b["input_ids"], position_ids=b["position_ids"], context_lengths=b["context_lengths"])
    loss = glm_loss(logits, b["targets"], b["loss_mask"])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def dp_slice(batch: dict, mesh) -> dict:
    dp, d = mesh["dp"].size(), mesh["dp"].get_local_rank()
    n = BATCH // dp
    return {k: v[d * n : (d + 1) * n] for k, v in batch.items()}


def assert_grads(grads: dict, ref: dict, scale: float = 1.0) -> None:
    assert grads, "no gradients"
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name] * scale, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def check_clipping(module, mesh, ref_grads: dict) -> None:
    """clip_grad_norm_ sees the global norm (all shards, all stages) and scales every shard."""
    ref_norm = torch.nn.utils.get_total_norm(list(ref_grads.values()))
    norm = P.clip_grad_norm_(module, float(ref_norm) / 2, mesh)
    torch.testing.assert_close(norm, ref_norm, **TOL)
    assert_grads(P.full_grads(module), ref_grads, scale=0.5)


# --------------------------------------------------------------------------------------------
# Process launching
# --------------------------------------------------------------------------------------------
def launch(fn, world: int, tmp_path, *args) -> None:
    spawn_ranks(fn, world, tmp_path, str(tmp_path), *args)  # fn(rank, tmp, *args)


# --------------------------------------------------------------------------------------------
# Workers (module level: spawn pickles them by name)
# --------------------------------------------------------------------------------------------
def _data_tensor_parallel_worker(rank: int, tmp: str, dims: tuple[int, int, int]) -> None:
    ref_logits, ref_loss, ref_grads = reference()
    mesh = P.build_mesh(*dims)
    model = P.parallelize_glm(seeded_model(), mesh)
    b = dp_slice(make_batch(), mesh)
    num_tokens = P.global_num_tokens(b["loss_mask"], mesh["dp"])
    with P.loss_context(model):
        logits = model(b["input_ids"], position_ids=b["position_ids"], context_lengths=b["context_lengths"])
        loss = P.glm_token_loss(logits, P.loss_targets(b["targets"], b["loss_mask"]), num_tokens)
        loss.backward()
    if dims[2] > 1:  # vocabulary-sharded logits straight from the tied head
        assert isinstance(logits, DTensor) and logits.placements[-1].is_shard(2)
        logits = logits.full_tensor()
    n = BATCH // dims[1]
    d = mesh["dp"].get_local_rank()
    torch.testing.assert_close(logits, ref_logits[d * n : (d + 1) * n], **TOL)
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh["dp"].get_group())
    torch.testing.assert_close(total, ref_loss, **TOL)
    assert_grads(P.full_grads(model), ref_grads)
    check_clipping(model, mesh, ref_grads)


def _pipeline_worker(rank: int, tmp: str, dims: tuple[int, int, int], schedule: str, tied: bool = True) -> None:
    _, ref_loss, ref_grads = reference(tied)
    mesh = P.build_mesh(*dims)
    parts = P.pipeline_stages(seeded_model(tied=tied), mesh)
    b = dp_slice(make_batch(), mesh)
    n_microbatches = b["input_ids"].shape[0] // 2
    sched = P.build_schedule(parts.stage, n_microbatches, schedule)
    num_tokens = P.global_num_tokens(b["loss_mask"], mesh["dp"])
    loss = P.pipeline_step(
        parts, sched, b["input_ids"], b["targets"], b["loss_mask"],
        position_ids=b["position_ids"], context_lengths=b["context_lengths"], num_tokens=num_tokens,
    )
    module = parts.module
    if module.is_last:
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        torch.testing.assert_close(loss, ref_loss, **TOL)
    else:
        assert loss is None
    grads = P.full_grads(module)
    layer_ids = {int(name.split(".")[1]) for name in grads if name.startswith("layers.")}
    assert layer_ids == set(P.stage_layer_ranges(4, dims[0])[module.stage_index])
    if tied or module.is_first:  # first stage (input) and, when tied, last stage (head)
        assert "word_embeddings.weight" in grads
    assert ("lm_head.weight" in grads) == (module.is_last and not tied)
    assert_grads(grads, ref_grads)
    check_clipping(module, mesh, ref_grads)


def _checkpoint_worker(rank: int, tmp: str) -> None:
    expected = seeded_model().state_dict()
    # Save under tp=2 ...
    model = P.parallelize_glm(seeded_model(), P.build_mesh(1, 1, 2))
    P.save_checkpoint(model, f"{tmp}/ckpt_tp2")
    # ... load under dp=2 (FSDP) into a differently seeded model: identical full weights.
    fsdp = P.parallelize_glm(seeded_model(seed=7), P.build_mesh(1, 2, 1))
    P.load_checkpoint(fsdp, f"{tmp}/ckpt_tp2")
    full = P.full_state_dict(fsdp)
    assert set(full) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(full[name], value, atol=0, rtol=0)
    # Save from pipeline stages (pp=2): the tied embedding lives on both stages.
    parts = P.pipeline_stages(seeded_model(), P.build_mesh(2, 1, 1))
    P.save_checkpoint(parts.module, f"{tmp}/ckpt_pp2")


def _train_one_step(model, opt, mesh, b) -> None:
    sl = dp_slice(b, mesh)
    n = P.global_num_tokens(sl["loss_mask"], mesh["dp"])
    with P.loss_context(model):
        logits = model(sl["input_ids"], position_ids=sl["position_ids"], context_lengths=sl["context_lengths"])
        P.glm_token_loss(logits, P.loss_targets(sl["targets"], sl["loss_mask"]), n).backward()
    opt.step()
    opt.zero_grad()


def _checkpoint_optimizer_worker(rank: int, tmp: str) -> None:
    b = make_batch()
    mesh_tp = P.build_mesh(1, 1, 2)
    model = P.parallelize_glm(seeded_model(), mesh_tp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_one_step(model, opt, mesh_tp, b)
    P.save_checkpoint(model, f"{tmp}/ckpt_opt", optimizer=opt)
    saved_params, saved_states = P.full_state_dict(model), P.full_optimizer_state(model, opt)

    mesh_dp = P.build_mesh(1, 2, 1)
    resumed = P.parallelize_glm(seeded_model(seed=3), mesh_dp)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    P.load_checkpoint(resumed, f"{tmp}/ckpt_opt", optimizer=resumed_opt)
    params, states = P.full_state_dict(resumed), P.full_optimizer_state(resumed, resumed_opt)
    assert set(states) == set(saved_states) and len(states) == 3 * len(params)  # step, exp_avg, exp_avg_sq
    for want, got in ((saved_params, params), (saved_states, states)):
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
    # The next step agrees across the two layouts (Adam amplifies float noise on tiny grads: 1e-4).
    _train_one_step(model, opt, mesh_tp, b)
    _train_one_step(resumed, resumed_opt, mesh_dp, b)
    a, c = P.full_state_dict(model), P.full_state_dict(resumed)
    for name in a:
        torch.testing.assert_close(a[name], c[name], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_geglu_permutation_roundtrip_and_local_pairs():
    cfg = tiny_config()
    state = seeded_model().state_dict()
    for tp in (1, 2, 4):
        permuted = P.to_tp_layout(state, cfg, tp)
        back = P.from_tp_layout(permuted, cfg, tp)
        for k in state:
            assert torch.equal(back[k], state[k])
        # each contiguous 1/tp slice is [a_r; b_r]
        w = state["layers.0.mlp.dense_h_to_4h.weight"]
        a, b = w.chunk(2)
        for r, local in enumerate(permuted["layers.0.mlp.dense_h_to_4h.weight"].chunk(tp)):
            la, lb = local.chunk(2)
            assert torch.equal(la, a.chunk(tp)[r]) and torch.equal(lb, b.chunk(tp)[r])


def test_stage_layer_ranges():
    assert [len(r) for r in P.stage_layer_ranges(70, 8)] == [9, 9, 9, 9, 9, 9, 8, 8]
    assert P.stage_layer_ranges(4, 2) == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError):
        P.stage_layer_ranges(2, 3)


def test_tensor_parallel_matches_single_process(tmp_path):
    launch(_data_tensor_parallel_worker, 2, tmp_path, (1, 1, 2))


def test_fsdp_matches_single_process(tmp_path):
    launch(_data_tensor_parallel_worker, 2, tmp_path, (1, 2, 1))


def test_tp_x_dp_mesh_matches_single_process(tmp_path):
    launch(_data_tensor_parallel_worker, 4, tmp_path, (1, 2, 2))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_single_process(tmp_path, schedule):
    launch(_pipeline_worker, 2, tmp_path, (2, 1, 1), schedule)


def test_pipeline_x_tp_untied_head_matches_single_process(tmp_path):
    # untied head (a separate lm_head, ColwiseParallel) on the last stage; tied heads are
    # covered by the other TP and PP tests
    launch(_pipeline_worker, 4, tmp_path, (2, 1, 2), "1f1b", False)


@pytest.mark.slow  # FSDP inside pipeline stages; about 6 s of CPU, kept out of the default run
def test_pipeline_x_dp_matches_single_process(tmp_path):
    launch(_pipeline_worker, 4, tmp_path, (2, 2, 1), "gpipe")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_reloads_under_another_layout(tmp_path):
    launch(_checkpoint_worker, 2, tmp_path)
    # ... and in this process without any process group: tp=1, pp=1.
    b = make_batch()
    expected = seeded_model()
    want = expected(b["input_ids"], position_ids=b["position_ids"], context_lengths=b["context_lengths"])
    for name in ("ckpt_tp2", "ckpt_pp2"):
        model = seeded_model(seed=11)
        P.load_checkpoint(model, tmp_path / name)
        for key, value in expected.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
        got = model(b["input_ids"], position_ids=b["position_ids"], context_lengths=b["context_lengths"])
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_checkpoint_with_optimizer_resumes_under_another_layout(tmp_path):
    launch(_checkpoint_optimizer_worker, 2, tmp_path)


def test_glm_130b_plan_shapes():
    tp, pp, dp = 4, 8, 2
    shapes = P.glm_130b_plan_shapes(tp=tp, pp=pp, dp=dp)
    h, f, v, n = 12288, 32768, 150528, 70
    assert len(shapes) == 12 * n + 3  # every parameter once; the tied embedding once
    assert shapes["word_embeddings.weight"] == (v // tp // dp, h)  # vocab over tp, then dp
    assert shapes["final_layernorm.weight"] == (h // dp,)
    for i in (0, 37, 69):
        layer = {k.split(f"layers.{i}.", 1)[1]: s for k, s in shapes.items() if k.startswith(f"layers.{i}.")}
        assert layer == {
            "input_layernorm.weight": (h // dp,),
            "input_layernorm.bias": (h // dp,),
            "attention.query_key_value.weight": (3 * h // tp // dp, h),
            "attention.query_key_value.bias": (3 * h // tp // dp,),
            "attention.dense.weight": (h // dp, h // tp),
            "attention.dense.bias": (h // dp,),
            "post_attention_layernorm.weight": (h // dp,),
            "post_attention_layernorm.bias": (h // dp,),
            "mlp.dense_h_to_4h.weight": (2 * f // tp, h // dp),  # FSDP shards this one on H
            "mlp.dense_h_to_4h.bias": (2 * f // tp // dp,),
            "mlp.dense_4h_to_h.weight": (h // dp, f // tp),
            "mlp.dense_4h_to_h.bias": (h // dp,),
        }
    assert not dist.is_initialized()
