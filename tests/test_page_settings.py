"""The page's request settings, run in Node (no browser needed): an empty box is left out."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources

import pytest


def settings(boxes: dict) -> dict:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    page = resources.files("glm130b.serve").joinpath("page.html").read_text(encoding="utf-8")
    fn = re.search(r"function settings\(\) \{.*?\n\}", page, re.S).group(0)
    script = f"const boxes = {json.dumps(boxes)}; const $ = (id) => ({{ value: boxes[id] }});\n{fn}\n" \
             "console.log(JSON.stringify(settings()));"
    return json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True, check=True,
                                     timeout=30).stdout)


def test_empty_boxes_send_no_value():
    assert settings({"max": "", "temp": " "}) == {"stream": True}  # before: max_tokens 0, a 400


def test_filled_boxes_are_sent_as_numbers():
    assert settings({"max": "16", "temp": "0.5"}) == {"stream": True, "max_tokens": 16, "temperature": 0.5}
