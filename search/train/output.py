"""The output folder of ``search train``: its files, written whole or not at all, and the check that a
new run does not overwrite another one and that ``--resume`` continues the same run."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

import ltmp_core
from ltmp_core import LTMPError

from ..setup.config import TrainSettings, train_flag as _flag

__all__ = ["LAST", "MODEL_FILE", "PLAN_FILE", "SUMMARY", "ARGS", "check_output", "summary_csv", "write_text",
           "yaml_text"]

#: Files a run writes in its output folder.
LAST, MODEL_FILE, PLAN_FILE, SUMMARY, ARGS = "last.pth", "model.safetensors", "plan.json", "summary.csv", "args.yaml"


def yaml_text(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


def write_text(path: Path, text: str) -> None:
    ltmp_core.write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def check_output(out: Path, resume: bool, args: dict[str, Any]) -> dict[str, Any] | None:
    """Check the output folder before anything is written; the checkpoint to resume from, if any.

    A folder that holds another run needs ``--resume``; ``--resume`` needs a checkpoint there written
    with the same settings (those that change what is trained).
    """
    if out.exists() and not out.is_dir():
        raise LTMPError(f"-o: {out} is a file, not a folder")
    last = out / LAST
    held = [name for name in (LAST, MODEL_FILE, ARGS) if (out / name).exists()]
    if not resume:
        if held:
            raise LTMPError(f"-o: {out} holds another run ({held[0]}); pass --resume to continue it, or choose "
                            "another folder")
        if not out.parent.is_dir():
            raise LTMPError(f"-o: no folder {out.parent} (create it first)")
        return None
    if not last.is_file():
        if (out / MODEL_FILE).is_file():
            return {"finished": True}
        raise LTMPError(f"--resume: {out} holds no checkpoint ({LAST}); start a new run without --resume")
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LTMPError(f"--resume: cannot read {last} ({str(e).strip().splitlines()[0][:160] if str(e) else e})") \
            from None
    saved = ckpt.get("args", {})
    keys = [f.name for f in fields(TrainSettings) if f.metadata["result"]] + ["plan", "config"]
    for key in keys:
        if key in saved and json.dumps(saved[key], sort_keys=True, default=str) != json.dumps(
                args.get(key), sort_keys=True, default=str):
            where = _flag(key) if key in {f.name for f in fields(TrainSettings)} else key
            raise LTMPError(f"--resume: {out} was trained with {where} = {saved[key]!r}, not {args.get(key)!r}")
    return ckpt


def summary_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
