"""Tensor-parallel loading: each rank reads only its own slices of a model folder."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import spawn_ranks, varied_model

from glm130b.checkpoint import save_model
from glm130b.config import GLMConfig
from glm130b.model.glm import build_model
from glm130b.tokenizer import default_tokenizer

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from glm130b.checkpoint import load_model
    from glm130b.train.distributed import join_process_group
    from glm130b.train.parallel_plan import build_mesh

    def status(key):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    torch.set_num_threads(1)
    folder, warm, out = sys.argv[1], sys.argv[2], sys.argv[3]
    join_process_group()
    mesh = build_mesh(tp=int(os.environ["WORLD_SIZE"]), device_type="cpu")
    load_model(warm, dtype=torch.float16, tp_mesh=mesh["tp"])  # imports, the tokenizer, the plan: not the load's cost
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS:")
    model, _ = load_model(folder, dtype=torch.float16, tp_mesh=mesh["tp"])
    local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
                for p in [*model.parameters(), *model.buffers()])
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"base_kb": base, "peak_kb": status("VmHWM:"), "local_bytes": local}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow  # four torchrun ranks loading a 236 MB folder (an 81 MB one for INT4)
@pytest.mark.parametrize("bits", [None, 4])
def test_each_rank_holds_a_quarter_of_the_model(tmp_path, bits):
    """4 gloo ranks load a 118M-parameter FP16 folder (236 MB), or its INT4 folder (81 MB: packed
    weights, scales, the FP16 embedding): each rank's peak memory while loading stays within 1/4
    of the model plus 25% (and a 16 MB allowance for buffers), after a warm-up load of a tiny
    folder has paid the fixed costs (imports, tokenizer, process group)."""
    from glm130b.quant import quantize_model

    def stored(model):
        return model if bits is None else quantize_model(model, bits)

    cfg = GLMConfig(name="tp-load", vocab_size=16384, hidden_size=1024, num_layers=8, num_heads=16,
                    ffn_hidden_size=2752, max_seq_len=256)
    save_model(tmp_path / "m", stored(build_model(cfg)), default_tokenizer(), dtype=torch.float16)
    tiny = GLMConfig.from_preset("tiny", num_layers=1)
    save_model(tmp_path / "warm", stored(build_model(tiny)), default_tokenizer(), dtype=torch.float16)
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                          str(tmp_path / "rank.py"), str(tmp_path / "m"), str(tmp_path / "warm"), str(tmp_path)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in range(4):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        grown = (r["peak_kb"] - r["base_kb"]) * 1024
        assert r["local_bytes"] < 0.3 * size  # the shard is about a quarter (LayerNorms are replicated)
        print(f"rank {rank}: peak +{grown / 2**20:.1f} MB while loading; a quarter of the file is "
              f"{size / 4 / 2**20:.1f} MB")
        assert grown <= 1.25 * size / 4 + 16 * 2**20, (rank, grown / 2**20, size / 2**20)


def _torchrun(nproc, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "glm130b", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_quantized_split_problems():
    """A quantized folder splits over --tp when each rank's inputs of the row-parallel matrices
    fall on whole packed bytes (INT4) and whole groups of scales; a quantized head does not."""
    from glm130b.infer.tensor_parallel import quantized_split_problems

    def cfg(**scheme):
        return GLMConfig.from_preset("tiny", extra={"quantization": scheme})  # H 128, F 344

    assert quantized_split_problems(cfg(bits=8), 2) == []
    assert quantized_split_problems(cfg(bits=4, group_size=4), 2) == []
    assert quantized_split_problems(cfg(bits=4, group_size=512), 4) == []  # one group per row: per-row
    [problem] = quantized_split_problems(cfg(bits=4, group_size=64), 2)  # 172 inputs per rank
    assert "mlp.dense_4h_to_h" in problem and "groups of 64" in problem
    [problem] = quantized_split_problems(cfg(bits=4), 8)  # 43 inputs per rank: half a byte
    assert "dense_4h_to_h" in problem and "odd" in problem
    assert quantized_split_problems(cfg(bits=8, head_bits=8), 2) == []  # the head splits on whole rows


PROMPT = "In the beginning God created"
IDS = torch.tensor([default_tokenizer().encode(PROMPT)])


def _quantized_head_worker(rank: int, folders: dict, expected: dict) -> None:
    """Each rank: its vocabulary rows of the quantized head (from a folder's slices, or
    quantized on the rank), and the single process's tokens and logits."""
    from glm130b.checkpoint import load_model
    from glm130b.infer.generate import generate
    from glm130b.infer.tensor_parallel import ShardQuantizedLinear, quantize_shards
    from glm130b.train.parallel_plan import build_mesh

    mesh = build_mesh(tp=2, device_type="cpu")
    for name, folder in folders.items():
        model, tokenizer = load_model(folder, tp_mesh=mesh["tp"])
        if name.startswith("fly"):  # a full-precision folder, quantized by each rank
            quantize_shards(model, 8, 4, head_bits=8)
        head = model.lm_head
        assert isinstance(head, ShardQuantizedLinear) and head.style == "vocab", name
        assert head.local.qweight.shape[0] == model.config.vocab_size // 2, name  # this rank's rows only
        with torch.no_grad():
            logits = model(IDS, context_lengths=torch.tensor([IDS.shape[1]])).full_tensor()
        torch.testing.assert_close(logits, expected[name]["logits"], atol=1e-4, rtol=1e-4)
        assert generate(model, tokenizer, PROMPT, max_new_tokens=8) == expected[name]["text"], name


def test_quantized_head_splits_over_tensor_parallel_ranks(tmp_path):
    """A quantized output head (--head-bits) under --tp: a quantized folder's head is read as
    each rank's vocabulary rows (a tied table, stored once as the head, is rebuilt from them), or
    each rank quantizes its rows of a full-precision head (tied table or untied head); logits and
    greedy tokens equal the single-process quantized model."""
    from glm130b.checkpoint import load_model
    from glm130b.infer.generate import generate
    from glm130b.quant import quantize_model

    tokenizer = default_tokenizer()
    torch.manual_seed(3)
    tied = build_model(GLMConfig.from_preset("tiny", num_layers=2)).eval()
    sources = {"saved_untied": (varied_model("1d", 5), True), "fly_untied": (varied_model("1d", 6), False),
               "fly_tied": (tied, False), "saved_tied": (copy.deepcopy(tied), True)}  # (the table stored as the head)
    folders, expected = {}, {}
    for name, (model, saved) in sources.items():
        folder = tmp_path / name
        save_model(folder, quantize_model(model, 8, 4, head_bits=8) if saved else model, tokenizer)
        single = load_model(folder, bits=None if saved else 8, group_size=None if saved else 4, head_bits=None if
                            saved else 8)[0]
        with torch.no_grad():
            logits = single(IDS, context_lengths=torch.tensor([IDS.shape[1]]))
        folders[name] = str(folder)
        expected[name] = {"logits": logits, "text": generate(single, tokenizer, PROMPT, max_new_tokens=8)}
    spawn_ranks(_quantized_head_worker, 2, tmp_path, folders, expected)


@pytest.mark.slow  # three torchrun launches of two ranks
def test_quantized_folder_generates_the_single_process_tokens(tmp_path):
    """`generate --tp 2` on folders written by `glm130b quantize` (INT8 per row, INT4 with groups
    and an INT8 head):
    each rank reads its slices of the packed weights and scales, and the tokens are the
    single-process quantized model's. A split off the groups is one error line."""
    from glm130b.checkpoint import load_model
    from glm130b.infer.generate import generate
    from glm130b.quant import quantize_model

    prompt = "In the beginning God created"
    for name, bits, group, head in (("q8", 8, None, None), ("q4g4h8", 4, 4, 8)):
        save_model(tmp_path / name, quantize_model(varied_model("1d", 5), bits, group, head), default_tokenizer())
        single = generate(load_model(tmp_path / name)[0], default_tokenizer(), prompt, max_new_tokens=12)
        out = _torchrun(2, "generate", "--model", str(tmp_path / name), "--tp", "2", "--max-new-tokens", "12", prompt)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout == single + "\n", name
    save_model(tmp_path / "q4g64", quantize_model(varied_model("1d", 5), 4, 64), default_tokenizer())
    out = _torchrun(2, "generate", "--model", str(tmp_path / "q4g64"), "--tp", "2", "x")
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "groups of 64" in errors[0]  # (torchrun's agent adds its own traceback of the failed ranks)


def test_sat_pieces_and_config(tmp_path):
    """Which parts of which source shards a rank copies; a SAT folder's config (its config.json,
    else the preset of its merged shapes, else one error line)."""
    from glm130b.checkpoint import CheckpointError
    from glm130b.cli import main
    from glm130b.interop.sat import (
        _overlap,
        is_sat_folder,
        load_sat_shard,
        sat_folder_config,
        sat_shard_files,
    )

    assert _overlap(0, 8, 4) == [(0, 0, 4), (1, 0, 4)]  # degree 4 -> tp 2: two whole shards
    assert _overlap(4, 2, 4) == [(1, 0, 2)]  # degree 2 -> tp 4: half of one
    assert _overlap(3, 4, 5) == [(0, 3, 5), (1, 0, 2)]
    save_model(tmp_path / "m", build_model(GLMConfig.from_preset("tiny")), default_tokenizer())
    assert main(["convert", "--from", "ours", "--to", "sat", "--tp", "2", str(tmp_path / "m"), str(tmp_path / "s")]) == 0
    assert is_sat_folder(tmp_path / "s") and not is_sat_folder(tmp_path / "m")
    files = sat_shard_files(tmp_path / "s")
    assert sat_folder_config(tmp_path / "s", load_sat_shard(files[0]), 2).name == "tiny"  # by its merged shapes
    shard0 = {k: v for k, v in load_sat_shard(files[0]).items() if "layers.1." not in k}  # no preset has 1 layer
    with pytest.raises(CheckpointError, match="config.json"):
        sat_folder_config(tmp_path / "s", shard0, 2)


def test_sat_folder_runs_in_one_process(tmp_path, capsys):
    """`generate --model SATDIR` without --tp: the tokens of the folder the shards were written
    from (full precision, and --bits 4 on load); official INT4 shards: the tokens of their merged
    state; a flag that needs --bits is one error line."""
    import shutil

    from glm130b.checkpoint import model_from_state
    from glm130b.cli import main
    from glm130b.infer.generate import generate
    from glm130b.interop.sat import read_sat_model
    from glm130b.quant import quantize_model

    tok, prompt = default_tokenizer(), "In the beginning God created"
    save_model(tmp_path / "fp", varied_model("1d", 5), tok)
    save_model(tmp_path / "q4", quantize_model(varied_model("1d", 5), 4), tok)
    for src in ("fp", "q4"):
        assert main(["convert", "--from", "ours", "--to", "sat", "--tp", "2", str(tmp_path / src),
                     str(tmp_path / f"sat-{src}")]) == 0
        for name in ("config.json", "tokenizer.json"):  # the untied test model matches no preset
            shutil.copy(tmp_path / "fp" / name, tmp_path / f"sat-{src}" / name)
    capsys.readouterr()

    def gen(folder, *flags):
        assert main(["generate", "--model", str(tmp_path / folder), "--max-new-tokens", "12", *flags, prompt]) == 0
        return capsys.readouterr().out

    assert gen("sat-fp") == gen("fp")
    assert gen("sat-fp", "--bits", "4") == gen("fp", "--bits", "4")
    merged = model_from_state(*read_sat_model(tmp_path / "sat-q4"), "sat")
    assert gen("sat-q4") == generate(merged, tok, prompt, max_new_tokens=12) + "\n"
    assert main(["generate", "--model", str(tmp_path / "sat-fp"), "--head-bits", "8", prompt]) == 2
    assert "--head-bits needs --bits" in capsys.readouterr().err


@pytest.mark.slow  # three torchrun launches (2, 4 and 2 ranks)
def test_sat_shards_load_resplit_at_any_tp(tmp_path):
    """SAT shards of degree 4 at --tp 2 and of degree 2 at --tp 4 (full precision), and official
    INT4 shards of degree 4 at --tp 2 (each rank's row-parallel columns span two source shards,
    their scales kept as groups): the tokens of one process."""
    import dataclasses
    import shutil

    from glm130b.checkpoint import load_config, load_model, model_from_state
    from glm130b.cli import main
    from glm130b.infer.generate import generate
    from glm130b.interop.sat import official_to_ours, read_sat, sat_quantization
    from glm130b.quant import quantize_model

    tok, prompt = default_tokenizer(), "In the beginning God created"
    save_model(tmp_path / "fp", varied_model("1d", 5), tok)
    save_model(tmp_path / "q4", quantize_model(varied_model("1d", 5), 4), tok)
    for src, degree in (("fp", 4), ("fp", 2), ("q4", 4)):
        dst = tmp_path / f"sat-{src}-{degree}"
        assert main(["convert", "--from", "ours", "--to", "sat", "--tp", str(degree), str(tmp_path / src), str(dst)]) == 0
        for name in ("config.json", "tokenizer.json"):  # the untied test model matches no preset
            shutil.copy(tmp_path / "fp" / name, dst / name)
    single = generate(load_model(tmp_path / "fp")[0], tok, prompt, max_new_tokens=12)
    official = read_sat(tmp_path / "sat-q4-4")  # the single-process load of the official INT4 shards
    cfg = load_config(tmp_path / "fp")
    cfg = dataclasses.replace(cfg, extra={"quantization": {**sat_quantization(official), "scheme": "", "modules": []}})
    single_q4 = generate(model_from_state(cfg, official_to_ours(official), "sat"), tok, prompt, max_new_tokens=12)
    for folder, tp, want in (("sat-fp-4", 2, single), ("sat-fp-2", 4, single), ("sat-q4-4", 2, single_q4)):
        out = _torchrun(tp, "generate", "--model", str(tmp_path / folder), "--tp", str(tp), "--max-new-tokens", "12",
                        prompt)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout == want + "\n", (folder, tp)
