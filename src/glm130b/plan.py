"""Memory planner: what one GPU holds to serve or train a GLM, and whether it fits.

Parameter counts come from the model itself, built on the meta device (no memory), so every
preset and model folder is planned from its real shapes. All byte counts are per GPU, for the
most loaded GPU. GPU sizes are in GiB, as `nvidia-smi` reports them (an "A100-40G" has 40 GiB).

Inference (weights spread over the GPUs by tensor parallelism, as GLM-130B's own inference does):
  weights     the four matrices of every layer at `bits` (INT8/INT4 per-row or group-wise with
              FP32 scales, glm130b.quant), embeddings, LayerNorms and biases in FP16, split by TP
  kv_cache    2 (k, v) x layers x batch x sequence x hidden x 2 bytes / TP
  activations the prefill of one layer in the engine (prefill_activation_bytes): the mask, a few
              hidden-size buffers, QKV, the FFN intermediate; SDPA builds no s x s scores
  overhead    CUDA context, kernels and allocator slack: a flat 1 GiB per GPU

Training (mixed precision, TP x PP x DP on PyTorch's stack, docs/parallel.md):
  the most loaded pipeline stage is planned (the first: ceil(layers / PP) layers + the embedding).
  `shard` says how data parallelism shares the model states:
    full       FSDP2 (this project's trainer): FP32 parameters, FP32 gradients and AdamW's two
               FP32 moments (16 bytes/parameter) are sharded over DP; one layer's parameters are
               gathered in BF16 at a time (two with prefetch)
    optimizer  ZeRO-1 (GLM-130B's DeepSpeed set-up): FP16 parameters and gradients replicated
               (4 bytes/parameter), FP32 master copy and moments (12 bytes) sharded over DP
    none       DDP: all 16 bytes/parameter on every GPU
  activations are stored for the in-flight micro-batches of 1F1B (min(PP, micro-batches) on the
  first stage): without checkpointing every saved tensor of each layer (the count is in
  `layer_activation_bytes`); with it, each layer's input only, plus one layer recomputed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from glm130b.config import GLMConfig
from glm130b.errors import GLMError

GiB = 1024**3
OVERHEAD = 1 * GiB  # CUDA context + allocator slack per GPU


class PlanError(GLMError, ValueError):
    """A plan that cannot be made (bad GPU spec, layout that does not divide)."""


@dataclass(frozen=True)
class Gpus:
    count: int
    gib: float

    @classmethod
    def parse(cls, spec: str, nodes: int = 1) -> Gpus:
        """"4x24GB", "8xA100-40G", "8x11" -> count and GiB per GPU (times `nodes`)."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(?:[A-Za-z0-9 ]+?[- ])?(\d+(?:\.\d+)?)\s*(?:GB|GiB|G)?\s*", spec)
        if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
            raise PlanError(f"cannot read --gpus {spec!r}: write COUNTxSIZE, e.g. 4x24GB or 8x40GB")
        if nodes < 1:
            raise PlanError(f"--nodes must be >= 1, got {nodes}")
        return cls(int(m.group(1)) * nodes, float(m.group(2)))


@dataclass(frozen=True)
class Counts:
    """Parameter counts by kind (from the meta-device model)."""

    embedding: int  # word embeddings (+ an untied head)
    layer_matrices: int  # the four quantizable matrices of one layer
    layer_other: int  # biases and LayerNorms of one layer
    final: int  # final LayerNorm
    total: int


def count_parameters(cfg: GLMConfig) -> Counts:
    from glm130b.model.glm import build_model
    from glm130b.quant.weights import quantizable_linears

    model = build_model(cfg, "meta")
    layer0 = model.layers[0]
    matrices = sum(m.weight.numel() for _n, _p, _a, m in quantizable_linears(layer0))
    layer_total = sum(p.numel() for p in layer0.parameters())
    embedding = model.word_embeddings.weight.numel() + (0 if model.lm_head is None else model.lm_head.weight.numel())
    final = sum(p.numel() for p in model.final_layernorm.parameters())
    return Counts(embedding, matrices, layer_total - matrices, final, model.num_parameters())


def _matrix_bytes(n: int, rows: int, bits: int, group_size: int | None, cols: int) -> float:
    """Bytes of `n` weights in `rows` rows of `cols` at `bits` (16: FP16; 8/4: + FP32 scales)."""
    if bits == 16:
        return 2.0 * n
    groups = 1 if not group_size else math.ceil(cols / group_size)
    return n * bits / 8 + rows * groups * 4


def layer_activation_bytes(cfg: GLMConfig, micro_batch: int, seq: int, tp: int) -> float:
    """16-bit tensors one layer saves for backward (Korthikanti et al. 2022's count, for GeGLU):
    replicated over TP: the attention input and LN output, the post-attention LN input and
    output (4 x sbh x 2 bytes); split over TP: q, k, v, the attention context (4 x sbh x 2), the
    softmax probabilities (a s^2 b x 2) and its FP32 input (x 4), the GeGLU 2F projection, the GELU
    output and the product fed to the output matrix (4F x sb x 2)."""
    s, b, h, a, f = seq, micro_batch, cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden_size
    replicated = 4 * s * b * h * 2
    split = (4 * s * b * h * 2 + a * s * s * b * (2 + 4) + 4 * f * s * b * 2) / tp
    return replicated + split


def prefill_activation_bytes(cfg: GLMConfig, batch: int, seq: int, tp: int, act_bytes: int = 2) -> float:
    """What one layer's prefill of `batch` x `seq` tokens allocates in the engine, summed over
    the layer (a bound on its peak): the boolean mask and SDPA's 16-bit additive copy of it (no
    s x s scores: SDPA's memory-efficient kernels never build them), four hidden-size buffers
    (input, LayerNorm output, attention output, residual), the QKV output and rotary's FP32
    copies of q and k, and the FFN's projection and activation (GeGLU: 2F then F; GELU: F twice).
    The earlier count (FP32 scores and probabilities, 8 bytes per head x s^2) was 2-6x the peak
    measured on the CPU (benchmarks/plan_vs_reality.py)."""
    b, s, h, f = batch, seq, cfg.hidden_size, cfg.ffn_hidden_size
    mask = b * s * s * (1 + act_bytes)
    hidden = 4 * b * s * h * act_bytes
    attention = 3 * b * s * h / tp * act_bytes + 2 * b * s * h / tp * 4
    ffn = (3 if cfg.ffn_type == "geglu" else 2) * b * s * f / tp * act_bytes
    return mask + hidden + attention + ffn


@dataclass
class Plan:
    mode: str  # "inference" or "training"
    preset: str
    parameters: int
    gpus: int
    gpu_bytes: float
    tp: int
    pp: int
    dp: int
    bits: int
    per_gpu: dict  # component -> bytes
    per_gpu_bytes: float
    fits: bool
    margin_bytes: float  # capacity - need (negative: short by this much)
    notes: list

    def to_dict(self) -> dict:
        return asdict(self)


def plan_inference(cfg: GLMConfig, gpus: Gpus, bits: int = 16, batch: int = 1, seq: int | None = None,
                   tp: int | None = None, group_size: int | None = None) -> Plan:
    if bits not in (16, 8, 4):
        raise PlanError(f"--bits must be 16, 8 or 4, got {bits}")
    tp = tp or gpus.count
    if tp < 1 or tp > gpus.count:
        raise PlanError(f"tensor parallelism {tp} needs 1..{gpus.count} GPUs")
    if cfg.num_heads % tp:
        raise PlanError(f"{cfg.num_heads} heads do not split over TP {tp}")
    seq = seq or cfg.max_seq_len
    c = count_parameters(cfg)
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    # rows of the four matrices of a layer: QKV 3h, dense h, h_to_4h 2f (or f for GELU), 4h_to_h h
    rows_cols = [(3 * h, h), (h, h), ((2 if cfg.ffn_type == "geglu" else 1) * f, h), (h, f)]
    layer = sum(_matrix_bytes(r * k, r, bits, group_size, k) for r, k in rows_cols)
    weights = (cfg.num_layers * (layer + 2 * c.layer_other) + 2 * (c.embedding + c.final)) / tp
    kv = 2 * cfg.num_layers * batch * seq * h * 2 / tp
    activations = prefill_activation_bytes(cfg, batch, seq, tp)
    per_gpu = {"weights": weights, "kv_cache": kv, "activations": activations, "overhead": OVERHEAD}
    notes = [f"batch {batch} x sequence {seq}; KV cache and activations in FP16/FP32 as the engine keeps them"]
    return _finish("inference", cfg, c, gpus, tp, 1, 1, bits, per_gpu, notes)


def plan_training(cfg: GLMConfig, gpus: Gpus, tp: int = 1, pp: int = 1, dp: int | None = None, micro_batch: int = 1,
                  seq: int | None = None, microbatches: int | None = None, checkpointing: bool = True,
                  shard: str = "full") -> Plan:
    if shard not in ("full", "optimizer", "none"):
        raise PlanError(f"--shard must be full, optimizer or none, got {shard!r}")
    if tp < 1 or pp < 1:
        raise PlanError("--tp and --pp must be >= 1")
    dp = dp or gpus.count // (tp * pp)
    if dp < 1 or tp * pp * dp != gpus.count:
        raise PlanError(f"tp {tp} x pp {pp} x dp {dp} = {tp * pp * dp}, but there are {gpus.count} GPUs")
    if cfg.num_heads % tp:
        raise PlanError(f"{cfg.num_heads} heads do not split over TP {tp}")
    if pp > cfg.num_layers:
        raise PlanError(f"{pp} pipeline stages for {cfg.num_layers} layers")
    seq = seq or cfg.max_seq_len
    microbatches = microbatches or pp
    c = count_parameters(cfg)
    layers = math.ceil(cfg.num_layers / pp)  # the first stage: most layers and the embedding
    layer_params = c.layer_matrices + c.layer_other
    params = (layers * layer_params + c.embedding) / tp
    if shard == "full":
        states = {"parameters": 4 * params / dp, "gradients": 4 * params / dp, "optimizer": 8 * params / dp,
                  "gathered_layers": 2 * 2 * layer_params / tp}
    elif shard == "optimizer":
        states = {"parameters": 2 * params, "gradients": 2 * params, "optimizer": 12 * params / dp}
    else:
        states = {"parameters": 4 * params, "gradients": 4 * params, "optimizer": 8 * params}
    in_flight = min(pp, microbatches)
    one_layer = layer_activation_bytes(cfg, micro_batch, seq, tp)
    if checkpointing:
        activations = in_flight * layers * 2 * seq * micro_batch * cfg.hidden_size + one_layer
    else:
        activations = in_flight * layers * one_layer
    logits = micro_batch * seq * cfg.vocab_size / tp * (2 + 4)  # the vocab-parallel logits and FP32 loss
    per_gpu = {**states, "activations": activations + logits, "overhead": OVERHEAD}
    notes = [f"first pipeline stage: {layers} layers + embedding; {in_flight} micro-batches of {micro_batch} x {seq} "
             f"in flight (1F1B); activation checkpointing {'on' if checkpointing else 'off'}; shard={shard}"]
    return _finish("training", cfg, c, gpus, tp, pp, dp, 16, per_gpu, notes)


def _finish(mode, cfg, counts, gpus, tp, pp, dp, bits, per_gpu, notes) -> Plan:
    need = float(sum(per_gpu.values()))
    capacity = gpus.gib * GiB
    return Plan(mode, cfg.name, counts.total, gpus.count, capacity, tp, pp, dp, bits,
                {k: float(v) for k, v in per_gpu.items()}, need, need <= capacity, capacity - need, notes)


def format_plan(plan: Plan, alternative: Plan | None = None) -> str:
    gib = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"{plan.mode} plan for {plan.preset} ({plan.parameters:,} parameters) on {plan.gpus} GPU(s) of "
             f"{plan.gpu_bytes / GiB:g} GiB: tp {plan.tp} x pp {plan.pp} x dp {plan.dp}"
             + (f", {plan.bits}-bit weights" if plan.mode == "inference" else ""),
             "per GPU:"]
    for k, v in plan.per_gpu.items():
        lines.append(f"  {k:<16}{gib(v)}")
    lines.append(f"  {'total':<16}{gib(plan.per_gpu_bytes)}  of {plan.gpu_bytes / GiB:g} GiB")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"{verdict}: {abs(plan.margin_bytes) / GiB:.2f} GiB {'to spare' if plan.fits else 'short'} per GPU")
    if alternative is not None:
        alt = "fits" if alternative.fits else "does not fit"
        lines.append(f"without activation checkpointing: {gib(alternative.per_gpu_bytes).strip()} per GPU, {alt}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
