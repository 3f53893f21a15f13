"""tools/cpu_session.py (issue #19's measurement on whatever CPU a session has): the table and the
targets it prints from benchmarks/decode.py's JSON, and what it says of this CPU."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("cpu_session", ROOT / "tools" / "cpu_session.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(int4, q4, int4_prefill, q4_prefill, fp32=50.0):
    """One benchmarks/decode.py JSON, as far as the session reads it."""
    return {"variants": {"fp32": {"tok_s": fp32, "prefill_tok_s": 400.0, "weight_bytes_per_token": 471.9e6},
                         "int4": {"tok_s": int4, "prefill_tok_s": int4_prefill, "weight_bytes_per_token": 84.5e6}},
            "peers": {"llama_cpp": {"f32": {"tok_s": 50.0, "prefill_tok_s": 500.0, "file_mb": 472.3},
                                    "q4_0": {"tok_s": q4, "prefill_tok_s": q4_prefill, "file_mb": 71.2}}},
            "int4_vs_llamacpp_q4_0": int4 / q4, "int4_prefill_vs_llamacpp_q4_0": int4_prefill / q4_prefill,
            "fp32_vs_llamacpp_f32": fp32 / 50.0, "fp32_prefill_vs_llamacpp_f32": 400.0 / 500.0,
            "int4_vs_fp32": int4 / fp32, "read_bw_gbs": 30.0}


def test_the_table_gives_each_runs_figures_and_ratios_side_by_side(session):
    runs = [_run(200.0, 250.0, 600.0, 500.0), _run(240.0, 200.0, 500.0, 500.0)]
    lines = session.table(runs)
    int4 = next(line for line in lines if line.startswith("| int4 / Q4_0"))
    assert "| 84.5 / 71.2 |" in int4 and "| 200.0, 240.0 | 250.0, 200.0 | 0.80, 1.20 |" in int4
    assert "| 600, 500 | 500, 500 | 1.20, 1.00 |" in int4
    assert not any(line.startswith("| int8 ") for line in lines)  # a variant no run measured has no row


def test_the_targets_say_in_how_many_runs_each_is_met(session):
    runs = [_run(200.0, 250.0, 600.0, 500.0), _run(240.0, 200.0, 500.0, 500.0), _run(130.0, 120.0, 400.0, 500.0)]
    lines = session.targets(runs)
    assert "- int4 decode >= 1.0x llama.cpp Q4_0: 0.80, 1.20, 1.08 -> met in 2 of 3 runs" in lines
    assert "- int4 prefill >= 1.0x llama.cpp Q4_0: 1.20, 1.00, 0.80 -> met in 2 of 3 runs" in lines
    assert "- int4 decode >= 2.5x our fp32: 4.00, 4.80, 2.60 -> met in 3 of 3 runs" in lines
    assert not any("Q8_0" in line for line in lines)


def test_the_printed_table_comes_from_saved_json_alone(session, tmp_path, capsys):
    files = []
    for i, run in enumerate([_run(200.0, 250.0, 600.0, 500.0)]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(run))
    assert session.main(["--from-json", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "| int4 / Q4_0 |" in out and "met in 0 of 1 runs" in out


def test_the_report_names_the_kernels_an_emulated_avx2_cpu_gets(session, monkeypatch):
    monkeypatch.setitem(os.environ, "GLM130B_CPU_ISA", "avx2")
    report = session.cpu_report()
    assert report["kernel_isa"] == "avx2" and report["cores"] >= 1
    assert set(report["flags"]) <= set(session.FLAGS)


def test_a_missing_or_broken_json_file_is_one_clear_error(session, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"variants": ')  # a run killed mid-write would leave this (the tool writes atomically)
    for path in (tmp_path / "missing.json", broken):
        with pytest.raises(SystemExit) as exit_:
            session.main(["--from-json", str(path)])
        assert exit_.value.code == 2 and "not a benchmark JSON file" in capsys.readouterr().err
