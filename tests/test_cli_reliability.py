"""The commands under a full disk, bad output paths, badly typed config files and killed saves:
one `error:` line and exit status 2, nothing half-written left, nothing finished lost."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glm130b
from glm130b.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "glm-small"
SRC = str(Path(glm130b.__file__).resolve().parents[1])  # the code under test, in subprocesses too
TINY = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def glm130b_with_file_limit(limit_bytes: int, *argv) -> subprocess.CompletedProcess:
    """The real command with every file capped at `limit_bytes`: writes past it fail in the OS
    (EFBIG), inside safetensors' Rust writer and torch.save alike, as on a full disk."""
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "glm130b", *map(str, argv)], preexec_fn=cap, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": SRC})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- disk full (item 5) -------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["quantize", "--model", SHIPPED, "--bits", "4", "--out", "{out}"],
    ["convert", "--from", "ours", "--to", "ours", SHIPPED, "{out}"],
    ["convert", "--from", "ours", "--to", "sat", SHIPPED, "{out}"],
])
def test_a_write_that_fails_is_one_line_and_leaves_nothing(tmp_path, argv):
    out = tmp_path / "out"
    r = glm130b_with_file_limit(1 << 20, *[str(out) if a == "{out}" else a for a in argv])
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: could not ") and "Traceback" not in r.stderr, r.stderr
    assert ("File too large" if argv[-3] != "sat" else "could not be written out in full") in r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_train_keeps_the_model_folder_when_the_checkpoint_does_not_fit(tmp_path):
    """Before: the checkpoint was written first, its failure was a traceback, and the finished
    run was lost. Now the model folder (a quarter of a checkpoint) is saved first."""
    out = tmp_path / "run"
    r = glm130b_with_file_limit(15 << 20, "train", *TINY, "--steps", "2", "--out", out)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not save checkpoint") and "only the resumable checkpoint is missing" in last
    from glm130b.checkpoint import load_model

    load_model(out)  # the trained model is there and loads
    assert json.loads((out / "meta.json").read_text())["trained_steps"] == 2


def test_train_refuses_to_start_without_room_for_its_saves(tmp_path, capsys, monkeypatch):
    import glm130b.train.trainer as trainer

    monkeypatch.setattr(trainer, "free_bytes", lambda path: 5 << 20)  # a 5 MB tmpfs
    code, _, err = run(capsys, "train", *TINY, "--steps", "2", "--out", tmp_path / "run")
    one_line_error(code, err, "MiB free, but this run's saves need about")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any training


# -- killed saves, permissions (Low) --------------------------------------------------------------
def test_a_save_killed_half_way_leaves_no_staging_folder_behind(tmp_path):
    from glm130b.io import staging_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / f".step_000100.{dead.pid}.abcd1234"  # as a kill -9 during a checkpoint write leaves it
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = folder / f".step_000100.{os.getppid()}.abcd1234"  # a live writer's folder is left alone
    live.mkdir()
    with staging_folder(folder / "step_000200", "x") as tmp:
        os.replace(tmp, folder / "step_000200")
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, "step_000200"])


def test_model_files_get_the_usual_permissions(tmp_path):
    from glm130b.checkpoint import save_model
    from glm130b.config import GLMConfig
    from glm130b.model.glm import build_model
    from glm130b.tokenizer import default_tokenizer

    mask = os.umask(0o022)
    try:
        save_model(tmp_path / "m", build_model(GLMConfig.from_preset("tiny")), default_tokenizer())
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


# -- bad output paths (item 6) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


def test_bad_output_paths_are_one_line(small_run, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run(capsys, "train", *TINY, "--steps", "1", "--out", a_file)
    one_line_error(code, err, "is a file")
    code, _, err = run(capsys, "train", *TINY, "--steps", "1", "--out", a_file / "sub")
    one_line_error(code, err, "is a file")
    code, _, err = run(capsys, "convert", "--from", "ours", "--to", "ours", small_run, a_file)
    one_line_error(code, err, "is a file")
    code, _, err = run(capsys, "quantize", "--model", small_run, "--bits", "8", "--out", a_file)
    one_line_error(code, err, "is a file")
    code, _, err = run(capsys, "plot", small_run, "--out", a_file / "x.png")
    one_line_error(code, err, "is a file")
    code, _, err = run(capsys, "plot", small_run, "--out", tmp_path / "x.nope")
    one_line_error(code, err, "not an image format")
    assert a_file.read_text() == "x"


def test_plot_makes_missing_folders(small_run, tmp_path, capsys):
    code, out, _ = run(capsys, "plot", small_run, "--out", tmp_path / "missing" / "dir" / "x.png")
    assert code == 0 and (tmp_path / "missing" / "dir" / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_quantize_refuses_to_overwrite_like_convert(small_run, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", "--model", small_run, "--bits", "8", "--out", out)
    one_line_error(code, err, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# -- config types (item 7) ------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text,needle", [
    ('steps: "ten"', "steps must be an integer, got 'ten'"),
    ("steps: 2.5", "steps must be an integer, got 2.5"),
    ("batch_size: true", "batch_size must be an integer, got True"),
    ("lr: fast", "lr must be a number"),
    ("compile: 1", "compile must be true or false"),
    ("sources: corpus", "sources must be a list of strings"),
    ("lr: 1e-3", "write 1.0e-3"),
    ("min_lr_ratio: -1", "min_lr_ratio must be in [0, 1]"),
    ("warmup_steps: -3", "warmup_steps must be >= 0"),
    ("keep_checkpoints: 0", "keep_checkpoints must be >= 1"),
    ("weight_decay: -1.0", "weight_decay must be >= 0"),
    ("sources: [nosuch]", "corpus source 'nosuch' not found"),
    ("instructions: nofile.jsonl", "instructions: nofile.jsonl: file not found"),
    ("steps: [1,\n  bad: : x", "is not valid YAML at line 2, column 8: expected the node content"),
])
def test_config_values_of_the_wrong_type_are_one_line(tmp_path, capsys, yaml_text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text + "\n")
    code, _, err = run(capsys, "train", "--config", config, "--out", tmp_path / "run")
    one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,needle", [
    ({"layernorm_eps": "x"}, "layernorm_eps must be a positive number, got 'x'"),
    ({"layernorm_eps": -1}, "layernorm_eps must be a positive number, got -1"),
    ({"rotary_base": 0}, "rotary_base must be a positive number"),
    ({"emb_grad_shrink": None}, "emb_grad_shrink must be a positive number"),
    ({"hidden_size": True}, "hidden_size must be a positive integer, got True"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"extra": 5}, "extra must be an object"),
    ({"extra": {"quantization": 5}}, "extra.quantization must be an object"),
    ({"max_seq_len": None}, "lacks max_seq_len"),
])
@pytest.mark.parametrize("verb", ["generate", "quantize"])
def test_bad_model_config_fields_are_one_line(tmp_path, capsys, change, needle, verb):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(SHIPPED, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if not (k == "max_seq_len" and v is None)}
    (folder / "config.json").write_text(json.dumps(config))
    argv = ["generate", "--model", folder, "hi"] if verb == "generate" else \
        ["quantize", "--model", folder, "--bits", "8", "--out", tmp_path / "q"]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, needle)
    assert not (tmp_path / "q").exists()


def test_eval_checks_its_output_path_before_evaluating(tmp_path, capsys, monkeypatch):
    import glm130b.eval.runner as runner

    monkeypatch.setattr(runner, "load_task", lambda _: pytest.fail("evaluation started"))
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "eval", "heldout_ppl", "--output", tmp_path / "afile" / "out.json")
    one_line_error(code, err, "afile is a file, not a folder")
    code, _, err = run(capsys, "eval", "heldout_ppl", "--output", tmp_path)
    one_line_error(code, err, "is a folder; give a file name")


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--preset", "tiny", "--gpus", "4x24GB", "--batch", "0"], "argument --batch: must be at least 1"),
    (["plan", "--preset", "tiny", "--gpus", "4x24GB", "--tp", "-1"], "argument --tp: must be at least 1"),
    (["plan", "--preset", "tiny", "--gpus", "4x24GB", "--train", "--micro-batch", "0"], "--micro-batch: must be at"),
    (["generate", "--tp", "0", "hi"], "argument --tp: must be at least 1"),
    (["convert", "--from", "ours", "--to", "ours", "--max-seq-len", "0", "a", "b"], "--max-seq-len: must be at least"),
])
def test_counts_below_one_are_refused_by_the_parser(capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and needle in capsys.readouterr().err


def test_convert_group_size_needs_bits(tmp_path, capsys):
    code, _, err = run(capsys, "convert", "--from", "ours", "--to", "ours", "--group-size", "64", SHIPPED, tmp_path / "o")
    one_line_error(code, err, "--group-size sets the scales of --bits 8/4")
    assert not (tmp_path / "o").exists()


def test_a_gpu_size_is_never_read_from_a_minus_sign(capsys):
    code, _, err = run(capsys, "plan", "--preset", "tiny", "--gpus", "4x-5")
    one_line_error(code, err, "cannot read --gpus '4x-5'")
    assert run(capsys, "plan", "--preset", "tiny", "--gpus", "4xA100-40G")[0] == 0


def test_a_port_out_of_range_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--port", "99999"])
    assert stop.value.code == 2
    assert "a port is 0 (any free port) to 65535, got 99999" in capsys.readouterr().err


# -- demo flags (item 8) ----------------------------------------------------------------------------
def test_demo_steps_and_out_train_a_model_that_info_reads(tmp_path, capsys, monkeypatch):
    import glm130b.demo as demo

    monkeypatch.setattr(demo, "PROMPTS", demo.PROMPTS[:1])
    out = tmp_path / "demo"
    code, printed, _ = run(capsys, "demo", "--steps", "3", "--out", out)
    assert code == 0 and "training the tiny preset for 3 steps" in printed
    assert json.loads((out / "meta.json").read_text())["trained_steps"] == 3
    code, printed, _ = run(capsys, "info", "--model", out)
    assert code == 0 and json.loads(printed)["preset"] == "tiny"
    code, _, err = run(capsys, "demo", "--model", SHIPPED, "--steps", "3")
    one_line_error(code, err, "one or the other")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "demo", "--device", "cuda")
        one_line_error(code, err, "no CUDA GPU")


# -- --help (Low) ---------------------------------------------------------------------------------
def _verbs():
    import argparse

    from glm130b.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_flag_of_every_verb_says_what_it_does_and_its_default():
    import re

    missing, no_default = [], []
    for verb, parser in _verbs().items():
        text = re.sub(r"\s+", " ", parser.format_help())
        for action in parser._actions:
            if action.dest == "help":
                continue
            if not (action.help or "").strip():
                missing.append(f"{verb} {action.option_strings or action.dest}")
            elif action.option_strings and action.default not in (None, False):
                if "default" not in action.help and f"(default {action.default})" not in text:
                    no_default.append(f"{verb} {action.option_strings}")
    assert not missing and not no_default, (missing, no_default)


def test_train_help_states_the_real_defaults():
    import dataclasses
    import re

    from glm130b.train.trainer import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for action in _verbs()["train"]._actions:
        m = re.search(r"\(default ([^);]+)[);]", action.help or "")
        if m and action.dest in defaults:
            assert m.group(1) == str(defaults[action.dest]), (action.dest, m.group(1), defaults[action.dest])


# -- checksums (Low) ------------------------------------------------------------------------------
@pytest.mark.parametrize("quantized", [False, True])
def test_flipped_bytes_in_the_weights_are_found(small_run, tmp_path, capsys, quantized):
    import shutil

    folder = tmp_path / "m"
    if quantized:
        assert main(["quantize", "--model", str(small_run), "--bits", "8", "--out", str(folder)]) == 0
    else:
        shutil.copytree(small_run, folder)
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "1", "hi"]) == 0
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    code, _, err = run(capsys, "generate", "--model", folder, "--max-new-tokens", "1", "hi")
    one_line_error(code, err, "does not match the checksum")


def test_the_shipped_model_matches_its_checksum():
    from glm130b.integrity import verify_checksums

    assert (SHIPPED / "checksums.json").is_file()
    verify_checksums(SHIPPED)


# -- eval --limit on MMLU, --resume with more steps (Low) -----------------------------------------
def test_eval_says_what_limit_means_for_mmlu():
    from glm130b.eval.runner import limit_notes
    from glm130b.eval.tasks import load_task

    notes = limit_notes([load_task("lambada_openai"), load_task("mmlu")], 2)
    assert len(notes) == 1 and "mmlu: --limit 2 counts items per subject: 114 items from 57 subjects" in notes[0]


def test_resume_with_more_steps_says_the_schedule_changes(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(capsys, "train", *TINY, "--steps", "2", "--checkpoint-every", "1", "--out", out)
    assert code == 0
    code, printed, _ = run(capsys, "train", *TINY, "--steps", "4", "--resume", "--out", out)
    assert code == 0
    assert "note: steps 2 -> 4: the learning-rate schedule changes from step 2 on" in printed
    assert "data stream" not in printed  # the data settings did not change


def test_resume_with_other_data_settings_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(capsys, "train", *TINY, "--steps", "2", "--checkpoint-every", "1", "--out", out)
    assert code == 0
    code, printed, _ = run(capsys, "train", *TINY, "--steps", "3", "--resume", "--out", out,
                           "--instructions", "builtin", "--pack-instructions")
    assert code == 0
    assert ("note: instructions None -> 'builtin', pack_instructions False -> True: the data stream continues "
            "from its position with the new settings") in printed


def test_a_metrics_line_torn_by_a_kill_does_not_block_resume_or_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # kill -9 in the middle of a write
    capsys.readouterr()
    code, printed, err = run(capsys, "train", *TINY, "--steps", "3", "--resume", "--out", out)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert main(["plot", str(out)]) == 0


def test_a_seed_torch_cannot_take_is_one_line(capsys):
    code, _, err = run(capsys, "generate", "--strategy", "sample", "--seed", 2**64, "hi")
    one_line_error(code, err, "seed must be in")
