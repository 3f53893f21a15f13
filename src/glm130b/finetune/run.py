"""`glm130b finetune`: adapt a model folder to JSONL examples with LoRA, P-Tuning v2 or full
fine-tuning, and `glm130b finetune merge`.

The run is the pretraining loop (train/trainer.py `run_job`) with another Job: the model is a
loaded folder (optionally quantized to frozen INT8/INT4 weights on load) with an adapter, the data
are the records of finetune/data.py, and what the run leaves is the adapter in peft's format (or,
for `--method full`, a model folder). Checkpoints hold only the trained parameters and the
optimizer; resume after a kill is exact, metrics.jsonl, TensorBoard and `glm130b plot` work as in
pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from glm130b.checkpoint import load_config
from glm130b.config import ConfigError
from glm130b.device import peak_rss_mib
from glm130b.errors import GLMError
from glm130b.finetune import adapters
from glm130b.train.trainer import TrainConfig

METHODS = ("lora", "ptuning", "full")
# TrainConfig's pretraining options, which fine-tuning ignores (tp and pp must stay 1): left out
# of the run's train_config.json
PRETRAINING_ONLY = ("preset", "sources", "instructions", "instruction_share", "pack_instructions", "gmask_prob",
                    "objective",
                    "model_overrides", "tp", "pp", "pipeline_schedule", "microbatches")
DEFAULT_LR = {"lora": 1e-3, "ptuning": 1e-1, "full": 1e-4}


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig (steps, batch_size, seq_len, lr, precision, checkpoint_every, resume, device,
    ...) plus what fine-tuning needs. PRETRAINING_ONLY's fields (`preset`, `sources`,
    `instructions`, the objective's settings, ...) do not apply and are not recorded."""

    base: str = ""  # the model folder to adapt
    data: str = ""  # JSONL records (finetune/data.py)
    method: str = "lora"
    out: str = "runs/finetune"
    seq_len: int | None = None  # None: 256, or the base's context when shorter
    lr: float | None = None  # None: DEFAULT_LR of the method
    warmup_steps: int = 10
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("qkv", "attn_out", "ffn_in", "ffn_out")
    pre_seq_len: int = 16
    prefix_hidden: int = 0  # > 0: P-Tuning v2 with a prefix projection of this width
    bits: int | None = None  # 8 or 4: frozen quantized base weights (QLoRA-style)
    group_size: int | None = None
    chat_template: str | None = None  # for conversation records (default: the base's template)

    def record(self) -> dict:
        return {k: v for k, v in super().record().items() if k not in PRETRAINING_ONLY}

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if not self.base or not self.data:
            raise ConfigError("fine-tuning needs a base model folder and a data file (--model, --data)")
        if not Path(self.data).is_file():
            raise ConfigError(f"{self.data}: file not found")
        if self.seq_len is None:
            from glm130b.checkpoint import load_config

            self.seq_len = min(256, load_config(self.base).max_seq_len)
        super().validate()
        if self.bits not in (None, 4, 8):
            raise ConfigError(f"bits must be 4 or 8, got {self.bits!r}")
        if self.method == "full" and self.bits is not None:
            raise ConfigError("--method full trains every weight; quantized (frozen) weights need lora or ptuning")
        if self.method == "ptuning" and not (isinstance(self.pre_seq_len, int) and self.pre_seq_len >= 1):
            raise ConfigError("pre_seq_len must be a positive integer")
        if self.tp > 1 or self.pp > 1:
            raise ConfigError("fine-tuning shards over data-parallel ranks (--dp, FSDP2) only; --tp and --pp "
                              "are not supported for adapters yet")


def prepare(cfg: FinetuneConfig, log=print):
    """(model with its adapter, tokenizer, FinetuneData): everything a run needs, checked."""
    from glm130b.checkpoint import load_model
    from glm130b.data.objective import GLMSampleBuilder, ObjectiveConfig
    from glm130b.finetune.data import FinetuneData, encode_records
    from glm130b.infer.chat import template_of

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.base, bits=cfg.bits, group_size=cfg.group_size)
    if cfg.seq_len > model.config.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the base model's context {model.config.max_seq_len}")
    template = template_of(cfg.base, tokenizer, cfg.chat_template)
    pairs, cut = encode_records(cfg.data, tokenizer, cfg.seq_len, template)
    log(f"{len(pairs)} records from {cfg.data}" + (f"; {cut} prompts keep only their last tokens to fit "
                                                    f"seq_len {cfg.seq_len}" if cut else ""))
    builder = GLMSampleBuilder(ObjectiveConfig(seq_len=cfg.seq_len, two_d=model.config.rotary == "2d"), tokenizer,
                               seed=cfg.seed)
    if cfg.method == "lora":
        adapters.add_lora(model, adapters.lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                                      list(cfg.lora_targets), base=str(cfg.base)))
    elif cfg.method == "ptuning":
        adapters.add_prefix(model, cfg.pre_seq_len, cfg.prefix_hidden or None)
    else:
        model.requires_grad_(True)
    return model, tokenizer, FinetuneData(pairs, builder, cfg.seed)


def finetune(cfg: FinetuneConfig, progress: bool = True, log=print) -> dict:
    """Run (or resume) a fine-tuning run into cfg.out; returns the summary (loss, tokens/s,
    parameters trained, peak memory)."""
    from glm130b.train import distributed
    from glm130b.train.trainer import Job, run_job

    cfg.validate()
    parallel, created = None, False
    if distributed.wants_distributed():  # under torchrun: FSDP2 over --dp ranks
        device, created = distributed.join_process_group()
        parallel = (distributed.layout_from(cfg, load_config(cfg.base)), device)
    model, tokenizer, data = prepare(cfg, log if parallel is None or torch.distributed.get_rank() == 0
                                     else (lambda *_: None))
    base = {"model": str(cfg.base), "bits": cfg.bits, "group_size": cfg.group_size}

    def save_folder(engine, out: Path, step: int) -> None:
        extra = {"trained_steps": step, "finetune_config": cfg.record()}
        if cfg.method == "full":
            engine.save_model(out, tokenizer, extra=extra)
        else:
            state = adapters.adapter_state(engine.module)  # (a collective under FSDP2)
            engine.on_main(lambda: adapters.write_adapter(out, *state, {**base, "trained_steps": step}),
                           f"the adapter in {out}")

    job = Job(model, data, save_folder, trainable_only=cfg.method != "full", trim=True)
    try:
        summary = run_job(cfg, job, progress, log, parallel)
    finally:
        if created:
            distributed.leave_process_group()
    summary.update(method=cfg.method, bits=cfg.bits, peak_rss_mib=peak_rss_mib())
    if torch.cuda.is_available():
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary




def merge(base: str | Path, adapter: str | Path, out: str | Path, bits: int | None = None,
          group_size: int | None = None, log=print) -> dict:
    """Write a plain model folder with a LoRA adapter folded into the weights (re-quantized with
    `bits`). The base loads as the adapter was trained (the same INT4/INT8 weights, dequantized),
    so the merged model computes what the adapter model computed."""
    from glm130b.checkpoint import load_model, save_model
    from glm130b.io import check_new_folder
    from glm130b.quant.weights import dequantize_model, quantize_model

    check_new_folder(out)
    if Path(out).is_dir() and any(Path(out).iterdir()):
        raise GLMError(f"--out {out} exists and is not empty; choose a new folder")
    config, _, sidecar = adapters.read_adapter(adapter)
    if config["peft_type"] != "LORA":
        raise adapters.AdapterError("a P-Tuning v2 prefix is not part of the weights and cannot be merged; "
                                    "use it with --adapter")
    trained = sidecar.get("base", {})
    model, tokenizer = load_model(base, bits=trained.get("bits"), group_size=trained.get("group_size"))
    dequantize_model(model)
    adapters.load_adapter(model, adapter, merge=True)
    if adapters.lora_layers(model):  # (cannot happen after dequantizing; a guard against silent loss)
        raise adapters.AdapterError("some LoRA layers could not be merged")
    if bits is not None:
        quantize_model(model, bits, group_size)
    save_model(out, model, tokenizer, extra={"merged_adapter": str(adapter), "base": str(base)})
    info = {"out": str(out), "base": str(base), "adapter": str(adapter), "trained_on_bits": trained.get("bits"),
            "bits": bits}
    log(f"merged {adapter} into {base} -> {out}")
    return info
