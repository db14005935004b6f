"""What a study runs on: the device, the data, the base model and the objective, set up once per process.

``search run`` and every ``--jobs`` worker process call :func:`build_objective`; ``search validate``
opens the data and the device the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ltmp_core import LTMPError

from .config import StudyConfig
from .data import BUILTIN, StudyData, load_data
from .models import check_model_name, load_base_model
from .objective import Objective, TrialHooks

__all__ = ["resolve_device", "open_data", "build_objective"]


def compile_static(model: torch.nn.Module, device: torch.device) -> Any:
    """``torch.compile`` of a model with fixed shapes (a static plan, or a stock model beside one).

    The static path is one graph (no graph breaks, no host syncs), so Inductor fuses the reducers'
    small operations around the GEMMs; on CUDA it also captures CUDA graphs ("reduce-overhead"), which
    removes the launch cost that dominates at batch 1. A new batch size compiles once more.
    """
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LTMPError(f"device: {name} was asked for, but no CUDA device is available here")
    return device


def open_data(config: StudyConfig, device: torch.device, *, holdout: bool = True) -> StudyData:
    """The study's data, with the model's own preprocessing for folders; checks the model name first.

    ``holdout=False`` carves no select split out of a folder (validation on val/ alone). A built-in
    data set is always split as configured: its test split is what remains after the select split.
    """
    from timm.data import create_transform

    if not config.data:
        raise LTMPError(
            f"data: the {Path(config.preset).stem} preset needs --data-dir DIR, a folder in ImageNet layout "
            "(DIR/train/<class>/<image>, DIR/val/<class>/<image>)"
        )
    data_config = check_model_name(config.model, config.model_kwargs)
    img_size = config.img_size or int(data_config["input_size"][-1])
    transform = None
    if config.data not in BUILTIN:
        data_config = {**data_config, "input_size": (3, img_size, img_size)}
        transform = create_transform(**data_config, is_training=False)
    carve = holdout or config.data in BUILTIN
    return load_data(
        config.data, img_size=img_size, holdout=config.holdout if carve else None, test=config.test_images,
        transform=transform,
        trial_images=config.trial_images, workers=config.workers, pin_memory=device.type == "cuda",
        mean=data_config["mean"], std=data_config["std"],
    )


def build_objective(
    config: StudyConfig,
    hooks: TrialHooks | None = None,
    on_base_epoch: Callable[[int, int, float], None] | None = None,
    artifacts: Path | None = None,
    data: StudyData | None = None,
) -> tuple[Objective, dict[str, Any], StudyData]:
    """Data, base model (loaded once; trained and cached for the digits preset) and the objective.

    With ``artifacts`` (a folder), every finished trial gets a dashboard note and pictures. ``data``:
    the study's data when the caller has opened it already.
    """
    from .dashboard import TrialRecorder

    device = resolve_device(config.device)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    if data is None:
        data = open_data(config, device)
    base, base_info = load_base_model(
        config.model, data, img_size=config.img_size, model_kwargs=config.model_kwargs,
        pretrained=config.pretrained, checkpoint=config.checkpoint, base_epochs=config.base_epochs,
        on_train=on_base_epoch,
    )
    recorder = None if artifacts is None else TrialRecorder(data, artifacts)
    return Objective(config, base, data, device=device, amp=amp, hooks=hooks, recorder=recorder), base_info, data
