"""End to end through the `glm130b` command: info, train, generate, infill, and bad input."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from glm130b.cli import main
from glm130b.io import SaveError, atomic_write, atomic_write_text


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    code = main(["train", "--preset", "tiny", "--steps", "60", "--batch-size", "8", "--seq-len", "64",
                 "--warmup-steps", "5", "--out", str(out)])
    assert code == 0
    return out


def test_info_glm_130b(capsys):
    code, out, _ = run(capsys, "info", "--preset", "glm-130b")
    info = json.loads(out)
    assert code == 0
    assert info["parameters"] == 128_697_794_560
    assert (info["layers"], info["hidden_size"], info["heads"], info["vocab_size"]) == (70, 12288, 96, 150528)


def test_train_writes_model_folder_and_loss_falls(trained):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl"):
        assert (trained / name).is_file(), name
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_generate_and_infill(trained, capsys):
    code, out, _ = run(capsys, "generate", "--model", str(trained), "--max-new-tokens", "8", "In the beginning")
    assert code == 0 and out.endswith("\n")  # a tiny model may well emit <eop> at once
    code, out, _ = run(capsys, "infill", "--model", str(trained), "--json", "--max-new-tokens", "4",
                       "Paris is the [MASK] of France, and 北京是中国的[MASK]。")
    result = json.loads(out)
    assert code == 0 and len(result["spans"]) == 2
    assert "[MASK]" not in result["text"] and result["text"].startswith("Paris is the")
    assert result["text"].endswith("。")
    code, out, err = run(capsys, "infill", "--model", str(trained), "--max-new-tokens", "2", "a [MASK] b [sMASK] c")
    assert code == 0 and "note: 1 blank(s) of another kind left" in err and "[sMASK]" in out
    code, _, err = run(capsys, "infill", "--model", str(trained), "--max-new-tokens", "2", "a [MASK] b [MASK] c")
    assert code == 0 and "note:" not in err


def test_stream_prints_the_same_text(trained, capsys):
    _, plain, _ = run(capsys, "generate", "--model", str(trained), "--max-new-tokens", "12", "起初，神创造")
    _, streamed, _ = run(capsys, "generate", "--model", str(trained), "--max-new-tokens", "12", "--stream", "起初，神创造")
    assert plain == streamed


def one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err


def test_bad_input_gives_one_line_errors(trained, tmp_path, capsys):
    code, _, err = run(capsys, "info", "--preset", "nope")
    one_line_error(code, err, "unknown preset")
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "missing"), "hi")
    one_line_error(code, err, "not found")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (corrupt / name).write_bytes((trained / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:1000])
    code, _, err = run(capsys, "generate", "--model", str(corrupt), "hi")
    one_line_error(code, err, "corrupt")

    (corrupt / "config.json").write_text("{not json")
    code, _, err = run(capsys, "generate", "--model", str(corrupt), "hi")
    one_line_error(code, err, "not valid JSON")

    code, _, err = run(capsys, "generate", "--model", str(trained), "word " * 400)
    one_line_error(code, err, "prompt is")
    code, _, err = run(capsys, "infill", "--model", str(trained), "no blank here")
    one_line_error(code, err, "no [MASK]")
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "none.yaml"))
    one_line_error(code, err, "not found")


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")

    def full_disk(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SaveError, match="No space left"):
        atomic_write(target, full_disk)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_device_flags(trained, capsys):
    """--device/--dtype on the verbs that run a model: cpu works, a missing GPU is one clear line."""
    import torch

    code, out, _ = run(capsys, "generate", "--model", str(trained), "--device", "cpu", "--dtype", "fp32",
                       "--max-new-tokens", "3", "In the beginning")
    assert code == 0
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "generate", "--model", str(trained), "--device", "cuda", "x")
        one_line_error(code, err, "no CUDA GPU")
    code, _, err = run(capsys, "infill", "--model", str(trained), "--device", "tpu", "a [MASK] b")
    one_line_error(code, err, "unknown device")
