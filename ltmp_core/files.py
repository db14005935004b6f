"""Files written whole or not at all, and whether a state dict fits a model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["write_atomic", "state_dict_mismatch"]


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(temp_path)`` beside ``path``, then rename the result onto ``path``: a reader (or a
    killed process) sees the old file or the whole new one, never a part. The temporary name keeps
    ``path``'s suffix (some writers check it). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def state_dict_mismatch(model: "nn.Module", state: Mapping[str, Any]) -> str:
    """Why ``state`` does not fit ``model`` (its first missing, unexpected and wrongly shaped keys), or
    ``""`` when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    detail = [f"missing: {', '.join(missing[:3])}" if missing else "",
              f"unexpected: {', '.join(unexpected[:3])}" if unexpected else "",
              f"wrong shape: {wrong[0]} {tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}"
              if wrong else ""]
    return "; ".join(d for d in detail if d)
