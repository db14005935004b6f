"""The setup every command shares: configuration -> device and amp -> data -> base model -> width cut.

``search run`` (each trial), ``search validate``, ``search train`` and ``search bench`` start from one
:class:`Workbench` (``bench`` from :func:`runtime` alone: it times random images on random weights), so
the device, autocast, preprocessing, base weights and the replay of a plan's width cut follow the same
defaults everywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from .config import StudyConfig
from .data import BUILTIN, StudyData, load_data
from .models import check_model_name, load_base_model
from .width import WidthCut, cut_width, width_cut_for

__all__ = ["Workbench", "resolve_device", "runtime", "open_data"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LTMPError(f"device: {name} was asked for, but no CUDA device is available here")
    return device


def runtime(device: str | torch.device, amp: bool | None) -> tuple[torch.device, bool]:
    """The device and whether bf16 autocast is on (``amp=None``: on CUDA, not elsewhere)."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return dev, amp if amp is not None else dev.type == "cuda"


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


@dataclass
class Workbench:
    """A configuration set up: where it runs, its data and its base model (on the device, in eval mode).

    Attributes:
        config: The configuration.
        device: Where everything runs.
        amp: bf16 autocast.
        data: The data, with its tune, select and test splits.
        base: The unreduced base model.
        info: Where the base model's weights came from (``source``, ``random_weights``, ...).
        geometry: The base model's geometry (of the unreduced model, also after :meth:`reduced` cut the
            base model itself).
    """

    config: StudyConfig
    device: torch.device
    amp: bool
    data: StudyData
    base: nn.Module
    info: dict[str, Any]
    geometry: ltmp_core.ViTGeometry

    @classmethod
    def open(
        cls,
        config: StudyConfig,
        *,
        device: torch.device | None = None,
        data: StudyData | None = None,
        holdout: bool = True,
        before_weights: Callable[[StudyData], None] | None = None,
        on_base_epoch: Callable[[int, int, float], None] | None = None,
    ) -> "Workbench":
        """Set ``config`` up.

        Args:
            device: Use this device instead of ``config.device`` (a rank's own GPU).
            data: The data when the caller has opened it already.
            holdout: Carve the select split out of a folder's ``train/`` (``False``: validation on
                ``val/`` alone).
            before_weights: Checks that need the data but must fail before any weights load.
            on_base_epoch: Progress of training a built-in base model that is not cached yet.
        """
        dev, amp = runtime(device or config.device, config.amp)
        if data is None:
            data = open_data(config, dev, holdout=holdout)
        if before_weights is not None:
            before_weights(data)
        base, info = load_base_model(
            config.model, data, img_size=config.img_size, model_kwargs=config.model_kwargs,
            pretrained=config.pretrained, checkpoint=config.checkpoint, base_epochs=config.base_epochs,
            on_train=on_base_epoch,
        )
        return cls(config, dev, amp, data, base.to(dev).eval(), info, ltmp_core.ViTGeometry.from_model(base))

    def width_cut(self, plan: ReductionPlan) -> WidthCut:
        """How ``plan``'s width is cut: as its record says, else as this configuration's study would."""
        return WidthCut.of(plan, width_cut_for(self.config))

    def cut(self, model: nn.Module, plan: ReductionPlan, *, teacher: nn.Module | None = None) -> ReductionPlan:
        """Cut ``model`` (the base model or a copy) to ``plan``'s widths as its trial did; the plan with the
        cut recorded (unchanged for a plan that keeps every width)."""
        return cut_width(model, plan, self.data, self.width_cut(plan), device=self.device, amp=self.amp,
                         teacher=teacher)

    def reduced(self, plan: ReductionPlan, mode: str, *, fresh: bool = True,
                teacher: nn.Module | None = None) -> tuple[nn.Module, ReductionPlan]:
        """The base model (a copy unless ``fresh=False``) cut to ``plan``'s widths and patched with it, on
        the device; and the plan as applied (its width cut recorded)."""
        model = copy.deepcopy(self.base) if fresh else self.base
        plan = self.cut(model, plan, teacher=teacher)
        ltmp_core.apply_plan(model, plan, mode=mode)
        return model.to(self.device), plan  # the thresholds the plan added join the device too
