"""GLM-130B's generation: token for token what the official generate.py produces.

tests/fixtures/oracle/generation_reference.json (from shared/oracle: THUDM/GLM-130B's own
`fill_blanks`, `batch_filling_sequence`, `BaseStrategy` and `BeamSearchStrategy(deterministic)`
run on a tiny model, generation_model.safetensors) pins 14 cases: continuation, [MASK] /
[sMASK] / [gMASK] layouts and their precedence, `<eos>` before `<sop>`, two blanks filled one at a
time with a shared length budget, answers that end early, long contexts and both beam settings.
$GLM130B_GENERATION_REFERENCE points the test at another reference in the same format (its
generation_model.safetensors beside it).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm130b.infer.engine import Engine, GenerationConfig, Row, beam_hypotheses
from glm130b.infer.generate import fill_blanks
from glm130b.interop.sat import config_from_official_shapes, load_official
from glm130b.model.glm import GLMModel
from glm130b.model.masks import Block

REFERENCE = Path(os.environ.get("GLM130B_GENERATION_REFERENCE",
                                Path(__file__).parent / "fixtures" / "oracle" / "generation_reference.json"))


class ToyTokenizer:
    """The reference's ids: text tokens are numbers, the specials its own."""

    def __init__(self, special: dict, vocab_size: int):
        self.mask_id, self.gmask_id, self.smask_id = special["[MASK]"], special["[gMASK]"], special["[sMASK]"]
        self.eos_id, self.sop_id, self.eop_id = special["eos"], special["sop"], special["eop"]
        self.pad_id, self.vocab_size = 0, vocab_size

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def encode(self, text):
        return [int(t) for t in text.split()]


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def genmodel():
    weights = load_file(REFERENCE.parent / "generation_model.safetensors")
    model = GLMModel(config_from_official_shapes(weights, num_heads=4, max_seq_len=2048))
    load_official(model, weights)
    return model.eval()


def _config(strategy: dict, out_seq_length: int) -> GenerationConfig:
    if strategy["name"] == "BeamSearchStrategy":
        return GenerationConfig(strategy="beam", num_beams=strategy["num_beams"],
                                length_penalty=strategy["length_penalty"],
                                no_repeat_ngram_size=strategy["no_repeat_ngram_size"],
                                min_new_tokens=strategy["min_gen_length"], max_new_tokens=out_seq_length)
    assert strategy["top_k"] == 1  # the reference's BaseStrategy is greedy
    return GenerationConfig(max_new_tokens=out_seq_length)


@pytest.mark.parametrize("name", [c["name"] for c in json.loads(REFERENCE.read_text())["cases"]])
def test_fill_blanks_matches_official_generate_py(reference, genmodel, name):
    case = next(c for c in reference["cases"] if c["name"] == name)
    want = case["results"]["genmodel"]
    tokenizer = ToyTokenizer(reference["special_tokens"], genmodel.config.vocab_size)
    out = fill_blanks(genmodel, tokenizer, _raw_ids(case, tokenizer), _config(case["strategy"], case["out_seq_length"]),
                      out_seq_length=case["out_seq_length"])
    assert out.ids == want["output_ids"]
    assert out.tokens == want["blanks"]
    if "beams" in want:  # the best beam of the official list
        assert out.ids == want["beams"][0]["output_ids"]


def _raw_ids(case: dict, tokenizer: ToyTokenizer) -> list[int]:
    """The ids of the case's raw text (what a user types), before generate.py appends anything."""
    ids = []
    for piece in case["raw_text"].split():
        ids.append({"[MASK]": tokenizer.mask_id, "[sMASK]": tokenizer.smask_id,
                    "[gMASK]": tokenizer.gmask_id}.get(piece, None) or int(piece))
    return ids


@pytest.mark.parametrize("name", [c["name"] for c in json.loads(REFERENCE.read_text())["cases"]
                                  if "beams" in c["results"]["genmodel"]])
def test_every_beam_and_its_score_match(reference, genmodel, name):
    """All returned beams, in order, with the official length-penalised scores (the length
    penalty counts the whole sequence; n-gram bans act before log_softmax)."""
    case = next(c for c in reference["cases"] if c["name"] == name)
    tokenizer = ToyTokenizer(reference["special_tokens"], genmodel.config.vocab_size)
    seq = case["input_ids"]  # one [gMASK] blank at the end: one beam search
    cfg = _config(case["strategy"], case["out_seq_length"] - len(seq) - 1)
    rows = beam_hypotheses(Engine(genmodel, kv_dtype=torch.float32), Row(seq, Block(len(seq) - 1, 0, continues=True)), cfg,
                           tokenizer.sop_id, {tokenizer.eop_id, tokenizer.eos_id})
    want = case["results"]["genmodel"]["beams"]
    assert [r.tokens for r in rows] == [b["blanks"][0] for b in want]
    assert [r.score for r in rows] == pytest.approx([b["penalized_score"] for b in want], abs=1e-4)
