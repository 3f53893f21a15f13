"""The decoding engine: cache layout vs full recompute, batching, sampling, beams, stops, streaming."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
from helpers import varied_model

from glm130b.cli import main
from glm130b.infer.engine import (
    Batch,
    Engine,
    GenerationConfig,
    GenerationError,
    Row,
    banned_ngram_tokens,
    generate_rows,
    length_penalty,
    sample_next,
)
from glm130b.infer.generate import PromptError, generate, generate_batch, generate_block, infill, infill_ids
from glm130b.model.masks import Block, attention_allowed, position_ids
from glm130b.quant import quantize_model, use_fast_linears
from glm130b.tokenizer import default_tokenizer


@pytest.fixture(autouse=True)
def exact_kv_cache(monkeypatch):
    """These tests check the cache layout token for token against full recomputes: an FP32
    cache, so no rounding can flip a near tie (the FP16 default is tested in test_fused_decode)."""
    monkeypatch.setenv("GLM130B_KV_CACHE", "fp32")


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def _model(rotary="1d", seed=0):
    return varied_model(rotary, seed)


@pytest.fixture(scope="module", params=["1d", "2d"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def model1d():
    return _model("1d")


def _full_logits(model, sequence, context_length, blocks):
    """GLMModel.forward over a whole Part A + Part B sequence (the reference for the cache)."""
    pos = position_ids(context_length, blocks, two_d=model.config.rotary == "2d").unsqueeze(0)
    ids = torch.tensor([sequence])
    with torch.no_grad():
        return model(ids, pos, allowed=attention_allowed(len(sequence), context_length))[0]


def _ids(tokenizer, text):
    return tokenizer.encode(text)


# --------------------------------------------------------------------------------------------
# The layout: cache == full recompute
# --------------------------------------------------------------------------------------------
def test_engine_logits_equal_model_forward(model):
    ids = torch.randint(8, 1000, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    if model.config.rotary == "2d":
        pos = torch.stack((pos, torch.zeros_like(pos)), 1)
    allowed = attention_allowed(12, torch.tensor([5, 9]))
    with torch.no_grad():
        ref = model(ids, pos, allowed=allowed)
    at = torch.tensor([11, 7])
    for m in (model, use_fast_linears(copy.deepcopy(model))):
        for fused in (False, True):
            engine = Engine(m, fused_decode=fused)
            got = engine.forward(ids, pos, allowed, engine.new_cache(2, 12), logits_at=at)
            torch.testing.assert_close(got, ref[torch.arange(2), at], rtol=1e-4, atol=1e-4)


def test_greedy_tokens_are_the_argmax_of_the_full_sequence(model, tokenizer):
    """Every generated token equals the argmax of GLMModel.forward on Part A + Part B so far."""
    for text, continues in (("In the beginning God created the heaven [gMASK]", True),
                            ("Paris is the [MASK] of France.", False)):
        ids = _ids(tokenizer, text)
        pos = next(i for i, t in enumerate(ids) if t in (tokenizer.mask_id, tokenizer.gmask_id))
        out = generate_block(model, ids, Block(pos, 0, continues), tokenizer.sop_id, set(), 10)
        assert len(out) == 10
        seq = ids + [tokenizer.sop_id] + out
        logits = _full_logits(model, seq, len(ids), [Block(pos, 11, continues)])
        assert logits[len(ids):-1].argmax(-1).tolist() == out


def test_several_blanks_reuse_one_cache_in_the_pretraining_layout(model, tokenizer):
    ids = _ids(tokenizer, "A [MASK] of the [sMASK], and then [MASK] again.")
    where = [i for i, t in enumerate(ids) if t in (tokenizer.mask_id, tokenizer.smask_id)]
    cfg = GenerationConfig(max_new_tokens=6)
    result = infill_ids(model, tokenizer, ids, config=cfg, reuse_cache=True)
    assert len(result.tokens) == 3
    # rebuild Part A + every block (<sop> + span) and check each token against the full forward
    seq, blocks = list(ids), []
    for pos, span in zip(where, result.tokens, strict=True):
        blocks.append(Block(pos, 1 + len(span)))
        seq += [tokenizer.sop_id] + span
    logits = _full_logits(model, seq, len(ids), blocks)
    start = len(ids)
    for span, block in zip(result.tokens, blocks, strict=True):
        predicted = logits[start : start + len(span)].argmax(-1).tolist()
        assert predicted == span
        stopped = len(span) < 6
        if stopped:  # the block ended on <eop>/<eos>
            assert logits[start + len(span)].argmax().item() in (tokenizer.eop_id, tokenizer.eos_id)
        start += block.length
    assert "[MASK]" not in result.text and result.text.endswith(" again.")


def test_default_mode_fills_blanks_one_after_another(model1d, tokenizer):
    """GLM-130B's rules: <eos> appended (the text does not end in a blank), each blank generated
    on the sequence with the earlier answers spliced in."""
    text = "A [MASK] B [MASK] C"
    result = infill(model1d, tokenizer, text, 5)
    ids = _ids(tokenizer, text) + [tokenizer.eos_id]
    first = ids.index(tokenizer.mask_id)
    span1 = generate_block(model1d, ids, Block(first, 0), tokenizer.sop_id, {tokenizer.eop_id, tokenizer.eos_id}, 5)
    assert result.tokens[0] == span1
    ids = ids[:first] + span1 + ids[first + 1 :]
    second = ids.index(tokenizer.mask_id)
    span2 = generate_block(model1d, ids, Block(second, 0), tokenizer.sop_id, {tokenizer.eop_id, tokenizer.eos_id}, 5)
    assert result.tokens[1] == span2


def test_batch_of_different_lengths_equals_one_by_one(model, tokenizer):
    prompts = ["In the beginning", "起初，神创造天地。地是空虚混沌", "And God said, Let there be light: and there was"]
    cfg = GenerationConfig(max_new_tokens=8)
    alone = [generate(model, tokenizer, p, config=cfg) for p in prompts]
    assert generate_batch(model, tokenizer, prompts, cfg) == alone
    streamed: dict[int, list[int]] = {}
    generate_batch(model, tokenizer, prompts, cfg, on_token=lambda i, t: streamed.setdefault(i, []).append(t))
    assert [tokenizer.decode(streamed.get(i, [])) for i in range(3)] == alone


def test_batched_cache_matches_full_recompute_per_row(model1d):
    engine = Engine(model1d)
    rows = [Row([10 + i for i in range(n)] + [6], Block(n, 0, True)) for n in (3, 9, 6)]
    batch = Batch(engine, rows, 5)
    tokens = torch.tensor([3, 3, 3])
    fed = [[3], [3], [3]]
    for _ in range(4):
        logits = batch.feed(tokens)
        tokens = torch.randint(8, 500, (3,))
        for i, r in enumerate(rows):
            seq = r.context + fed[i]
            ref = _full_logits(model1d, seq, len(r.context), [Block(r.block.mask_position, len(fed[i]), True)])
            torch.testing.assert_close(logits[i], ref[-1], rtol=1e-4, atol=1e-4)
            fed[i].append(int(tokens[i]))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(model1d, tokenizer):
    cfg = GenerationConfig(strategy="sample", seed=7, max_new_tokens=12, temperature=1.5)
    a = generate(model1d, tokenizer, "In the beginning", config=cfg)
    b = generate(model1d, tokenizer, "In the beginning", config=cfg)
    c = generate(model1d, tokenizer, "In the beginning", config=GenerationConfig(
        strategy="sample", seed=8, max_new_tokens=12, temperature=1.5))
    assert a == b and a != c
    greedy = generate(model1d, tokenizer, "In the beginning", config=GenerationConfig(max_new_tokens=12))
    assert generate(model1d, tokenizer, "In the beginning",
                    config=GenerationConfig(strategy="sample", seed=1, top_k=1, max_new_tokens=12)) == greedy
    assert generate(model1d, tokenizer, "In the beginning",
                    config=GenerationConfig(strategy="sample", seed=1, top_p=1e-6, max_new_tokens=12)) == greedy


def test_top_k_top_p_and_temperature_follow_the_fp32_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)

    def draw(cfg, n=4000):
        return Counter(sample_next(logits.expand(n, 4), cfg, g).tolist())

    assert set(draw(GenerationConfig(strategy="sample", top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(GenerationConfig(strategy="sample", top_p=0.85))) == {0, 1, 2}
    assert set(draw(GenerationConfig(strategy="sample", top_k=2))) == {0, 1}
    counts = draw(GenerationConfig(strategy="sample"), 20000)
    for i, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(counts[i] / 20000 - p) < 0.02
    hot = draw(GenerationConfig(strategy="sample", temperature=2.0), 20000)
    expected = torch.softmax(logits[0] / 2.0, -1)
    for i in range(4):
        assert abs(hot[i] / 20000 - expected[i].item()) < 0.02
    # renormalised nucleus: among {0, 1}, 0.5 / 0.8 and 0.3 / 0.8
    nucleus = draw(GenerationConfig(strategy="sample", top_p=0.7), 20000)
    assert abs(nucleus[0] / 20000 - 0.625) < 0.02
    # bf16 logits are sampled from an FP32 softmax too
    assert sample_next(logits.bfloat16(), GenerationConfig(strategy="sample", top_k=1), g).item() == 0


def test_no_repeat_ngram():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 1], 2) == {2}
    assert banned_ngram_tokens([5, 6], 1) == {5, 6}
    assert banned_ngram_tokens([1, 2], 3) == set()
    assert banned_ngram_tokens([1, 2, 3], 0) == set()


def test_generation_never_repeats_an_ngram(model1d, tokenizer):
    for n in (1, 2, 3):
        cfg = GenerationConfig(max_new_tokens=30, no_repeat_ngram_size=n)
        ids = _ids(tokenizer, "A [MASK] B")
        out = generate_block(model1d, ids, Block(ids.index(tokenizer.mask_id), 0), tokenizer.sop_id, set(), 30,
                             config=cfg)
        grams = [tuple(out[i : i + n]) for i in range(len(out) - n + 1)]
        assert len(grams) == len(set(grams)), (n, out)


def _eop_loving(tokenizer):
    """A model whose <eop> logit is H (the final LN's bias 1 times an all-ones head row): it always
    wants to stop."""
    model = _model("1d", seed=3)
    with torch.no_grad():
        model.final_layernorm.bias.fill_(1.0)
        model.lm_head.weight[tokenizer.eop_id].fill_(1.0)
    return model


def test_min_and_max_length(tokenizer):
    model = _eop_loving(tokenizer)
    ids = _ids(tokenizer, "In the beginning") + [tokenizer.gmask_id]
    block = Block(len(ids) - 1, 0, True)
    stops = {tokenizer.eop_id, tokenizer.eos_id}
    assert generate_block(model, ids, block, tokenizer.sop_id, stops, 20) == []
    forced = generate_block(model, ids, block, tokenizer.sop_id, stops, 20,
                            config=GenerationConfig(max_new_tokens=20, min_new_tokens=3))
    assert len(forced) == 3 and tokenizer.eop_id not in forced
    beam = generate_block(model, ids, block, tokenizer.sop_id, stops, 20,
                          config=GenerationConfig(strategy="beam", max_new_tokens=20, min_new_tokens=4))
    assert len(beam) == 4
    assert len(generate_block(model, ids, block, tokenizer.sop_id, set(), 7)) == 7


def test_stop_strings_cut_the_text_and_streaming_agrees(model1d, tokenizer):
    cfg = GenerationConfig(max_new_tokens=24)
    full = generate(model1d, tokenizer, "In the beginning", config=cfg)
    assert len(full) > 6
    stop = full[3:5]
    pieces: list[str] = []
    cut = generate(model1d, tokenizer, "In the beginning", on_text=pieces.append,
                   config=GenerationConfig(max_new_tokens=24, stop_strings=(stop,)))
    assert cut == full[: full.find(stop)]
    assert "".join(pieces) == cut
    pieces = []
    assert generate(model1d, tokenizer, "In the beginning", on_text=pieces.append, config=cfg) == full
    assert "".join(pieces) == full


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------
def _score(model, tokenizer, ids, block, tokens, alpha, stopped):
    seq = ids + [tokenizer.sop_id] + tokens
    logits = _full_logits(model, seq, len(ids), [Block(block.mask_position, 1 + len(tokens), block.continues)])
    logp = torch.log_softmax(logits[len(ids):].double(), -1)
    total = sum(logp[i, t].item() for i, t in enumerate(tokens))
    if stopped:
        total += max(logp[len(tokens), tokenizer.eop_id].item(), logp[len(tokens), tokenizer.eos_id].item())
    return total / length_penalty(len(tokens), alpha)


def test_length_penalty_formula():
    assert length_penalty(1, 1.0) == 1.0
    assert length_penalty(7, 1.0) == 2.0
    assert length_penalty(7, 0.0) == 1.0
    assert math.isclose(length_penalty(13, 0.5), 3 ** 0.5)


def test_beam_search(model1d, tokenizer):
    ids = _ids(tokenizer, "Paris is the [MASK] of France.")
    block = Block(ids.index(tokenizer.mask_id), 0)
    stops = {tokenizer.eop_id, tokenizer.eos_id}
    greedy = generate_block(model1d, ids, block, tokenizer.sop_id, stops, 6)
    one = generate_block(model1d, ids, block, tokenizer.sop_id, stops, 6,
                         config=GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=6, length_penalty=0.0))
    assert one == greedy
    for alpha in (0.0, 1.0):
        cfg = GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=6, length_penalty=alpha)
        beam = generate_block(model1d, ids, block, tokenizer.sop_id, stops, 6, config=cfg)
        s_beam = _score(model1d, tokenizer, ids, block, beam, alpha, stopped=len(beam) < 6)
        s_greedy = _score(model1d, tokenizer, ids, block, greedy, alpha, stopped=len(greedy) < 6)
        assert s_beam >= s_greedy - 1e-6
    text = generate(model1d, tokenizer, "In the beginning",
                    config=GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=5))
    assert isinstance(text, str)
    assert generate_batch(model1d, tokenizer, ["a", "b c"],
                          GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=3))[1] == \
        generate(model1d, tokenizer, "b c", config=GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=3))


# --------------------------------------------------------------------------------------------
# Settings, errors, quantized models, CLI
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"strategy": "nucleus"}, "strategy"), ({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"num_beams": 0}, "num_beams"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"min_new_tokens": 99, "max_new_tokens": 5}, "min_new_tokens"),
    ({"no_repeat_ngram_size": -2}, "no_repeat"), ({"stop_strings": ("",)}, "stop"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        GenerationConfig(**kwargs)


def test_prompt_errors(model1d, tokenizer):
    with pytest.raises(PromptError, match="no \\[MASK\\]"):
        infill(model1d, tokenizer, "no blank")
    with pytest.raises(PromptError, match="prompt is"):
        generate(model1d, tokenizer, "word " * 200)
    with pytest.raises(GenerationError):
        generate_rows(Engine(model1d), [Row([6], Block(0, 0, True))], GenerationConfig(strategy="beam"), 3, set())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_and_bf16_models_generate(model1d, tokenizer, bits):
    q = quantize_model(copy.deepcopy(model1d), bits)
    cfg = GenerationConfig(max_new_tokens=6)
    out = generate(q, tokenizer, "In the beginning", config=cfg)
    assert isinstance(out, str)
    mixed = use_fast_linears(quantize_model(copy.deepcopy(model1d), bits), torch.bfloat16)
    assert Engine(mixed).dtype == torch.float32
    generate(mixed, tokenizer, "In the beginning", config=cfg)
    result = infill(mixed, tokenizer, "A [MASK] B [MASK]", config=cfg)
    assert len(result.spans) == 2


def test_cli_sampling_flags(tmp_path, tokenizer, capsys):
    from glm130b.checkpoint import save_model

    save_model(tmp_path / "m", _model("1d"), tokenizer)
    args = ["generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--strategy", "sample",
            "--seed", "3", "--top-p", "0.9", "--temperature", "0.8", "In the beginning"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first
    assert main(args + ["--stream"]) == 0 and capsys.readouterr().out == first
    assert main(["infill", "--model", str(tmp_path / "m"), "--json", "--strategy", "beam", "--num-beams", "2",
                 "--max-new-tokens", "3", "--no-repeat-ngram", "2", "A [MASK] B [MASK] C"]) == 0
    assert len(json.loads(capsys.readouterr().out)["spans"]) == 2
    assert main(["generate", "--model", str(tmp_path / "m"), "--temperature", "0", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "temperature" in err and err.count("\n") == 1


@pytest.mark.slow  # real torchrun launches; a gloo rank sometimes aborts (SIGABRT) on this 2-core machine
def test_tensor_parallel_generation_matches_one_process(tmp_path, tokenizer):
    """`torchrun --nproc-per-node 2 -m glm130b generate --tp 2` prints the tokens of one process."""
    import os
    import subprocess
    import sys

    from glm130b.checkpoint import save_model

    save_model(tmp_path / "m", _model("1d", seed=5), tokenizer)
    prompt, text = "In the beginning God created", "And God said, Let there be [MASK]: and there was [MASK]."
    single = generate(_model("1d", seed=5), tokenizer, prompt, max_new_tokens=12)
    single_fill = infill(_model("1d", seed=5), tokenizer, text, max_new_tokens=6).text
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "glm130b"]
    out = subprocess.run(torchrun + ["generate", "--model", str(tmp_path / "m"), "--tp", "2", "--max-new-tokens",
                                     "12", prompt], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == single + "\n"  # rank 0 prints, once
    out = subprocess.run(torchrun + ["infill", "--model", str(tmp_path / "m"), "--tp", "2", "--max-new-tokens",
                                     "6", text], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == single_fill
    # each rank quantizes its own shard: with groups inside a shard, exactly the full model's groups
    from glm130b.checkpoint import load_model

    q, _ = load_model(tmp_path / "m", bits=8, group_size=4)
    single_q = generate(q, tokenizer, prompt, max_new_tokens=12)
    out = subprocess.run(torchrun + ["generate", "--model", str(tmp_path / "m"), "--tp", "2", "--bits", "8",
                                     "--group-size", "4", "--max-new-tokens", "12", prompt],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == single_q + "\n"
    # outside torchrun, --tp says how to launch it
    assert main(["generate", "--model", str(tmp_path / "m"), "--tp", "2", "x"]) == 2
