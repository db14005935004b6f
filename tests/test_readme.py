"""The README's Python example runs as written (offline: random weights, a smaller batch)."""

from __future__ import annotations

import re
import subprocess
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
    import ltmp_core

    assert ltmp_core.block_widths(namespace["narrow"]) == [(6, 1536)] * 6 + [(4, 768)] * 6
    assert ltmp_core.get_mode(namespace["narrow"]) == "static"


def ci_command(marker: str, readme: Path = README) -> str:
    """The line .ci/run takes from ``readme`` after ``marker``: its own awk program, run on the file."""
    ci = (README.parent / ".ci" / "run").read_text()
    program = re.search(r"awk '(.*?)' README\.md", ci).group(1).replace("test-command", marker)
    return subprocess.run(["awk", program, str(readme)], capture_output=True, text=True, check=True).stdout.strip()


def test_ci_runs_the_readme_test_command_and_the_main_command_is_the_search():
    venv = "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'"
    assert ci_command("test-command") == f"{venv} && .venv/bin/python -m pytest"
    assert ci_command("main-command") == f"{venv} && .venv/bin/search run --flops 0.35"


def test_ci_finds_the_command_inside_the_fence_only(tmp_path):
    fake = tmp_path / "README.md"
    fake.write_text("<!-- test-command -->\nprose\n```bash\necho one\n```\n```bash\necho two\n```\n")
    assert ci_command("test-command", fake) == "echo one"
