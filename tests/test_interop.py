"""Checkpoint interop on synthetic checkpoints written in the official layouts: SAT tensor-parallel
shards (GLM-130B), ChatGLM-6B's Hugging Face folder, our HF export; re-sharding and quantizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm130b.cli import main
from glm130b.config import GLMConfig
from glm130b.interop.convert import read_ours
from glm130b.interop.sat import PREFIX, merge_tp, read_sat, sat_shard_files, split_tp, write_sat
from glm130b.model.glm import GLMModel
from glm130b.quant import quantize_model

ORACLE = Path(__file__).parent / "fixtures" / "oracle"
TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "glm130b" / "assets" / "tokenizer.json"


def logits(model, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, model.config.vocab_size, (2, n), generator=g)
    with torch.no_grad():
        return model.float()(ids, context_lengths=torch.tensor([n // 2, n]))


def convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


def model_of(folder) -> GLMModel:
    cfg, state, _ = read_ours(folder)
    model = GLMModel(cfg)
    model.load_state_dict(state)
    return model.eval()


def random_model(seed=0, **overrides) -> GLMModel:
    torch.manual_seed(seed)
    # FP16 rotary angles: what a checkpoint converted from SAT shards or a ChatGLM folder gets
    cfg = GLMConfig.from_preset("tiny", **{"num_heads": 8, "max_seq_len": 64, "rotary_precision": "fp16", **overrides})
    model = GLMModel(cfg).eval()
    with torch.no_grad():  # every parameter matters (LayerNorm biases included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hand_split(name: str, w: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """The TP split as ../shared/oracle/README.md states it, written independently of sat.py."""
    if "dense_h_to_4h" in name:
        f = w.shape[0] // 2
        lin, gate = w[:f].chunk(tp), w[f:].chunk(tp)
        return [torch.cat((lin[r], gate[r])) for r in range(tp)]
    if name.endswith(("query_key_value.weight", "query_key_value.bias", "word_embeddings.weight")):
        return list(w.chunk(tp, dim=0))
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return list(w.chunk(tp, dim=1))
    return [w] * tp


def write_hand_shards(folder: Path, official: dict, tp: int, iteration: int = 49300) -> None:
    (folder / str(iteration)).mkdir(parents=True)
    (folder / "latest").write_text(str(iteration))
    for r in range(tp):
        shard = {n: hand_split(n, w, tp)[r].clone() for n, w in official.items()}
        shard[f"{PREFIX}layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)  # released files have it
        torch.save({"module": shard}, folder / str(iteration) / f"mp_rank_{r:02d}_model_states.pt")


# --------------------------------------------------------------------------------------------
def test_official_shards_convert_to_the_official_logits(tmp_path):
    """The oracle's official weights, split 2 ways by the README's rule into SAT shard files:
    `convert --from sat` gives a model whose logits are the official code's."""
    official = load_file(ORACLE / "reference.safetensors")
    ref = load_file(ORACLE / "reference_logits.safetensors")
    meta = json.loads((ORACLE / "reference.json").read_text())
    write_hand_shards(tmp_path / "sat", official, tp=2)
    assert convert(tmp_path / "sat", tmp_path / "ours", "--from", "sat", "--to", "ours", "--num-heads",
                   meta["config"]["num_attention_heads"], "--max-seq-len", 64) == 0
    model = model_of(tmp_path / "ours")
    layout = meta["layouts"]["gmask"]
    ids, pos = ref["gmask.input_ids"], ref["gmask.position_ids"]
    with torch.no_grad():
        out = model(ids, pos, context_lengths=torch.tensor([layout["prefix_length_P"]]))
    assert model.config.rotary_precision == "fp16"  # the official angles, by default
    assert (out - ref["gmask.logits_fp16rope"]).abs().max() < 1e-4
    # our writer produces exactly those shards
    write_sat(tmp_path / "ours_sat", official, tp=2)
    for mine, theirs in zip(sat_shard_files(tmp_path / "ours_sat"), sat_shard_files(tmp_path / "sat"), strict=True):
        a, b = torch.load(mine)["module"], torch.load(theirs)["module"]
        assert all(torch.equal(a[n], b[n]) for n in official)


def test_glu_halves_are_not_plainly_concatenated():
    w = torch.arange(16.0).view(8, 2)  # F = 4: rows 0-3 linear, 4-7 gated
    shards = split_tp("transformer.layers.0.mlp.dense_h_to_4h.weight", w, 2)
    assert shards[0][:, 0].tolist() == [0, 2, 8, 10]  # [its linear rows; its gated rows]
    assert torch.equal(merge_tp("transformer.layers.0.mlp.dense_h_to_4h.weight", shards), w)
    assert not torch.equal(torch.cat(shards), w)


def test_resharding_4_8_1_is_lossless(tmp_path):
    model = random_model()
    from glm130b.checkpoint import save_model

    save_model(tmp_path / "src", model, None)
    assert convert(tmp_path / "src", tmp_path / "tp4", "--from", "ours", "--to", "sat", "--tp", 4) == 0
    assert convert(tmp_path / "tp4", tmp_path / "tp8", "--from", "sat", "--to", "sat", "--tp", 8,
                   "--num-heads", 8) == 0
    assert convert(tmp_path / "tp8", tmp_path / "tp1", "--from", "sat", "--to", "sat", "--tp", 1,
                   "--num-heads", 8) == 0
    assert len(sat_shard_files(tmp_path / "tp8")) == 8
    shard = torch.load(sat_shard_files(tmp_path / "tp8")[3])["module"]
    h, f = model.config.hidden_size, model.config.ffn_hidden_size
    assert shard[f"{PREFIX}layers.0.attention.query_key_value.weight"].shape == (3 * h // 8, h)
    assert shard[f"{PREFIX}layers.0.mlp.dense_h_to_4h.weight"].shape == (2 * f // 8, h)
    assert shard[f"{PREFIX}layers.0.mlp.dense_4h_to_h.weight"].shape == (h, f // 8)
    merged = read_sat(tmp_path / "tp1")
    original = {PREFIX + n: t for n, t in model.state_dict().items()}
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[n], original[n]) for n in original)
    assert convert(tmp_path / "tp8", tmp_path / "back", "--from", "sat", "--to", "ours", "--num-heads", 8,
                   "--max-seq-len", 64) == 0
    assert torch.equal(logits(model_of(tmp_path / "back")), logits(model))


def test_quantize_while_converting(tmp_path):
    from glm130b.checkpoint import load_model

    model = random_model(seed=1)
    write_sat(tmp_path / "sat", {PREFIX + n: t for n, t in model.state_dict().items()}, tp=2)
    assert convert(tmp_path / "sat", tmp_path / "int4", "--from", "sat", "--to", "ours", "--bits", 4,
                   "--num-heads", 8, "--max-seq-len", 64, "--tokenizer", TOKENIZER) == 0
    q, tokenizer = load_model(tmp_path / "int4")
    assert tokenizer.vocab_size == 16384
    expected = quantize_model(random_model(seed=1), 4)
    assert torch.allclose(logits(q), logits(expected), atol=1e-4)


def test_a_folder_with_a_quantized_head_converts(tmp_path, capsys):
    """A tied model quantized with --head-bits stores its table once, as the head: `convert --to
    ours` rebuilds the table and keeps the same logits; the official SAT layout has no quantized
    head, so `--to sat` is one error line."""
    from glm130b.checkpoint import load_model, save_model
    from glm130b.tokenizer import default_tokenizer

    cfg = GLMConfig.from_preset("tiny", max_seq_len=64)
    torch.manual_seed(2)
    model = quantize_model(GLMModel(cfg).eval(), 4, head_bits=8)
    save_model(tmp_path / "q", model, default_tokenizer())
    assert "word_embeddings.weight" not in load_file(tmp_path / "q" / "model.safetensors")
    assert convert(tmp_path / "q", tmp_path / "copy", "--from", "ours", "--to", "ours") == 0
    copied, _ = load_model(tmp_path / "copy")
    assert torch.equal(logits(copied), logits(model))
    capsys.readouterr()
    assert convert(tmp_path / "q", tmp_path / "sat", "--from", "ours", "--to", "sat") == 2
    assert "quantized output head" in capsys.readouterr().err and not (tmp_path / "sat").exists()


def test_chatglm_6b_hf_folder(tmp_path):
    """A ChatGLM-6B style folder (its config keys, two .bin shards + index, untied lm_head,
    inv_freq buffers, 2D rotary, GELU tanh FFN) converts to the same logits."""
    model = random_model(seed=2, rotary="2d", ffn_type="gelu", gelu_approximate="tanh", ffn_hidden_size=512,
                         tie_word_embeddings=False)
    cfg = model.config
    named = {("lm_head.weight" if n == "lm_head.weight" else PREFIX + n): t.half() for n, t in model.state_dict().items()}
    named[f"{PREFIX}layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    folder = tmp_path / "chatglm"
    folder.mkdir()
    names = sorted(named)
    parts = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
             "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for fname, part in parts.items():
        torch.save({n: named[n] for n in part}, folder / fname)
        weight_map.update({n: fname for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": cfg.hidden_size,
        "inner_hidden_size": cfg.ffn_hidden_size, "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "vocab_size": cfg.vocab_size, "max_sequence_length": 64,
        "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "bos_token_id": 130004}))
    assert convert(folder, tmp_path / "ours", "--from", "hf", "--to", "ours") == 0
    got = model_of(tmp_path / "ours")
    assert got.config.rotary == "2d" and got.config.ffn_type == "gelu" and not got.config.tie_word_embeddings
    half = random_model(seed=2, rotary="2d", ffn_type="gelu", gelu_approximate="tanh", ffn_hidden_size=512,
                        tie_word_embeddings=False).half()
    assert torch.equal(logits(got), logits(half))


def test_hf_export_round_trip(tmp_path):
    from glm130b.checkpoint import load_model, save_model
    from glm130b.tokenizer import default_tokenizer

    model = random_model(seed=3)
    save_model(tmp_path / "src", model, default_tokenizer())
    from glm130b.interop.hf import write_hf

    write_hf(tmp_path / "hf", model.config, model.state_dict(), default_tokenizer(), shard_bytes=2_000_000,
             dtype=torch.float32)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "hf" / f).is_file() for f in files)
    assert set(index["weight_map"]) == {PREFIX + n for n in model.state_dict()}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_layers"] == 2 and config["num_attention_heads"] == 8
    assert convert(tmp_path / "hf", tmp_path / "back", "--from", "hf", "--to", "ours") == 0
    back, tokenizer = load_model(tmp_path / "back")
    assert back.config == model.config and tokenizer.vocab_size == 16384
    assert torch.equal(logits(back), logits(model))
    assert convert(tmp_path / "src", tmp_path / "hf16", "--from", "ours", "--to", "hf") == 0  # default fp16
    from glm130b.checkpoint import CheckpointError
    from glm130b.interop.hf import read_hf

    for bad in (5, {"a.weight": 7}):  # an index whose weight_map is not names -> files
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
        with pytest.raises(CheckpointError, match="weight_map must map tensor names to file names"):
            read_hf(tmp_path / "hf")
    assert all(t.dtype == torch.float16 for f in (tmp_path / "hf16").glob("*.safetensors")
               for t in load_file(f).values())


def test_bad_checkpoints_give_clear_errors(tmp_path, capsys):
    official = load_file(ORACLE / "reference.safetensors")
    write_hand_shards(tmp_path / "sat", official, tp=2)
    (tmp_path / "sat" / "49300" / "mp_rank_01_model_states.pt").unlink()
    (tmp_path / "sat" / "49300" / "mp_rank_02_model_states.pt").write_bytes(b"x")
    cases = [
        ((tmp_path / "sat", tmp_path / "o1", "--from", "sat", "--to", "ours", "--num-heads", 4), "mp_rank_01"),
        ((tmp_path / "nothing", tmp_path / "o2", "--from", "sat", "--to", "ours"), "not found"),
        ((tmp_path / "sat", tmp_path / "o3", "--from", "hf", "--to", "ours"), "config.json"),
        ((tmp_path / "sat", tmp_path / "o4", "--from", "sat", "--to", "ours", "--tp", 2), "--tp"),
    ]
    write_hand_shards(tmp_path / "wrong", official, tp=1)
    cases.append(((tmp_path / "wrong", tmp_path / "o5", "--from", "sat", "--to", "ours", "--preset", "tiny"), "shape"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    cases.append(((tmp_path / "corrupt", tmp_path / "o6", "--from", "sat", "--to", "ours"), "not a readable"))
    for argv, words in cases:
        assert convert(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err, (argv, err)
        assert not Path(argv[1]).exists()  # nothing half-written
