"""Official GLM-130B (SwissArmyTransformer) parameter names <-> ours.

Our module tree mirrors the official one, minus the `transformer.` prefix, and keeps the
official tensor layouts (per-head interleaved QKV rows; GeGLU `[linear half; gated half]`),
so a merged official state dict loads by renaming. Rotary `inv_freq` buffers in released
checkpoints are ignored, as the official loader does. Merging tensor-parallel shards and
re-sharding follow the official tools/convert_tp.py (`tp_rule`, `merge_tp`, `split_tp`).
"""

from __future__ import annotations

import dataclasses

import torch

from glm130b.checkpoint import CheckpointError, check_state_dict
from glm130b.config import PRESETS, ConfigError, GLMConfig
from glm130b.errors import first_line
from glm130b.model.layout import split_rule

PREFIX = "transformer."


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.endswith("inv_freq"):
            continue
        if not name.startswith(PREFIX):
            raise CheckpointError(f"unexpected parameter {name!r}: official names start with {PREFIX!r}")
        out[name[len(PREFIX):]] = tensor
    return out


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + name: tensor for name, tensor in state.items()}


def load_official(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a merged official GLM-130B state dict into `model` (shapes checked first)."""
    ours = official_to_ours(state)
    check_state_dict(ours, model, "official checkpoint")
    model.load_state_dict(ours, strict=True)


def config_from_official_shapes(state: dict[str, torch.Tensor], num_heads: int, **overrides) -> GLMConfig:
    """Infer a GLM-130B-style config from official tensor shapes (heads cannot be inferred)."""
    vocab, hidden = state[PREFIX + "word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(PREFIX + "layers."))
    inner = state[PREFIX + "layers.0.mlp.dense_h_to_4h.bias"].shape[0] // 2  # GeGLU: [linear; gated] rows
    return GLMConfig(
        name="official", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=num_heads,
        ffn_hidden_size=inner, **overrides,
    )


def sat_config(state: dict[str, torch.Tensor], preset: str | None, num_heads: int | None) -> GLMConfig:
    """The config of official-named weights: a named preset, else the preset whose shapes they
    have, else shapes + --num-heads (heads cannot be read from shapes)."""
    if preset:
        return GLMConfig.from_preset(preset)
    state = ours_to_official(state)  # (a dict of the same tensors)
    for cfg in PRESETS.values():
        if cfg.rotary == "1d" and num_heads in (None, cfg.num_heads):
            try:
                guess = config_from_official_shapes(state, cfg.num_heads)
            except ConfigError:  # these shapes cannot have this preset's heads
                continue
            if (guess.vocab_size, guess.hidden_size, guess.num_layers, guess.ffn_hidden_size) == (
                    cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size):
                return cfg
    if num_heads is None:
        raise CheckpointError("the shards match no preset: pass --num-heads (and --max-seq-len if not 2048)")
    return config_from_official_shapes(state, num_heads, max_seq_len=2048, rotary_precision="fp16")


# --------------------------------------------------------------------------------------------
# Tensor-parallel shards (SwissArmyTransformer's mp_rank_XX_model_states.pt)
# --------------------------------------------------------------------------------------------
SHARD_FILE = "mp_rank_{rank:02d}_model_states.pt"


def tp_rule(name: str) -> str:
    """How tensor parallelism splits an official tensor (model/layout.py's table). Heads are
    split in whole per-head blocks, so QKV needs no special case (its rows are per-head
    interleaved); "glu": a shard holds [its linear rows; its gated rows]."""
    return split_rule(name)


def merge_tp(name: str, shards: list[torch.Tensor], glu_halves: bool = True) -> torch.Tensor:
    """One tensor from its TP shards (the rule of official tools/convert_tp.py)."""
    rule = tp_rule(name)
    if rule == "glu" and not glu_halves:
        rule = "column"
    if len(shards) == 1 or rule == "replicated":
        return shards[0]
    if rule == "column":
        return torch.cat(shards, dim=0)
    if rule == "row":
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def split_tp(name: str, tensor: torch.Tensor, tp: int, glu_halves: bool = True) -> list[torch.Tensor]:
    """The TP shards of one merged tensor (the inverse of merge_tp)."""
    rule = tp_rule(name)
    if rule == "glu" and not glu_halves:
        rule = "column"
    if tp == 1 or rule == "replicated":
        return [tensor] * tp
    dim = 1 if rule == "row" else 0
    if tensor.shape[dim] % (2 * tp if rule == "glu" else tp):
        raise CheckpointError(f"{name}: dimension {dim} of size {tensor.shape[dim]} does not split into {tp} shards")
    if rule == "glu":
        first, second = tensor.chunk(2, dim=0)
        return [torch.cat((a, b), dim=0) for a, b in zip(first.chunk(tp), second.chunk(tp), strict=True)]
    return list(tensor.chunk(tp, dim=dim))


def sat_shard_files(directory) -> list:
    """The mp_rank_XX files of a SAT checkpoint folder, in rank order (the folder itself, or
    the iteration folder its `latest` file names)."""
    from pathlib import Path

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    latest = directory / "latest"
    if latest.is_file() and not list(directory.glob("mp_rank_*_model_states.pt")):
        iteration = latest.read_text().strip()
        directory = directory / iteration
        if not directory.is_dir():
            raise CheckpointError(f"{latest} names iteration {iteration!r}, but {directory} does not exist")
    files = sorted(directory.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{directory} holds no mp_rank_XX_model_states.pt shard")
    expected = [directory / SHARD_FILE.format(rank=r) for r in range(len(files))]
    missing = [p.name for p in expected if not p.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: {len(files)} shards found but {missing[0]} is missing")
    return expected


def load_sat_shard(path, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """One shard's state dict, memory-mapped (nothing is read until a tensor is used)."""
    import pickle
    import zipfile

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=not unsafe_pickle)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        hint = ("; it holds Python objects besides tensors: convert with --unsafe-pickle if you trust the file"
                if "weights_only" in str(e) or "Unsupported global" in str(e) else "")
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)}){hint}") from None
    state = obj.get("module", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict (expected {{'module': {{name: tensor}}}})")
    return state


def read_sat(directory, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A merged official state dict from a folder of TP shards. Shards are memory-mapped and
    merged tensor by tensor, so the model is materialised once, never twice. Official INT8/INT4
    shards (interop/sat_quantized.py) come back with our `qweight`/`scales` for the quantized
    matrices (`sat_quantization` reads the scheme from them)."""
    from glm130b.interop import sat_quantized as SQ

    shards = [load_sat_shard(p, unsafe_pickle) for p in sat_shard_files(directory)]
    names = [n for n in shards[0] if not n.endswith("inv_freq")]
    for rank, shard in enumerate(shards[1:], start=1):
        if set(n for n in shard if not n.endswith("inv_freq")) != set(names):
            raise CheckpointError(f"{directory}: shard {rank} has other tensor names than shard 0")
    bits = SQ.quantized_bits(shards[0])
    group_size = SQ.group_size_for(shards, bits) if bits else None
    merged = {}
    for name in names:
        if bits and name.endswith(SQ.SCALE):
            continue
        if bits and SQ.is_quantized_matrix(name):
            base = name.removesuffix(".weight")
            merged[base + ".qweight"], merged[base + ".scales"] = SQ.merge_quantized(name, shards, bits, group_size)
        else:
            merged[name] = merge_tp(name, [s[name] for s in shards]).contiguous()
        for s in shards:
            s[name] = None  # drop the mapped view as soon as it is merged
    return merged


def read_sat_model(directory, preset: str | None = None, num_heads: int | None = None,
                   unsafe_pickle: bool = False) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of a whole SAT folder, merged once (read_sat). The config: the
    named preset or heads, else the folder's config.json, else the preset of its shapes; official
    INT8/INT4 shards come with our quantization entry (their `qweight`/`scales`)."""
    from pathlib import Path

    from glm130b.checkpoint import CONFIG, load_config
    from glm130b.model.layout import QUANTIZED_MODULES
    from glm130b.quant.weights import SCHEME

    official = read_sat(directory, unsafe_pickle)
    scheme = sat_quantization(official)
    state = official_to_ours(official)
    if preset is None and num_heads is None and (Path(directory) / CONFIG).is_file():
        cfg = load_config(directory)
    else:
        cfg = sat_config(state, preset, num_heads)
    if scheme is not None:
        cfg = dataclasses.replace(cfg, extra={**cfg.extra, "quantization": {
            **scheme, "scheme": SCHEME, "modules": list(QUANTIZED_MODULES)}})
    return cfg, state


def load_sat_model(directory, device="cpu", dtype: torch.dtype = torch.float32, bits: int | None = None,
                   group_size: int | None = None, head_bits: int | None = None):
    """(model, tokenizer) of a SAT folder in one process (any shard count): the shards merged
    once on the host, then the verb's quantization, dtype and device. `--tp N` under torchrun
    reads only each rank's slices instead (load_sat_tensor_parallel)."""
    from pathlib import Path

    from glm130b.checkpoint import load_folder_tokenizer, model_from_state
    from glm130b.quant.weights import quantize_model

    cfg, state = read_sat_model(directory)
    quantized = cfg.extra.get("quantization")
    if quantized and (bits is not None or head_bits is not None):
        raise CheckpointError(f"{directory} holds quantized ({quantized['bits']}-bit) shards; load them without "
                              "--bits / --head-bits")
    model = model_from_state(cfg, state, str(directory))
    del state
    if bits is not None:
        quantize_model(model.float(), bits, group_size, head_bits)
    model = model.to(device=device, dtype=dtype)
    return model.eval(), load_folder_tokenizer(Path(directory), cfg)


def sat_quantization(state: dict[str, torch.Tensor]) -> dict | None:
    """{"bits", "group_size"} of a merged state holding quantized matrices (read_sat), else None."""
    name = next((n for n in state if n.endswith("attention.query_key_value.qweight")), None)
    if name is None:
        return None
    bits = 8 if state[name].dtype == torch.int8 else 4
    groups = state[name.removesuffix(".qweight") + ".scales"].shape[1]
    hidden = state[name.replace("attention.query_key_value.qweight", "input_layernorm.weight")].shape[0]
    return {"bits": bits, "group_size": None if groups == 1 else hidden // groups}


def write_sat(directory, state: dict[str, torch.Tensor], tp: int, iteration: int = 0,
              quantization: dict | None = None) -> None:
    """Write an official-named state dict as SAT TP shards: DIR/latest + DIR/ITER/mp_rank_XX...pt
    (with `quantization` {"bits", ...}: our qweight/scales become the official INT8/INT4 layout).
    Atomic: the folder is built beside the target and renamed into place."""
    import os
    from pathlib import Path

    from glm130b.io import SaveError, staging_folder

    if tp < 1:
        raise CheckpointError(f"--tp must be >= 1, got {tp}")
    directory = Path(directory)
    if directory.exists():
        raise SaveError(f"{directory} exists; choose a new folder for the shards")
    with staging_folder(directory, f"could not write shards to {directory}") as tmp:
        (tmp / str(iteration)).mkdir()
        for rank in range(tp):  # one shard in memory at a time (a view would save its whole storage)
            shard = _shard(state, tp, rank, quantization)
            torch.save({"module": shard, "iteration": iteration}, tmp / str(iteration) / SHARD_FILE.format(rank=rank))
            del shard
        (tmp / "latest").write_text(f"{iteration}\n")
        os.replace(tmp, directory)



def _shard(state: dict[str, torch.Tensor], tp: int, rank: int, quantization: dict | None) -> dict:
    from glm130b.interop import sat_quantized as SQ

    shard = {}
    for name, tensor in state.items():
        if name.endswith(".scales"):
            continue
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            hidden = state[PREFIX + "layers.0.input_layernorm.weight"].shape[0]
            scales = state[base + ".scales"]
            in_features = hidden if not base.endswith("dense_4h_to_h") else \
                state[base.replace("dense_4h_to_h", "dense_h_to_4h") + ".bias"].shape[0] // 2
            weight, scale = SQ.split_quantized(base + ".weight", tensor, scales, quantization["bits"], in_features,
                                               tp)[rank]
            shard[base + ".weight"], shard[base + ".weight" + SQ.SCALE] = weight.clone(), scale.clone()
        else:
            shard[name] = split_tp(name, tensor, tp)[rank].clone()
    return shard


# --------------------------------------------------------------------------------------------
# Tensor-parallel loading straight from shards of any degree (glm130b generate --tp N)
# --------------------------------------------------------------------------------------------
def is_sat_folder(directory) -> bool:
    """A SAT checkpoint folder (mp_rank_XX shards, or a `latest` file naming their folder)
    rather than one of our model folders."""
    from pathlib import Path

    directory = Path(directory)
    return directory.is_dir() and not (directory / "model.safetensors").is_file() and (
        any(directory.glob("mp_rank_*_model_states.pt")) or (directory / "latest").is_file())


def sat_folder_config(directory, shard0: dict[str, torch.Tensor], degree: int) -> GLMConfig:
    """The config of a SAT folder: its config.json when it has one, else the preset whose shapes
    the shards have (the merged shapes, worked out from shard 0 without reading a tensor)."""
    from pathlib import Path

    from glm130b.checkpoint import CONFIG, load_config

    if (Path(directory) / CONFIG).is_file():
        return load_config(directory)
    shapes = {}
    for name, t in shard0.items():
        if name.endswith("inv_freq"):
            continue
        shape = list(t.shape)
        rule = tp_rule(name)
        if rule != "replicated" and shape:
            shape[1 if rule == "row" else 0] *= degree
        shapes[name] = torch.empty(shape, device="meta")
    try:
        return sat_config(official_to_ours(shapes), None, None)
    except CheckpointError:
        raise CheckpointError(f"{directory}: the shards match no preset; put the model's config.json beside them "
                              "(or convert them: glm130b convert --from sat --num-heads N ...)") from None


def load_sat_tensor_parallel(directory, device, dtype: torch.dtype, tp_mesh):
    """(model, tokenizer) of this rank from a SAT folder of any degree S at tensor parallelism N
    (a 1-D DeviceMesh): the shards are memory-mapped, and this rank copies into its local
    tensors only the parts of the source shards its slice covers (N < S: several whole shards;
    N > S: part of one), so untouched shards and rows are never read. Official INT8/INT4 shards
    (interop/sat_quantized.py) become ShardQuantizedLinear layers: rows and their scales for a
    column split; for a row split the value columns (INT4 repacked to our nibble order) and each
    source shard's row scale repeated over the groups of its columns."""
    from glm130b.checkpoint import load_folder_tokenizer, tensor_parallel_shell
    from glm130b.interop import sat_quantized as SQ

    files = sat_shard_files(directory)
    shards = [load_sat_shard(p) for p in files]
    degree, tp, rank = len(shards), tp_mesh.size(), tp_mesh.get_local_rank()
    config = sat_folder_config(directory, shards[0], degree)
    bits = SQ.quantized_bits(shards[0])
    if bits == 4 and any((n // tp) % 2 for n in (config.hidden_size, config.ffn_hidden_size)):
        raise CheckpointError(f"{directory}: at --tp {tp} a rank's inputs of a row-parallel matrix split INT4's "
                              "packed bytes")
    group = _sat_group_size(config, degree, tp) if bits else None
    model, targets, shells = tensor_parallel_shell(config, device, dtype, tp_mesh, bits, group)
    glu = config.ffn_type == "geglu"
    wanted = {PREFIX + n for n in targets} | {PREFIX + m + ".weight" for m in shells} | \
        {PREFIX + m + ".weight" + SQ.SCALE for m in shells}
    unexpected = sorted(n for n in shards[0] if n not in wanted and not n.endswith("inv_freq")
                        and not n.endswith((".qweight", ".scales")))
    if unexpected:
        raise CheckpointError(f"{files[0]}: unexpected tensor {unexpected[0]!r} for this model")

    def pieces(rule, total):  # (source shard, start, stop) along the split dim, in this rank's order
        if rule == "glu" and glu:
            src, dst = total // 2 // degree, total // 2 // tp
            return [(s, h * src + lo, h * src + hi) for h in (0, 1) for s, lo, hi in _overlap(rank * dst, dst, src)]
        return _overlap(rank * (total // tp), total // tp, total // degree)

    def source(s, name):
        tensor = shards[s].get(name)
        if tensor is None:
            raise CheckpointError(f"{files[s]}: missing tensor {name!r}")
        return tensor

    with torch.no_grad():
        for name, target in targets.items():
            local = target.to_local() if hasattr(target, "to_local") else target
            module_name, _, attr = name.rpartition(".")
            official = PREFIX + name
            if module_name in shells and attr in ("qweight", "scales"):
                _fill_quantized(local, shells[module_name], attr, PREFIX + module_name + ".weight", bits, pieces,
                                source, degree, tp)
                continue
            rule = tp_rule(official)
            if rule == "replicated":
                part = source(0, official)
                if tuple(part.shape) != tuple(local.shape):
                    raise CheckpointError(f"{files[0]}: {official} has shape {tuple(part.shape)}, the model "
                                          f"expects {tuple(local.shape)}")
                local.copy_(part)
                continue
            dim = 1 if rule == "row" else 0
            at = 0
            for s, lo, hi in pieces(rule, source(0, official).shape[dim] * degree):
                part = source(s, official).narrow(dim, lo, hi - lo)
                local.narrow(dim, at, hi - lo).copy_(part)
                at += hi - lo
            if at != local.shape[dim]:
                raise CheckpointError(f"{directory}: {official} does not fill this rank's {tuple(local.shape)}")
    for shard in shards:
        shard.clear()  # drop the mapped storages
    return model.eval(), load_folder_tokenizer(directory, config)


def _overlap(start: int, width: int, per_source: int) -> list[tuple[int, int, int]]:
    """(source shard, start, stop) covering [start, start + width) of a dimension cut into source
    shards of `per_source` each."""
    out, stop = [], start + width
    while start < stop:
        s = start // per_source
        end = min(stop, (s + 1) * per_source)
        out.append((s, start - s * per_source, end - s * per_source))
        start = end
    return out


def _sat_group_size(config: GLMConfig, degree: int, tp: int) -> int | None:
    """The group size that keeps every source shard's row scales of the row-parallel matrices on
    this rank: None (per row) when each rank's columns lie inside one source shard, else the
    gcd of the source and target widths."""
    import math

    if tp % degree == 0:
        return None
    widths = [n // d for n in (config.hidden_size, config.ffn_hidden_size) for d in (degree, tp)]
    return math.gcd(*widths)


def _fill_quantized(local, shell, attr, name, bits, pieces, source, degree, tp) -> None:
    """This rank's `qweight` or `scales` of one official quantized matrix."""
    from glm130b.interop import sat_quantized as SQ
    from glm130b.quant.weights import pack_int4

    rule = tp_rule(name)
    in_features = shell.local.in_features
    first = source(0, name)
    if rule == "row":
        cuts = pieces(rule, in_features * tp)  # value columns [lo, hi) of each source shard
        if attr == "qweight":
            if bits == 4 and any(lo % 2 or hi % 2 for _, lo, hi in cuts):
                raise CheckpointError(f"{name}: this rank's columns split INT4's packed bytes")
            per_byte = 2 if bits == 4 else 1
            parts = [source(s, name)[:, lo // per_byte : hi // per_byte] for s, lo, hi in cuts]
            values = torch.cat([p if bits == 8 else SQ.unpack_official_int4(p) for p in parts], dim=1)
        else:
            width = in_features // local.shape[1]  # inputs per group
            if any((hi - lo) % width for _, lo, hi in cuts):
                raise CheckpointError(f"{name}: a source shard's columns do not fill whole groups of {width}")
            values = torch.cat([source(s, name + SQ.SCALE).float().view(-1, 1).expand(-1, (hi - lo) // width)
                                for s, lo, hi in cuts], dim=1)
    else:
        cuts = pieces(rule, first.shape[0] * degree)
        if attr == "qweight":
            values = torch.cat([source(s, name)[lo:hi] for s, lo, hi in cuts])
            values = values if bits == 8 else SQ.unpack_official_int4(values)
        else:
            values = torch.cat([source(s, name + SQ.SCALE)[lo:hi] for s, lo, hi in cuts]).float().view(-1, 1)
            values = values.expand(-1, local.shape[1])
    if attr == "qweight":
        if values.shape[1] != in_features:
            raise CheckpointError(f"{name}: {values.shape[1]} inputs on this rank, the model expects {in_features}")
        values = values if bits == 8 else pack_int4(values)
    if tuple(values.shape) != tuple(local.shape):
        raise CheckpointError(f"{name}: shape {tuple(values.shape)} on this rank, the model expects "
                              f"{tuple(local.shape)}")
    local.copy_(values)
