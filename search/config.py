"""The resolved configuration of a study: dataclass defaults, then a preset TOML, then flags.

The resolved :class:`StudyConfig` is saved on the study (user attribute ``config``), so that a study
can be re-run exactly and a second run with the same name can tell when it would mix settings.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ltmp_core import OPS, LTMPError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["StudyConfig", "load_preset", "preset_names", "resolve", "DEFAULT_PRESET", "RESULT_FIELDS"]

DEFAULT_PRESET = "digits"
SAMPLERS = ("tpe", "nsga2", "random", "gp")
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides what a study measures.

    Attributes:
        flops: Target FLOPs ratio: measured FLOPs at most this fraction of the unreduced model's.
        flops_margin: Plans aim this fraction under the target (``flops * (1 - margin)``), because
            held-out images cost a little more or less than the calibration batch.
        preset: Name or path of the preset these values came from.
        model: timm model name of the base model.
        model_kwargs: Extra keyword arguments for ``timm.create_model`` (as timm's ``--model-kwargs``).
        pretrained: Load timm's pretrained weights for ``model``.
        checkpoint: Path of a local checkpoint for ``model``.
        data: ``digits`` (scikit-learn's bundled digits) or a folder with ``train/`` and ``val/``.
        img_size: Input size in pixels (``None``: the model's own).
        holdout: Held-out images, carved from the training images, that score every trial.
        trial_images: Cap on the images a trial tunes on (``None``: all the others).
        workers: DataLoader workers for folder data (``None``: all cores but one, at most 8).
        calib_images: Images of the calibration batch that sets the starting thresholds.
        batch_size: Images per tuning and evaluation batch.
        trial_steps: Threshold-tuning steps per trial.
        eval_every: Steps between intermediate held-out evaluations (for the pruner).
        eval_images: Held-out images used by intermediate evaluations.
        lr: Learning rate of the thresholds (Adam), in units of each threshold's score spread on the
            calibration batch.
        budget: Budget term of the tuning loss: ``layer`` (each layer against its own budget),
            ``global`` (LTMP's FLOPs ratio against the target), or ``space`` (the space's choice).
        budget_weight: Weight of the budget term in the tuning loss (strong: the budget is a constraint).
        tau: Temperature of the soft threshold masks.
        distill: Tune against the unreduced model's logits instead of the labels.
        space: Search space (``layerwise``, or a baseline: ``ltmp``, ``tome``, ``tps``).
        ops: Operations the ``layerwise`` space may choose from.
        importance: Scores prune and squeeze may use: ``mean`` (LTMP: attention received, needs the
            full attention map), ``cls`` (the class token's attention, fused attention: faster); with
            both, the search chooses per layer.
        sampler: ``tpe`` (default), ``nsga2``, ``random`` or ``gp``.
        pruner: ``median`` (default), ``hyperband`` or ``none``.
        seed: Seed of the sampler, the data order and the base model training.
        n_trials: Finished trials the study should have.
        base_epochs: Epochs of training for the embedded digits base model.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: bf16 autocast (default: on for CUDA).
        heartbeat: Seconds between a running trial's heartbeats; a trial silent for three beats is
            stale (its worker died) and is failed and retried by another worker.
    """

    flops: float = 0.35
    flops_margin: float = 0.02
    preset: str = DEFAULT_PRESET
    model: str = "ltmp_vit_digits"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    data: str = "digits"
    img_size: int | None = None
    holdout: int = 360
    trial_images: int | None = None
    workers: int | None = None
    calib_images: int = 128
    batch_size: int = 64
    trial_steps: int = 40
    eval_every: int = 20
    eval_images: int = 128
    lr: float = 0.05
    budget: str = "space"
    budget_weight: float = 1000.0
    tau: float = 0.1
    distill: bool = False
    space: str = "layerwise"
    ops: tuple[str, ...] = tuple(OPS)
    importance: tuple[str, ...] = ("mean",)
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    n_trials: int = 12
    base_epochs: int = 30
    device: str = "auto"
    amp: bool | None = None
    heartbeat: int = 60

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = list(self.ops)
        d["importance"] = list(self.importance)
        return d

    def default_study_name(self) -> str:
        """``preset[-data][-model]-space-flopsX``: what the preset implies is left out.

        With the default preset and a folder of your own, the folder's name replaces ``digits``.
        """
        preset = Path(self.preset).stem
        base = _preset_values(self.preset) if self.preset else {}
        parts = [preset]
        if self.data != base.get("data", StudyConfig.data):
            data = Path(self.data).name or "data"
            parts = [data] if preset == DEFAULT_PRESET else [preset, data]
        if self.model != base.get("model", StudyConfig.model):
            parts.append(self.model)
        parts.append(self.space)
        parts.append(f"flops{self.flops:g}")
        return "-".join(parts)


#: Fields that change what a trial measures: a study must not mix values of these.
RESULT_FIELDS = (
    "flops", "flops_margin", "model", "model_kwargs", "pretrained", "checkpoint", "data", "img_size", "holdout",
    "trial_images", "calib_images",
    "batch_size", "trial_steps", "eval_every", "eval_images", "lr", "budget", "budget_weight", "tau", "distill",
    "space", "ops", "importance", "base_epochs",
)

_TYPES: dict[str, tuple[type, ...]] = {
    "flops": (float, int), "flops_margin": (float, int), "lr": (float, int), "budget_weight": (float, int), "tau": (float, int),
    "pretrained": (bool,), "distill": (bool,), "amp": (bool, type(None)),
    "checkpoint": (str, type(None)),
    "img_size": (int, type(None)), "trial_images": (int, type(None)), "workers": (int, type(None)),
    "model_kwargs": (dict,),
}


def _check(c: StudyConfig) -> None:
    for f in fields(c):
        value = getattr(c, f.name)
        expected = _TYPES.get(f.name)
        if expected is None:
            expected = (int,) if isinstance(f.default, int) and not isinstance(f.default, bool) else (type(f.default),)
            if f.name in ("ops", "importance"):
                expected = (tuple, list)
        if isinstance(value, bool) and bool not in expected:
            raise LTMPError(f"{f.name}: expected {expected[0].__name__}, got {value!r}")
        if not isinstance(value, expected):
            raise LTMPError(f"{f.name}: expected {expected[0].__name__}, got {value!r}")
    if not (math.isfinite(c.flops) and 0.0 < c.flops <= 1.0):
        raise LTMPError(f"flops: the target FLOPs ratio must be in (0, 1], got {c.flops}")
    for name in ("img_size", "holdout", "calib_images", "batch_size", "eval_images", "n_trials", "eval_every",
                 "trial_images", "heartbeat"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise LTMPError(f"{name}: must be >= 1, got {getattr(c, name)}")
    if c.workers is not None and c.workers < 0:
        raise LTMPError(f"workers: must be >= 0, got {c.workers}")
    for key, value in c.model_kwargs.items():
        if not isinstance(key, str) or not isinstance(value, (int, float, str, bool)):
            raise LTMPError(f"model_kwargs: {key!r} must be a number, string or boolean, got {value!r}")
    for name in ("trial_steps", "base_epochs", "seed"):
        if getattr(c, name) < 0:
            raise LTMPError(f"{name}: must be >= 0, got {getattr(c, name)}")
    if not (math.isfinite(c.flops_margin) and 0.0 <= c.flops_margin < 0.5):
        raise LTMPError(f"flops_margin: must be in [0, 0.5), got {c.flops_margin}")
    for name in ("lr", "budget_weight", "tau"):
        v = getattr(c, name)
        if not (math.isfinite(v) and v >= 0) or (name == "tau" and v == 0):
            raise LTMPError(f"{name}: must be a finite {'positive' if name == 'tau' else 'non-negative'} number, got {v}")
    if not c.ops:
        raise LTMPError("ops: give at least one operation")
    for op in c.ops:
        if op not in OPS:
            raise LTMPError(f"ops: unknown operation {op!r} (choose from {', '.join(OPS)})")
    object.__setattr__(c, "ops", tuple(c.ops))
    object.__setattr__(c, "importance", tuple(c.importance))
    if not c.importance or any(i not in ("mean", "cls") for i in c.importance):
        raise LTMPError(f"importance: expected mean, cls or mean,cls, got {','.join(map(str, c.importance))!r}")
    if c.budget not in ("space", "layer", "global"):
        raise LTMPError(f"budget: expected space, layer or global, got {c.budget!r}")
    if c.sampler not in SAMPLERS:
        raise LTMPError(f"sampler: unknown sampler {c.sampler!r} (choose from {', '.join(SAMPLERS)})")
    if c.pruner not in PRUNERS:
        raise LTMPError(f"pruner: unknown pruner {c.pruner!r} (choose from {', '.join(PRUNERS)})")
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        raise LTMPError(f"device: expected auto, cpu, cuda or cuda:N, got {c.device!r}")
    from spaces import get_space

    get_space(c.space)


def preset_names() -> list[str]:
    """Presets shipped with the package (``studies/*.toml`` in the source tree)."""
    return sorted(p.name[:-5] for p in resources.files("search.presets").iterdir() if p.name.endswith(".toml"))


def _preset_text(name: str) -> tuple[str, str]:
    path = Path(name)
    if name.endswith(".toml") or path.parent != Path("."):
        try:
            return str(path), path.read_text(encoding="utf-8")
        except OSError as e:
            raise LTMPError(f"study: cannot read preset file {name} ({e.strerror or e})") from None
    resource = resources.files("search.presets") / f"{name}.toml"
    if not resource.is_file():
        raise LTMPError(f"study: unknown preset {name!r} (choose from {', '.join(preset_names())}, or give a .toml path)")
    return f"{name}.toml", resource.read_text(encoding="utf-8")


def _preset_values(name: str) -> dict[str, Any]:
    where, text = _preset_text(name)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LTMPError(f"{where}: not valid TOML ({e})") from None
    known = {f.name for f in fields(StudyConfig)} - {"preset"}
    for key, value in data.items():
        if key not in known:
            raise LTMPError(f"{where}: unknown key {key!r}")
        if isinstance(value, dict) and key != "model_kwargs":
            raise LTMPError(f"{where}: {key!r} must be a value, not a table")
    return data


def load_preset(name: str) -> StudyConfig:
    """The configuration a preset gives (dataclass defaults for keys it leaves out)."""
    values = _preset_values(name)
    where = _preset_text(name)[0]
    try:
        return StudyConfig(preset=name, **values)
    except LTMPError as e:
        raise LTMPError(f"{where}: {e}") from None


#: Preset keys that describe the preset's own model; a different ``--model`` starts without them.
MODEL_SHAPE_FIELDS = ("img_size", "model_kwargs")


def resolve(preset: str | None, overrides: Mapping[str, Any]) -> StudyConfig:
    """Preset values, then ``overrides`` (flags the user gave; ``None`` means not given).

    A preset's input size and architecture arguments were chosen for its model: when the flags name
    another model, that model runs at its own size with timm's defaults unless the flags say more
    (``--model vit_small_patch16_224`` after the digits preset runs at 224 px, not at 32).
    """
    base = load_preset(preset or DEFAULT_PRESET)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("model", base.model) != base.model:
        defaults = StudyConfig()
        for name in MODEL_SHAPE_FIELDS:
            given.setdefault(name, getattr(defaults, name))
    return replace(base, **given)


def differences(saved: Mapping[str, Any], config: StudyConfig) -> list[str]:
    """Result fields whose value differs between a study's saved configuration and ``config``."""
    now = json.loads(json.dumps(config.to_dict()))
    return [k for k in RESULT_FIELDS if k in saved and saved[k] != now.get(k)]
