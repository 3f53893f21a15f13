"""The layer-layout table: every weight of a GLM layer, how tensor parallelism splits it, and
whether weight-only quantization replaces it.

The tensor-parallel plans (train/parallel_plan.py, infer/tensor_parallel.py), the SAT
checkpoint merge and split (interop/sat.py), quantization (quant/weights.py) and the fused
decode step (infer/fused.py) all read this table instead of listing the matrices themselves.

Splits (Megatron's, as GLM-130B's own checkpoints are cut):
* "column": the output rows are split (QKV keeps whole heads: its rows are per-head interleaved).
* "glu": column-split per GeGLU half (rows [a; b] become [a_r; b_r] on rank r); plain "column"
  for a GELU FFN (ChatGLM-6B).
* "row": the input columns are split; the partial sums are all-reduced, the bias added once.
* "replicated": every rank holds all of it (LayerNorms, a row-split matrix's bias).
The vocabulary (embedding table, an untied head) is split by rows, like "column".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Matrix:
    module: str  # the module's path inside a layer
    split: str  # "column", "glu" or "row"
    quantized: bool = True  # GLM-130B's INT8/INT4 replaces it


# The four matrices of every layer, in the order a token meets them.
LAYER_MATRICES = (
    Matrix("attention.query_key_value", "column"),
    Matrix("attention.dense", "row"),
    Matrix("mlp.dense_h_to_4h", "glu"),
    Matrix("mlp.dense_4h_to_h", "row"),
)
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")  # replicated, never quantized
QUANTIZED_MODULES = tuple(m.module for m in LAYER_MATRICES if m.quantized)


def split_of(matrix: Matrix, ffn_type: str) -> str:
    """The split of `matrix` in a model whose FFN is `ffn_type` ("geglu" or "gelu")."""
    return "column" if matrix.split == "glu" and ffn_type != "geglu" else matrix.split


def layer_matrices(block):
    """(Matrix, module) for the four matrices of one GLMBlock."""
    return [(m, block.get_submodule(m.module)) for m in LAYER_MATRICES]


def split_rule(name: str) -> str:
    """How tensor parallelism splits the tensor `name` (a state-dict key, with any prefix):
    "column" (dim 0), "row" (dim 1), "glu" (dim 0 of each GeGLU half) or "replicated"."""
    for m in LAYER_MATRICES:
        if name.endswith(m.module + ".weight"):
            return m.split
        if name.endswith(m.module + ".bias"):
            return "replicated" if m.split == "row" else m.split
    if name.endswith(("word_embeddings.weight", "lm_head.weight")):
        return "column"
    return "replicated"
