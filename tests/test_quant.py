"""Weight-only INT8/INT4 quantization: the scheme, packing, the module swap, checkpoints, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm130b.checkpoint import CheckpointError, load_model, read_safetensors, save_model
from glm130b.cli import main
from glm130b.config import GLMConfig
from glm130b.model.glm import build_model
from glm130b.quant import (
    QuantizationError,
    QuantizedLinear,
    check_settings,
    dequantize_weight,
    pack_int4,
    quantization_info,
    quantize_model,
    quantize_weight,
    unpack_int4,
    weight_bytes,
)
from glm130b.quant.kernels import reference_linear
from glm130b.tokenizer import default_tokenizer

TINY = GLMConfig.from_preset("tiny")


@pytest.fixture
def exact_kernels():
    """The FP32-activation kernels: the integer-activation ones round x (to 16 bits with AVX-512
    VNNI, to 8 bits elsewhere; bounded in test_quant_kernels), and two forwards whose inputs
    differ in the last bit may round it to neighbouring steps."""
    from glm130b.quant import kernels as K

    before = K.set_int_activations(False)
    yield
    K.set_int_activations(before)


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_model(TINY)
    model.eval()
    return model


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory, tiny_model, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "tiny"
    save_model(out, tiny_model, tokenizer)
    return out


def _inputs(batch=2, length=20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 1000, (batch, length), generator=g)
    return ids, torch.tensor([10, 15][:batch])


# --------------------------------------------------------------------------------------------
# The scheme
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_per_row_absmax_is_the_official_formula(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, scales = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    # GLM-130B's quantization/__init__.py: scale = absmax / (2^(b-1) - 1); q = round(w / scale)
    official_scale = w.abs().max(dim=-1).values / qmax
    official_q = torch.round(w / official_scale[:, None]).to(torch.int8)
    assert torch.equal(scales[:, 0], official_scale)
    assert torch.equal(q, official_q)
    assert q.abs().max() == qmax and q.min() >= -qmax
    err = (dequantize_weight(q, scales) - w).abs()
    assert (err <= scales / 2 + 1e-7).all()


@pytest.mark.parametrize("bits,group", [(8, 16), (4, 32), (4, 10), (8, 7)])
def test_groups_have_their_own_scales_and_a_short_last_group(bits, group):
    torch.manual_seed(0)
    k = 75  # not a multiple of any group: the last group is short
    w = torch.randn(12, k)
    w[:, :group] *= 100.0  # a loud first group must not swamp the others
    q, scales = quantize_weight(w, bits, group)
    n_groups = -(-k // group)
    assert scales.shape == (12, n_groups)
    for g in range(n_groups):
        sl = slice(g * group, min(k, (g + 1) * group))
        assert torch.allclose(scales[:, g], w[:, sl].abs().amax(-1) / (2 ** (bits - 1) - 1))
    deq = dequantize_weight(q, scales, group)
    assert ((deq - w).abs() <= scales.repeat_interleave(group, 1)[:, :k] / 2 + 1e-6).all()


def test_zero_rows_and_exact_values():
    w = torch.zeros(3, 8)
    w[1] = torch.tensor([7.0, -7, 0, 1, 2, 3, -3, 5])
    q, scales = quantize_weight(w, 4)
    assert torch.equal(scales[:, 0], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(q[0], torch.zeros(8, dtype=torch.int8))
    assert torch.equal(dequantize_weight(q, scales), w)


def test_int4_packing_layout_and_round_trip():
    q = torch.tensor([[-7, 7, 0], [1, -1, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    # input 2j in the low nibble, 2j+1 in the high nibble, each as q + 8; odd tail padded with q = 0
    assert packed[0].tolist() == [(-7 + 8) | ((7 + 8) << 4), 8 | (8 << 4)]
    assert packed[1].tolist() == [9 | (7 << 4), 11 | (8 << 4)]
    torch.manual_seed(0)
    for k in (1, 2, 31, 64, 1365):
        q = torch.randint(-7, 8, (5, k), dtype=torch.int8)
        assert torch.equal(unpack_int4(pack_int4(q), k), q)


@pytest.mark.parametrize("bits,group,message", [
    (3, None, "bits must be 8 or 4"), (16, None, "bits must be 8 or 4"), ("8", None, "bits must be 8 or 4"),
    (True, None, "bits must be 8 or 4"), (8, 0, "positive integer"), (8, -64, "positive integer"),
    (8, 2.5, "positive integer"), (4, 33, "even"),
])
def test_bad_settings_are_clear_errors(bits, group, message):
    with pytest.raises(QuantizationError, match=message):
        check_settings(bits, group)
    with pytest.raises(QuantizationError, match=message):
        quantize_weight(torch.randn(4, 64), bits, group)


# --------------------------------------------------------------------------------------------
# The module and the model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 32])
def test_quantized_linear_matches_dequantize_then_matmul(bits, group, exact_kernels):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    ql = QuantizedLinear.from_linear(lin, bits, group)
    for shape in [(1, 96), (3, 96), (2, 5, 96)]:
        x = torch.randn(*shape)
        y = ql(x)
        assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
        torch.testing.assert_close(y, reference_linear(x, ql), rtol=1e-4, atol=1e-4)
    # bf16 activations come back as bf16
    xb = torch.randn(2, 96).bfloat16()
    assert ql(xb).dtype == torch.bfloat16
    torch.testing.assert_close(ql(xb).float(), reference_linear(xb.float(), ql), rtol=2e-2, atol=2e-2)
    # the quantization error is what the scheme promises
    rel = (ql.dequantized_weight() - lin.weight).abs().max() / lin.weight.abs().max()
    assert rel <= (0.5 / 127 if bits == 8 else 0.5 / 7) + 1e-6


def test_quantize_model_swaps_exactly_the_four_matrices(tiny_model):
    model = quantize_model(copy.deepcopy(tiny_model), 4, 32)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    expected = sorted(f"layers.{i}.{m}" for i in range(TINY.num_layers) for m in
                      ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    assert names == expected
    assert isinstance(model.word_embeddings, torch.nn.Embedding)
    assert torch.equal(model.word_embeddings.weight, tiny_model.word_embeddings.weight)
    assert torch.equal(model.final_layernorm.weight, tiny_model.final_layernorm.weight)
    assert model.config.extra["quantization"] == quantization_info(model)
    assert quantization_info(model)["bits"] == 4 and quantization_info(model)["group_size"] == 32
    assert "quantization" not in tiny_model.config.extra  # the original's config is not touched
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model, 8)


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.1)])
def test_quantized_model_logits_stay_close(tiny_model, bits, tol):
    ids, ctx = _inputs()
    ref = tiny_model(ids, context_lengths=ctx)
    out = quantize_model(copy.deepcopy(tiny_model), bits)(ids, context_lengths=ctx)
    assert (out - ref).abs().max() / ref.abs().max() < tol
    # bf16 embeddings/norms with quantized matrices also run (the activations follow the input)
    half = quantize_model(copy.deepcopy(tiny_model), bits).to(torch.bfloat16)
    assert half.layers[0].attention.dense.scales.dtype == torch.float32
    assert half(ids, context_lengths=ctx).dtype == torch.bfloat16


def test_int4_weight_bytes(tiny_model):
    model = quantize_model(copy.deepcopy(tiny_model), 4, 128)
    fp16 = sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, QuantizedLinear))
    assert weight_bytes(model)["quantized"] <= 0.3 * fp16


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 64)])
def test_quantized_folder_round_trip(tiny_model, tokenizer, tmp_path, bits, group, exact_kernels):
    model = quantize_model(copy.deepcopy(tiny_model), bits, group)
    save_model(tmp_path / "q", model, tokenizer)
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert state["layers.0.attention.query_key_value.qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert "layers.0.attention.query_key_value.weight" not in state
    assert state["layers.0.mlp.dense_4h_to_h.scales"].dtype == torch.float32
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["extra"]["quantization"]["bits"] == bits
    assert cfg["extra"]["quantization"]["group_size"] == group
    loaded, _ = load_model(tmp_path / "q")
    for (n1, t1), (n2, t2) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items()),
                                  strict=True):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    ids, ctx = _inputs()
    torch.testing.assert_close(loaded(ids, context_lengths=ctx), model(ids, context_lengths=ctx),
                               rtol=1e-5, atol=1e-5)


def test_on_the_fly_quantization_equals_quantize_model(tiny_model, fp32_dir):
    loaded, _ = load_model(fp32_dir, bits=4, group_size=32)
    direct = quantize_model(copy.deepcopy(tiny_model), 4, 32)
    for name, t in direct.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    plain, _ = load_model(fp32_dir)  # no bits: a plain load
    assert quantization_info(plain) is None


def test_loading_errors(tiny_model, tokenizer, fp32_dir, tmp_path):
    q = tmp_path / "q4"
    save_model(q, quantize_model(copy.deepcopy(tiny_model), 4), tokenizer)
    with pytest.raises(QuantizationError, match="already quantized"):
        load_model(q, bits=8)
    loaded, _ = load_model(q)  # the plain loader dispatches quantized folders
    assert quantization_info(loaded)["bits"] == 4
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (corrupt / name).write_bytes((q / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes((q / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(corrupt)
    with pytest.raises(QuantizationError, match="bits must be"):
        load_model(fp32_dir, bits=2)


def test_streaming_reader_matches_safetensors(fp32_dir):
    ref = load_file(str(fp32_dir / "model.safetensors"))
    got = dict(read_safetensors(fp32_dir / "model.safetensors"))
    assert set(got) == set(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name])


def test_loading_never_materialises_full_precision_matrices(tiny_model, tokenizer, fp32_dir, tmp_path):
    """Record every non-meta floating tensor created while loading; none may have the shape of a
    quantized matrix (when loading a quantized folder), or be alive beyond one at a time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = {(m.out_features, m.in_features) for m in quantize_model(copy.deepcopy(tiny_model), 8).modules()
              if isinstance(m, QuantizedLinear)}
    assert (TINY.vocab_size, TINY.hidden_size) not in shapes

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.created = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point() and t.dim() == 2:
                    self.created.append(tuple(t.shape))
            return out

    q = tmp_path / "q"
    save_model(q, quantize_model(copy.deepcopy(tiny_model), 4, 32), tokenizer)
    with Record() as rec:
        load_model(q)
    assert not shapes & set(rec.created), rec.created
    with Record() as rec:  # from a full-precision folder, each matrix is read (once) and quantized
        load_model(fp32_dir, bits=4, group_size=32)
    assert shapes & set(rec.created)


PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch
    from glm130b.checkpoint import load_model

    def status(key):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    torch.set_num_threads(1)
    warm, path, bits = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]]
    load_model(warm)  # first use of torch, the tokenizer library, ...: not the load's cost
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS:")
    model, _ = load_model(path, **dict(zip(("bits", "group_size"), bits)))
    print(json.dumps({"base_kb": base, "peak_kb": status("VmHWM:")}))
""")


def _peak_bytes(warm: Path, path: Path, *bits) -> int:
    # Allocations from 1 MiB up are mmapped and given back on free, so the peak counts live
    # tensors, not what glibc's heap happened to keep (that varied 0.40-0.77x run to run).
    env = {**os.environ, "GLM130B_NO_KERNELS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(warm), str(path), *map(str, bits)],
                         capture_output=True, text=True, env=env, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return (r["peak_kb"] - r["base_kb"]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_while_loading(tmp_path, tokenizer, tiny_model):
    """A quantized folder loads in <= 1.3x its file size; quantizing a full-precision folder on
    the fly stays far below the full-precision model (one matrix at a time)."""
    warm = save_model(tmp_path / "warm", quantize_model(copy.deepcopy(tiny_model), 8), tokenizer)
    # 134M parameters, 8 layers of 1024 x 4096 GeGLU: a 134 MB INT4 folder (made without running the
    # quantizer: random packed values are as good for a memory test)
    cfg = GLMConfig(name="mem", vocab_size=tokenizer.vocab_size, hidden_size=1024, num_layers=8, num_heads=8,
                    ffn_hidden_size=4096, max_seq_len=256)
    with torch.device("meta"):
        model = quantize_model(build_model(cfg, "meta"), 4)
    model = model.to_empty(device="cpu")
    for t in model.state_dict().values():
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8))
        else:
            t.normal_(std=0.02)
    q = save_model(tmp_path / "q4", model, tokenizer)
    del model
    q_bytes = (q / "model.safetensors").stat().st_size
    assert q_bytes > 100e6
    peak = _peak_bytes(warm, q)
    print(f"quantized load: peak {peak / q_bytes:.2f}x the file")
    assert peak <= 1.3 * q_bytes
    # on the fly from FP32 (168 MB): the INT4 model + the largest FP32 tensor + temporaries
    small = GLMConfig(name="mem", vocab_size=tokenizer.vocab_size, hidden_size=512, num_layers=8, num_heads=8,
                      ffn_hidden_size=2048, max_seq_len=256)
    torch.manual_seed(0)
    fp32 = save_model(tmp_path / "fp32", build_model(small), tokenizer)
    fp32_bytes = (fp32 / "model.safetensors").stat().st_size
    peak = _peak_bytes(warm, fp32, 4)
    print(f"on-the-fly INT4: peak {peak / fp32_bytes:.2f}x the FP32 file")
    assert peak <= 0.6 * fp32_bytes


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_quantize_then_generate(fp32_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--model", str(fp32_dir), "--bits", "4", "--group-size", "64", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits"] == 4 and info["group_size"] == 64 and (out / "model.safetensors").is_file()
    assert main(["generate", "--model", str(out), "--max-new-tokens", "4", "In the beginning"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["infill", "--model", str(fp32_dir), "--bits", "8", "--json", "--max-new-tokens", "3",
                 "Paris is the [MASK] of France."]) == 0
    assert len(json.loads(capsys.readouterr().out)["spans"]) == 1
    assert main(["info", "--model", str(out)]) == 0


def test_cli_quantize_with_half_precision_embeddings(fp32_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    full, half = tmp_path / "q8", tmp_path / "q8h"
    assert main(["quantize", "--model", str(fp32_dir), "--bits", "8", "--out", str(full)]) == 0
    assert main(["quantize", "--model", str(fp32_dir), "--bits", "8", "--dtype", "fp16", "--out", str(half)]) == 0
    infos = [json.loads(x) for x in capsys.readouterr().out.replace("}\n{", "}\n\n{").split("\n\n") if x.strip()]
    assert infos[1]["file_bytes"] < 0.75 * infos[0]["file_bytes"]
    tensors = load_file(half / "model.safetensors")
    assert tensors["word_embeddings.weight"].dtype == torch.float16
    assert all(t.dtype == torch.float32 for n, t in tensors.items() if n.endswith(".scales"))
    assert all(t.dtype == torch.int8 for n, t in tensors.items() if n.endswith(".qweight"))
    assert main(["generate", "--model", str(half), "--max-new-tokens", "3", "In the beginning"]) == 0


def test_cli_bad_quantization_settings(fp32_dir, tmp_path, capsys):
    code = main(["quantize", "--model", str(fp32_dir), "--bits", "4", "--group-size", "33", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "even" in err and err.count("\n") == 1
    code = main(["generate", "--model", str(fp32_dir), "--group-size", "64", "hi"])
    assert code == 2 and "needs --bits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", str(fp32_dir), "--bits", "3", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# The optional quantized output head
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_head_round_trip_and_logits(tiny_model, tokenizer, fp32_dir, tmp_path, tied):
    base = copy.deepcopy(tiny_model)
    if not tied:
        base = build_model(GLMConfig.from_preset("tiny", tie_word_embeddings=False)).eval()
    table = base.word_embeddings.weight.detach().clone()
    head_weight = table if tied else base.lm_head.weight.detach().clone()
    model = quantize_model(copy.deepcopy(base), 4, head_bits=8)
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == 8
    if tied:  # one table: the lookups read the head's dequantized rows
        assert torch.equal(model.word_embeddings.weight, model.lm_head.dequantized_weight())
        assert not torch.equal(model.word_embeddings.weight, table)
    else:  # an untied model's lookup table is not the head
        assert torch.equal(model.word_embeddings.weight, table)
    torch.testing.assert_close(model.lm_head.dequantized_weight(), head_weight, rtol=0, atol=head_weight.abs().max() / 254)
    assert quantization_info(model)["head_bits"] == 8 and quantization_info(model)["bits"] == 4
    ids, ctx = _inputs()
    layers_only = quantize_model(copy.deepcopy(base), 4)
    torch.testing.assert_close(model(ids, context_lengths=ctx), layers_only(ids, context_lengths=ctx),
                               rtol=0.02, atol=0.02)
    save_model(tmp_path / "q", model, tokenizer)
    from glm130b.checkpoint import read_safetensors

    stored = {name for name, _ in read_safetensors(tmp_path / "q" / "model.safetensors")}
    assert ("word_embeddings.weight" in stored) != tied  # a tied table is stored once, as the head
    loaded, _ = load_model(tmp_path / "q")
    assert quantization_info(loaded)["head_bits"] == 8
    assert torch.equal(loaded.word_embeddings.weight, model.word_embeddings.weight)
    if tied:  # a table changed since (full fine-tuning, say) is not the head's rows: it is stored
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.word_embeddings.weight[5] += 1.0
        save_model(tmp_path / "changed", changed, tokenizer)
        assert torch.equal(load_model(tmp_path / "changed")[0].word_embeddings.weight, changed.word_embeddings.weight)
    torch.testing.assert_close(loaded(ids, context_lengths=ctx), model(ids, context_lengths=ctx), rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantizationError, match="8-bit head"):
        load_model(tmp_path / "q", bits=4, head_bits=4)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(loaded, 4)
    if tied:  # on the fly from a full-precision folder: the head comes from the table
        fly, _ = load_model(fp32_dir, bits=4, head_bits=8)
        for name, t in model.state_dict().items():
            assert torch.equal(fly.state_dict()[name], t), name
        with pytest.raises(QuantizationError, match="need the layers"):
            load_model(fp32_dir, head_bits=8)


def test_cli_head_bits(fp32_dir, tmp_path, capsys):
    out = tmp_path / "q4h8"
    assert main(["quantize", "--model", str(fp32_dir), "--bits", "4", "--head-bits", "8", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["head_bits"] == 8
    assert main(["generate", "--model", str(out), "--max-new-tokens", "4", "In the beginning"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(fp32_dir), "--head-bits", "8", "hi"]) == 2
    assert "needs --bits" in capsys.readouterr().err
