"""The resolved configuration of a study: dataclass defaults, then a preset TOML, then flags.

:class:`StudyConfig` is the one place a setting is declared. Each field's metadata says what the
command line needs (its flag and help), whether a study may mix runs that differ in it (``result``),
whether it describes the preset's model (``shape``) and which table it must be a name of
(``choices``); the flags of ``search run`` and ``search validate``, the check of a resumed study
and the validation below are all generated from it.

The resolved configuration is saved on the study (user attribute ``config``), so that a study can be
re-run exactly and a second run with the same name can tell when it would mix settings.
"""

from __future__ import annotations

import json
import math
import sys
import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ltmp_core import IMPORTANCE, OPS, WIDTH_IMPORTANCE, LTMPError

from .budget import DEFAULT_MARGIN, Budget, check_margin, check_ratio

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "TrainSettings", "RECIPES", "train_flag",
    "StudyConfig", "load_preset", "preset_names", "resolve", "plan_config", "differences", "option_fields", "label",
    "DEFAULT_PRESET", "RESULT_FIELDS", "MODEL_SHAPE_FIELDS",
]

DEFAULT_PRESET = "mnist"


def _spaces() -> Iterable[str]:
    from spaces import SPACES

    return SPACES


def _samplers() -> Iterable[str]:
    from ..study.samplers import SAMPLERS

    return SAMPLERS


def _pruners() -> Iterable[str]:
    from ..study.samplers import PRUNERS

    return PRUNERS


def setting(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    group: str = "search",
    result: bool = True,
    shape: bool = False,
    choices: Callable[[], Iterable[str]] | None = None,
    noun: str | None = None,
    minimum: float | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A :class:`StudyConfig` field and what the command line and the checks need to know of it.

    Args:
        help: One line for ``--help`` (and the docs).
        flag: Its command-line flag; ``None``: a preset key only.
        short: A short flag beside it (``-b``).
        group: ``model`` (also a flag of ``search validate``) or ``search`` (``search run`` only).
        result: A study must not mix runs that differ in it (it changes what a trial measures).
        shape: It describes the preset's own model; a different ``--model`` starts without it.
        choices: The table its value (or each of its values) must be a key of.
        noun: What one of its values is called in an error ("unknown search space 'grid'").
        minimum: Smallest allowed value (numbers; ``None`` values are always allowed where typed so).
    """
    meta = dict(help=help, flag=flag, short=short, group=group, result=result, shape=shape, choices=choices,
                noun=noun, minimum=minimum)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides what a study measures and how it runs (see each field's help)."""

    flops: float = setting(0.35, "target FLOPs ratio: measured FLOPs at most this fraction of the unreduced "
                           "model's; or a range LO:HI (0.25:0.6) for one study over many budgets", flag="--flops",
                           minimum=0)
    flops_min: float | None = setting(None, "lower end of a range of targets (--flops LO:HI): one study with two "
                                      "objectives, top-1 up and measured FLOPs down", minimum=0)
    flops_margin: float = setting(DEFAULT_MARGIN, "plans aim this fraction under the target, for the images that "
                                  "cost more than the calibration batch", minimum=0, flag="--flops-margin")
    latency: float | None = setting(None, "target latency ratio: the plan's time over the unreduced model's on this "
                                    "device (--device) at --latency-batch, predicted by a latency model measured once "
                                    "per device and checked by timing the best plans; with --flops: both constraints",
                                    flag="--latency")
    latency_batch: int = setting(1, "images per forward that --latency is measured at", flag="--latency-batch",
                                 minimum=1)
    latency_mode: str = setting("static", "mode the plan's latency is measured in (static: fixed counts, the "
                                "deployment path; dynamic: the thresholds decide every image's counts, and the "
                                "latency is predicted from the counts they leave on the calibration images)",
                                flag="--latency-mode", choices=lambda: ("static", "dynamic"), noun="latency mode")
    latency_margin: float = setting(0.03, "plans aim this fraction under the latency target (the prediction's error)",
                                    flag="--latency-margin", minimum=0)
    stage_stride: int | None = setting(None, "the search may run a shape's reduction in only every k-th of its "
                                       "reducing blocks, k up to this (fewer stages, each cutting harder); 1: every "
                                       "block; default: with --latency (static), 3 where the device's latency model "
                                       "predicts fewer stages faster, else 1; without, 1", flag="--stage-stride",
                                       minimum=1)
    latency_reaim: int = setting(2, "after the best trials are timed, up to N of them whose measured latency lies more "
                                 "than 5% from the aim run again, their FLOPs aim solved with the prediction scaled by "
                                 "what was measured, and are timed too (0: off)", flag="--latency-reaim", result=False,
                                 minimum=0)
    latency_remeasure: bool = setting(False, "measure a latency model on this device although the study holds one "
                                      "of another device (its trials then mix devices)", flag="--latency-remeasure",
                                      result=False)
    preset: str = setting(DEFAULT_PRESET, "name or path of the preset these values came from", result=False)
    model: str = setting("ltmp_vit_digits", "timm model name", flag="--model", group="model")
    model_kwargs: dict[str, Any] = setting(help="extra arguments for timm.create_model, e.g. patch_size=8 depth=4",
                                           flag="--model-kwargs", group="model", shape=True, factory=dict)
    pretrained: bool = setting(False, "timm's pretrained weights (needs the network)", flag="--pretrained",
                               group="model")
    checkpoint: str | None = setting(None, "local weights (.pth/.pt/.safetensors; timm, DeiT or LTMP checkpoints)",
                                     flag="--checkpoint", group="model")
    random_weights: bool = setting(False, "search a model whose weights are random on purpose (timing, tests): "
                                   "no warning", flag="--random-weights", group="model", result=False)
    data: str = setting("digits", "ImageNet-layout folder (train/<class>/..., val/<class>/...), or a built-in "
                        "data set: mnist, mnistm, digits",
                        flag="--data-dir", group="model")
    img_size: int | None = setting(None, "input size in pixels (default: the model's own)", flag="--img-size",
                                   group="model", shape=True, minimum=1)
    holdout: int = setting(360, "select split: held-out images (carved from train/) that score and select the "
                           "trials", flag="--holdout", group="model", minimum=1)
    test_images: int = setting(360, "test split of a built-in data set (mnist, mnistm, digits): reported only, never "
                               "searched on (a folder's test split is val/)", flag="--test-images", group="model",
                               minimum=1)
    trial_images: int | None = setting(None, "cap on the images a trial tunes its thresholds on",
                                       flag="--trial-images", minimum=1)
    workers: int | None = setting(None, "DataLoader workers (default: cores - 1, at most 8)", flag="--workers",
                                  group="model", result=False, minimum=0)
    calib_images: int = setting(128, "images of the batch that calibrates the starting thresholds", minimum=1)
    batch_size: int = setting(64, "images per tuning and evaluation batch", flag="--batch-size", short="-b",
                              group="model", minimum=1)
    trial_steps: int = setting(40, "threshold-tuning steps per trial", flag="--trial-steps", minimum=0)
    eval_every: int = setting(20, "tuning steps between the intermediate held-out scores the pruner sees", minimum=1)
    eval_images: int = setting(128, "held-out images of an intermediate score", minimum=1)
    lr: float = setting(0.05, "threshold learning rate (Adam), in units of each threshold's score spread at "
                        "calibration", minimum=0)
    budget: str = setting("space", "budget term while tuning: layer (each layer against its budget), global "
                          "(LTMP's FLOPs term) or space (the space's choice)", flag="--budget",
                          choices=lambda: ("space", "layer", "global"), noun="budget term")
    budget_weight: float = setting(1000.0, "weight of the budget term (strong: the budget is a constraint)",
                                   minimum=0)
    tau: float = setting(0.1, "temperature of the soft threshold masks", minimum=0)
    distill: bool = setting(False, "tune against the unreduced model's logits instead of the labels",
                            flag="--distill")
    space: str = setting("layerwise", "search space", flag="--space", choices=_spaces, noun="search space")
    ops: tuple[str, ...] = setting(help="operations a space may choose from, comma-separated", flag="--ops",
                                   choices=lambda: OPS, noun="operation", factory=lambda: tuple(OPS))
    importance: tuple[str, ...] = setting(help="prune/squeeze scores: mean (LTMP), cls (class token's attention: "
                                          "fused, faster), or mean,cls (the search chooses per layer)",
                                          flag="--importance", choices=lambda: IMPORTANCE, noun="importance",
                                          factory=lambda: ("mean",))
    width_importance: str = setting("taylor", "how a plan that cuts width (--space joint) ranks the heads and MLP units "
                                    "it removes: taylor (torch-pruning's Taylor criterion on the calibration batch), "
                                    "magnitude or random", flag="--width-importance",
                                    choices=lambda: WIDTH_IMPORTANCE, noun="width importance")
    width_recovery: int = setting(30, "steps of recovery after a width cut (64 images each): the remaining norms and "
                                  "biases learn the unreduced model's predictions again, so that a trial ranks width "
                                  "cuts closer to how they train (0: none)", flag="--width-recovery", minimum=0)
    refine_top: int = setting(0, "refine stage: after the trials, the best N distinct feasible shapes on select get "
                              "--refine-steps steps of threshold tuning with the global FLOPs term, then the shared "
                              "shift re-solved for the aim; each is scored and added as its own trial (0: off)",
                              flag="--refine-top", result=False, minimum=0)
    refine_steps: int = setting(24, "threshold-tuning steps of each refined shape (--refine-top)",
                                flag="--refine-steps", result=False, minimum=1)
    sampler: str = setting("tpe", "Optuna sampler", flag="--sampler", result=False, choices=_samplers, noun="sampler")
    pruner: str = setting("median", "Optuna pruner", flag="--pruner", result=False, choices=_pruners, noun="pruner")
    seed: int = setting(0, "seed of the sampler and the data order", flag="--seed", result=False, minimum=0)
    n_trials: int = setting(12, "finished trials the study should have", flag="--n-trials", result=False,
                            minimum=1)
    base_epochs: int = setting(30, "epochs of training of the embedded digits base model", minimum=0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", flag="--device", group="model", result=False)
    amp: bool | None = setting(None, "bf16 autocast (default: on CUDA)", flag="--amp", group="model",
                               result=False)
    heartbeat: int = setting(60, "seconds between a running trial's heartbeats; a trial silent for three is "
                             "failed and retried by another worker", result=False, minimum=1)

    def __post_init__(self) -> None:
        _check(self)

    def flops_budget(self, target: float | None = None) -> Budget:
        """The study's budget (a trial of a study over a range of targets gives its own ``target``)."""
        return Budget(self.flops if target is None else target, self.flops_margin)

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
        if self.latency is None or self.flops < 1.0:
            parts.append(f"flops{self.flops:g}" if self.flops_min is None else f"flops{self.flops_min:g}-{self.flops:g}")
        if self.latency is not None:
            parts.append(f"latency{self.latency:g}-b{self.latency_batch}"
                         + ("" if self.latency_mode == "static" else f"-{self.latency_mode}"))
        return "-".join(parts)


_FIELDS: dict[str, Field] = {f.name: f for f in fields(StudyConfig)}
_HINTS = typing.get_type_hints(StudyConfig)

#: Fields that change what a trial measures: a study must not mix values of these.
RESULT_FIELDS = tuple(name for name, f in _FIELDS.items() if f.metadata["result"])

#: Preset keys that describe the preset's own model; a different ``--model`` starts without them.
MODEL_SHAPE_FIELDS = tuple(name for name, f in _FIELDS.items() if f.metadata["shape"])


def option_fields(group: str | None = None) -> list[Field]:
    """The fields that have a command-line flag (of ``group`` only, if given), in declaration order."""
    return [f for f in _FIELDS.values() if f.metadata["flag"] and (group is None or f.metadata["group"] == group)]


def label(name: str) -> str:
    """How errors name a setting: its flag where it has one, else its preset key."""
    return _FIELDS[name].metadata["flag"] or name if name in _FIELDS else name


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (tuple, list):
        return "a list of names"
    if typing.get_origin(hint) is dict:
        return "a table of values"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        args[0] if args else hint, str(hint))


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check(c: StudyConfig) -> None:
    """Types, ranges and names of every field, from the declarations; the first problem is raised."""
    for name, f in _FIELDS.items():
        value, hint, meta = getattr(c, name), _HINTS[name], f.metadata
        where = label(name)
        if not _conforms(value, hint):
            raise LTMPError(f"{where}: expected {_type_name(hint)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise LTMPError(f"{where}: must be finite, got {value}")
        if meta["minimum"] is not None and value is not None and value < meta["minimum"]:
            raise LTMPError(f"{where}: must be >= {meta['minimum']:g}, got {value}")
        if meta["choices"] is not None:
            table = list(meta["choices"]())
            for v in (value if isinstance(value, (tuple, list)) else [value]):
                if v not in table:
                    raise LTMPError(f"{where}: unknown {meta['noun']} {v!r} (choose from {', '.join(table)})")
            if isinstance(value, (tuple, list)):
                if not value:
                    raise LTMPError(f"{where}: give at least one of {', '.join(table)}")
                object.__setattr__(c, name, tuple(value))
    check_ratio(c.flops, label("flops"))
    check_margin(c.flops_margin, label("flops_margin"))
    if c.latency is not None:
        check_ratio(c.latency, label("latency"), noun="latency ratio")
        if c.flops_min is not None:
            raise LTMPError(f"{label('latency')}: not with a range of FLOPs targets (--flops LO:HI)")
        from spaces import SPACES

        if SPACES[c.space].cuts_width:
            raise LTMPError(f"{label('latency')}: not with --space {c.space}: the latency model is measured on "
                            "full-width blocks and cannot predict plans that cut heads and MLP units")
    check_margin(c.latency_margin, label("latency_margin"))
    if c.stage_stride is not None and c.stage_stride > 1:
        from spaces import SPACES

        if not SPACES[c.space].stages:
            able = ", ".join(s.name for s in SPACES.values() if s.stages)
            raise LTMPError(f"{label('stage_stride')}: --space {c.space} cannot run fewer reduction stages; "
                            f"use 1, or a space that can ({able})")
    if c.flops_min is not None and not 0.0 < c.flops_min < c.flops:
        raise LTMPError(f"{label('flops')}: a range LO:HI needs 0 < LO < HI, got {c.flops_min}:{c.flops}")
    if c.refine_top and c.flops_min is not None:
        raise LTMPError(f"{label('refine_top')}: not for a range of targets (--flops LO:HI); refine one target's study")
    if c.tau == 0:
        raise LTMPError(f"tau: must be > 0, got {c.tau}")
    for key, value in c.model_kwargs.items():
        if not isinstance(key, str) or not isinstance(value, (int, float, str, bool)):
            raise LTMPError(f"{label('model_kwargs')}: {key!r} must be a number, string or boolean, got {value!r}")
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        raise LTMPError(f"{label('device')}: expected auto, cpu, cuda or cuda:N, got {c.device!r}")


def _presets() -> Any:
    """The folder of the shipped presets: ``studies/`` beside the package when it runs from a source
    tree (on ``PYTHONPATH``, the GPU machine's way, or a second checkout beside an editable install,
    whose ``search.presets`` would point into the other checkout), else ``search.presets`` as installed."""
    source = Path(__file__).resolve().parents[2] / "studies"
    if (Path(__file__).resolve().parents[2] / "pyproject.toml").is_file() and source.is_dir():
        return source
    return resources.files("search.presets")


def preset_names() -> list[str]:
    """Presets shipped with the package (``studies/*.toml`` in the source tree)."""
    return sorted(p.name[:-5] for p in _presets().iterdir() if p.name.endswith(".toml"))


def _preset_text(name: str) -> tuple[str, str]:
    path = Path(name)
    if name.endswith(".toml") or path.parent != Path("."):
        try:
            return str(path), path.read_text(encoding="utf-8")
        except OSError as e:
            raise LTMPError(f"study: cannot read preset file {name} ({e.strerror or e})") from None
    resource = _presets() / f"{name}.toml"
    if not resource.is_file():
        raise LTMPError(f"study: unknown preset {name!r} (choose from {', '.join(preset_names())}, or give a .toml path)")
    return f"{name}.toml", resource.read_text(encoding="utf-8")


def _preset_values(name: str) -> dict[str, Any]:
    where, text = _preset_text(name)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LTMPError(f"{where}: not valid TOML ({e})") from None
    known = set(_FIELDS) - {"preset"}
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


def resolve(preset: str | None, overrides: Mapping[str, Any]) -> StudyConfig:
    """Preset values, then ``overrides`` (flags the user gave; ``None`` means not given).

    A preset's input size and architecture arguments were chosen for its model: when the flags name
    another model, that model runs at its own size with timm's defaults unless the flags say more
    (``--model vit_small_patch16_224`` after the digits preset runs at 224 px, not at 32).
    """
    base = load_preset(preset or DEFAULT_PRESET)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(_FIELDS))
    if unknown:
        raise LTMPError(f"{unknown[0]}: not a setting")
    if given.get("latency") is not None and "flops" not in given and "flops" not in _preset_values(base.preset):
        given["flops"] = 1.0  # --latency alone: the latency is the budget, FLOPs are free
    if given.get("model", base.model) != base.model:
        for name in MODEL_SHAPE_FIELDS:
            f = _FIELDS[name]
            given.setdefault(name, f.default_factory() if f.default is MISSING else f.default)
    return replace(base, **given)


def plan_config(plan: Any, preset: str | None, overrides: Mapping[str, Any]) -> StudyConfig:
    """The configuration to run ``plan`` (a :class:`ltmp_core.ReductionPlan`) with: the preset's, the
    plan's own model at the size it was searched at unless the flags name another model or size, then
    the flags (``search validate``, ``search train``)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "model" not in given and plan.model:
        given["model"] = plan.model
        if "img_size" not in given and plan.geometry is not None:
            given["img_size"] = plan.geometry.img_size[0]
    return resolve(preset, given)


def differences(saved: Mapping[str, Any], config: StudyConfig) -> list[str]:
    """Result fields whose value differs between a study's saved configuration and ``config``."""
    now = json.loads(json.dumps(config.to_dict()))
    return [k for k in RESULT_FIELDS if k in saved and saved[k] != now.get(k)]


# -- search train -------------------------------------------------------------------------------------

#: Recipes of ``search train``.
RECIPES = ("ltmp", "full")
#: ``search train --soft-form``: :data:`ltmp_core.SOFT_FORMS` or ``auto``.
TRAIN_SOFT_FORMS = ("auto", "ltmp", "project")


def train_option(default: Any = None, help: str = "", *, flag: str | None = None, short: str | None = None,
           result: bool = True) -> Any:
    """A :class:`TrainSettings` field with its flag (timm train.py's name) and help; ``result``: a resumed
    run must not change it."""
    return field(default=default, metadata=dict(help=help, flag=flag, short=short, result=result))


@dataclass(frozen=True)
class TrainSettings:
    """What ``search train`` does beyond the model and data settings; ``None``: the recipe's default."""

    recipe: str = train_option("ltmp", "ltmp (LTMP's released recipe: thresholds only, 1 epoch, SGD) or full (weights and "
                         "thresholds, AdamW, warm-up and cosine decay)", flag="--recipe")
    epochs: int | None = train_option(None, "epochs (ltmp: 1, full: 30)", flag="--epochs")
    lr: float | None = train_option(None, "learning rate: of the merge thresholds for ltmp (5e-3; prune thresholds get "
                              "LTMP's 1/1000 of it in raw units), of the weights for full (1e-4)", flag="--lr")
    opt: str | None = train_option(None, "full: timm optimizer name (adamw; e.g. momentum, sgd, lamb); ltmp always uses SGD "
                             "without momentum", flag="--opt")
    soft_form: str = train_option("auto", "what the soft (training) forward computes: ltmp (LTMP's released "
                                  "training forward; merge and prune plans in ToMe's order with raw mean-attention "
                                  "importance), project (this project's, any plan), or auto (ltmp for --recipe ltmp "
                                  "where the plan allows it, else project)", flag="--soft-form")
    threshold_lr: float | None = train_option(None, "full: learning rate of the thresholds (1e-3; relative units)",
                                        flag="--threshold-lr")
    weight_decay: float | None = train_option(None, "weight decay (ltmp: 0, full: 0.05; never on thresholds, norms, biases)",
                                        flag="--weight-decay")
    warmup_epochs: int | None = train_option(None, "epochs of linear warm-up (ltmp: 0, full: 1)", flag="--warmup-epochs")
    min_lr: float | None = train_option(None, "lowest learning rate of the cosine decay (ltmp: 0, full: 1e-6)",
                                  flag="--min-lr")
    smoothing: float = train_option(0.1, "label smoothing", flag="--smoothing")
    mixup: float = train_option(0.0, "full: Mixup alpha (0: off)", flag="--mixup")
    cutmix: float = train_option(0.0, "full: CutMix alpha (0: off)", flag="--cutmix")
    distill: bool = train_option(False, "full: distil from the unreduced model (DeiT soft distillation)", flag="--distill")
    clip_grad: float | None = train_option(None, "clip the gradient norm at this value", flag="--clip-grad")
    model_ema: bool = train_option(False, "full: keep an exponential moving average of the weights and save it",
                             flag="--model-ema")
    model_ema_decay: float = train_option(0.9998, "decay of the moving average", flag="--model-ema-decay")
    budget_weight: float = train_option(10.0, "weight of the FLOPs budget term (LTMP's lambda)", flag="--budget-weight")
    flops: float | None = train_option(None, "target FLOPs ratio (default: the plan's target)", flag="--flops")
    flops_margin: float | None = train_option(None, "aim this fraction under the target (default: the plan's, i.e. "
                                              f"its study's margin; {DEFAULT_MARGIN:g} for a plan that records none)",
                                              flag="--flops-margin")
    seed: int = train_option(0, "seed of the data order and of every random draw", flag="--seed")
    train_images: int | None = train_option(None, "train on the first N tune images only (quick runs)",
                                      flag="--train-images")
    save_every: int = train_option(100, "steps between checkpoints (also at every epoch's end)", flag="--save-every",
                             result=False)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise LTMPError(f"--recipe: expected one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.soft_form not in TRAIN_SOFT_FORMS:
            raise LTMPError(f"--soft-form: expected one of {', '.join(TRAIN_SOFT_FORMS)}, got {self.soft_form!r}")
        positive = ("epochs", "lr", "threshold_lr", "train_images", "save_every", "model_ema_decay")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LTMPError(f"{f.metadata['flag']}: must be finite, got {value}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if value < 0 or (f.name in positive and value == 0):
                    raise LTMPError(f"{f.metadata['flag']}: must be {'> 0' if f.name in positive else '>= 0'}, "
                                    f"got {value}")
        if self.flops is not None:
            check_ratio(self.flops, "--flops")
        if self.flops_margin is not None:
            check_margin(self.flops_margin, "--flops-margin")
        if self.model_ema_decay >= 1:
            raise LTMPError(f"--model-ema-decay: must be below 1, got {self.model_ema_decay}")
        if self.recipe == "ltmp":
            for name in ("mixup", "cutmix", "distill", "model_ema", "threshold_lr", "opt"):
                if getattr(self, name):
                    raise LTMPError(f"{train_flag(name)}: only for --recipe full (ltmp trains the thresholds alone)")

    def resolved(self) -> "TrainSettings":
        """The recipe's defaults filled in."""
        defaults = dict(epochs=1, lr=5e-3, weight_decay=0.0, warmup_epochs=0, min_lr=0.0) if self.recipe == "ltmp" else \
            dict(epochs=30, lr=1e-4, threshold_lr=1e-3, weight_decay=0.05, warmup_epochs=1, min_lr=1e-6, opt="adamw")
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def train_flag(name: str) -> str:
    """The flag of a :class:`TrainSettings` field."""
    return next(f.metadata["flag"] for f in fields(TrainSettings) if f.name == name)
