"""The official INT8/INT4 SAT checkpoints: load, convert to our quantized folders and back,
re-shard. The official files are written here by a helper that follows GLM-130B's
tools/convert_tp.py and cuda/quantization.cu bit for bit, written without the project's code."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm130b.checkpoint import model_from_state
from glm130b.cli import main
from glm130b.interop.convert import read_ours
from glm130b.interop.sat import PREFIX, sat_shard_files

ORACLE = Path(__file__).parent / "fixtures" / "oracle"
QUANTIZED_LAYERS = ["attention.dense.weight", "attention.query_key_value.weight", "mlp.dense_h_to_4h.weight",
                    "mlp.dense_4h_to_h.weight"]  # convert_tp.py's list


def official_split(name: str, w: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """convert_tp.py's merge_weights for 1 -> tp shards."""
    if name.endswith(("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")):
        chunks = w.chunk(2 * tp, dim=0)
        return [torch.cat([chunks[r], chunks[tp + r]]) for r in range(tp)]
    if name.endswith(("input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                      "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias",
                      "final_layernorm.weight", "final_layernorm.bias")):
        return [w] * tp
    dim = 1 if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")) else 0
    return [c.clone() for c in w.chunk(tp, dim=dim)]


def official_quantize(w: torch.Tensor, bits: int):
    """convert_tp.py: scale = (absmax / (2^(b-1) - 1)).half(), weight = round(w / scale).to(int8),
    INT4 packed by int4WeightCompression: (input[2i] << 4) | (input[2i+1] & 0b1111)."""
    w = w.half()  # the released checkpoints are FP16
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        hi, lo = q[:, 0::2].to(torch.int32), q[:, 1::2].to(torch.int32)
        q = torch.tensor([[((a << 4) | (b & 0b1111)) & 0xFF for a, b in zip(r1, r2, strict=True)]
                          for r1, r2 in zip(hi.tolist(), lo.tolist(), strict=True)], dtype=torch.uint8).view(torch.int8)
    return q, scale


def official_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int4WeightExtraction / int8WeightExtraction, in FP32 (high nibble first, sign-extended)."""
    if bits == 4:
        vals = []
        for row in q.tolist():
            out = []
            for byte in row:
                byte &= 0xFF
                hi, lo = byte >> 4, byte & 0xF
                out += [hi - 16 if hi > 7 else hi, lo - 16 if lo > 7 else lo]
            vals.append(out)
        q = torch.tensor(vals, dtype=torch.int8)
    return q.float() * scale.float()[:, None]


def write_official_quantized(folder: Path, official: dict, tp: int, bits: int) -> list[dict]:
    (folder / "7").mkdir(parents=True)
    (folder / "latest").write_text("7")
    shards = []
    for r in range(tp):
        shard = {}
        for name, w in official.items():
            part = official_split(name, w, tp)[r]
            if any(name.endswith(layer) for layer in QUANTIZED_LAYERS):
                shard[name], shard[name + "_scale"] = official_quantize(part, bits)
            else:
                shard[name] = part.half()
        torch.save({"module": shard}, folder / "7" / f"mp_rank_{r:02d}_model_states.pt")
        shards.append(shard)
    return shards


def dequantized_merge(shards: list[dict], bits: int) -> dict:
    """What the official model computes with: each shard's matrices dequantized, then merged by
    convert_tp.py's rule (GLU halves regrouped)."""
    tp, merged = len(shards), {}
    for name in shards[0]:
        if name.endswith("_scale"):
            continue
        parts = [official_dequantize(s[name], s[name + "_scale"], bits) if name + "_scale" in s else s[name].float()
                 for s in shards]
        if name.endswith(("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")):
            halves = [p.chunk(2) for p in parts]
            merged[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        elif parts[0].shape == parts[-1].shape and tp > 1 and torch.equal(parts[0], parts[-1]) and parts[0].dim() == 1 \
                and not name.endswith(("query_key_value.bias",)):
            merged[name] = parts[0]
        else:
            dim = 1 if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")) else 0
            merged[name] = torch.cat(parts, dim=dim) if tp > 1 else parts[0]
    return merged


@pytest.fixture(scope="module")
def official():
    return load_file(ORACLE / "reference.safetensors")


def _logits(model, ids):
    with torch.no_grad():
        return model.float()(ids, context_lengths=torch.tensor([ids.shape[1] // 2]))


@pytest.mark.parametrize("bits,tp", [(8, 2), (4, 2), (4, 1)])
def test_official_quantized_shards_load_exactly(tmp_path, official, bits, tp):
    from glm130b.interop.sat import config_from_official_shapes, load_official
    from glm130b.model.glm import GLMModel

    shards = write_official_quantized(tmp_path / "sat", official, tp, bits)
    assert main(["convert", "--from", "sat", "--to", "ours", "--num-heads", "4", "--max-seq-len", "64",
                 str(tmp_path / "sat"), str(tmp_path / "ours")]) == 0
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())["extra"]["quantization"]
    assert saved["bits"] == bits and saved["group_size"] == (None if tp == 1 else 16)  # gcd(64/2, 160/2)
    cfg, state, _ = read_ours(tmp_path / "ours")  # (no tokenizer in the shards: the loader's model part)
    model = model_from_state(cfg, state, "test")
    # the reference: the official shards dequantized by the official rule, merged, in a plain model
    ref = GLMModel(config_from_official_shapes(official, num_heads=4, max_seq_len=64, rotary_precision="fp16"))
    load_official(ref, dequantized_merge(shards, bits))
    ids = torch.randint(10, 900, (2, 12), generator=torch.Generator().manual_seed(0))
    from glm130b.quant import kernels as K

    vnni = K.set_int4_vnni(False)  # the exact FP32-activation kernel (VNNI rounds x to 16 bits)
    try:
        torch.testing.assert_close(_logits(model, ids), _logits(ref.eval(), ids), rtol=1e-4, atol=1e-4)
    finally:
        K.set_int4_vnni(vnni)

    # ... and back: our folder written as official shards gives the official files bit for bit
    assert main(["convert", "--from", "ours", "--to", "sat", "--tp", str(tp), str(tmp_path / "ours"),
                 str(tmp_path / "back")]) == 0
    for mine, theirs in zip(sat_shard_files(tmp_path / "back"), sat_shard_files(tmp_path / "sat"), strict=True):
        a, b = torch.load(mine)["module"], torch.load(theirs)["module"]
        for name in b:
            if name.endswith("_scale") or any(name.endswith(layer) for layer in QUANTIZED_LAYERS):
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_official_quantized_shards_reshard_up_but_not_down(tmp_path, official):
    write_official_quantized(tmp_path / "sat", official, 2, 4)
    assert main(["convert", "--from", "sat", "--to", "sat", "--tp", "4", "--num-heads", "4", "--max-seq-len", "64",
                 str(tmp_path / "sat"), str(tmp_path / "tp4")]) == 0
    four = [torch.load(p)["module"] for p in sat_shard_files(tmp_path / "tp4")]
    name = PREFIX + "layers.0.attention.dense.weight"
    assert four[0][name].shape == (64, 16 // 2) and four[0][name + "_scale"].dtype == torch.float16
    # 2 -> 1 would need one scale per whole row where each half had its own: refused, with the way out
    assert main(["convert", "--from", "sat", "--to", "sat", "--tp", "1", "--num-heads", "4", "--max-seq-len", "64",
                 str(tmp_path / "sat"), str(tmp_path / "tp1")]) == 2
