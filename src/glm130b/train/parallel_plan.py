"""The 3D-parallel plan for GLM: tensor (DTensor), fully sharded data (FSDP2) and pipeline parallelism.

Everything here is PyTorch's own stack, applied torchtitan-style *beside* the model (the model in
`glm130b.model` knows nothing about parallelism):

* a 3-D `DeviceMesh` named ("pp", "dp", "tp")                               -> `build_mesh`
* tensor parallelism with `parallelize_module` (Colwise QKV / h->4h, Rowwise dense / 4h->h,
  vocabulary-parallel embedding, vocabulary-parallel tied output head)       -> `apply_tensor_parallel`
* FSDP2 `fully_shard` over "dp", per block then the root                     -> `apply_fsdp`
* pipeline stages with `torch.distributed.pipelining` (GPipe, 1F1B)          -> `pipeline_stages`, `build_schedule`
* the loss with `loss_parallel` on vocabulary-sharded logits                 -> `glm_token_loss`
* `torch.distributed.checkpoint` save/load that reloads under any (pp, dp, tp) -> `save_checkpoint`, `load_checkpoint`
* the shard shapes of the full GLM-130B plan on a fake 64-rank world         -> `glm_130b_plan_shapes`

See docs/parallel.md for the plan and the reasons behind it. Two things need care:

GeGLU under TP. `dense_h_to_4h` has rows `[a; b]` (linear half, gated half) and the MLP computes
`a * gelu(b)` after `chunk(2)`. A plain column split would give rank 0 all of `a` and rank 1 all
of `b`. `apply_tensor_parallel` therefore permutes the rows (and bias) in place *before* sharding,
to `[a_0; b_0; a_1; b_1; ...]` (a_r = rows r*F/tp..(r+1)*F/tp of a), exactly what GLM-130B's
official `convert_tp` does, so each rank's contiguous slice is `[a_r; b_r]` and the model's local
`chunk(2)` is right. `to_tp_layout` / `from_tp_layout` apply / undo it on full state dicts, and the
DCP checkpoint stores the weight in the canonical (un-permuted) layout as a `[2, F, H]` view, so a
checkpoint saved with one `tp` loads under another.

Tied output head under TP. The embedding's weight is sharded on the vocabulary (Shard(0),
`VocabParallelEmbedding`). The model computes `F.linear(final_layernorm(h), embedding.weight)`;
making the final LayerNorm's output a *Replicate DTensor* (`PrepareModuleOutput`) turns that
very line into a column-parallel projection: Replicate x Shard(0)-weight -> logits sharded on the
vocabulary (Shard(-1)), which `loss_parallel` consumes without ever gathering the logits. The
weight stays one Parameter, so both uses accumulate into one (sharded) gradient. Under pipeline
parallelism the first and last stage each hold the embedding and `sync_tied_embedding_grads`
sums their gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from glm130b.config import GLMConfig
from glm130b.model.glm import GLMModel
from glm130b.model.layout import LAYER_MATRICES

IGNORE_INDEX = -100
MESH_DIM_NAMES = ("pp", "dp", "tp")
_TP_ATTR = "_glm_tp_size"  # set on a module by apply_tensor_parallel: the GeGLU layout's tp degree

__all__ = [
    "IGNORE_INDEX",
    "GLMStage",
    "VocabParallelEmbedding",
    "PipelineParts",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "build_schedule",
    "checkpoint_state_dict",
    "clip_grad_norm_",
    "from_tp_layout",
    "full_grads",
    "full_optimizer_state",
    "full_state_dict",
    "geglu_tp_permutation",
    "glm_130b_plan_shapes",
    "glm_token_loss",
    "global_num_tokens",
    "load_checkpoint",
    "loss_context",
    "loss_targets",
    "parallelize_glm",
    "pipeline_stages",
    "pipeline_step",
    "save_checkpoint",
    "split_stage",
    "stage_layer_ranges",
    "sync_tied_embedding_grads",
    "to_tp_layout",
    "tp_size_of",
]


# ============================================================================================
# Mesh
# ============================================================================================
def build_mesh(pp: int = 1, dp: int = 1, tp: int = 1, device_type: str = "cpu") -> DeviceMesh:
    """A 3-D mesh (pp, dp, tp) over the default process group; tp is innermost (fastest links).

    Rank r sits at pp = r // (dp*tp), dp = (r // tp) % dp, tp = r % tp. Sub-meshes: mesh["tp"],
    mesh["dp"], mesh["pp"] (and e.g. mesh["dp", "tp"]).
    """
    for name, size in zip(MESH_DIM_NAMES, (pp, dp, tp), strict=True):
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if dist.is_initialized() and dist.get_world_size() != pp * dp * tp:
        raise ValueError(f"pp*dp*tp = {pp * dp * tp} but the world has {dist.get_world_size()} ranks")
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIM_NAMES)


# ============================================================================================
# GeGLU row permutation for tensor parallelism
# ============================================================================================
def geglu_tp_permutation(ffn_hidden_size: int, tp: int) -> torch.Tensor:
    """Index `perm` with `permuted = canonical[perm]` for the 2F rows of a GeGLU `dense_h_to_4h`.

    Canonical rows are `[a; b]`; permuted rows are `[a_0; b_0; a_1; b_1; ...]` with a_r, b_r the
    r-th of tp equal slices of each half, so a contiguous 1/tp slice is `[a_r; b_r]`.
    """
    if ffn_hidden_size % tp:
        raise ValueError(f"ffn_hidden_size {ffn_hidden_size} is not divisible by tp={tp}")
    c = ffn_hidden_size // tp
    return torch.arange(2 * ffn_hidden_size).view(2, tp, c).transpose(0, 1).reshape(-1)


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def _is_geglu_key(key: str) -> bool:
    return key.endswith("mlp.dense_h_to_4h.weight") or key.endswith("mlp.dense_h_to_4h.bias")


def _permute_geglu_state(state: dict, config: GLMConfig, tp: int, inverse: bool) -> dict:
    if config.ffn_type != "geglu" or tp == 1:
        return dict(state)
    perm = geglu_tp_permutation(config.ffn_hidden_size, tp)
    if inverse:
        perm = _inverse_permutation(perm)
    out = {}
    for key, value in state.items():
        if _is_geglu_key(key):
            if isinstance(value, DTensor):
                raise TypeError(f"{key}: to_tp_layout/from_tp_layout take full tensors, got a DTensor")
            value = value.index_select(0, perm.to(value.device))
        out[key] = value
    return out


def to_tp_layout(state: dict, config: GLMConfig, tp: int) -> dict:
    """Full (canonical) state dict -> the row order a tp-way TP model holds (GeGLU rows permuted)."""
    return _permute_geglu_state(state, config, tp, inverse=False)


def from_tp_layout(state: dict, config: GLMConfig, tp: int) -> dict:
    """Inverse of `to_tp_layout`: full tensors gathered from a tp-way TP model -> canonical layout."""
    return _permute_geglu_state(state, config, tp, inverse=True)


def tp_size_of(module: nn.Module) -> int:
    """The tp degree `apply_tensor_parallel` used on this module (1 if none)."""
    return getattr(module, _TP_ATTR, 1)


# ============================================================================================
# Tensor parallelism
# ============================================================================================
def _blocks(module: nn.Module) -> list[nn.Module]:
    layers = getattr(module, "layers", None)
    if layers is None:
        return []
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


class VocabParallelEmbedding(ParallelStyle):
    """ParallelStyle: Megatron's vocabulary-parallel embedding, expressed with DTensor.

    The weight becomes a Shard(0) DTensor (as `RowwiseParallel` does for `nn.Embedding`). The
    forward looks up the *local* shard with out-of-range ids masked to zero and turns the
    Partial sum into Replicate (one all-reduce; identity in backward). Why not plain
    `RowwiseParallel`: DTensor has no vocabulary-sharded strategy for `embedding_dense_backward`,
    so it falls back to computing the *full* V x H weight gradient on every TP rank (7.4 GB per
    rank for GLM-130B in FP32). Here `to_local()` hands back a Shard(0) gradient of the local
    rows only. The module keeps its class and parameter names; only its forward is replaced.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding applies to nn.Embedding, got {type(module)}")
        weight = distribute_tensor(module.weight, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
        module.register_parameter("weight", nn.Parameter(weight, requires_grad=module.weight.requires_grad))
        module.forward = _VocabForward(module, device_mesh)
        return module


class _VocabForward:
    def __init__(self, module: nn.Embedding, mesh: DeviceMesh):
        self.module = module  # a plain attribute of a plain object: no module registration
        self.mesh = mesh

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        module = self.module
        weight = module.weight  # Shard(0) DTensor (FSDP's unsharded view when FSDP is on)
        local_w = weight.to_local()
        rows = local_w.shape[0]
        start = self.mesh.get_local_rank() * rows
        outside = (input_ids < start) | (input_ids >= start + rows)
        local_ids = (input_ids - start).masked_fill(outside, 0)
        out = F.embedding(local_ids, local_w).masked_fill(outside.unsqueeze(-1), 0.0)
        out = DTensor.from_local(out, self.mesh, [Partial()], run_check=False)
        return out.redistribute(self.mesh, [Replicate()]).to_local()


def tp_split_problems(config: GLMConfig, tp: int) -> list[str]:
    """What keeps `config` from splitting over `tp` ranks (whole heads, GeGLU rows, vocabulary rows)."""
    return [f"{name}={getattr(config, name)} is not divisible by --tp {tp}"
            for name in ("num_heads", "ffn_hidden_size", "vocab_size") if getattr(config, name) % tp]


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Megatron-style TP with DTensor `parallelize_module`, in place. Works on a `GLMModel` or a `GLMStage`.

    Per block: `query_key_value` and `dense_h_to_4h` ColwiseParallel (Shard(0) weight and bias),
    `attention.dense` and `dense_4h_to_h` RowwiseParallel (Shard(1) weight, replicated bias; one
    all-reduce per sub-layer in forward, one in backward). `attention.num_heads` becomes nh/tp
    (the per-head interleaved QKV rows keep whole heads on a rank). GeGLU rows are permuted
    first (module docstring). The embedding is vocabulary-parallel (Shard(0)); the final
    LayerNorm returns a Replicate DTensor so the tied head yields vocabulary-sharded logits.
    LayerNorms and activations between sub-layers stay replicated (no sequence parallelism).
    """
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    if tp_size_of(model) != 1:
        raise RuntimeError("apply_tensor_parallel was already applied to this module")
    config: GLMConfig = model.config
    problems = tp_split_problems(config, tp)
    if problems:
        raise ValueError("; ".join(problems))
    if tp == 1:
        return model

    # 1. GeGLU: permute rows in place so each contiguous column shard is [a_r; b_r].
    if config.ffn_type == "geglu":
        perm = geglu_tp_permutation(config.ffn_hidden_size, tp)
        with torch.no_grad():
            for block in _blocks(model):
                lin = block.mlp.dense_h_to_4h
                for p in (lin.weight, lin.bias):
                    p.copy_(p.index_select(0, perm.to(p.device)))

    # 2. Blocks.
    layer_plan = {m.module: RowwiseParallel() if m.split == "row" else ColwiseParallel() for m in LAYER_MATRICES}
    for block in _blocks(model):
        parallelize_module(block, tp_mesh, layer_plan)
        block.attention.num_heads = config.num_heads // tp  # local heads, as torchtitan adjusts n_heads

    # 3. Embedding, final LayerNorm and the (tied) head.
    plan = {}
    if getattr(model, "word_embeddings", None) is not None:
        plan["word_embeddings"] = VocabParallelEmbedding()
    if getattr(model, "final_layernorm", None) is not None:
        plan["final_layernorm"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False
        )
    if getattr(model, "lm_head", None) is not None:  # untied head: its weight is used via F.linear
        plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    setattr(model, _TP_ATTR, tp)
    return model


# ============================================================================================
# FSDP2
# ============================================================================================
def _fsdp_placement(param: nn.Parameter):
    # GeGLU's dense_h_to_4h weight is sharded over dp on its *input* dim (H), so that its
    # tp-local rows [a_r; b_r] stay whole on every dp rank and the checkpoint can expose the
    # canonical [2, F, H] layout as a zero-copy view (see checkpoint_state_dict).
    if getattr(param, "_glm_geglu_weight", False):
        return Shard(1)
    return None


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
    sum_gradients: bool = True,
) -> nn.Module:
    """FSDP2 `fully_shard` over `dp_mesh`: each block, then the root (embedding, final LN, head).

    `sum_gradients=True` makes the gradient reduction a sum over dp ranks (divide factor 1):
    pair it with a loss normalised by the *global* number of loss tokens (`global_num_tokens`),
    which makes the result exactly the single-process full-batch loss and gradient even when
    ranks hold different numbers of loss tokens. With False, FSDP averages (its default).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    config: GLMConfig = model.config
    if config.ffn_type == "geglu":
        for block in _blocks(model):
            w = block.mlp.dense_h_to_4h.weight
            if w.shape[1] % dp_mesh.size():
                raise ValueError(f"hidden_size {w.shape[1]} is not divisible by dp={dp_mesh.size()}")
            w._glm_geglu_weight = True
    kwargs = {"mesh": dp_mesh, "shard_placement_fn": _fsdp_placement}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy if isinstance(mp_policy, MixedPrecisionPolicy) else MixedPrecisionPolicy(**mp_policy)
    for block in _blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root keeps its (embedding/head) parameters gathered after forward: backward starts with them.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if sum_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                if dp_mesh.device_type == "cpu":  # gloo has no PREMUL_SUM: plain SUM reductions
                    m.set_force_sum_reduction_for_comms(True)
    return model


# ============================================================================================
# Composition
# ============================================================================================
def parallelize_glm(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
    sum_gradients: bool = True,
) -> nn.Module:
    """torchtitan order: TP over mesh["tp"] first, then FSDP over mesh["dp"] (2-D DTensors).

    `model` is a whole `GLMModel` (pp = 1) or this rank's `GLMStage` (from `pipeline_stages`,
    which calls this for you). Skips TP when tp = 1 and FSDP when dp = 1.
    """
    names = mesh.mesh_dim_names or ()
    if "tp" in names and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if "dp" in names and mesh["dp"].size() > 1:
        apply_fsdp(model, mesh["dp"], reshard_after_forward=reshard_after_forward,
                   mp_policy=mp_policy, sum_gradients=sum_gradients)
    return model


# ============================================================================================
# Loss
# ============================================================================================
def loss_targets(targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Targets with IGNORE_INDEX where loss_mask is 0: one tensor that survives microbatch splitting."""
    return targets.masked_fill(loss_mask == 0, IGNORE_INDEX)


def global_num_tokens(loss_mask: torch.Tensor, dp_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Number of loss tokens over the global batch (the local count summed over dp ranks)."""
    n = (loss_mask != 0).sum().to(torch.float32)
    if dp_mesh is not None and dp_mesh.size() > 1:
        dist.all_reduce(n, group=dp_mesh.get_group())
    return n


def glm_token_loss(logits: torch.Tensor, targets: torch.Tensor, num_tokens) -> torch.Tensor:
    """Sum of FP32 cross-entropy over non-ignored targets, divided by `num_tokens`.

    With `num_tokens` = the global count, the sum of this over microbatches and dp ranks is
    exactly `glm_loss` on the whole batch. Vocabulary-sharded DTensor logits (TP) must be used
    inside `loss_context`/`loss_parallel()` (forward *and* backward); the result is a plain tensor.
    """
    total = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if isinstance(total, DTensor):
        total = total.to_local()  # Replicate on the tp mesh: every rank holds the full value
    return total / num_tokens


def loss_context(module: nn.Module | None = None):
    """`loss_parallel()` when `module` is tensor-parallel (or always when module is None)."""
    from torch.distributed.tensor.parallel import loss_parallel

    if module is not None and tp_size_of(module) == 1:
        return contextlib.nullcontext()
    return loss_parallel()


def clip_grad_norm_(module: nn.Module, max_norm: float, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Clip the gradients of a parallelised model (or stage) to a global L2 norm; returns that norm.

    `torch.nn.utils.clip_grad_norm_` cannot mix gradients living on different meshes (TP
    DTensors on ("dp", "tp"), LayerNorms on ("dp",) only, plain tensors), nor see other pipeline
    stages. Here `torch.nn.utils.get_total_norm` runs per mesh, each partial norm is made whole
    with `full_tensor()`, the stages' squares are summed over mesh["pp"] (the tied embedding's
    second copy on the last stage is left out), and `clip_grads_with_norm_`-style scaling applies.
    """
    groups: dict = {}
    skip_tied = isinstance(module, GLMStage) and module.is_last and not module.is_first and module.tied
    for name, p in module.named_parameters():
        if p.grad is None or (skip_tied and name.startswith("word_embeddings.")):
            continue
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p.grad)
    square = torch.zeros((), dtype=torch.float32)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norm = _full(norm).float().cpu()
        square = square + norm**2
    if mesh is not None and mesh.mesh_dim_names and "pp" in mesh.mesh_dim_names and mesh["pp"].size() > 1:
        square = square.to(torch.device(mesh.device_type))
        dist.all_reduce(square, group=mesh["pp"].get_group())
        square = square.cpu()
    total = square.sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


# ============================================================================================
# Pipeline parallelism
# ============================================================================================
def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, the first `num_layers % num_stages` stages one layer longer."""
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        ranges.append(range(start, start + n))
        start += n
    return ranges


class GLMStage(GLMModel):
    """One pipeline stage of a `GLMModel`: the same submodules under the same names, run by
    GLMModel's own forward.

    Layers live in a ModuleDict keyed by their global index, so parameter names ("layers.37.mlp...")
    are those of the whole model and checkpoints move between pipeline layouts. The first stage
    embeds; the last stage applies the final LayerNorm and the head. With a tied head the last
    stage holds its own `word_embeddings` (the same parameter name): after backward,
    `sync_tied_embedding_grads` sums the two copies' gradients, as Megatron does.

    forward(x, position_ids=None, context_lengths=None, allowed=None, segments=None): x is input_ids [B, L] on the
    first stage and hidden states [B, L, H] elsewhere; the keyword tensors reach every stage.
    """

    def __init__(self, model: GLMModel, stage_index: int, num_stages: int):
        nn.Module.__init__(self)  # the modules are the model's, not new ones
        self.config = model.config
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.embeds = self.is_first
        self.layer_range = stage_layer_ranges(len(model.layers), num_stages)[stage_index]
        self.tied = tied = model.lm_head is None
        self.word_embeddings = model.word_embeddings if (self.is_first or (self.is_last and tied)) else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in self.layer_range})
        self.final_layernorm = model.final_layernorm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.prefix_encoder = model.prefix_encoder


def split_stage(model: GLMModel, stage_index: int, num_stages: int) -> GLMStage:
    """This stage's part of `model` (shares the submodules; the rest can be dropped)."""
    return GLMStage(model, stage_index, num_stages)


@dataclass
class PipelineParts:
    module: GLMStage  # this rank's stage, after TP/FSDP
    stage: object  # torch.distributed.pipelining.PipelineStage
    mesh: DeviceMesh


def pipeline_stages(
    model: GLMModel,
    mesh: DeviceMesh,
    *,
    device: torch.device | str | None = None,
    parallelize: bool = True,
    **parallel_kwargs,
) -> PipelineParts:
    """Split `model` into mesh["pp"].size() contiguous stages and build this rank's `PipelineStage`.

    One stage per pp rank (manual `PipelineStage` with a per-stage module; `torch.export`-based
    splitting is not needed). With `parallelize`, TP/FSDP are applied to the stage module over
    the same mesh (`parallelize_glm`). Returns the stage module and the `PipelineStage`; build
    a schedule with `build_schedule`.
    """
    from torch.distributed.pipelining import PipelineStage

    pp_mesh = mesh["pp"] if mesh.mesh_dim_names and "pp" in mesh.mesh_dim_names else mesh
    num_stages = pp_mesh.size()
    stage_index = pp_mesh.get_local_rank()
    module = split_stage(model, stage_index, num_stages)
    if parallelize:
        parallelize_glm(module, mesh, **parallel_kwargs)
    if device is None:
        device = torch.device(mesh.device_type)
        if mesh.device_type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    stage = PipelineStage(module, stage_index, num_stages, torch.device(device), group=pp_mesh.get_group())
    return PipelineParts(module=module, stage=stage, mesh=mesh)


def build_schedule(stage, n_microbatches: int, schedule: str = "1f1b"):
    """`ScheduleGPipe` ("gpipe") or `Schedule1F1B` ("1f1b") with the GLM token loss.

    Run it with `pipeline_step` (on every rank of the pipeline), which amounts to:

        with loss_context(parts.module):
            schedule.step(*((input_ids,) if first stage else ()),
                          target=loss_targets(targets, loss_mask) if last stage else None,
                          losses=losses, loss_kwargs={"num_tokens": n},
                          position_ids=pos, context_lengths=ctx)  # kwargs: split, to every stage
        sync_tied_embedding_grads(parts)

    `loss_kwargs` is passed unchanged to every microbatch's loss, so `num_tokens` (the global
    count) makes each microbatch loss a share of the full-batch loss; gradients are therefore
    *not* rescaled by the schedule (`scale_grads=False`) and `sum(losses)` is the batch loss.
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule.lower() not in classes:
        raise ValueError(f"schedule must be one of {sorted(classes)}, got {schedule!r}")
    return classes[schedule.lower()](stage, n_microbatches, loss_fn=glm_token_loss, scale_grads=False)


def pipeline_step(
    parts: PipelineParts,
    schedule,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    context_lengths: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    num_tokens=None,
) -> torch.Tensor | None:
    """One forward/backward of this rank's data-parallel batch through the pipeline.

    Every rank of the pipeline passes the same batch (only the first stage reads input_ids,
    only the last reads targets/loss_mask). The mask inputs (position_ids, context_lengths,
    segments or allowed) are keyword tensors split into microbatches and given to every stage. num_tokens
    defaults to the local loss-token count (pass `global_num_tokens(loss_mask, mesh["dp"])`
    under dp). Ends with the tied-embedding gradient sum. Returns the loss on the last stage
    (the sum of its microbatch losses), None elsewhere.
    """
    module = parts.module
    if num_tokens is None:
        num_tokens = global_num_tokens(loss_mask)
    kwargs = {k: v for k, v in (("position_ids", position_ids), ("context_lengths", context_lengths),
                                ("allowed", allowed), ("segments", segments)) if v is not None}
    losses: list[torch.Tensor] = []
    args = (input_ids,) if module.is_first else ()
    target = loss_targets(targets, loss_mask) if module.is_last else None
    with loss_context(module):
        schedule.step(*args, target=target, losses=losses, loss_kwargs={"num_tokens": num_tokens}, **kwargs)
    sync_tied_embedding_grads(parts)
    return torch.stack(losses).sum() if module.is_last else None


_TIED_GROUPS: dict = {}


def _tied_embedding_group(mesh: DeviceMesh):
    """Process group of the first and last pp stage at this rank's (dp, tp) coordinate."""
    pp_mesh = mesh["pp"]
    if pp_mesh.size() == 2:
        return pp_mesh.get_group()
    key = id(mesh)
    if key not in _TIED_GROUPS:
        ranks = mesh.mesh  # [pp, dp, tp]
        mine = None
        for d in range(ranks.shape[1]):
            for t in range(ranks.shape[2]):
                pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                group = dist.new_group(pair)  # every rank creates every group, in the same order
                if dist.get_rank() in pair:
                    mine = group
        _TIED_GROUPS[key] = mine
    return _TIED_GROUPS[key]


def sync_tied_embedding_grads(parts: PipelineParts) -> None:
    """Sum the tied embedding's gradient between the first and last stage (call on every rank)."""
    module, mesh = parts.module, parts.mesh
    if module.num_stages == 1 or not module.tied:
        return
    group = _tied_embedding_group(mesh)
    if not (module.is_first or module.is_last):
        return
    grad = module.word_embeddings.weight.grad
    if grad is None:
        grad = torch.zeros_like(module.word_embeddings.weight)
        module.word_embeddings.weight.grad = grad
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    dist.all_reduce(local, group=group)


# ============================================================================================
# Gathering (tests, export)
# ============================================================================================
def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full, canonical (un-permuted) parameters on every rank. A collective over the module's meshes."""
    state = {name: _full(p.detach()) for name, p in module.named_parameters()}
    return from_tp_layout(state, module.config, tp_size_of(module))


def full_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full, canonical gradients on every rank (None-grads skipped). A collective."""
    state = {name: _full(p.grad) for name, p in module.named_parameters() if p.grad is not None}
    return from_tp_layout(state, module.config, tp_size_of(module))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full, canonical optimizer states as {"<param fqn>.<state name>": tensor}. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    config: GLMConfig = module.config
    tp = tp_size_of(module)
    out = {}
    for fqn, entry in get_optimizer_state_dict(module, optimizer)["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                full = _full(value)
                if _is_geglu_key(fqn) and full.dim() > 0:
                    full = from_tp_layout({fqn: full}, config, tp)[fqn]
                out[f"{fqn}.{name}"] = full
    return out


# ============================================================================================
# Distributed checkpoint (re-layoutable)
# ============================================================================================
def _geglu_halves_view(t: torch.Tensor, ffn: int) -> torch.Tensor:
    """The canonical `[2, F, H]` view of a (possibly TP-permuted, FSDP-sharded) h->4h weight.

    Local rows under tp are `[a_r; b_r]`; viewed as [2, F/tp, H'] they are the tp-th slice of
    `W.view(2, F, H)` on dim 1. FSDP shards this weight on dim 1 (H), which becomes dim 2.
    """
    if not isinstance(t, DTensor):
        return t.view(2, ffn, t.shape[1])
    placements = []
    names = t.device_mesh.mesh_dim_names or (None,) * t.device_mesh.ndim
    for name, p in zip(names, t.placements, strict=True):
        if isinstance(p, Replicate):
            placements.append(p)
        elif name == "tp" and p == Shard(0):
            placements.append(Shard(1))
        elif name != "tp" and p == Shard(1):
            placements.append(Shard(2))
        else:
            raise NotImplementedError(
                f"unexpected placement {p} on mesh dim {name!r} for a GeGLU weight "
                "(use apply_tensor_parallel/apply_fsdp from this module)"
            )
    local = t.to_local()
    local = local.view(2, local.shape[0] // 2, local.shape[1])
    return DTensor.from_local(
        local, t.device_mesh, placements, run_check=False,
        shape=torch.Size((2, ffn, t.shape[1])), stride=(ffn * t.shape[1], t.shape[1], 1),
    )


def _to_checkpoint(key: str, value, config: GLMConfig, tp: int):
    """One state entry in the layout-independent checkpoint form (see checkpoint_state_dict)."""
    if config.ffn_type != "geglu" or not isinstance(value, torch.Tensor) or not _is_geglu_key(key):
        return value
    if value.dim() == 0:  # e.g. Adam's step counter
        return value
    ffn = config.ffn_hidden_size
    if value.dim() == 2:  # the weight (or an optimizer state shaped like it)
        return _geglu_halves_view(value, ffn)
    full = _full(value.detach())
    inv = _inverse_permutation(geglu_tp_permutation(ffn, tp))
    return full.index_select(0, inv.to(full.device)).view(2, ffn).clone()


@torch.no_grad()
def _from_checkpoint_(key: str, loaded, target, config: GLMConfig, tp: int) -> None:
    """Write a loaded checkpoint-form entry back into `target` (the live tensor), in place."""
    if loaded is target or not isinstance(target, torch.Tensor) or target.dim() == 0:
        return
    local_target = target.to_local() if isinstance(target, DTensor) else target
    if target.dim() == 2:  # GeGLU weight: normally a zero-copy view, already loaded in place
        local_loaded = loaded.to_local() if isinstance(loaded, DTensor) else loaded
        if local_loaded.data_ptr() != local_target.data_ptr():
            local_target.copy_(local_loaded.reshape(local_target.shape))
        return
    full = loaded.reshape(-1)
    full = full.index_select(0, geglu_tp_permutation(config.ffn_hidden_size, tp).to(full.device))
    if isinstance(target, DTensor):
        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
    local_target.copy_(full)


def _map_state(state: dict, fn) -> dict:
    """Apply fn(fqn, tensor) to the parameter-keyed entries of a model or optimizer state dict."""
    return {key: fn(key, value) for key, value in state.items()}


def checkpoint_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The state for `torch.distributed.checkpoint`, independent of the (pp, dp, tp) layout.

    `get_model_state_dict` (sharded DTensors, nothing gathered), except GeGLU `dense_h_to_4h`:
    the weight appears as its canonical `[2, F, H]` view (zero-copy, so loading writes straight
    into the parameter), the bias as the canonical full `[2, F]` (gathered; 2F numbers).
    With an optimizer: {"model": ..., "optim": get_optimizer_state_dict(...)} with the same
    treatment of the GeGLU entries' states (exp_avg, ...); else the model state alone.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    config: GLMConfig = module.config
    tp = tp_size_of(module)
    model_state = _map_state(get_model_state_dict(module), lambda k, v: _to_checkpoint(k, v, config, tp))
    if optimizer is None:
        return model_state
    optim_state = get_optimizer_state_dict(module, optimizer)
    per_param = {
        fqn: {name: _to_checkpoint(fqn, value, config, tp) for name, value in entry.items()}
        for fqn, entry in optim_state["state"].items()
    }
    return {"model": model_state, "optim": {**optim_state, "state": per_param}}


def save_checkpoint(module: nn.Module, path, *, optimizer: torch.optim.Optimizer | None = None) -> None:
    """`dcp.save` of `checkpoint_state_dict(module[, optimizer])` to the directory `path` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(checkpoint_state_dict(module, optimizer), checkpoint_id=str(path))


def load_checkpoint(module: nn.Module, path, *, optimizer: torch.optim.Optimizer | None = None) -> None:
    """`dcp.load` into `module` (and `optimizer`), whatever (pp, dp, tp) layout saved it (collective).

    Works without a process group too (a plain single-process model). Pass an optimizer only
    for a checkpoint saved with one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    config: GLMConfig = module.config
    tp = tp_size_of(module)
    live_model = get_model_state_dict(module)
    ck_model = _map_state(live_model, lambda k, v: _to_checkpoint(k, v, config, tp))
    if optimizer is None:
        dcp.load(ck_model, checkpoint_id=str(path))
    else:
        live_optim = get_optimizer_state_dict(module, optimizer)
        ck_state = {
            fqn: {name: _to_checkpoint(fqn, value, config, tp) for name, value in entry.items()}
            for fqn, entry in live_optim["state"].items()
        }
        ck_optim = {**live_optim, "state": ck_state}
        dcp.load({"model": ck_model, "optim": ck_optim}, checkpoint_id=str(path))
        for fqn, entry in live_optim["state"].items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and _is_geglu_key(fqn):
                    _from_checkpoint_(fqn, ck_state[fqn][name], value, config, tp)
                else:
                    entry[name] = ck_state[fqn][name]
        live_optim["param_groups"] = ck_optim["param_groups"]
    for key, value in live_model.items():
        if _is_geglu_key(key):
            _from_checkpoint_(key, ck_model[key], value, config, tp)
        else:
            live_model[key] = ck_model[key]
    set_model_state_dict(module, live_model)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, live_optim)


# ============================================================================================
# The GLM-130B plan, on the meta device
# ============================================================================================
def glm_130b_plan_shapes(tp: int = 4, pp: int = 8, dp: int = 2, config: GLMConfig | None = None) -> dict[str, tuple]:
    """Local (per-rank) shard shape of every parameter of the full GLM-130B plan, computed on meta.

    Builds the model on the meta device, splits it into `pp` stages and applies the real TP and
    FSDP plan to each stage on a fake process group of pp*dp*tp ranks (no data, no compute),
    then reads each parameter's local shape. Names are the global ones; `word_embeddings.weight`
    appears once (the first and last stage hold identical shards). Must run where no process
    group is initialised (it creates and destroys the fake one).
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("glm_130b_plan_shapes needs a process without a process group")
    config = config or GLMConfig.from_preset("glm-130b")
    world = pp * dp * tp
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    shapes: dict[str, tuple] = {}
    try:
        mesh = build_mesh(pp, dp, tp)
        for s in range(pp):
            with torch.device("meta"):
                model = GLMModel(config)
            stage = split_stage(model, s, pp)
            parallelize_glm(stage, mesh)
            for name, p in stage.named_parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                shapes.setdefault(name, tuple(local.shape))
            del model, stage
    finally:
        dist.destroy_process_group()
    return shapes
