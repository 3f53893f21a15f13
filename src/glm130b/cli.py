"""`glm130b` command: each verb is one thin function over the library.

User errors (GLMError) print one line and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

from glm130b.errors import GLMError

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "glm-small"


def resolve_model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if (SHIPPED_MODEL / "model.safetensors").is_file():
        return SHIPPED_MODEL
    raise GLMError("no --model given and no shipped model found; train one first: glm130b train --preset tiny --out runs/tiny")


# ---------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from glm130b.config import GLMConfig
    from glm130b.model.glm import build_model

    cfg = GLMConfig.from_preset(args.preset) if args.preset else _load_config_of(args.model)
    model = build_model(cfg, "meta")
    info = {
        "preset": cfg.name, "parameters": model.num_parameters(), "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
        "ffn_hidden_size": cfg.ffn_hidden_size, "ffn_type": cfg.ffn_type, "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len, "rotary": cfg.rotary, "norm": cfg.norm,
        "deepnorm_alpha": cfg.deepnorm_alpha, "deepnorm_beta": cfg.deepnorm_beta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    print(json.dumps(info, indent=2))
    return 0


def _load_config_of(model_arg):
    from glm130b.checkpoint import load_config

    return load_config(resolve_model_dir(model_arg))


def cmd_train(args) -> int:
    from glm130b.tokenizer import GLMTokenizer, default_tokenizer
    from glm130b.train.trainer import TrainConfig, train

    values = _options(args, TrainConfig, "training", (
        "preset", "out", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "precision", "seed", "instructions",
        "gmask_prob", "instruction_share", "checkpoint_every", "grad_accum", "resume", "keep_checkpoints", "tp", "pp",
        "dp", "pipeline_schedule", "microbatches", "device", "compile", "objective", "time_budget_s", "steps_file",
        "pack_instructions"))
    if values.get("time_budget_s") and "steps" not in values:  # the budget decides; no cap
        values["steps"] = 10**9
    if getattr(args, "sources", None) is not None:  # --sources: a corpus name ("base") or comma-separated sources
        values["sources"] = tuple(args.sources.split(","))
    if isinstance(values.get("sources"), list):
        values["sources"] = tuple(values["sources"])

    def run() -> dict:
        tokenizer = GLMTokenizer.load(args.tokenizer) if args.tokenizer else default_tokenizer()
        return train(TrainConfig(**values), tokenizer)

    return _summary_on_rank0(run)


def _int_in(low: int, high: int | None, out_of_range: str):
    """An argparse type: an integer in [low, high] (no upper bound for None), else
    `out_of_range` (formatted with the value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(out_of_range.format(value))
        return value

    return parse


_positive = _int_in(1, None, "must be at least 1, got {}")  # a degree, a count, a length
_port = _int_in(0, 65535, "a port is 0 (any free port) to 65535, got {}")


def _options(args, config_cls, what: str, flags: tuple[str, ...]) -> dict:
    """A run's options: the --config YAML, then the flags that were given; names that
    `config_cls` does not have are one error."""
    values: dict = {}
    if args.config:
        from glm130b.io import read_yaml

        values.update(read_yaml(args.config))
    values.update({key: getattr(args, key) for key in flags if getattr(args, key) is not None})
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise GLMError(f"unknown {what} option(s): {', '.join(unknown)}")
    return values


def _summary_on_rank0(run) -> int:
    """Run a training job; under torchrun every rank runs it and only rank 0 prints (errors and
    the JSON summary)."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = run()
    except GLMError:
        if not rank0:
            return 2
        raise
    if rank0:
        print(json.dumps(summary, indent=2))
    return 0


def _quantization_flags(args, directory):
    """(bits, group_size, head_bits) of a loading verb; a group size or head bits without --bits
    is an error unless the folder is saved quantized (its own scheme then applies)."""
    from glm130b.checkpoint import is_quantized_folder
    from glm130b.interop.sat import is_sat_folder

    bits, group_size = getattr(args, "bits", None), getattr(args, "group_size", None)
    head_bits = getattr(args, "head_bits", None)
    if (group_size is not None or head_bits is not None) and bits is None and \
            (is_sat_folder(directory) or not is_quantized_folder(directory)):
        raise GLMError(f"{'--group-size' if group_size is not None else '--head-bits'} needs --bits 8 or --bits 4")
    return bits, group_size, head_bits


def _load(args):
    """checkpoint.load_model (or a SAT folder's loader) with the verb's --bits / --group-size /
    --head-bits / --device / --dtype: the weights go from the file to the device one tensor at a
    time, quantized on the way."""
    from glm130b.device import resolve_device, resolve_dtype
    from glm130b.interop.loader import load_any
    from glm130b.quant.weights import compact_cuda_int4

    device = resolve_device(getattr(args, "device", "cpu"))
    dtype = resolve_dtype(getattr(args, "dtype", "fp32"), device)
    directory = resolve_model_dir(args.model)
    bits, group_size, head_bits = _quantization_flags(args, directory)
    model, tokenizer = load_any(directory, device=device, dtype=dtype, bits=bits, group_size=group_size,
                                head_bits=head_bits)
    if getattr(args, "adapter", None):
        from glm130b.finetune.adapters import load_adapter

        load_adapter(model, args.adapter, log=lambda m: print(m, file=sys.stderr))
    model.compile_decode = bool(getattr(args, "compile", False))
    if model.compile_decode and device.type == "cpu":
        print("note: --compile pays off on a GPU; on the CPU the fused C++ decode step (the default) is "
              "faster (docs/inference.md)", file=sys.stderr)
    compact_cuda_int4(model)  # on a GPU, INT4 held once: these verbs only run the model
    return model, tokenizer


def _fast(model):
    """The fast CPU GEMV for the four matrices of every layer (same weights); nothing on a GPU."""
    from glm130b.quant import use_fast_linears

    return use_fast_linears(model) if model.final_layernorm.weight.device.type == "cpu" else model


def cmd_quantize(args) -> int:
    from glm130b.checkpoint import is_quantized_folder, load_model, save_model
    from glm130b.io import check_new_folder
    from glm130b.quant import QuantizationError, quantization_info, weight_bytes

    check_new_folder(args.out)  # like convert: never replace a folder that holds something
    if Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        raise GLMError(f"--out {args.out} exists and is not empty; choose a new folder")
    t0 = time.perf_counter()
    directory = resolve_model_dir(args.model)
    if is_quantized_folder(directory) and args.bits is None:
        raise QuantizationError(f"{directory} is already quantized; quantize the full-precision model")
    from glm130b.device import resolve_device

    model, tokenizer = load_model(directory, device=resolve_device(args.device), bits=args.bits,
                                  group_size=args.group_size, head_bits=args.head_bits)
    import torch

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    out = save_model(args.out, model, tokenizer, dtype=half)
    info = {**quantization_info(model), "out": str(out), "weight_bytes": weight_bytes(model),
            "file_bytes": (Path(out) / "model.safetensors").stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(info, indent=2))
    return 0


def _generation_config(args):
    from glm130b.infer.engine import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, strategy=args.strategy,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
        length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram, seed=args.seed,
        stop_strings=tuple(args.stop or ()))


def _load_for_generation(args):

    config = _generation_config(args)  # bad settings fail before the model is loaded
    tp = getattr(args, "tp", None) or 1
    if tp > 1:
        return (*_load_tensor_parallel(args), config)
    model, tokenizer = _load(args)
    return _fast(model), tokenizer, config


def _load_tensor_parallel(args):
    """This rank's (model, tokenizer) under torchrun --tp N (infer/tensor_parallel.py)."""
    import torch

    from glm130b.device import resolve_dtype
    from glm130b.infer.tensor_parallel import load_tensor_parallel
    from glm130b.quant.weights import compact_cuda_int4

    directory = resolve_model_dir(args.model)
    bits, group_size, head_bits = _quantization_flags(args, directory)
    if getattr(args, "adapter", None):
        raise GLMError("--adapter is not supported with --tp yet: merge it first (glm130b finetune merge)")
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_tensor_parallel(directory, args.tp, bits, group_size, dtype, head_bits)
    model.compile_decode = bool(getattr(args, "compile", False))  # each rank compiles the same step
    compact_cuda_int4(model)  # on a GPU, INT4 held once (per shard)
    return model, tokenizer


def _leave_tp(args) -> None:
    """After a --tp run: barrier, then destroy the process group (gloo aborts at teardown otherwise)."""
    if (getattr(args, "tp", None) or 1) > 1:
        from glm130b.train.distributed import leave_process_group

        sys.stdout.flush()
        leave_process_group()


def _out(*values, **kw) -> None:
    """print on rank 0 only (under torchrun --tp every rank computes the same tokens)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*values, **kw)


def cmd_generate(args) -> int:
    from glm130b.infer.generate import generate

    model, tokenizer, config = _load_for_generation(args)
    if args.stream:
        generate(model, tokenizer, args.prompt, on_text=lambda s: _out(s, end="", flush=True), config=config)
        _out()
    else:
        _out(generate(model, tokenizer, args.prompt, config=config))
    _leave_tp(args)
    return 0


def cmd_infill(args) -> int:
    from glm130b.infer.generate import infill

    model, tokenizer, config = _load_for_generation(args)
    result = infill(model, tokenizer, args.text, config=config, reuse_cache=args.reuse_cache)
    from glm130b.infer.generate import blank_ids

    left = sum(t in blank_ids(tokenizer) for t in tokenizer.encode(args.text)) - len(result.spans)
    if left and not args.reuse_cache:
        print(f"note: {left} blank(s) of another kind left as they are: GLM-130B's rule fills one kind per call "
              "([MASK] before [sMASK] before [gMASK]); --reuse-cache fills every kind", file=sys.stderr)
    if args.json:
        _out(json.dumps({"text": result.text, "spans": result.spans}, ensure_ascii=False, indent=2))
    else:
        _out(result.text)
        for i, span in enumerate(result.spans):
            _out(f"  blank {i + 1}: {span!r}")
    _leave_tp(args)
    return 0


def cmd_plot(args) -> int:
    from glm130b.train.metrics import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_demo(args) -> int:
    from glm130b.demo import run_demo

    return run_demo(steps=args.steps, out=args.out, model_dir=args.model, device=args.device)


def cmd_eval(args) -> int:
    from glm130b.device import resolve_device
    from glm130b.eval.runner import run_command

    run_command(resolve_model_dir(args.model), args.tasks, limit=args.limit, output=args.output, bits=args.bits,
                compare=args.compare, progress=not args.no_progress, with_samples=args.samples,
                precision=args.precision, device=resolve_device(args.device), adapter=args.adapter,
                compile_decode=args.compile)
    return 0


def cmd_finetune(args) -> int:
    """`glm130b finetune` (train an adapter) and `glm130b finetune merge`."""
    from glm130b.finetune.run import FinetuneConfig, finetune, merge

    if args.action == "merge":
        if not args.adapter or not args.out:
            raise GLMError("finetune merge needs --adapter DIR and --out DIR (and --model: the base)")
        info = merge(resolve_model_dir(args.model), args.adapter, args.out, bits=args.bits, group_size=args.group_size,
                     log=lambda m: print(m, file=sys.stderr))
        print(json.dumps(info, indent=2))
        return 0
    values = _options(args, FinetuneConfig, "fine-tuning", (
        "data", "method", "out", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "precision", "seed",
        "checkpoint_every", "grad_accum", "resume", "keep_checkpoints", "device", "lora_rank", "lora_alpha",
        "lora_dropout", "pre_seq_len", "prefix_hidden", "bits", "group_size", "chat_template", "weight_decay", "dp"))
    if args.lora_targets:
        values["lora_targets"] = args.lora_targets.split(",")
    if isinstance(values.get("lora_targets"), list):
        values["lora_targets"] = tuple(t.strip() for t in values["lora_targets"] if t.strip())
    values["base"] = str(resolve_model_dir(args.model or values.get("base")))
    return _summary_on_rank0(lambda: finetune(FinetuneConfig(**values), log=lambda m: print(m, file=sys.stderr)))


def _add_sampling_flags(p) -> None:
    g = p.add_argument_group("decoding (default: greedy)")
    g.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="greedy",
                   help="greedy, sample (temperature, top-k, top-p) or beam search")
    g.add_argument("--temperature", type=float, default=1.0, help="sample: divide the logits by this")
    g.add_argument("--top-k", dest="top_k", type=int, default=0, help="sample: keep the k most likely tokens (0: all)")
    g.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="sample: nucleus mass (1: off)")
    g.add_argument("--seed", type=int, help="sample: seed for a reproducible run")
    g.add_argument("--num-beams", dest="num_beams", type=int, default=4, help="beam: hypotheses kept")
    g.add_argument("--length-penalty", dest="length_penalty", type=float, default=1.0,
                   help="beam: alpha in ((5 + length) / 6) ** alpha")
    g.add_argument("--no-repeat-ngram", dest="no_repeat_ngram", type=int, default=0,
                   help="forbid repeating any n-gram of this size (0: off)")
    g.add_argument("--min-new-tokens", dest="min_new_tokens", type=int, default=0,
                   help="block <eop>/<eos> until this many tokens")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop when the text contains TEXT (repeatable)")
    p.add_argument("--adapter", help="a fine-tuned adapter folder (glm130b finetune): LoRA merged into "
                                     "full-precision weights, or a P-Tuning v2 prefix")


def cmd_serve(args) -> int:
    from glm130b.serve.app import create_app

    if args.max_batch < 1 or args.max_queue < 0 or not args.drain_timeout >= 0:
        raise GLMError("--max-batch must be >= 1, --max-queue >= 0 and --drain-timeout >= 0")
    directory = resolve_model_dir(args.model)
    tp = args.tp or 1
    if tp > 1:  # rank 0 serves and broadcasts each model step; the others follow (serve/batcher.py)
        import signal

        import torch.distributed as dist

        from glm130b.serve.batcher import broadcast_from_rank0, follow

        model, tokenizer = _load_tensor_parallel(args)
        if dist.get_rank() != 0:
            for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 drains, then tells this rank to stop
                signal.signal(sig, signal.SIG_IGN)
            follow(model, args.max_batch)
            _leave_tp(args)
            return 0
    else:
        model, tokenizer = _load(args)
        model = _fast(model)
    name = args.served_model_name or directory.resolve().name
    app = None
    try:
        from glm130b.infer.chat import template_of

        template = template_of(directory, tokenizer, args.chat_template)
        app = create_app(model, tokenizer, model_name=name, api_key=args.api_key or os.environ.get("GLM130B_API_KEY"),
                         max_batch=args.max_batch, max_queue=args.max_queue, batcher_thread=False,
                         chat_template=template, broadcast=broadcast_from_rank0 if tp > 1 else None)
        return _serve(app, args, name, directory)
    finally:
        if tp > 1:  # the other ranks leave follow, also when rank 0 failed before its batcher ran
            from glm130b.serve.batcher import ModelOps

            (app.state.server.batcher.ops if app is not None else ModelOps(None, None, broadcast_from_rank0)) \
                .stop_followers()
            _leave_tp(args)


def _serve(app, args, name, directory) -> int:
    """HTTP on a thread, decoding on this (main) thread: the one that owns torch's thread pools.
    uvicorn waits for open requests a little longer than the drain, so they end with our error event."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                          timeout_graceful_shutdown=int(args.drain_timeout) + 5))
    http = threading.Thread(target=server.run, name="glm130b-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise GLMError(f"could not serve on {args.host}:{args.port} (see the message above)")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
    print(f"serving {name} from {directory} on http://{args.host}:{port} (max batch {args.max_batch}, "
          f"queue {args.max_queue})", file=sys.stderr, flush=True)
    _graceful_stop(server, app.state.server, args.drain_timeout)
    try:
        app.state.server.batcher.run(keep_running=http.is_alive)  # decodes until HTTP has drained
    finally:
        server.should_exit = True
        http.join(timeout=args.drain_timeout + 30)
    return 0


def cmd_chat(args) -> int:
    """A terminal chat: the conversation rendered by the model's chat template, each answer
    streamed; /reset forgets, /exit (or end of input) leaves, Ctrl-C stops the current answer."""
    from glm130b.infer.chat import fit_history, template_of
    from glm130b.infer.engine import stop_cut
    from glm130b.infer.generate import TextStream, generate_block
    from glm130b.model.masks import Block

    model, tokenizer, config = _load_for_generation(args)
    template = template_of(resolve_model_dir(args.model), tokenizer, args.chat_template)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    limit = model.config.max_seq_len - 1
    print("chat: /reset forgets the conversation, /exit leaves, Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except OSError as e:  # no readable standard input (a detached process, a test runner)
            raise GLMError(f"chat reads the conversation from standard input, which cannot be read ({e})") from None
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError:
            line = "\udcff"  # (a strict stdin: said below, as for the surrogates a lenient one keeps)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # one bad line must not end the conversation
            print("(that line is not valid UTF-8: set the terminal's encoding to UTF-8 and type it again)",
                  file=sys.stderr)
            continue
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(opening)
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages = history + [{"role": "user", "content": line}]
        ids = fit_history(tokenizer, template, messages, lambda n: n + config.max_new_tokens <= limit)
        budget = min(config.max_new_tokens, limit - len(ids))
        if budget < 1:
            print("(the message alone fills the model's context; say it shorter)", file=sys.stderr)
            continue
        stream = TextStream(tokenizer, lambda piece: print(piece, end="", flush=True), config.stop_strings)
        print("glm> ", end="", flush=True)
        try:
            generate_block(model, ids, Block(len(ids) - 1, 0, continues=True), tokenizer.sop_id,
                           {tokenizer.eop_id, tokenizer.eos_id}, budget, stream.token,
                           dataclasses.replace(config, max_new_tokens=budget))
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        answer = tokenizer.decode(stream.tokens)
        cut = stop_cut(answer, config.stop_strings)
        answer = answer if cut is None else answer[:cut]
        stream.finish(answer)
        print(flush=True)
        history = messages + [{"role": "assistant", "content": answer}]


def _graceful_stop(server, api, drain: float) -> None:
    """SIGTERM / SIGINT: stop accepting, let requests in flight finish for `drain` seconds, end
    the rest with an error (streams get an error event and [DONE]), exit 0. A second signal
    ends the rest at once (docs/serving.md)."""
    import signal

    def stop(signum, _frame):
        now = api.deadline is not None
        api.drain(0 if now else drain)
        server.should_exit = True
        b = api.batcher
        print(f"glm130b: {signal.Signals(signum).name}: " + ("ending the requests in flight now" if now else
              f"no new requests; finishing {b.running} running and {b.queue_depth} waiting (up to {drain:g} s; "
              "signal again to end them now)"), file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def cmd_plan(args) -> int:
    from glm130b.config import GLMConfig
    from glm130b.plan import Gpus, format_plan, plan_inference, plan_training

    cfg = GLMConfig.from_preset(args.preset) if args.preset else _load_config_of(args.model)
    gpus = Gpus.parse(args.gpus, args.nodes)
    if args.train:
        common = dict(tp=args.tp or 1, pp=args.pp or 1, dp=args.dp, micro_batch=args.micro_batch, seq=args.seq,
                      microbatches=args.microbatches, shard=args.shard)
        plan = plan_training(cfg, gpus, checkpointing=not args.no_checkpointing, **common)
        other = plan_training(cfg, gpus, checkpointing=args.no_checkpointing, **common)
        alternative = None if args.no_checkpointing else other
    else:
        if args.pp or args.dp:
            raise GLMError("--pp and --dp plan training (add --train); inference spreads weights by --tp")
        plan = plan_inference(cfg, gpus, bits=args.bits, batch=args.batch, seq=args.seq, tp=args.tp,
                              group_size=args.group_size)
        alternative = None
    if args.json:
        out = plan.to_dict()
        if args.train:
            out["checkpointing"] = not args.no_checkpointing
            out["other_checkpointing"] = {"checkpointing": args.no_checkpointing, "fits": other.fits,
                                          "per_gpu_bytes": other.per_gpu_bytes}
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, alternative))
    return 0


def cmd_convert(args) -> int:
    from glm130b.interop.convert import convert

    info = convert(args.src, args.dst, args.from_fmt, args.to_fmt, tp=args.tp, bits=args.bits,
                   group_size=args.group_size, preset=args.preset, num_heads=args.num_heads,
                   tokenizer_path=args.tokenizer, unsafe_pickle=args.unsafe_pickle, dtype=args.dtype,
                   max_seq_len=args.max_seq_len)
    print(json.dumps(info, indent=2))
    return 0


def _add_quant_flags(p) -> None:
    from glm130b.device import add_device_flags

    add_device_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="decode through one torch.compile'd step over a static KV cache (a CUDA graph on a GPU: "
                        "worth it there; the first step compiles for a while)")
    p.add_argument("--bits", type=int, choices=[8, 4], help="quantize the weights to INT8/INT4 while loading")
    p.add_argument("--group-size", dest="group_size", type=int, help="with --bits: one scale per this many inputs")
    p.add_argument("--head-bits", dest="head_bits", type=int, choices=[8, 4],
                   help="with --bits: quantize the output head too, per row (not GLM-130B's scheme; faster decoding)")


# ---------------------------------------------------------------------------------------------
class _Help(argparse.HelpFormatter):
    """Every option's default in --help, unless it is None/False or the text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*args, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm130b", description="GLM-130B in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="print a model's shape and exact parameter count as JSON")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="glm-130b, chatglm-6b, base, small or tiny")
    g.add_argument("--model", help="a model folder")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model with the GLM objective on the shipped corpus")
    p.add_argument("--config", help="YAML file of training options (command-line flags override it)")
    p.add_argument("--preset", help="model shape: tiny, small, base, chatglm-6b or glm-130b (default tiny)")
    p.add_argument("--out", help="run folder: model, metrics.jsonl (default runs/tiny)")
    p.add_argument("--steps", type=int, help="optimizer steps; the cosine schedule ends at the last (default 200)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per step (default 8)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per training sequence (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.002)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warm-up steps (default 20)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="fp32, or bf16 / fp16 autocast (fp16 with loss scaling) (default fp32)")
    p.add_argument("--seed", type=int, help="seed of the weights, the data order and the masks (default 1234)")
    p.add_argument("--gmask-prob", dest="gmask_prob", type=float,
                   help="share of samples with a [gMASK] suffix; the rest get [MASK] spans (default 0.7)")
    p.add_argument("--objective", choices=["glm", "causal"],
                   help="glm: blank infilling (default); causal: plain next-token prediction (the GPT baseline)")
    p.add_argument("--sources", help='training corpus: "shipped" (default), "base" (built by '
                   'tools/build_corpus_base.sh), or comma-separated source names')
    p.add_argument("--instructions", help='JSONL of {"prompt", "answer"} pairs mixed into training, or "builtin"')
    p.add_argument("--instruction-share", dest="instruction_share", type=float,
                   help="with --instructions: share of samples that are instruction pairs (default 0.05)")
    p.add_argument("--pack-instructions", dest="pack_instructions", action="store_true", default=None,
                   help="with --instructions: each instruction sample holds as many pairs as fit, each attending "
                        "only to itself (instead of one pair and padding)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="save a resumable checkpoint (and the model folder) every N steps")
    p.add_argument("--time-budget", dest="time_budget_s", type=float, metavar="SECONDS",
                   help="train for about this long: the step count is fixed from the measured step time early on, "
                        "so the learning-rate schedule ends on time (--steps, if given, is a cap)")
    p.add_argument("--steps-file", dest="steps_file", metavar="FILE",
                   help="with --time-budget: runs given the same file train the same number of steps "
                        "(the first to decide writes it)")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from its last good checkpoint")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, help="keep the last K checkpoints (default 3)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the shipped one)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"],
                   help="one process: train on this device (default cpu; auto = cuda when there is one)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (worth it on GPUs)")
    g = p.add_argument_group("parallelism (under torchrun; tp x pp x dp must equal the number of processes)")
    g.add_argument("--tp", type=_positive, help="tensor-parallel degree (default 1)")
    g.add_argument("--pp", type=_positive, help="pipeline stages (default 1)")
    g.add_argument("--dp", type=_positive, help="data-parallel (FSDP2) degree (default 1); --batch-size is the global batch")
    g.add_argument("--pipeline-schedule", dest="pipeline_schedule", choices=["gpipe", "1f1b"],
                   help="pipeline schedule when --pp > 1 (default 1f1b)")
    g.add_argument("--microbatches", type=_positive, help="pipeline microbatches per dp rank and step (default: --pp)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt (greedy by default; sampling, beam search)")
    p.add_argument("prompt", help="the text to continue (a [gMASK] is appended); a prompt that holds "
                   "[MASK]/[sMASK]/[gMASK] blanks has them filled instead, as `infill` does")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--tp", type=_positive, default=1,
                   help="tensor-parallel processes (run under torchrun --nproc-per-node TP)")
    _add_sampling_flags(p)
    _add_quant_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("infill", help="fill [MASK]/[sMASK]/[gMASK] blanks left to right")
    p.add_argument("text", help="text with one or more [MASK] / [sMASK] / [gMASK] blanks")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per blank")
    p.add_argument("--json", action="store_true", help="print the filled text and spans as JSON")
    p.add_argument("--reuse-cache", action="store_true",
                   help="fill every blank in one KV cache (faster; every kind of blank; not the official "
                        "layout) instead of GLM-130B's generate.py rules (one kind of blank, each re-encoded "
                        "with the earlier answers spliced in)")
    p.add_argument("--tp", type=_positive, default=1,
                   help="tensor-parallel processes (run under torchrun --nproc-per-node TP)")
    _add_sampling_flags(p)
    _add_quant_flags(p)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("quantize", help="write an INT8/INT4 weight-only quantized copy of a model folder")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True, help="weight bits: 8 or 4")
    p.add_argument("--group-size", dest="group_size", type=int,
                   help="one scale per this many inputs of a row (default: one per row, as GLM-130B)")
    p.add_argument("--head-bits", dest="head_bits", type=int, choices=[8, 4],
                   help="also quantize the output head, per row (default: keep it, as GLM-130B); a tied "
                        "embedding table stays for the lookups")
    p.add_argument("--out", required=True, help="new (or empty) folder for the quantized model")
    p.add_argument("--device", default="cpu", help="where to quantize: cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="store the tensors that stay unquantized (embeddings, LayerNorms, biases) in this type "
                        "(default fp32; fp16 halves a small model's file, whose embedding is most of it)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("plot", help="write PNG curves (loss, gradient norm, lr, loss scale) of a training run")
    p.add_argument("run_dir", help="a training run folder (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="fill blanks, continue and translate with the shipped model in fp32 and int4")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--steps", type=int,
                   help="train the tiny preset for this many steps first and show that model (default 500 when "
                        "there is no shipped model)")
    p.add_argument("--out", help="with --steps: the folder for the trained demo model (default runs/demo)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu; a GPU runs bf16)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with GLM blank infilling (docs/serving.md)")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--api-key", dest="api_key",
                   help="require `Authorization: Bearer KEY` on /v1 (default: $GLM130B_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests that may wait for a batch slot; more get 503 + Retry-After (default 128)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.add_argument("--drain-timeout", dest="drain_timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: seconds requests in flight may take to finish before they end with "
                        "an error (default 30)")
    p.add_argument("--chat-template", help="a Jinja chat template file, or chatglm-6b / chatglm-6b-cpp / plain "
                                           "(default: the model folder's, see docs/serving.md)")
    p.add_argument("--adapter", help="a fine-tuned adapter folder (glm130b finetune) to serve on the model")
    p.add_argument("--tp", type=_positive, default=1,
                   help="tensor-parallel processes (run under torchrun --nproc-per-node TP; rank 0 serves HTTP)")
    _add_quant_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="talk to a model in turns in the terminal (streaming; /reset, /exit; Ctrl-C "
                                    "stops an answer)")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument("--chat-template", help="a Jinja chat template file, or chatglm-6b / chatglm-6b-cpp / plain")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens an answer may take (default 128)")
    _add_sampling_flags(p)
    _add_quant_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert between SAT TP shards, HF folders (ChatGLM-6B) and ours; re-shard")
    p.add_argument("src", help="the checkpoint to read (a folder)")
    p.add_argument("dst", help="a new (or empty) folder to write")
    p.add_argument("--from", dest="from_fmt", required=True, choices=["sat", "hf", "ours"],
                   help="format of SRC: sat (SwissArmyTransformer shards), hf (Hugging Face) or ours")
    p.add_argument("--to", dest="to_fmt", required=True, choices=["ours", "hf", "sat"], help="format of DST")
    p.add_argument("--tp", type=_positive, help="with --to sat: the number of tensor-parallel shards (default 1)")
    p.add_argument("--bits", type=int, choices=[8, 4], help="with --to ours: quantize while converting")
    p.add_argument("--group-size", dest="group_size", type=int, help="with --bits: group-wise scales")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast the weights (default: as stored)")
    p.add_argument("--preset", help="--from sat: the model's preset (default: the preset its shapes match)")
    p.add_argument("--num-heads", dest="num_heads", type=int, help="--from sat: heads, when no preset matches")
    p.add_argument("--max-seq-len", dest="max_seq_len", type=_positive, help="override the context length")
    p.add_argument("--tokenizer", help="tokenizer.json or an official ice_text.model to put in the output")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="--from sat: unpickle shards that hold Python objects besides tensors (trusted files only)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plan", help="per-GPU memory to serve or train a model, and whether it fits")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="a preset (glm-130b, chatglm-6b, small, tiny)")
    g.add_argument("--model", help="a model folder (default: the shipped model)")
    p.add_argument("--gpus", required=True, help="GPUs per node as COUNTxSIZE in GiB, e.g. 4x24GB, 8x40GB, 8x11")
    p.add_argument("--nodes", type=_positive, default=1, help="nodes of --gpus each")
    p.add_argument("--bits", type=int, choices=[16, 8, 4], default=16, help="inference weight bits (default 16)")
    p.add_argument("--group-size", dest="group_size", type=int, help="with --bits 8/4: group-wise scales")
    p.add_argument("--batch", type=_positive, default=1, help="inference batch (default 1)")
    p.add_argument("--seq", type=_positive, help="sequence length (default: the model's context)")
    p.add_argument("--train", action="store_true", help="plan training instead of inference")
    p.add_argument("--tp", type=_positive, help="tensor parallelism (inference default: all GPUs)")
    p.add_argument("--pp", type=_positive, help="pipeline stages (training)")
    p.add_argument("--dp", type=_positive, help="data parallelism (training; default: GPUs / (tp x pp))")
    p.add_argument("--micro-batch", dest="micro_batch", type=_positive, default=1, help="training: sequences per micro-batch")
    p.add_argument("--microbatches", type=_positive, help="micro-batches per step (default: pp)")
    p.add_argument("--shard", choices=["full", "optimizer", "none"], default="full",
                   help="how DP shares model states: full = FSDP2 (ours), optimizer = ZeRO-1, none = DDP")
    p.add_argument("--no-checkpointing", action="store_true", help="plan without activation checkpointing")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="zero-shot evaluation: results table, JSON with --output (see docs/eval.md)")
    p.add_argument("tasks", nargs="+", metavar="TASK_OR_YAML", help="task names (tasks/*.yaml) or task YAML files")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--limit", type=int, help="first N items of each task (of each subject for MMLU)")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--bits", type=int, choices=[4, 8], help="quantize the weights first (glm130b.quant)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8", "int4"],
                   help="evaluate at this precision (default fp32; bf16 is several times faster on CPUs with AVX512-BF16)")
    p.add_argument("--compare", help="comma-separated precisions to compare, e.g. fp32,int8,int4 (also bf16, fp16)")
    p.add_argument("--samples", action="store_true", help="include per-item predictions in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--adapter", help="a fine-tuned adapter folder (glm130b finetune) to put on the model")
    p.add_argument("--compile", action="store_true",
                   help="generation tasks decode through one torch.compile'd step (worth it on a GPU)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", help="fine-tune a model folder on JSONL examples: LoRA, P-Tuning v2 or full, on "
                                        "full-precision or INT8/INT4 weights (docs/finetune.md); "
                                        "`finetune merge` folds a LoRA adapter into the weights")
    p.add_argument("action", nargs="?", choices=["train", "merge"], default="train",
                   help="train an adapter (default), or merge one into a plain model folder")
    p.add_argument("--model", help="the base model folder (default: the shipped model)")
    p.add_argument("--data", help='JSONL of {"prompt", "response"}, {"instruction", "input", "output"} or '
                                  'conversations ({"messages"} / {"prompt", "response", "history"})')
    p.add_argument("--method", choices=["lora", "ptuning", "full"], help="default lora")
    p.add_argument("--config", help="YAML file of fine-tuning options (flags override it)")
    p.add_argument("--out", help="run folder: the adapter, checkpoints, metrics.jsonl (default runs/finetune); "
                                 "merge: the new model folder")
    p.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="examples per step (default 8)")
    p.add_argument("--seq-len", dest="seq_len", type=int,
                   help="longest example in tokens; longer prompts keep their end (default 256)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: lora 1e-3, ptuning 1e-1, full 1e-4)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warm-up steps (default 10)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="fp32, or bf16/fp16 autocast (default fp32)")
    p.add_argument("--seed", type=int, help="seed of the adapter's initialisation and the data order (default 1234)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="save a resumable checkpoint (and the adapter) every N steps")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from its last good checkpoint")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, help="keep the last K checkpoints (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="where to train (default cpu)")
    p.add_argument("--dp", type=_positive, help="under torchrun: data-parallel (FSDP2) ranks; --batch-size is the global batch")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", dest="lora_rank", type=int, help="rank r (default 8)")
    g.add_argument("--lora-alpha", dest="lora_alpha", type=float, help="scale alpha; updates are alpha/r * BA (default 16)")
    g.add_argument("--lora-dropout", dest="lora_dropout", type=float, help="dropout on LoRA's input (default 0.05)")
    g.add_argument("--lora-targets", dest="lora_targets",
                   help="comma-separated: qkv, attn_out, ffn_in, ffn_out (default all four)")
    g = p.add_argument_group("P-Tuning v2")
    g.add_argument("--pre-seq-len", dest="pre_seq_len", type=int, help="learned prefix length (default 16)")
    g.add_argument("--prefix-hidden", dest="prefix_hidden", type=int,
                   help="> 0: train the prefix through a projection MLP of this width, as ChatGLM's "
                        "--prefix_projection (default 0: no projection)")
    g = p.add_argument_group("quantized base (frozen INT8/INT4 weights) and merge")
    g.add_argument("--bits", type=int, choices=[8, 4], help="train on INT8/INT4 base weights; merge: re-quantize")
    g.add_argument("--group-size", dest="group_size", type=int, help="with --bits: group-wise scales")
    g.add_argument("--adapter", help="merge: the adapter folder to fold into --model")
    p.add_argument("--chat-template", dest="chat_template",
                   help="template for conversation records (default: the base model's)")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 path from argv is printed escaped, not a traceback
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        return args.func(args)
    except GLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `glm130b ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
