"""tools/device_tree.sh: the shipped weights leave a lent GPU machine's copy of the tree, then come back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "device_tree.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_every_shipped_model_is_hidden_and_restored(tmp_path):
    """`hide` takes each tracked models/*/model.safetensors out of the index and ignores it (the
    files stay), other files untouched; `restore` puts them back as committed; a staged change
    elsewhere makes `hide` refuse."""
    repo = tmp_path / "repo"
    for rel in ("models/glm-small/model.safetensors", "models/glm-base/model.safetensors",
                "models/glm-small/config.json", "README.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(rel)
    tool = repo / "tools" / "device_tree.sh"
    tool.parent.mkdir()
    shutil.copy(SCRIPT, tool)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")

    def run(verb):
        return subprocess.run(["bash", str(tool), verb], cwd=repo, capture_output=True, text=True)

    assert run("hide").returncode == 0
    tracked = _git(repo, "ls-files").split()
    assert "models/glm-small/model.safetensors" not in tracked and "models/glm-base/model.safetensors" not in tracked
    assert "models/glm-small/config.json" in tracked
    assert (repo / "models/glm-base/model.safetensors").read_text() == "models/glm-base/model.safetensors"
    assert _git(repo, "check-ignore", "models/glm-base/model.safetensors").strip()  # not sent as untracked either
    assert "hidden" in run("status").stdout
    assert run("restore").returncode == 0
    assert _git(repo, "status", "--porcelain") == ""  # as committed
    assert run("status").stdout.strip() == "normal"
    (repo / "README.md").write_text("changed")
    _git(repo, "add", "README.md")
    refused = run("hide")
    assert refused.returncode == 2 and "staged" in refused.stderr
