"""benchmarks/plan_vs_reality.py runs end to end on the CPU at a tiny shape (figures not judged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_vs_reality.py"


def test_cpu_smoke_run_reports_plan_and_peak():
    args = ["--device", "cpu", "--preset", "tiny", "--seq", "96", "--new", "8", "--bits", "16,4", "--batch", "2",
            "--training", "--train-preset", "tiny", "--train-seq", "32", "--train-batch", "2", "--json"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["device"] == "cpu" and out["tolerance"] == 0.1
    results = out["results"]
    assert [r["mode"] for r in results] == ["inference", "inference", "training"]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["plan_per_gpu_bytes"] == pytest.approx(sum(r["plan"].values()))
        assert r["compared_without_overhead"]  # on the CPU the GPU overhead line is left out
        assert r["plan_total_bytes"] == pytest.approx(r["plan_per_gpu_bytes"] - r["plan"]["overhead"])
        assert r["measured_bytes"] > 0 and r["measured"]["peak_rss_bytes"] > 0
        assert r["ratio"] == pytest.approx(r["measured_bytes"] / r["plan_total_bytes"])
        assert isinstance(r["within_10pct"], bool)
    for r in results[:2]:  # the model and the cache really are what the plan counts
        assert set(r["plan"]) == {"weights", "kv_cache", "activations", "overhead"}
        for line in ("weights", "kv_cache"):
            assert r["line_checks"][line]["real_bytes"] == r["line_checks"][line]["plan_bytes"]
    train = results[2]
    assert {"parameters", "gradients", "optimizer", "activations"} <= set(train["plan"])
    assert train["line_checks"]["optimizer"]["ratio"] == pytest.approx(1.0, rel=1e-3)
    assert len(train["measured"]["losses"]) == 2


def test_a_time_limit_on_the_parent_ends_its_running_child_too(tmp_path):
    """`timeout` sends SIGTERM to the parent only; the parent then kills the configuration it is
    measuring instead of leaving it running (on a GPU, holding memory under the next job)."""
    import os
    import signal
    import time

    args = ["--device", "cpu", "--preset", "tiny", "--seq", "96", "--new", "8", "--bits", "16,8,4", "--batch", "1,2",
            "--out", str(tmp_path / "out.json")]
    parent = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    if not children.exists():
        parent.kill()
        pytest.skip("no /proc/PID/task/PID/children here")
    deadline, child = time.monotonic() + 120, None
    while time.monotonic() < deadline and parent.poll() is None:
        pids = children.read_text().split()
        if pids:
            child = int(pids[0])
            break
        time.sleep(0.05)
    assert child is not None, "no configuration started"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    for _ in range(200):  # the child is gone (killed and reaped by the parent)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the child {child} outlived its parent")
