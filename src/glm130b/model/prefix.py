"""P-Tuning v2 prefixes: learned keys and values in front of every layer's attention.

The prefix is `pre_seq_len` virtual tokens whose keys and values are learned directly, one set
per layer (Liu et al. 2021; ChatGLM-6B's ptuning/). Every position of the sequence sees every
prefix key (masks.with_prefix); the keys carry no rotary position, as in ChatGLM-6B.

Two parametrisations, as ChatGLM-6B's PrefixEncoder and peft's PrefixTuning have them:
* plain: one table [pre_seq_len, num_layers * 2 * hidden] of keys and values;
* projected: an embedding [pre_seq_len, hidden] through Linear -> tanh -> Linear up to that
  width (smoother training; ChatGLM's `--prefix_projection`).
Either way the table's last dimension is laid out as peft lays out `prompt_embeddings`
(layer, then key/value, then head, then head dim), so `table()` is what peft saves and what a
peft PREFIX_TUNING adapter loads into a plain encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from glm130b.config import GLMConfig


class PrefixEncoder(nn.Module):
    def __init__(self, config: GLMConfig, pre_seq_len: int, projection_hidden: int | None = None):
        super().__init__()
        if pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be >= 1, got {pre_seq_len}")
        self.num_layers, self.num_heads, self.head_dim = config.num_layers, config.num_heads, config.head_dim
        self.pre_seq_len = pre_seq_len
        width = config.num_layers * 2 * config.hidden_size
        self.projection_hidden = projection_hidden
        if projection_hidden:
            self.embedding = nn.Embedding(pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, projection_hidden), nn.Tanh(),
                                       nn.Linear(projection_hidden, width))
        else:
            self.embedding = nn.Embedding(pre_seq_len, width)
            self.trans = None
        # N(0, 1), nn.Embedding's default, as ChatGLM-6B's PrefixEncoder and peft leave it: keys of the
        # real keys' scale get attention (and gradient) from the first step; 0.02 barely trained

    def table(self) -> torch.Tensor:
        """The keys and values as one [pre_seq_len, num_layers * 2 * hidden] table."""
        e = self.embedding.weight
        return self.trans(e) if self.trans is not None else e

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (keys, values), each [1, heads, pre_seq_len, head_dim] (broadcast over rows)."""
        kv = self.table().view(self.pre_seq_len, self.num_layers * 2, self.num_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1)  # [layers * 2, 1, heads, P, d]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    @classmethod
    def from_table(cls, config: GLMConfig, table: torch.Tensor) -> PrefixEncoder:
        """A plain encoder holding a saved table (inference: any projection is already applied)."""
        width = config.num_layers * 2 * config.hidden_size
        if table.dim() != 2 or table.shape[1] != width:
            raise ValueError(f"prefix table of shape {tuple(table.shape)} does not fit this model "
                             f"([pre_seq_len, {width}] = layers x 2 x hidden)")
        encoder = cls(config, table.shape[0])
        with torch.no_grad():
            encoder.embedding.weight.copy_(table)
        return encoder
