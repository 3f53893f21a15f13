"""Quantized model folders, and loading any model folder with or without quantization.

A quantized folder is an ordinary model folder (glm130b.checkpoint): `model.safetensors` holds
`<layer>.qweight` (int8, or uint8 with two INT4 values per byte) and `<layer>.scales` (FP32)
in place of each quantized `<layer>.weight`, and `config.json` carries the scheme in
`extra.quantization` = {"bits", "group_size", "scheme", "modules"} (also in the safetensors
metadata), so `load_config` and `glm130b info` read it unchanged.

Loading never builds the full-precision weights of the quantized layers: the model is built on
the meta device, the quantized layers are swapped in as empty shells, and each tensor is read
from the file straight into its final place (a streaming safetensors reader; no mmap, whose
page cache would count twice), so peak memory is about the file size. Quantizing on the fly
(`bits=` on a full-precision folder) reads one matrix at a time and quantizes it before the
next is read: peak = the quantized model + one full-precision matrix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from glm130b.checkpoint import CONFIG, WEIGHTS, _model_dir, load_config, load_folder_tokenizer, save_model
from glm130b.integrity import verify_checksums
from glm130b.interop.sat import CheckpointError
from glm130b.model.glm import GLMModel
from glm130b.quant.weights import (
    QuantizationError,
    QuantizedLinear,
    check_settings,
    quantization_info,
    quantize_model,
    with_quantization_entry,
)

__all__ = ["save_quantized", "load_model_quantized", "read_safetensors", "is_quantized_folder"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def save_quantized(directory: str | Path, model: nn.Module, tokenizer) -> Path:
    """Write a quantized model folder (atomically, through glm130b.checkpoint.save_model)."""
    if quantization_info(model) is None:
        raise QuantizationError("the model is not quantized; call quantize_model first")
    with_quantization_entry(model)
    return save_model(directory, model, tokenizer, dtype=None)


def is_quantized_folder(directory: str | Path) -> bool:
    return bool(load_config(directory).extra.get("quantization"))


# --------------------------------------------------------------------------------------------
# A streaming safetensors reader
# --------------------------------------------------------------------------------------------
def read_safetensors(path: str | Path, buffer_for=None):
    """Yield (name, tensor) from a .safetensors file, one tensor at a time, read with readinto.

    `buffer_for(name, dtype, shape)` may return a tensor to read into instead of a new one
    (a reused scratch buffer: freed large tensors would otherwise stay in the heap). Raises
    CheckpointError for a corrupt file. The caller decides what to keep.
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in finally
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable ({e.strerror or e})") from None
    try:
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
        base = 8 + n
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, entry in entries:
            dtype = _DTYPES.get(entry.get("dtype"))
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
            tensor = buffer_for(name, dtype, shape) if buffer_for is not None else None
            if tensor is None:
                tensor = torch.empty(shape, dtype=dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if end - begin != nbytes or base + end > size:
                raise CheckpointError(f"{path} is corrupt or unreadable (tensor {name} is truncated)")
            f.seek(base + begin)
            if nbytes and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise CheckpointError(f"{path} is corrupt or unreadable (tensor {name} is truncated)")
            yield name, tensor
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupt or unreadable ({e})") from None
    finally:
        f.close()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"unexpected tensor {name!r}")


def load_model_quantized(directory: str | Path, bits: int | None = None, group_size: int | None = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         head_bits: int | None = None):
    """Load (model, tokenizer) from any model folder, quantizing on the fly when `bits` is set.

    * A quantized folder loads as saved (asking for other bits, group size or head bits is an
      error).
    * A full-precision folder with `bits` (4 or 8) is quantized matrix by matrix while read;
      `head_bits` also quantizes the output head (quant/weights.py: quantize_head).
    * A full-precision folder without `bits` loads as glm130b.checkpoint.load_model would.
    `dtype` applies to the tensors that are not quantized (embeddings, norms, biases).
    """
    if bits is not None or group_size is not None:
        check_settings(bits, group_size)
    if head_bits is not None:
        check_settings(head_bits)
    directory = _model_dir(directory)
    config = load_config(directory)
    saved = config.extra.get("quantization")
    if saved:
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
        bits, group_size, head_bits = s_bits, s_group, s_head
    elif head_bits is not None and bits is None:
        raise QuantizationError("head bits need the layers quantized too: pass bits (8 or 4) as well")
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    verify_checksums(directory)

    with torch.device("meta"):
        model = GLMModel(config)
    if bits is not None:
        quantize_model(model, bits, group_size, head_bits)
    expected = {name: t for name, t in model.state_dict().items()}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    seen: set[str] = set()
    scratch: dict = {}

    def buffer_for(name, dtype_, shape):
        """Full-precision matrices to quantize go through one reused buffer."""
        module_name, _, attr = name.rpartition(".")
        if saved or module_name not in quantized or attr != "weight" or len(shape) != 2:
            return None
        n = shape[0] * shape[1]
        buf = scratch.get(dtype_)
        if buf is None or buf.numel() < n:
            largest = max(m.in_features * m.out_features for m in quantized.values())
            buf = scratch[dtype_] = torch.empty(max(n, largest), dtype=dtype_)
        return buf[:n].view(shape)

    for name, tensor in read_safetensors(weights, buffer_for):
        module_name, _, attr = name.rpartition(".")
        if not saved and module_name in quantized and attr == "weight":
            layer = quantized[module_name]
            if tuple(tensor.shape) != (layer.out_features, layer.in_features):
                raise CheckpointError(f"{weights}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{(layer.out_features, layer.in_features)}")
            layer.set_weight(tensor)
            seen.update({f"{module_name}.qweight", f"{module_name}.scales"})
            del tensor
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
        if tensor.is_floating_point() and attr != "scales" and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        elif attr == "scales":
            tensor = tensor.float()
        _set_tensor(model, name, tensor)
        seen.add(name)
    if head_bits is not None and not saved and config.tie_word_embeddings:  # the head from the table
        model.lm_head.set_weight(model.word_embeddings.weight)
        seen.update({"lm_head.qweight", "lm_head.scales"})
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{weights}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    scratch.clear()
    if str(device) != "cpu":
        model = model.to(device)
    model.eval()
    if bits is not None:
        with_quantization_entry(model)
    return model, load_folder_tokenizer(directory, config)
