"""The compiled decode step over a static KV cache (infer/compiled.py) decodes what the plain
engine decodes: greedy batches of different lengths, beams, seeded sampling, several blanks in
one cache, both rotary layouts; compiled by inductor on the CPU here (CUDA graphs on a GPU)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from helpers import spawn_ranks, varied_model

from glm130b.cli import main
from glm130b.infer import compiled
from glm130b.infer.engine import Engine, GenerationConfig
from glm130b.infer.generate import generate, generate_batch, infill
from glm130b.model.kv_cache import StaticKVCache
from glm130b.model.masks import Block
from glm130b.tokenizer import default_tokenizer

PROMPTS = ["In the beginning", "起初，神创造天地。地是空虚混沌", "And God said, Let there be light: and there was"]
BEAM = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=5)
SAMPLE = GenerationConfig(strategy="sample", seed=3, temperature=1.3, max_new_tokens=8)


@pytest.fixture(autouse=True)
def exact_kv_cache(monkeypatch):
    monkeypatch.setenv("GLM130B_KV_CACHE", "fp32")  # token-for-token comparisons: no FP16 rounding


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def _outputs(model, tokenizer):
    return (generate_batch(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=8)),
            generate(model, tokenizer, "Paris is the [MASK] of France.", config=BEAM),
            generate_batch(model, tokenizer, PROMPTS[:2], SAMPLE),
            infill(model, tokenizer, "In the [MASK] God created the [MASK] and the [gMASK]",
                   config=GenerationConfig(max_new_tokens=5), reuse_cache=True).spans)


def _with_compile(model, mode, fn):
    model.compile_decode = mode
    try:
        return fn()
    finally:
        model.compile_decode = False


@pytest.mark.parametrize("rotary", ["1d", "2d"])
def test_static_cache_step_equals_the_plain_engine(rotary, tokenizer):
    """The static cache's step (every slot attended, masked; writes at device-side slots; beams
    reordered in place), uncompiled: the same tokens as the plain engine."""
    model = varied_model(rotary, seed=1)
    plain = _outputs(model, tokenizer)
    assert len(set(plain[0])) == 3  # different outputs: a real comparison
    engine = Engine(model, compile_decode="eager")
    cache = engine.new_cache(2, 16)
    assert isinstance(cache, StaticKVCache) and engine.kv_dtype == torch.float32
    assert cache.max_len == compiled.CACHE_ROUND and engine.new_cache(2, 200) is cache  # one per shape, reused
    assert engine.new_cache(2, compiled.CACHE_ROUND + 1).max_len == 2 * compiled.CACHE_ROUND
    assert _with_compile(model, "eager", lambda: _outputs(model, tokenizer)) == plain


def test_inductor_compiled_step_equals_the_plain_engine(tokenizer, recwarn):
    """torch.compile (inductor on this CPU) of the decode step: same tokens, and the CPU C++
    kernels stay out of the graph (no graph-break warning about them)."""
    model = varied_model("1d", seed=1)
    plain = _outputs(model, tokenizer)
    got = _with_compile(model, "default", lambda: _outputs(model, tokenizer))
    assert got == plain
    assert not [w for w in recwarn if "Dynamo does not know how to trace" in str(w.message)]


def _tensor_parallel_worker(rank: int, folders: dict, expected: dict, mode: str) -> None:
    from glm130b.checkpoint import load_model
    from glm130b.train.parallel_plan import build_mesh

    mesh = build_mesh(tp=2, device_type="cpu")
    for name, folder in folders.items():
        model, tokenizer = load_model(folder, tp_mesh=mesh["tp"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            got = _with_compile(model, mode, lambda model=model, tokenizer=tokenizer: _outputs(model, tokenizer))
        assert got == expected[name], (rank, name)
        assert "torch.compile of the decode step failed" not in err.getvalue(), err.getvalue()  # really compiled


@pytest.mark.parametrize("mode", ["eager", pytest.param("default", marks=pytest.mark.slow)])
def test_tensor_parallel_static_step_equals_one_process(tmp_path, tokenizer, monkeypatch, mode):
    """--compile under --tp: every rank runs the static-cache step on its heads and its
    vocabulary rows (a full-precision folder, and an INT8 one with groups and an INT8 head),
    the logits gathered inside the step; the tokens are one process's plain engine's.
    ("default": compiled by inductor with the collectives in the graph; slow.)"""
    from glm130b.checkpoint import load_model, save_model
    from glm130b.quant import kernels, quantize_model

    monkeypatch.setenv("GLM130B_KV_CACHE", "fp32")  # the spawned ranks inherit it
    if mode == "default":  # inductor's graph dequantizes exactly: the reference takes no 8-bit activations either
        monkeypatch.setenv("GLM130B_INT_ACT", "0")
    before = kernels.set_int_activations(mode != "default")
    try:
        folders, expected = {}, {}
        for name, quantize in (("fp", False), ("q8h8", True)):
            model = varied_model("1d", seed=1)
            save_model(tmp_path / name, quantize_model(model, 8, 4, head_bits=8) if quantize else model, tokenizer)
            folders[name] = str(tmp_path / name)
            expected[name] = _outputs(load_model(tmp_path / name)[0], tokenizer)
    finally:
        kernels.set_int_activations(before)
    spawn_ranks(_tensor_parallel_worker, 2, tmp_path, folders, expected, mode)


def test_a_compile_failure_falls_back_to_the_eager_step(tokenizer, monkeypatch, capsys):
    """A compiler that fails (no C++ compiler, an unsupported op) costs speed, not the answer."""
    from torch._dynamo.exc import TorchDynamoException

    def broken(fn, **kwargs):
        def run(*args):
            raise TorchDynamoException("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_compiled", {})  # not the graphs an earlier test compiled
    model = varied_model("1d", seed=1)
    plain = generate_batch(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=6))
    engine = Engine(model, compile_decode="default")
    assert engine._decoder.fn is not compiled.decode_one
    got = _with_compile(model, "default", lambda: generate_batch(model, tokenizer, PROMPTS,
                                                                  GenerationConfig(max_new_tokens=6)))
    assert got == plain
    assert "torch.compile of the decode step failed" in capsys.readouterr().err


def test_a_one_token_context_is_prefilled_not_decoded(tokenizer):
    """A one-token prefill has the shape of a decode step but attends only its own slots: it
    must not go to the static step, which attends every slot of the cache."""
    model = varied_model("1d", seed=1)
    plain, fast = Engine(model), Engine(model, compile_decode="eager")
    got = []
    for engine in (plain, fast):
        cache = engine.new_cache(1, 8)
        cache.k[0].fill_(3.0)  # stale keys in the unused slots: a step attending them would differ
        got.append(engine.forward(*engine.prefill_inputs([[6]]), cache, logits_at=torch.tensor([0])))
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-5)


def test_a_full_static_cache_is_an_error_not_a_wrong_token(tokenizer):
    model = varied_model("1d", seed=1)
    engine = Engine(model, compile_decode="eager")
    cache = engine.new_cache(1, 3, pooled=False)
    ids, positions, allowed = engine.prefill_inputs([[5, 6, 7]])
    engine.forward(ids, positions, allowed, cache)
    with pytest.raises(ValueError, match="KV cache full"):
        engine.step([3], cache, [Block(2, 0, True)], [3], [0], torch.tensor([3]), 3)
    assert int(cache.lengths[0]) == 3


def test_cli_compile_flag(tmp_path, tokenizer, capsys):
    """`generate --compile` decodes the same text (static cache, compiled step)."""
    model_dir = tmp_path / "m"
    from glm130b.checkpoint import save_model

    save_model(model_dir, varied_model("1d", seed=1), tokenizer)
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "6", "--device", "cpu", "In the beginning"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == plain


def test_an_unknown_compile_mode_is_one_error_line(tokenizer, tmp_path, monkeypatch, capsys):
    from glm130b.checkpoint import save_model
    from glm130b.errors import GLMError

    with pytest.raises(GLMError, match="compile mode"):
        Engine(varied_model("1d", seed=1), compile_decode="fastest")
    save_model(tmp_path / "m", varied_model("1d", seed=1), tokenizer)
    monkeypatch.setenv(compiled.MODE_ENV, "bogus")
    assert main(["generate", "--model", str(tmp_path / "m"), "--compile", "--max-new-tokens", "2", "In"]) == 2
    err = capsys.readouterr().err
    assert "GLM130B_COMPILE_MODE must be one of" in err and "Traceback" not in err

# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): CUDA graphs
# --------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@cuda
def test_cuda_graph_step_equals_the_eager_engine_in_fp32(tokenizer):
    model = varied_model("1d", seed=1).cuda()
    plain = _outputs(model, tokenizer)
    got = _with_compile(model, "reduce-overhead", lambda: _outputs(model, tokenizer))
    assert got == plain


@cuda
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_cuda_graph_step_logits_in_bf16(bits):
    """BF16 (and INT8/INT4 weights): the compiled step's logits follow the eager step's, fed the
    same tokens, within BF16's rounding."""
    from glm130b.quant import quantize_model

    model = varied_model("2d", seed=1).cuda().to(torch.bfloat16)
    if bits:
        quantize_model(model, bits)
    eager, fast = Engine(model, fused_decode=False), Engine(model, compile_decode="reduce-overhead")
    rows = [[10 + (3 * i) % 50 for i in range(n)] + [6] for n in (5, 11)]
    caches = []
    for engine in (eager, fast):
        cache = engine.new_cache(2, 32)
        engine.forward(*engine.prefill_inputs(rows), cache)
        caches.append(cache)
    tokens = torch.tensor([3, 3])
    blocks = [Block(len(r) - 1, 0, True) for r in rows]
    ctx = torch.tensor([len(r) for r in rows])
    for step in range(6):
        a = eager.step(tokens, caches[0], blocks, [len(r) for r in rows], [step] * 2, ctx, 12)
        b = fast.step(tokens, caches[1], blocks, [len(r) for r in rows], [step] * 2, ctx, 12)
        assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item(), step
        tokens = a.argmax(dim=-1).cpu()
    assert fast._decoder.failed is None
