"""Shared test models, and gloo ranks in spawned processes."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm130b.config import GLMConfig
from glm130b.model.glm import build_model


def varied_model(rotary: str = "1d", seed: int = 0, max_seq_len: int = 128):
    """A random tiny GLM whose untied head makes varied, context-dependent choices (a plain random
    model repeats one token, which would hide batching and cache bugs)."""
    torch.manual_seed(seed)
    cfg = GLMConfig.from_preset("tiny", rotary=rotary, tie_word_embeddings=False, max_seq_len=max_seq_len)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)
        for block in model.layers:  # stronger attention so the context matters
            block.attention.query_key_value.weight.mul_(3.0)
    return model


def _rank_entry(rank: int, world: int, rendezvous: str, fn, args) -> None:
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    fn(rank, *args)  # an exception reaches the parent through spawn's error file
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world: int, tmp_path, *args) -> None:
    """fn(rank, *args) in `world` spawned processes joined in one gloo group (a file rendezvous
    under tmp_path); an exception in any rank fails the caller. `fn` must be importable by name."""
    rendezvous = tmp_path / f"rdv_{fn.__name__}_{len(list(tmp_path.glob('rdv_*')))}"
    rendezvous.mkdir()
    mp.spawn(_rank_entry, args=(world, str(rendezvous), fn, args), nprocs=world, join=True)
