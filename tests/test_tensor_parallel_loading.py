"""Tensor-parallel loading: each rank reads only its own slices of a model folder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

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
                for p in model.parameters())
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"base_kb": base, "peak_kb": status("VmHWM:"), "local_bytes": local}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow  # four torchrun ranks loading a 236 MB folder
def test_each_rank_holds_a_quarter_of_the_model(tmp_path):
    """4 gloo ranks load a 118M-parameter FP16 folder (236 MB): each rank's peak memory while
    loading stays within 1/4 of the model plus 25% (and a 16 MB allowance for buffers), after a
    warm-up load of a tiny folder has paid the fixed costs (imports, tokenizer, process group)."""
    cfg = GLMConfig(name="tp-load", vocab_size=16384, hidden_size=1024, num_layers=8, num_heads=16,
                    ffn_hidden_size=2752, max_seq_len=256)
    save_model(tmp_path / "m", build_model(cfg), default_tokenizer(), dtype=torch.float16)
    tiny = GLMConfig.from_preset("tiny", num_layers=1)
    save_model(tmp_path / "warm", build_model(tiny), default_tokenizer(), dtype=torch.float16)
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
