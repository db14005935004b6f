"""What the benchmark scripts share: the `search` command of this environment, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def search(*args: str, cwd: Path) -> str:
    """``search ARGS`` in ``cwd`` (the executable beside this Python); its stdout, or exit with its stderr."""
    exe = Path(sys.executable).with_name("search")
    done = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"search {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout
