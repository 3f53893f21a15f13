"""The GLM blank-infilling objective: shares, reconstruction, positions, resume, bad input.

Documents are synthetic ids 100..999 so no tokenizer is needed; specials are 0..6, and 7 plays
the sentence end for [sMASK].
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm130b.data.objective import (
    GLMSampleBuilder,
    InstructionFormatError,
    ObjectiveConfig,
    SpecialIds,
    collate,
    encode_instructions,
    read_instructions,
)

IDS = SpecialIds(mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6, pad=0)
PERIOD = 7
BLANKS = {"mask": IDS.mask, "smask": IDS.smask, "gmask": IDS.gmask, "instruction": IDS.gmask}


def make_docs(seed: int, n: int, max_len: int = 300, period_every: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        doc = [r.randint(100, 999) for _ in range(r.randint(1, max_len))]
        if period_every:
            doc = [PERIOD if r.random() < 1 / period_every else t for t in doc]
        docs.append(doc)
    return docs


def stream_of(docs: list[list[int]]) -> list[int]:
    return [t for doc in docs if doc for t in doc + [IDS.eos]]


def check_sample(sample, seq_len: int, two_d: bool = False) -> list[int]:
    """Assert a sample is well formed and return the source text it encodes (blanks filled back)."""
    inputs, targets = sample.input_ids.tolist(), sample.targets.tolist()
    loss, ctx = sample.loss_mask.tolist(), sample.context_length
    assert sample.input_ids.shape == sample.targets.shape == sample.loss_mask.shape == (seq_len,)
    assert sample.input_ids.dtype == sample.targets.dtype == torch.long
    assert sample.loss_mask.dtype == torch.float
    assert sample.position_ids.shape == ((2, seq_len) if two_d else (seq_len,))
    n = ctx + sum(b.length for b in sample.blocks)  # Part A + Part B
    assert loss == [0.0] * ctx + [1.0] * (n - ctx) + [0.0] * (seq_len - n)
    assert inputs[n:] == [IDS.pad] * (seq_len - n)
    pos = sample.position_ids if two_d else sample.position_ids.unsqueeze(0)
    assert pos[:, n:].eq(0).all()  # padding takes position 0
    assert pos[0, :ctx].tolist() == list(range(ctx))
    if two_d:
        assert pos[1, :ctx].eq(0).all()

    # Part B, parsed from the tokens alone: blocks start at <sop>, end with an <eop> target.
    blank = BLANKS[sample.mode]
    blank_positions = [i for i in range(ctx) if inputs[i] == blank]
    assert all(t == IDS.pad for t in targets[:ctx])
    fills, i = {}, ctx
    while i < n:
        assert inputs[i] == IDS.sop
        j = targets.index(IDS.eop, i)
        span = inputs[i + 1 : j + 1]
        assert targets[i : j + 1] == span + [IDS.eop]  # input <sop>+span, target span+<eop>
        first = pos[0, i].item()
        if sample.mode in ("gmask", "instruction") and not two_d:  # 1D [gMASK]: counts on after the context
            assert first == ctx and pos[0, i : j + 1].tolist() == list(range(ctx, ctx + j + 1 - i))
            mask_position = ctx - 1
        else:
            assert pos[0, i : j + 1].eq(first).all()  # every token at the blank's position
            mask_position = first
        if two_d:
            assert pos[1, i : j + 1].tolist() == list(range(1, j + 2 - i))
        assert mask_position in blank_positions and mask_position not in fills
        fills[mask_position] = span
        i = j + 1
    assert sorted(fills) == blank_positions  # one block per blank, one blank per block
    text = []
    for k, t in enumerate(inputs[:ctx]):
        text.extend(fills.get(k, [t]))
    return text


def builder(seq_len: int = 128, seed: int = 0, **kw) -> GLMSampleBuilder:
    return GLMSampleBuilder(ObjectiveConfig(seq_len, **kw), IDS, seed, sentence_end={PERIOD})


def test_mask_share_and_span_lengths():
    b = builder(256)
    r = random.Random(1)
    lengths, source = [], 0
    for _ in range(400):
        window = [r.randint(100, 999) for _ in range(256)]
        s = b.mask_sample(window)
        assert s.mode == "mask"
        assert check_sample(s, 256) == window[: s.num_source_tokens]
        lengths += [blk.length - 1 for blk in s.blocks]
        source += s.num_source_tokens
        assert s.num_source_tokens + 2 * len(s.blocks) <= 256
    assert 0.13 <= sum(lengths) / source <= 0.17
    # Poisson(3) without zeros has mean 3/(1-e^-3) = 3.16; trimming the last span to hit 15%
    # exactly pulls it a little lower (about 3.03 here).
    assert 2.8 <= sum(lengths) / len(lengths) <= 3.3
    assert max(lengths) <= 40


def test_spans_not_adjacent_and_parts_fit():
    b = builder(64)
    r = random.Random(2)
    for _ in range(200):
        s = b.mask_sample([r.randint(100, 999) for _ in range(64)])
        part_a = s.input_ids[: s.context_length].tolist()
        assert all(not (x == y == IDS.mask) for x, y in zip(part_a, part_a[1:], strict=False))
        assert s.context_length + sum(blk.length for blk in s.blocks) <= 64


def test_part_b_blocks_are_shuffled():
    b = builder(256)
    r = random.Random(3)
    in_order = []
    for _ in range(20):
        s = b.mask_sample([r.randint(100, 999) for _ in range(256)])
        positions = [blk.mask_position for blk in s.blocks]
        in_order.append(positions == sorted(positions))
    assert not any(in_order)  # about 12 blocks each: text order by chance is very unlikely


def test_gmask_suffix_and_positions():
    b = builder(64, two_d=True)
    r = random.Random(4)
    suffixes = []
    for _ in range(300):
        window = [r.randint(100, 999) for _ in range(64)]
        s = b.gmask_sample(window)
        assert s.mode == "gmask" and s.num_source_tokens == 62
        assert check_sample(s, 64, two_d=True) == window[:62]
        assert s.input_ids[s.context_length - 1] == IDS.gmask
        (blk,) = s.blocks
        assert blk.continues and blk.mask_position == s.context_length - 1
        assert s.position_ids[1, s.context_length :].tolist() == list(range(1, 64 - s.context_length + 1))
        assert s.loss_mask.sum() == 64 - s.context_length  # gMASK fills the sample exactly
        suffixes.append(blk.length - 1)
    assert min(suffixes) >= int(0.2 * 62) and max(suffixes) <= 62
    assert 30 <= sum(suffixes) / len(suffixes) <= 44  # uniform over [12, 62]: mean 37


def test_mask_positions_2d():
    b = builder(64, two_d=True)
    s = b.mask_sample(list(range(100, 164)))
    assert check_sample(s, 64, two_d=True) == list(range(100, 100 + s.num_source_tokens))


def test_smask_whole_sentences():
    b = builder(128, smask_prob=1.0)
    r = random.Random(5)
    seen = 0
    for _ in range(100):
        window = [PERIOD if r.random() < 0.1 else r.randint(100, 999) for _ in range(128)]
        s = b.smask_sample(window)
        assert check_sample(s, 128) == window[: s.num_source_tokens]
        if s.mode != "smask":
            continue
        seen += 1
        ctx, offset = s.input_ids[: s.context_length].tolist(), s.context_length
        for blk in s.blocks:
            span = s.input_ids[offset + 1 : offset + blk.length].tolist()
            offset += blk.length
            assert span[-1] == PERIOD or blk.mask_position == len(ctx) - 1  # ends a sentence
            assert blk.mask_position == 0 or ctx[blk.mask_position - 1] == PERIOD  # starts one
    assert seen > 80


def test_smask_needs_sentence_ends():
    with pytest.raises(ValueError, match="sentence_end"):
        GLMSampleBuilder(ObjectiveConfig(64, smask_prob=0.1), IDS, 0)


def test_instruction_sample_and_truncation():
    b = builder(16)
    s = b.instruction_sample(list(range(100, 120)), [500, 501, 502])
    assert s.mode == "instruction" and s.num_source_tokens == 0
    text = check_sample(s, 16)
    assert text == list(range(109, 120)) + [500, 501, 502]  # prompt lost its first 9 tokens
    assert s.context_length == 12 and s.loss_mask.sum() == 4
    assert check_sample(b.instruction_sample([], list(range(100, 114))), 16) == list(range(100, 114))
    assert b.max_answer_tokens == 14  # [gMASK] and <sop> take the other two
    with pytest.raises(ValueError, match="cannot fit seq_len 16"):
        b.instruction_sample([100], list(range(100, 115)))
    with pytest.raises(ValueError, match="answer_ids is empty"):
        b.instruction_sample([100], [])


def test_stream_mode_mix_and_every_token_once():
    docs = make_docs(6, 800)
    instructions = [([300 + i % 50, 301], [400, 401 + i % 7]) for i in range(10_000)]
    b = builder(64)
    samples = list(b.samples(docs, iter(instructions)))
    modes = Counter(s.mode for s in samples)
    assert len(samples) > 2000
    assert 0.035 <= modes["instruction"] / len(samples) <= 0.065
    pretrain = modes["mask"] + modes["gmask"]
    assert 0.66 <= modes["gmask"] / pretrain <= 0.74
    text = []
    for s in samples:
        out = check_sample(s, 64)
        if s.mode != "instruction":
            text += out
            assert len(out) == s.num_source_tokens
    assert text == stream_of(docs)


def test_instructions_run_out_and_none():
    docs = make_docs(7, 50)
    samples = list(builder(64, instruction_share=0.5).samples(docs, iter([([100], [200])] * 3)))
    assert sum(s.mode == "instruction" for s in samples) == 3
    samples = list(builder(64, instruction_share=0.5).samples(docs))
    assert all(s.mode != "instruction" for s in samples)


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_a_pair_whose_answer_does_not_fit_is_passed_over(objective):
    """A short window with long answers among the instructions (the builtin pairs at --seq-len
    64): the stream passes those pairs over instead of failing the run mid-way."""
    docs = make_docs(7, 200)
    room = 14 if objective == "glm" else 15  # seq_len 16 less [gMASK] and <sop>, or <eos>
    pairs = [([100], list(range(200, 200 + room + 1))), ([100], list(range(200, 200 + room)))] * 4
    b = builder(16, instruction_share=0.5, objective=objective)
    with pytest.warns(RuntimeWarning, match="passed over"):
        samples = list(b.samples(docs, iter(pairs)))
    used = [s for s in samples if s.mode == "instruction"]
    assert len(used) == 4  # the four answers that fit, each used
    assert b.state_dict()["instructions"] == 8  # and the other four consumed (a resume skips them too)


def same(a, b) -> bool:
    return (
        a.mode == b.mode and a.context_length == b.context_length
        and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.position_ids, b.position_ids)
        and torch.equal(a.targets, b.targets) and torch.equal(a.loss_mask, b.loss_mask)
    )


def test_same_seed_same_samples_and_different_seed_differs():
    docs = make_docs(8, 100)
    a = list(builder(64, seed=3).samples(docs))
    b = list(builder(64, seed=3).samples(docs))
    c = list(builder(64, seed=4).samples(docs))
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(same(x, y) for x, y in zip(a, c, strict=False))


def test_state_dict_resume_is_exact():
    docs = make_docs(9, 200, period_every=12)
    pairs = [([100 + i], [200 + i, 201]) for i in range(500)]
    kw = dict(smask_prob=0.3, instruction_share=0.2)
    full = list(builder(48, seed=5, **kw).samples(docs, iter(pairs)))

    first = builder(48, seed=5, **kw)
    it = first.samples(docs, iter(pairs))
    head = [next(it) for _ in range(137)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["samples"] == 137

    resumed = builder(48, seed=5, **kw)
    resumed.load_state_dict(state)
    tail = list(resumed.samples(docs, iter(pairs)))
    assert len(head) + len(tail) == len(full)
    assert all(same(x, y) for x, y in zip(head + tail, full, strict=True))

    skipped = list(builder(48, seed=5, **kw).samples(docs, iter(pairs), skip=137))
    assert all(same(x, y) for x, y in zip(skipped, full[137:], strict=True))


def test_load_state_dict_rejects_garbage():
    with pytest.raises(ValueError, match="lacks"):
        builder().load_state_dict({"rng": {}})


def test_collate():
    b = builder(32, two_d=True)
    samples = [b.mask_sample(list(range(100, 140))), b.gmask_sample(list(range(100, 140)))]
    batch = collate(samples)
    assert batch["input_ids"].shape == (2, 32) and batch["position_ids"].shape == (2, 2, 32)
    assert batch["loss_mask"].dtype == torch.float and batch["targets"].dtype == torch.long
    assert batch["context_lengths"].tolist() == [s.context_length for s in samples]
    with pytest.raises(ValueError, match="differ"):
        collate([samples[0], builder(16).gmask_sample([100, 101])])
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def test_special_ids_from_tokenizer_like_object():
    class Tok:
        mask_id, gmask_id, smask_id, sop_id, eop_id, eos_id, pad_id = 1, 2, 3, 4, 5, 6, 0

    b = GLMSampleBuilder(ObjectiveConfig(32), Tok(), 0)
    assert b.ids == IDS
    del Tok.sop_id
    with pytest.raises(TypeError, match="sop_id"):
        GLMSampleBuilder(ObjectiveConfig(32), Tok(), 0)
    with pytest.raises(ValueError, match="distinct"):
        SpecialIds(mask=1, gmask=1, smask=3, sop=4, eop=5, eos=6, pad=0)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(seq_len=2), "seq_len"),
        (dict(seq_len=64, mask_ratio=0.7), "mask_ratio"),
        (dict(seq_len=64, gmask_prob=1.5), "gmask_prob"),
        (dict(seq_len=64, max_span=0), "max_span"),
        (dict(seq_len=64, poisson_lambda=0), "poisson_lambda"),
    ],
)
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ObjectiveConfig(**kw)


def test_bad_tokens():
    b = builder(32)
    with pytest.raises(TypeError, match="integer token ids"):
        b.mask_sample([100, 1.5])
    with pytest.raises(TypeError, match="not a string"):
        list(b.samples("some text"))
    with pytest.raises(ValueError, match="empty"):
        b.gmask_sample([])
    with pytest.raises(TypeError, match="pairs"):
        list(builder(32, instruction_share=1.0).samples([[100] * 10], iter([[1, 2, 3]])))


def test_read_instructions(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "2+2?", "answer": "4", "id": 1}\n\n{"prompt": "", "answer": "x"}\n')
    records = list(read_instructions(good))
    assert records == [{"prompt": "2+2?", "answer": "4"}, {"prompt": "", "answer": "x"}]
    pairs = list(encode_instructions(records, lambda text: [100 + ord(c) for c in text]))
    assert pairs[0] == ([150, 143, 150, 163], [152])

    cases = {
        '{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n': r"bad.jsonl:2: not valid JSON",
        '["a", "b"]\n': r":1: expected a JSON object",
        '{"prompt": "a"}\n': r":1: missing field 'answer'",
        '{"prompt": 3, "answer": "b"}\n': r":1: field 'prompt' must be a string",
    }
    for text, msg in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(InstructionFormatError, match=msg):
            list(read_instructions(bad))
    with pytest.raises(InstructionFormatError, match="not found"):
        list(read_instructions(tmp_path / "missing.jsonl"))


@settings(max_examples=60, deadline=None)
@given(
    seq_len=st.integers(3, 80),
    doc_lens=st.lists(st.integers(0, 200), min_size=0, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    two_d=st.booleans(),
    smask_prob=st.sampled_from([0.0, 0.5]),
)
def test_property_every_sample_well_formed(seq_len, doc_lens, seed, two_d, smask_prob):
    r = random.Random(seed)
    docs = [[PERIOD if r.random() < 0.08 else r.randint(100, 999) for _ in range(n)] for n in doc_lens]
    pairs = [([r.randint(100, 999) for _ in range(r.randint(0, 10))], [r.randint(100, 999)]) for _ in range(5)]
    b = builder(seq_len, seed=seed, two_d=two_d, smask_prob=smask_prob, instruction_share=0.1)
    text = []
    for s in b.samples(docs, iter(pairs)):
        out = check_sample(s, seq_len, two_d=two_d)
        if s.mode != "instruction":
            assert len(out) == s.num_source_tokens >= 1
            text += out
    assert text == stream_of(docs)
