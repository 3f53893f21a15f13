"""Model folders, and the one loader every command uses.

A model folder is `model.safetensors` + `config.json` + `tokenizer.json` (`--model DIR`). A
quantized folder is the same: `model.safetensors` holds `<layer>.qweight` (int8, or uint8 with
two INT4 values per byte) and `<layer>.scales` (FP32) in place of each quantized
`<layer>.weight`, and `config.json` carries the scheme in `extra.quantization` = {"bits",
"group_size", "scheme", "modules"[, "head_bits"]} (quant/weights.py).

`load_model(dir, device=, dtype=, bits=, group_size=, head_bits=)` loads any folder: the model is
built on the meta device, quantized layers (saved, or asked for with `bits`) are swapped in as
empty shells, and each tensor is read from the file straight into its place on `device` (a
streaming safetensors reader; no mmap, whose page cache would count twice). Full-precision
matrices to quantize go through one reused buffer and are quantized before the next is read, so
peak memory is the loaded model plus one full-precision matrix.

Saving writes every file in a temporary folder beside the target first and then renames each
into place, so a crash or a full disk never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn

from glm130b.config import ConfigError, GLMConfig
from glm130b.errors import CheckpointError
from glm130b.integrity import verify_checksums, write_checksums
from glm130b.io import save_safetensors, staging_folder
from glm130b.model.glm import GLMModel
from glm130b.quant.weights import (
    QuantizationError,
    QuantizedLinear,
    check_settings,
    quantize_model,
    stores_table_as_head,
    table_from_head,
    with_quantization_entry,
)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def save_model(directory: str | Path, model: GLMModel, tokenizer, dtype: torch.dtype | None = None,
               extra: dict | None = None, context: int | None = None) -> Path:
    """Write the model folder atomically (weights optionally cast to `dtype`, e.g. fp16; a
    quantized model keeps its integer weights and records its scheme in the config).
    `context`: the config's max_seq_len to record, when shorter than the model's (a trained run
    records its training windows: rotary positions past them were never trained)."""
    directory = Path(directory)
    with_quantization_entry(model)
    with staging_folder(directory, f"could not save the model to {directory}") as tmp:
        state = {}
        skip = "word_embeddings.weight" if stores_table_as_head(model) else None  # the quantized head's rows
        for name, tensor in model.state_dict().items():
            if name == skip:
                continue
            tensor = tensor.detach().cpu()
            if dtype is not None and tensor.is_floating_point() and not name.endswith(".scales"):
                tensor = tensor.to(dtype)
            state[name] = tensor.contiguous()
        save_safetensors(state, tmp / WEIGHTS, metadata={"format": "pt", "glm130b": "1"})
        write_checksums(tmp, (WEIGHTS,))
        config = model.config
        if context is not None and context < config.max_seq_len:
            config = dataclasses.replace(config, max_seq_len=context)
        config.save(tmp / CONFIG)
        if tokenizer is not None:  # None: weights only (a converted checkpoint without its tokenizer)
            tokenizer.save(tmp / TOKENIZER)
        if extra:
            (tmp / "meta.json").write_text(json.dumps(extra, indent=2, ensure_ascii=False) + "\n")
        _swap_in(tmp, directory)
    return directory


def _swap_in(tmp: Path, directory: Path) -> None:
    """Move each finished file into place with an atomic rename; other files there are kept
    (a training run keeps its metrics beside the model)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(p.name for p in tmp.iterdir()):
        if name != WEIGHTS:
            os.replace(tmp / name, directory / name)
    os.replace(tmp / WEIGHTS, directory / WEIGHTS)
    tmp.rmdir()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path, buffer_for=None):
    """Yield (name, tensor) from a .safetensors file, one whole tensor at a time, read with
    readinto (read_safetensors_slices asking for everything).

    `buffer_for(name, dtype, shape)` may return a tensor to read into instead of a new one
    (a reused scratch buffer: freed large tensors would otherwise stay in the heap). Raises
    CheckpointError for a corrupt file. The caller decides what to keep.
    """
    into = None if buffer_for is None else (lambda name, shape, dtype: buffer_for(name, dtype, shape))
    return read_safetensors_slices(path, lambda name, shape: "all", into)


def _open(path: Path):
    try:
        return open(path, "rb")  # noqa: SIM115 - the callers close it
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable ({e.strerror or e})") from None


def _header(f, path: Path) -> tuple[dict, int, int]:
    """(tensor entries, where the data starts, file size) of an open safetensors file."""
    size = path.stat().st_size
    head = f.read(8)
    if len(head) != 8:
        raise CheckpointError(f"{path} is corrupt or unreadable (too short for a safetensors header)")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, 100 * 2**20):
        raise CheckpointError(f"{path} is corrupt or unreadable (bad header length)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt or unreadable (header is not JSON)") from None
    header.pop("__metadata__", None)
    return header, 8 + n, size


def read_safetensors_slices(path: str | Path, pick, buffer_for=None):
    """Yield (name, tensor) of the part of each tensor that `pick(name, shape)` asks for: None
    (skip it), "all", or (dim, [(start, stop), ...]) ranges along dim 0 or 1, concatenated. Only
    those bytes are read (a row-split matrix row by row), so a tensor-parallel rank reads its
    1/tp of a checkpoint and no more. `buffer_for(name, shape, dtype)` may give the tensor to
    read into (the model's own, so that nothing is allocated twice)."""
    path = Path(path)
    f = _open(path)
    try:
        yield from _read_slices(f, path, pick, buffer_for)
    except (KeyError, TypeError, ValueError) as e:  # a header that is JSON but not a safetensors one
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupt or unreadable ({e})") from None
    finally:
        f.close()


def _read_slices(f, path: Path, pick, buffer_for):
    """The generator behind read_safetensors_slices, on an open file."""
    header, base, size = _header(f, path)
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype, shape = _DTYPES.get(entry.get("dtype")), tuple(entry["shape"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
        want = pick(name, shape)
        if want is None:
            continue
        begin, end = entry["data_offsets"]
        item = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * item or base + end > size:
            raise CheckpointError(f"{path} is corrupt or unreadable (tensor {name} is truncated)")
        dim, ranges = (0, [(0, shape[0] if shape else 1)]) if want == "all" else want
        rows = shape[0] if shape else 1
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        width = sum(stop - start for start, stop in ranges)
        out_shape = shape if not shape else ((width, *shape[1:]) if dim == 0 else (rows, width))
        out = buffer_for(name, out_shape, dtype) if buffer_for is not None else None
        if out is None:
            out = torch.empty(out_shape, dtype=dtype)
        at = 0
        for start, stop in ranges:
            if dim == 0:
                part = out[at : at + stop - start] if shape else out
                _read_into(f, base + begin + start * row_elems * item, part, path, name)
            else:  # columns [start, stop) of every row
                for r in range(rows):
                    _read_into(f, base + begin + (r * row_elems + start) * item, out[r, at : at + stop - start],
                               path, name)
            at += stop - start
        yield name, out


def _read_into(f, offset: int, out: torch.Tensor, path: Path, name: str) -> None:
    nbytes = out.numel() * out.element_size()
    f.seek(offset)
    if nbytes and f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != nbytes:
        raise CheckpointError(f"{path} is corrupt or unreadable (tensor {name} is truncated)")


def read_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model.safetensors, as saved (for converters)."""
    return dict(read_safetensors(_weights_of(_model_dir(directory))))


def check_state_dict(state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]!r}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the model expects {tuple(shape)}"
            )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(directory: str | Path) -> GLMConfig:
    directory = _model_dir(directory)
    try:
        return GLMConfig.load(directory / CONFIG)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def is_quantized_folder(directory: str | Path) -> bool:
    return bool(load_config(directory).extra.get("quantization"))


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               bits: int | None = None, group_size: int | None = None, head_bits: int | None = None,
               tp_mesh=None):
    """(model, tokenizer) from any model folder, with one-line errors for bad folders.

    * A quantized folder loads as saved (asking for other bits, group size or head bits is an
      error).
    * A full-precision folder with `bits` (4 or 8) is quantized matrix by matrix while read
      (`group_size`: per group of inputs; `head_bits`: the output head too, quant/weights.py).
    * Otherwise the weights load as saved, cast to `dtype`.
    `dtype` applies to every floating tensor that is not quantized (embeddings, norms, biases).
    With `tp_mesh` (a 1-D DeviceMesh), this rank builds the tensor-parallel model on the meta
    device and reads only its own slices of the file (`_load_shard`); `bits` is then the
    caller's (infer/tensor_parallel.py quantizes each shard).
    """
    directory = _model_dir(directory)
    config = load_config(directory)
    verify_checksums(directory)
    if tp_mesh is not None:
        return _load_shard(directory, config, device, dtype, tp_mesh), load_folder_tokenizer(directory, config)
    bits, group_size, head_bits, saved = _quantization_of(directory, config, bits, group_size, head_bits)
    weights = _weights_of(directory)
    with torch.device("meta"):
        model = GLMModel(config)
    if bits is not None:
        quantize_model(model, bits, group_size, head_bits)
    expected = model.state_dict()
    to_quantize = {} if saved else {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    seen: set[str] = set()
    scratch: dict = {}

    def buffer_for(name, dtype_, shape):
        """Full-precision matrices to quantize go through one reused buffer."""
        module_name, _, attr = name.rpartition(".")
        if module_name not in to_quantize or attr != "weight" or len(shape) != 2:
            return None
        n = shape[0] * shape[1]
        buf = scratch.get(dtype_)
        if buf is None or buf.numel() < n:
            largest = max(m.in_features * m.out_features for m in to_quantize.values())
            buf = scratch[dtype_] = torch.empty(max(n, largest), dtype=dtype_)
        return buf[:n].view(shape)

    for name, tensor in read_safetensors(weights, buffer_for):
        module_name, _, attr = name.rpartition(".")
        if module_name in to_quantize and attr == "weight":
            layer = to_quantize[module_name]
            if tuple(tensor.shape) != (layer.out_features, layer.in_features):
                raise CheckpointError(f"{weights}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{(layer.out_features, layer.in_features)}")
            layer.set_weight(tensor.to(device))
            seen.update({f"{module_name}.qweight", f"{module_name}.scales"})
            continue
        if name not in expected:
            hint = " (a quantized tensor in a folder whose config has no quantization entry)" \
                if attr in ("qweight", "scales") else ""
            raise CheckpointError(f"{weights}: unexpected tensor {name!r}{hint}")
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(f"{weights}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(want.shape)}")
        if want.dtype != tensor.dtype and not (want.is_floating_point() and tensor.is_floating_point()):
            raise CheckpointError(f"{weights}: {name} is {tensor.dtype}, the model expects {want.dtype}")
        if attr == "scales":
            tensor = tensor.float()
        elif tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        _set_tensor(model, name, tensor.to(device))
        seen.add(name)
    if head_bits is not None and config.tie_word_embeddings:
        if not saved:  # the head from the table, then the table from the head: one table
            model.lm_head.set_weight(model.word_embeddings.weight)
            seen.update({"lm_head.qweight", "lm_head.scales"})
            table_from_head(model.word_embeddings.weight, model.lm_head)
        elif "word_embeddings.weight" not in seen:  # stored once, as the quantized head
            _set_tensor(model, "word_embeddings.weight", model.lm_head.dequantized_weight(dtype).to(device))
            seen.add("word_embeddings.weight")
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{weights}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    scratch.clear()
    model.eval()
    if bits is not None:
        with_quantization_entry(model)
    return model, load_folder_tokenizer(directory, config)


def tensor_parallel_shell(config: GLMConfig, device, dtype: torch.dtype, tp_mesh, bits: int | None = None,
                          group_size: int | None = None, head_bits: int | None = None):
    """(model, targets, shells): this rank's tensor-parallel model, built on the meta device with
    the plan (train/parallel_plan.py) and its local shards allocated (uninitialised) on `device`;
    `targets` {state-dict name of the full model: this rank's tensor (a DTensor for a split
    parameter)} to fill; with `bits`, the four matrices of every layer are empty
    ShardQuantizedLinear shells ({module name: shell}) whose `qweight`, `scales` and `bias` are
    targets under the full model's names (with `head_bits`, `lm_head` too: its vocabulary rows)."""
    from glm130b.quant.tensor_parallel import quantized_shells
    from glm130b.train.parallel_plan import apply_tensor_parallel

    with torch.device("meta"):
        model = GLMModel(config).to(dtype)
    apply_tensor_parallel(model, tp_mesh)
    shells = quantized_shells(model, bits, group_size, dtype, head_bits) if bits else {}
    model = model.to_empty(device=device)
    inside = {f"{m}.local" for m in shells}
    targets = {name: p for name, p in model.named_parameters() if name.rpartition(".")[0] not in inside}
    for module_name, shell in shells.items():
        targets[f"{module_name}.qweight"], targets[f"{module_name}.scales"] = shell.local.qweight, shell.local.scales
        bias = shell.bias if shell.style == "rowwise" else shell.local.bias
        if bias is not None:
            targets[f"{module_name}.bias"] = bias
    return model, targets, shells


def _load_shard(directory: Path, config: GLMConfig, device, dtype: torch.dtype, tp_mesh) -> GLMModel:
    """This rank's part of a tensor-parallel model: the plan (train/parallel_plan.py) applied on
    the meta device, local shards allocated on `device`, and each filled from the slice of the
    file the layout table (model/layout.py) assigns to this rank; nothing else is read.

    A quantized folder: the four matrices of every layer become empty ShardQuantizedLinear shells
    (quant/tensor_parallel.py) and take this rank's slices of `qweight` and `scales`: a column
    split their rows; a row split its packed-byte columns of `qweight` and its whole groups of
    `scales` (per-row scales whole: every part of a row shares them)."""
    from torch.distributed.tensor import DTensor, Shard

    from glm130b.model.layout import split_rule

    scheme = config.extra.get("quantization") or {}
    model, targets, shells = tensor_parallel_shell(config, device, dtype, tp_mesh, scheme.get("bits"),
                                                   scheme.get("group_size"), scheme.get("head_bits"))
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()

    def rows(rule, n):  # this rank's rows of a column ("glu": of each GeGLU half) split
        if rule == "glu" and config.ffn_type == "geglu":  # [a_r; b_r], as the plan permutes
            c = n // 2 // tp
            return 0, [(rank * c, (rank + 1) * c), (n // 2 + rank * c, n // 2 + (rank + 1) * c)]
        return 0, [(rank * (n // tp), (rank + 1) * (n // tp))]

    def pick(name, shape):
        if name not in targets:
            raise CheckpointError(f"{directory / WEIGHTS}: unexpected tensor {name!r}")
        module_name, _, attr = name.rpartition(".")
        shell = shells.get(module_name)
        if shell is not None:
            rule = split_rule(module_name + ".weight")
            if attr == "bias" and rule == "row" or attr == "scales" and rule == "row" and shape[1] == 1:
                return "all"  # the row-parallel bias; per-row scales cover every part of a row
            if rule != "row":
                return rows(rule, shape[0])
            width = tuple(targets[name].shape)[1]  # packed bytes or groups per rank (checked to divide)
            return 1, [(rank * width, (rank + 1) * width)]
        param = targets[name]
        placement = param.placements[0] if isinstance(param, DTensor) else None
        if not isinstance(placement, Shard):
            return "all"
        if placement.dim == 0:
            return rows(split_rule(name), shape[0])
        n = shape[1] // tp
        return 1, [(rank * n, (rank + 1) * n)]

    def local_of(name):
        target = targets[name]
        return target.to_local() if isinstance(target, DTensor) else target

    def buffer_for(name, shape, dtype_):  # straight into the model's own shard when the dtypes agree
        local = local_of(name)
        return local.data if local.dtype == dtype_ and tuple(local.shape) == tuple(shape) else None

    seen = set()
    with torch.no_grad():
        for name, tensor in read_safetensors_slices(_weights_of(directory), pick, buffer_for):
            local = local_of(name)
            if tuple(local.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{directory / WEIGHTS}: {name} has shape {tuple(tensor.shape)} on this rank, "
                                      f"the model expects {tuple(local.shape)}")
            if local.dtype != tensor.dtype and not (local.is_floating_point() and tensor.is_floating_point()):
                raise CheckpointError(f"{directory / WEIGHTS}: {name} is {tensor.dtype}, the model expects "
                                      f"{local.dtype}")
            if tensor.data_ptr() != local.data_ptr():
                local.copy_(tensor)
            seen.add(name)
    if "lm_head" in shells and config.tie_word_embeddings and "word_embeddings.weight" not in seen:
        table_from_head(local_of("word_embeddings.weight"), shells["lm_head"].local)  # stored once, as the head
        seen.add("word_embeddings.weight")
    missing = sorted(set(targets) - seen)
    if missing:
        raise CheckpointError(f"{directory / WEIGHTS}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    return model.eval()


def _quantization_of(directory: Path, config: GLMConfig, bits, group_size, head_bits):
    """(bits, group_size, head_bits, saved) to load with: a folder's saved scheme, checked
    against what was asked, or the asked settings for a full-precision folder."""
    if (group_size is not None or head_bits is not None) and bits is None and not config.extra.get("quantization"):
        flag = "a group size" if group_size is not None else "head bits"
        raise QuantizationError(f"{flag} need the layers quantized too: pass bits (8 or 4) as well")
    if bits is not None:
        check_settings(bits, group_size)
    if head_bits is not None:
        check_settings(head_bits)
    saved = config.extra.get("quantization")
    if not saved:
        return bits, group_size, head_bits, False
    s_bits, s_group, s_head = saved.get("bits"), saved.get("group_size"), saved.get("head_bits")
    try:
        check_settings(s_bits, s_group)
        if s_head is not None:
            check_settings(s_head)
    except QuantizationError as e:
        raise CheckpointError(f"{directory / CONFIG}: bad quantization entry ({e})") from None
    if (bits is not None and (bits, group_size) != (s_bits, s_group)) or \
            (head_bits is not None and head_bits != s_head):
        want = f"{bits or s_bits}-bit" + (f", group size {group_size}" if group_size else "") + \
            (f", {head_bits}-bit head" if head_bits else "")
        have = f"{s_bits}-bit" + (f", group size {s_group}" if s_group else "") + \
            (f", {s_head}-bit head" if s_head else "")
        raise QuantizationError(f"{directory} is already quantized ({have}); cannot load it as {want}: "
                                "quantize the full-precision model instead")
    return s_bits, s_group, s_head, True


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        grad = module._parameters[attr].requires_grad and tensor.is_floating_point()
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=grad)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"unexpected tensor {name!r}")


def model_from_state(cfg: GLMConfig, state: dict[str, torch.Tensor], source: str) -> GLMModel:
    """A model that takes the state's tensors without copying them (built on meta, assigned;
    quantized matrices as QuantizedLinear when the config says so)."""
    with torch.device("meta"):
        model = GLMModel(cfg)
    scheme = cfg.extra.get("quantization")
    if scheme:
        quantize_model(model, scheme["bits"], scheme.get("group_size"), scheme.get("head_bits"))
        if stores_table_as_head(model) and "word_embeddings.weight" not in state \
                and {"lm_head.qweight", "lm_head.scales"} <= set(state):
            state = {**state, "word_embeddings.weight": _table_of_head(cfg, scheme["head_bits"], state)}
    check_state_dict(state, model, source)
    model.load_state_dict(state, strict=True, assign=True)  # (the FP32 rotary frequencies are built, not loaded)
    return model.eval()


def _table_of_head(cfg: GLMConfig, bits: int, state: dict) -> torch.Tensor:
    """A tied table stored once, as the quantized head: its dequantized rows, in the dtype of the
    state's other floating tensors."""
    head = QuantizedLinear(cfg.hidden_size, cfg.vocab_size, bits, None, bias=False, device="meta")
    head.qweight, head.scales = state["lm_head.qweight"], state["lm_head.scales"]
    dtype = next((t.dtype for n, t in state.items() if t.is_floating_point() and not n.endswith(".scales")),
                 torch.float32)
    return head.dequantized_weight(dtype)


def load_folder_tokenizer(directory: Path, config: GLMConfig):
    """The tokenizer of a model folder, checked to fit the model's vocabulary."""
    from glm130b.tokenizer import SENTENCEPIECE_FILE, GLMTokenizer, SentencePieceTokenizer, TokenizerError

    try:
        if not (directory / TOKENIZER).is_file() and (directory / SENTENCEPIECE_FILE).is_file():
            tokenizer = SentencePieceTokenizer.load_folder(directory)  # a converted official checkpoint
        else:
            tokenizer = GLMTokenizer.load(directory / TOKENIZER)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    return tokenizer


def _weights_of(directory: Path) -> Path:
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    return weights


def _model_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"model folder not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder (expected {WEIGHTS}, {CONFIG}, {TOKENIZER})")
    return directory
