"""Fine-tuning: data formats, LoRA / P-Tuning v2 adapters (save, load, merge, peft's own reader),
frozen INT4 bases, and exact resume after a kill."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import varied_model

from glm130b.checkpoint import load_model, save_model
from glm130b.data.objective import GLMSampleBuilder, ObjectiveConfig, collate
from glm130b.finetune import adapters
from glm130b.finetune.data import FinetuneDataError, encode_records, read_records
from glm130b.finetune.run import FinetuneConfig, prepare
from glm130b.model.glm import glm_loss
from glm130b.model.masks import Block, position_ids
from glm130b.quant.weights import QuantizedLinear, dequantize_model
from glm130b.tokenizer import default_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"prompt": "Capital of France?", "response": "Paris"},
    {"instruction": "Translate into Chinese", "input": "light", "output": "光"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]},
    {"prompt": "And then?", "response": "More", "history": [["one", "two"]]},
    {"prompt": "Define the word \"lamp\".", "response": "a device that gives light"},
    {"prompt": "Capital of Italy?", "response": "Rome"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny"
    save_model(out, varied_model(), tokenizer)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def _inputs(tokenizer, context_text="The lamp gives", answer=(11, 12, 13)):
    ids = tokenizer.encode(context_text) + [tokenizer.gmask_id]
    tokens = ids + [tokenizer.sop_id, *answer]
    block = Block(mask_position=len(ids) - 1, length=1 + len(answer), continues=True)
    pos = position_ids(len(ids), [block]).unsqueeze(0)
    return torch.tensor([tokens]), pos, torch.tensor([len(ids)])


def assert_same_outputs(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within 1e-5 of the logits' scale: (W + s BA) x against Wx + s B(Ax) differ by FP32
    rounding only (up to ~2e-5 on this test model's logits of up to ~20)."""
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# -- data -------------------------------------------------------------------------------------
def test_every_record_form_becomes_a_prompt_and_a_response(data_file):
    got = [r for _, r in read_records(data_file)]
    assert got[0] == {"prompt": "Capital of France?", "response": "Paris"}
    assert got[1] == {"prompt": "Translate into Chinese\nlight", "response": "光"}
    assert got[2] == {"messages": [{"role": "user", "content": "Hi"}], "response": "Hello there"}
    assert got[3]["messages"] == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                                  {"role": "user", "content": "And then?"}]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"}', "field 'response' must be a string, got missing"),
    ('{"prompt": "x", "response": 3}', "field 'response' must be a string, got a int"),
    ('{"text": "x"}', "expected {'prompt', 'response'}"),
    ('not json', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant's"),
    ('{"prompt": "x", "response": "  "}', "the response is empty"),
])
def test_a_bad_record_is_one_error_naming_its_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n' + line + "\n")
    with pytest.raises(FinetuneDataError) as e:
        list(read_records(path))
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_a_response_longer_than_seq_len_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "word " * 40}) + "\n")
    with pytest.raises(FinetuneDataError, match=r"d.jsonl:1: the response has \d+ tokens"):
        encode_records(path, tokenizer, seq_len=32)


def test_samples_are_prompt_gmask_then_sop_response_with_loss_on_the_response_only(data_file, tokenizer):
    pairs, cut = encode_records(data_file, tokenizer, seq_len=64, chat_template="{{ messages[-1].content }}")
    assert cut == 0
    prompt, response = pairs[0]
    builder = GLMSampleBuilder(ObjectiveConfig(seq_len=64), tokenizer)
    s = builder.instruction_sample(prompt, response)
    n = len(prompt)
    assert s.input_ids[: n + 2].tolist() == prompt + [tokenizer.gmask_id, tokenizer.sop_id]
    assert s.input_ids[n + 2 : n + 2 + len(response)].tolist() == response
    on = s.loss_mask.nonzero().flatten().tolist()
    assert on == list(range(n + 1, n + 2 + len(response)))  # the response and <eop>, nothing of the prompt
    assert s.targets[on].tolist() == response + [tokenizer.eop_id]


# -- LoRA -------------------------------------------------------------------------------------
def _lora_model(seed=0):
    model = varied_model()
    adapters.add_lora(model, adapters.lora_config(4, 8, 0.0, list(adapters.LORA_TARGETS)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.eval()


def test_lora_saves_loads_and_merges_to_the_same_outputs_and_peft_reads_it(tmp_path, tokenizer):
    ids, pos, ctx = _inputs(tokenizer)
    model = _lora_model()
    with torch.no_grad():
        adapted = model(ids, pos, context_lengths=ctx)
        base = varied_model()(ids, pos, context_lengths=ctx)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the outputs
    adapters.save_adapter(tmp_path / "a", model, {"model": "tiny", "bits": None})
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                             "glm130b_adapter.json"}
    merged = adapters.load_adapter(varied_model(), tmp_path / "a")  # merged into the weights on load
    assert not adapters.lora_layers(merged) and type(merged.layers[0].attention.query_key_value) is torch.nn.Linear
    with torch.no_grad():
        assert_same_outputs(merged(ids, pos, context_lengths=ctx), adapted)
    from peft import PeftModel  # the peer: peft's own loader on our folder

    peer = PeftModel.from_pretrained(varied_model(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert (peer(ids, pos, context_lengths=ctx) - adapted).abs().max() < 1e-6


def test_merge_command_writes_a_model_equal_to_base_plus_adapter(tmp_path, base_dir, tokenizer):
    from glm130b.finetune.run import merge

    model, _ = load_model(base_dir)
    adapters.add_lora(model, adapters.lora_config(4, 8, 0.0, ["qkv", "ffn_out"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    adapters.save_adapter(tmp_path / "a", model, {"model": str(base_dir), "bits": None})
    merge(base_dir, tmp_path / "a", tmp_path / "m", log=lambda *_: None)
    merge(base_dir, tmp_path / "a", tmp_path / "m4", bits=4, log=lambda *_: None)
    ids, pos, ctx = _inputs(tokenizer)
    merged, _ = load_model(tmp_path / "m")
    merged4, _ = load_model(tmp_path / "m4")
    with torch.no_grad():
        want = model.eval()(ids, pos, context_lengths=ctx)
        assert_same_outputs(merged(ids, pos, context_lengths=ctx), want)
    assert isinstance(merged4.layers[0].attention.query_key_value, QuantizedLinear)
    with pytest.raises(Exception, match="not empty"):
        merge(base_dir, tmp_path / "a", tmp_path / "m", log=lambda *_: None)


def test_lora_on_int4_trains_through_frozen_unchanged_weights(base_dir, data_file):
    cfg = FinetuneConfig(base=str(base_dir), data=str(data_file), method="lora", bits=4, group_size=32,
                         lora_dropout=0.0, seq_len=64, out="unused")
    cfg.lr = 1e-3
    model, _, data = prepare(cfg, log=lambda *_: None)
    quantized = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "scales"))}
    assert len(quantized) == 2 * 4 * model.config.num_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    batch = collate([s for s, _ in zip(data.samples(), range(4), strict=False)])
    reference = dequantize_model(copy.deepcopy(model))  # the same model with the INT4 products in FP32
    grads = []
    for m in (model, reference):
        m.train()
        logits = m(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"])
        glm_loss(logits, batch["targets"], batch["loss_mask"]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    first = "layers.0.attention.query_key_value.lora_B.default.weight"  # reached only through layer 1's INT4 products
    assert grads[0][first].abs().max() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for name, before in quantized.items():
        assert torch.equal(dict(model.named_buffers())[name], before)


# -- P-Tuning v2 ------------------------------------------------------------------------------
def test_prefix_reaches_every_layer_and_respects_the_glm_mask(tokenizer):
    model = varied_model()
    adapters.add_prefix(model, pre_seq_len=3)
    ids, pos, ctx = _inputs(tokenizer)
    logits = model(ids, pos, context_lengths=ctx)
    logits[0, -1].logsumexp(0).backward()
    grad = model.prefix_encoder.embedding.weight.grad.view(3, model.config.num_layers, 2, -1)
    for layer in range(model.config.num_layers):
        for kv in (0, 1):
            assert grad[:, layer, kv].abs().max() > 0, (layer, kv)
    model.eval()
    with torch.no_grad():
        a = model(ids, pos, context_lengths=ctx)
        changed = ids.clone()
        changed[0, -1] = 99  # a Part-B token: the context cannot see it, with or without a prefix
        b = model(changed, pos, context_lengths=ctx)
        n = int(ctx[0])
        assert torch.equal(a[:, :n], b[:, :n])
        model.prefix_encoder.embedding.weight.add_(0.5)  # every position, the first included, sees the prefix
        c = model(ids, pos, context_lengths=ctx)
        assert ((c - a).abs().amax(-1) > 1e-4).all()


def test_prefix_decoding_with_the_cache_equals_full_recomputation(tokenizer):
    from glm130b.infer.generate import generate

    model = varied_model()
    adapters.add_prefix(model, pre_seq_len=4, projection_hidden=16)
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.normal_(std=1.0)
    model.eval()
    prompt = "The lamp gives"
    ids = tokenizer.encode(prompt) + [tokenizer.gmask_id]
    text = generate(model, tokenizer, prompt, max_new_tokens=6)
    tokens = [tokenizer.sop_id]
    with torch.no_grad():
        for _ in range(6):
            block = Block(len(ids) - 1, len(tokens), continues=True)
            logits = model(torch.tensor([ids + tokens]), position_ids(len(ids), [block]).unsqueeze(0),
                           context_lengths=torch.tensor([len(ids)]))
            nxt = int(logits[0, -1, : tokenizer.vocab_size].argmax())
            if nxt in (tokenizer.eop_id, tokenizer.eos_id):
                break
            tokens.append(nxt)
    assert text == tokenizer.decode(tokens[1:])


def test_prefix_adapter_round_trips_in_peft_layout(tmp_path, tokenizer):
    model = varied_model()
    adapters.add_prefix(model, pre_seq_len=2, projection_hidden=8)
    adapters.save_adapter(tmp_path / "p", model, {"model": "tiny", "bits": None})
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 2
    loaded = adapters.load_adapter(varied_model(), tmp_path / "p")
    ids, pos, ctx = _inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pos, context_lengths=ctx), model.eval()(ids, pos, context_lengths=ctx))
    from peft import PrefixTuningConfig

    assert PrefixTuningConfig.from_pretrained(str(tmp_path / "p")).num_layers == model.config.num_layers


def test_bad_adapters_give_one_clear_error(tmp_path):
    with pytest.raises(adapters.AdapterError, match="not a folder"):
        adapters.load_adapter(varied_model(), tmp_path / "missing")
    model = _lora_model()
    adapters.save_adapter(tmp_path / "a", model, {})
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(adapters.AdapterError, match="cannot read it"):
        adapters.load_adapter(varied_model(), tmp_path / "a")
    adapters.save_adapter(tmp_path / "b", model, {})
    from glm130b.config import GLMConfig
    from glm130b.model.glm import build_model

    other = build_model(GLMConfig.from_preset("tiny", hidden_size=64, num_heads=2))
    with pytest.raises(adapters.AdapterError, match="does not fit this model .size mismatch"):
        adapters.load_adapter(other, tmp_path / "b")
    config = tmp_path / "b" / "adapter_config.json"
    good = json.loads(config.read_text())
    for key, value in (("r", "x"), ("lora_alpha", "x"), ("target_modules", 5)):
        config.write_text(json.dumps({**good, key: value}))
        with pytest.raises(adapters.AdapterError, match=f"adapter {tmp_path / 'b'}"):
            adapters.load_adapter(varied_model(), tmp_path / "b")
    config.write_text(json.dumps(good))
    sidecar = tmp_path / "b" / adapters.SIDECAR
    for text in ("[]", "{not json"):
        sidecar.write_text(text)
        with pytest.raises(adapters.AdapterError, match="restore it or delete it"):
            adapters.load_adapter(varied_model(), tmp_path / "b")
    sidecar.unlink()  # (optional: peft's own adapters have none)
    adapters.load_adapter(varied_model(), tmp_path / "b")


# -- the command, killed and resumed ----------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "glm130b.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}, timeout=300)


def test_finetune_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, base_dir, data_file, tokenizer):
    from glm130b.finetune.run import finetune, merge
    from glm130b.infer.generate import generate

    settings = dict(steps=6, batch_size=2, checkpoint_every=2, lora_dropout=0.1, seq_len=64, lr=5e-3)
    finetune(FinetuneConfig(base=str(base_dir), data=str(data_file), out=str(tmp_path / "whole"), **settings),
             progress=False, log=lambda *_: None)
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", v)]
    killed = _cli("finetune", "--model", base_dir, "--data", data_file, "--out", tmp_path / "cut", *flags,
                  env={"GLM130B_FAULT_KILL_AFTER_STEP": "4"})
    assert killed.returncode == -9, killed.stderr
    finetune(FinetuneConfig(base=str(base_dir), data=str(data_file), out=str(tmp_path / "cut"), resume=True,
                            **settings), progress=False, log=lambda *_: None)

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    recorded = json.loads((tmp_path / "cut" / "train_config.json").read_text())  # (rewritten on resume)
    assert recorded["method"] == "lora" and recorded["steps"] == 6 and recorded["resume"]
    assert not {"preset", "sources", "objective", "gmask_prob"} & recorded.keys()  # pretraining's only
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    # generating with the adapter equals generating with the merged model folder
    merge(base_dir, tmp_path / "whole", tmp_path / "m", log=lambda *_: None)
    with_adapter = adapters.load_adapter(load_model(base_dir)[0], tmp_path / "whole")
    merged = load_model(tmp_path / "m")[0]
    texts = [generate(m, tokenizer, "Capital of France?", max_new_tokens=6) for m in (with_adapter, merged)]
    assert texts[0] == texts[1]


def test_bad_finetune_settings_are_one_line(tmp_path, base_dir, data_file):
    r = _cli("finetune", "--model", base_dir, "--data", data_file, "--method", "full", "--bits", "4",
             "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "quantized (frozen) weights" in r.stderr
    r = _cli("finetune", "--model", base_dir, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "y")
    assert r.returncode == 2 and "file not found" in r.stderr and "Traceback" not in r.stderr


# -- the worked example and the verbs' --adapter ----------------------------------------------
def test_the_worked_example_rebuilds_identically_and_holds_its_dev_verses_out(tmp_path, monkeypatch):
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_example", ROOT / "tools" / "make_finetune_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path)
    module.main()
    shipped = ROOT / "data" / "finetune"
    for name in ("verse_book_dev.jsonl.gz", "verse_book_train.jsonl.gz"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name

    def rows(name):
        return [json.loads(line) for line in gzip.open(shipped / name, "rt", encoding="utf-8")]

    dev, train = rows("verse_book_dev.jsonl.gz"), rows("verse_book_train.jsonl.gz")
    verse = {r["question"].split("? ", 1)[-1].split("？", 1)[-1] for r in dev}
    from glm130b.data.corpus import iter_parallel_verses

    translations = {}
    for row in iter_parallel_verses():
        translations[row["en"]], translations[row["zh"]] = row["zh"], row["en"]
    held = verse | {translations[v] for v in verse}  # a dev verse in either language
    assert not any(r["prompt"].split("? ", 1)[-1].split("？", 1)[-1] in held for r in train)
    assert {r["lang"] for r in dev} == {"en", "zh"} and len(dev) == 400


def test_every_model_verb_takes_adapter(tmp_path, base_dir, tokenizer):
    from glm130b.cli import _load, build_parser

    model = _lora_model()
    adapters.save_adapter(tmp_path / "a", model, {"model": str(base_dir), "bits": None})
    want = adapters.load_adapter(load_model(base_dir)[0], tmp_path / "a")
    ids, pos, ctx = _inputs(tokenizer)
    for verb in (["generate", "x"], ["infill", "x [MASK]"], ["chat"], ["serve"]):
        args = build_parser().parse_args([*verb, "--model", str(base_dir), "--adapter", str(tmp_path / "a")])
        got, _ = _load(args)
        with torch.no_grad():
            assert torch.equal(got(ids, pos, context_lengths=ctx), want(ids, pos, context_lengths=ctx)), verb
    args = build_parser().parse_args(["eval", "verse_book", "--adapter", str(tmp_path / "a")])
    assert args.adapter == str(tmp_path / "a")


def _finetune_worker(rank: int, cfg: FinetuneConfig) -> None:
    from glm130b.finetune.run import finetune

    finetune(cfg, progress=False, log=lambda *_: None)


def test_lora_under_fsdp2_on_two_ranks_gives_the_one_process_losses(tmp_path, base_dir, data_file):
    from test_train_distributed import launch

    from glm130b.finetune.run import finetune
    from glm130b.io import read_jsonl

    settings = dict(base=str(base_dir), data=str(data_file), steps=3, batch_size=4, seq_len=64, lr=5e-3,
                    lora_dropout=0.0, warmup_steps=1)
    finetune(FinetuneConfig(out=str(tmp_path / "one"), **settings), progress=False, log=lambda *_: None)
    launch(_finetune_worker, 2, tmp_path, FinetuneConfig(out=str(tmp_path / "two"), dp=2, **settings))

    def losses(run):
        return [r["loss"] for _, r in read_jsonl(run / "metrics.jsonl")]

    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5, rtol=1e-5)
    from safetensors.torch import load_file

    one, two = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    # Adam turns float noise in a near-zero gradient into an lr-sized step (its sign may flip), so a
    # few elements may differ by up to 2 lr; nearly all must agree to 1e-5
    diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    assert diff.max() <= 2 * settings["lr"] and (diff > 1e-5).float().mean() < 0.01


@pytest.mark.parametrize("prefix_hidden", [16, 0], ids=["projected", "plain"])
def test_ptuning_under_fsdp2_on_two_ranks_gives_the_one_process_losses_and_adapter(
        tmp_path, base_dir, data_file, tokenizer, prefix_hidden):
    """With --prefix-hidden the saved table is the projection of parameters FSDP2 shards over the
    ranks (computed on DTensors, then gathered); it must be the one-process run's table."""
    from safetensors.torch import load_file
    from test_train_distributed import launch

    from glm130b.finetune.run import finetune
    from glm130b.infer.generate import generate
    from glm130b.io import read_jsonl

    settings = dict(base=str(base_dir), data=str(data_file), method="ptuning", pre_seq_len=4,
                    prefix_hidden=prefix_hidden, steps=3, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=1)
    finetune(FinetuneConfig(out=str(tmp_path / "one"), **settings), progress=False, log=lambda *_: None)
    launch(_finetune_worker, 2, tmp_path, FinetuneConfig(out=str(tmp_path / "two"), dp=2, **settings))

    def losses(run):
        return [r["loss"] for _, r in read_jsonl(run / "metrics.jsonl")]

    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5, rtol=1e-5)
    one, two = (load_file(tmp_path / run / "adapter_model.safetensors")["prompt_embeddings"]
                for run in ("one", "two"))
    config = varied_model().config
    assert two.shape == (4, config.num_layers * 2 * config.hidden_size)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
    cfg = FinetuneConfig(out=str(tmp_path / "unused"), **settings)
    cfg.validate()
    with torch.no_grad():
        initial = prepare(cfg, log=lambda *_: None)[0].prefix_encoder.table()
    assert (one - initial).abs().max() > 1e-3  # it trained
    r = _cli("generate", "Capital of France?", "--model", base_dir, "--adapter", tmp_path / "two",
             "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    model = adapters.load_adapter(load_model(base_dir)[0], tmp_path / "one")
    assert r.stdout.rstrip("\n") == generate(model, tokenizer, "Capital of France?", max_new_tokens=4)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_each_method_learns_a_few_examples_at_its_default_learning_rate(tmp_path, base_dir, data_file, method):
    """A P-Tuning prefix initialised at 0.02 (instead of N(0, 1)) barely moved the loss of the
    worked example in 150 steps; this catches such a setting in a few."""
    from glm130b.train.trainer import trim_padding

    cfg = FinetuneConfig(base=str(base_dir), data=str(data_file), method=method, lora_dropout=0.0, seq_len=64,
                         out=str(tmp_path / "unused"))
    cfg.validate()
    model, _, data = prepare(cfg, log=lambda *_: None)
    batch = trim_padding(collate([s for s, _ in zip(data.samples(), range(len(RECORDS)), strict=False)]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.train()
    losses = []
    for _ in range(25):
        logits = model(batch["input_ids"], batch["position_ids"], context_lengths=batch["context_lengths"])
        loss = glm_loss(logits, batch["targets"], batch["loss_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
