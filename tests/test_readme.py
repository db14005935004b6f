"""The README's Python example runs as written (offline: random weights, a smaller batch)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has a Python example"
    code = blocks[0]
    assert "pretrained=True" in code and "randn(32" in code
    code = code.replace("pretrained=True", "pretrained=False").replace("(32", "(2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "plan.json").exists()
    assert namespace["macs"] < 4.6e9 and namespace["loss"].requires_grad


def test_readme_names_the_test_command_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command" in text and "test-command" in ci
