"""Instruction rows packed with several pairs (ObjectiveConfig.pack_instructions): every pair is
trained exactly as it would be alone (same tokens, targets, positions, and a model's logits),
no token sees another pair, and resume stays exact when a pair waits for the next row."""

from __future__ import annotations

import json
import random

import pytest
import torch

from glm130b.data.objective import GLMSampleBuilder, ObjectiveConfig, SpecialIds, collate
from glm130b.model.masks import attention_allowed
from tests.helpers import varied_model

IDS = SpecialIds(mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6, pad=0)


def pairs(n: int, seed: int = 0, longest: int = 20) -> list[tuple[list[int], list[int]]]:
    r = random.Random(seed)
    return [([r.randrange(100, 999) for _ in range(r.randrange(0, longest))],
             [r.randrange(100, 999) for _ in range(r.randrange(1, longest))]) for _ in range(n)]


def docs(n: int = 40, seed: int = 1) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(100, 999) for _ in range(r.randrange(5, 200))] for _ in range(n)]


def builder(seq_len: int, objective: str = "glm", share: float = 1.0, seed: int = 0, **kw) -> GLMSampleBuilder:
    cfg = ObjectiveConfig(seq_len, instruction_share=share, objective=objective, pack_instructions=True, **kw)
    return GLMSampleBuilder(cfg, IDS, seed)


def alone(seq_len: int, objective: str, pair, **kw):
    """The pair as its own (unpacked) sample, and its length through the last token with a loss."""
    cfg = ObjectiveConfig(seq_len, objective=objective, **kw)
    b = GLMSampleBuilder(cfg, IDS, 0)
    s = b.causal_instruction_sample(*pair) if objective == "causal" else b.instruction_sample(*pair)
    return s, int(s.loss_mask.nonzero().max()) + 1


def segments_of(sample) -> list[tuple[int, int]]:
    """(start, end) of each packed segment (the rest of the row is padding: no real id is pad)."""
    starts = sample.segments[0].tolist()
    real = int((sample.input_ids != IDS.pad).sum())
    assert (sample.input_ids[:real] != IDS.pad).all()
    bounds = [i for i in range(real) if starts[i] == i] + [real]
    assert all(starts[i] == a for a, b in zip(bounds[:-1], bounds[1:], strict=True) for i in range(a, b))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize("objective", ["glm", "causal"])
@pytest.mark.parametrize("two_d", [False, True])
def test_each_packed_pair_is_its_own_sample(objective, two_d):
    if objective == "causal" and two_d:
        pytest.skip("the causal objective has no 2D positions")
    L, data = 64, pairs(300, seed=2)
    rows = list(builder(L, objective, two_d=two_d).samples(docs(), iter(data)))
    packed = [s for s in rows if s.mode == "instruction"]
    assert packed and all(s.segments is not None for s in packed)
    seen = []
    for s in packed:
        at = 0
        for start, end in segments_of(s):
            assert start == at
            pair = data[len(seen)]
            single, n = alone(L, objective, pair, two_d=two_d)
            assert end - start == n
            assert torch.equal(s.input_ids[start:end], single.input_ids[:n])
            assert torch.equal(s.targets[start:end], single.targets[:n])
            assert torch.equal(s.loss_mask[start:end], single.loss_mask[:n])
            assert torch.equal(s.position_ids[..., start:end], single.position_ids[..., :n])  # positions restart
            assert s.segments[1, start:end].tolist() == [start + single.context_length] * n
            seen.append(pair)
            at = end
        assert s.loss_mask[at:].sum() == 0 and (s.input_ids[at:] == IDS.pad).all()
        # packing is greedy: the next pair would not have fit in what is left
        if len(seen) < len(data):
            assert alone(L, objective, data[len(seen)], two_d=two_d)[1] > L - at
    assert seen == data[: len(seen)] and len(seen) > 2 * len(packed)  # in order, several per row


def test_no_token_sees_another_segment():
    L = 48
    rows = [s for s in builder(L).samples(docs(), iter(pairs(100))) if s.mode == "instruction"]
    batch = collate(rows[:4])
    allowed = attention_allowed(L, batch["context_lengths"], segments=batch["segments"])[:, 0]
    for r, s in enumerate(rows[:4]):
        for start, end in segments_of(s):
            n = end - start
            inside = allowed[r, start:end, start:end]
            assert torch.equal(inside, attention_allowed(n, s.segments[1, start] - start)[0, 0])
            assert not allowed[r, start:end, :start].any() and not allowed[r, start:end, end:].any()
        for i in range(segments_of(s)[-1][1], L):  # padding sees itself only, so softmax stays defined
            assert allowed[r, i].nonzero().view(-1).tolist() == [i]


def test_unpacked_rows_in_a_packed_batch_keep_their_mask():
    rows = list(builder(48, share=0.5, seed=3).samples(docs(), iter(pairs(100))))
    mixed = [s for s in rows if s.mode != "instruction"][:2] + [s for s in rows if s.mode == "instruction"][:2]
    batch = collate(mixed)
    with_segments = attention_allowed(48, batch["context_lengths"], segments=batch["segments"])
    plain = attention_allowed(48, batch["context_lengths"])
    assert torch.equal(with_segments[:2], plain[:2])
    assert "segments" not in collate(mixed[:2])  # no packed row: the batch is as before


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_model_logits_of_a_packed_pair_equal_the_pair_alone(objective):
    torch.manual_seed(0)
    model = varied_model("1d", seed=4, max_seq_len=64)
    L, data = 64, pairs(40, seed=5, longest=12)
    row = next(s for s in builder(L, objective).samples(docs(), iter(data)) if s.mode == "instruction")
    batch = collate([row])
    with torch.no_grad():
        packed = model(batch["input_ids"], batch["position_ids"], segments=batch["segments"])
        for k, (start, end) in enumerate(segments_of(row)):
            single, n = alone(L, objective, data[k])
            one = collate([single])
            ref = model(one["input_ids"][:, :n], one["position_ids"][..., :n], context_lengths=one["context_lengths"])
            torch.testing.assert_close(packed[0, start:end], ref[0], rtol=1e-4, atol=1e-4)
    assert len(segments_of(row)) >= 2


def test_resume_is_exact_with_a_pair_waiting():
    data = pairs(400, seed=6)
    kw = dict(share=0.3, seed=7)
    full = list(builder(40, **kw).samples(docs(60), iter(data)))
    same = lambda a, b: (a.mode == b.mode and torch.equal(a.input_ids, b.input_ids)  # noqa: E731
                         and torch.equal(a.position_ids, b.position_ids) and torch.equal(a.targets, b.targets)
                         and (a.segments is None) == (b.segments is None)
                         and (a.segments is None or torch.equal(a.segments, b.segments)))
    for cut in (5, 23, 61):
        first = builder(40, **kw)
        it = first.samples(docs(60), iter(data))
        head = [next(it) for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = builder(40, **kw)
        resumed.load_state_dict(state)
        tail = list(resumed.samples(docs(60), iter(data)))
        assert len(head) + len(tail) == len(full)
        assert all(same(x, y) for x, y in zip(head + tail, full, strict=True))
        skipped = list(builder(40, **kw).samples(docs(60), iter(data), skip=cut))
        assert all(same(x, y) for x, y in zip(skipped, full[cut:], strict=True))


def test_too_long_answers_are_passed_over_and_counted():
    L = 24
    data = [([100], [200] * 30), ([101], [201, 202]), ([102], [203] * 40), ([103], [204])]
    b = builder(L)
    with pytest.warns(RuntimeWarning, match="passed over"):
        rows = [s for s in b.samples(docs(2), iter(data)) if s.mode == "instruction"]
    assert b.state_dict()["instructions"] == 4
    text = rows[0].input_ids.tolist()
    assert 201 in text and 204 in text and 200 not in text and 203 not in text


def test_packing_fills_rows():
    """The point of packing: far fewer padding tokens in instruction rows."""
    data = pairs(500, seed=8)

    def real_share(pack: bool) -> float:
        cfg = ObjectiveConfig(128, instruction_share=1.0, pack_instructions=pack)
        rows = [s for s in GLMSampleBuilder(cfg, IDS, 0).samples(docs(5), iter(data)) if s.mode == "instruction"]
        return float(sum((s.input_ids != IDS.pad).sum() for s in rows)) / (128 * len(rows))

    assert real_share(True) > 0.8 > 0.3 > real_share(False)


def test_trimmed_batches_keep_their_segments_aligned():
    from glm130b.train.trainer import trim_padding

    L = 128
    rows = [s for s in builder(L, seed=9).samples(docs(3, seed=2), iter(pairs(60, seed=3, longest=6)))
            if s.mode == "instruction"]
    rows = [s for s in rows if (s.input_ids != IDS.pad).sum() < L][:3]  # (rows with padding to trim)
    batch = collate(rows)
    trimmed = trim_padding(batch)
    end = trimmed["input_ids"].shape[-1]
    assert end < L and trimmed["segments"].shape == (3, 2, end)
    full = attention_allowed(L, batch["context_lengths"], segments=batch["segments"])
    cut = attention_allowed(end, trimmed["context_lengths"], segments=trimmed["segments"])
    assert torch.equal(cut, full[..., :end, :end])


def test_the_mixture_benchmark_compares_packed_and_unpacked_rows():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "data_mixture.py"), "--config",
                          str(root / "configs" / "glm-small.yaml"), "--samples", "200", "--json",
                          "--variants", "0.2:nopack,0.2:pack"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    unpacked, packed = json.loads(out.stdout)
    assert not unpacked["pack_instructions"] and packed["pack_instructions"]
    assert packed["real_token_share"] > unpacked["real_token_share"]
    assert packed["pairs_read"] > 2 * unpacked["pairs_read"] and unpacked["pairs_read"] == unpacked["instruction_rows"]
