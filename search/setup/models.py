"""Base models: timm ViTs by name, and the built-in ViTs of the built-in data sets.

The built-in models (:data:`BUILTIN_MODELS`) are trained by :func:`train_builtin_base` on the tune
split of their data set. ``ltmp_vit_mnist``, the embedded default, ships its weights with the
package (``search/weights/``, reproduced by ``python benchmarks/train_base.py``); any other recipe,
seed or size is trained here once and cached (``studies/cache``, or ``$LTMP_CACHE``).

The base model is loaded once per process; every trial patches a deep copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

import ltmp_core
from ltmp_core import LTMPError

from .data import Splits, StudyData

__all__ = [
    "ltmp_vit_digits", "ltmp_vit_mnist", "ltmp_vit_mnistm", "BUILTIN_MODELS", "check_model_name", "load_base_model", "load_checkpoint",
    "train_builtin_base", "cache_dir", "weights_dir",
]


@dataclass(frozen=True)
class BuiltinModel:
    """A ViT trained here on a built-in data set: its architecture and its training recipe."""

    data: str
    arch: dict[str, Any]
    recipe: dict[str, Any]


#: Built-in base models by timm name. Recipes: AdamW, one-cycle schedule, label smoothing, random shifts.
BUILTIN_MODELS = {
    # 32 px, patch 4 (64 tokens), 4 blocks, width 64: the tests' model, a minute on 2 cores.
    "ltmp_vit_digits": BuiltinModel("digits", dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                                   mlp_ratio=2.0),
                                    dict(lr=2e-3, weight_decay=0.05, batch_size=64, label_smoothing=0.1, shift=2,
                                         version=2)),
    # 32 px, patch 4 (64 tokens), DeiT's depth (12 blocks) and MLP ratio, width 64, 4 heads: the share of
    # the attention products in a block (15%) is DeiT-Ti's.
    "ltmp_vit_mnist": BuiltinModel("mnist", dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4,
                                                 mlp_ratio=4.0),
                                   dict(lr=1e-3, weight_decay=0.05, batch_size=64, label_smoothing=0.1, shift=2,
                                        version=1)),
    # MNIST-M (the same digits on photograph crops): ltmp_vit_mnist's architecture and recipe. The mnist
    # model already takes 3 input channels (its grey images are repeated to RGB), so only the data and
    # the weights differ; a name of its own keys the shipped weights to the data they were trained on.
    "ltmp_vit_mnistm": BuiltinModel("mnistm", dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4,
                                                   mlp_ratio=4.0),
                                    dict(lr=1e-3, weight_decay=0.05, batch_size=64, label_smoothing=0.1, shift=2,
                                         version=1)),
}


def _builtin_vit(name: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    if pretrained:
        raise LTMPError(f"model: {name} has no published weights; it is trained here (or shipped) on "
                        f"the {BUILTIN_MODELS[name].data} data")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(BUILTIN_MODELS[name].arch, num_classes=10)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = model.default_cfg = dict(
        architecture=name, num_classes=args["num_classes"],
        input_size=(3, args["img_size"], args["img_size"]), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        crop_pct=1.0, interpolation="bilinear",
    )
    return model


@register_model
def ltmp_vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny ViT for the digits data: 32 px, patch 4 (64 tokens), 4 blocks, width 64."""
    return _builtin_vit("ltmp_vit_digits", pretrained, kwargs)


@register_model
def ltmp_vit_mnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The embedded default's ViT: 32 px, patch 4 (64 tokens), 12 blocks, width 64, 4 heads, MLP ratio 4."""
    return _builtin_vit("ltmp_vit_mnist", pretrained, kwargs)


@register_model
def ltmp_vit_mnistm(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ltmp_vit_mnist's ViT, trained on MNIST-M (the second proxy, colour texture in every patch)."""
    return _builtin_vit("ltmp_vit_mnistm", pretrained, kwargs)


def cache_dir() -> Path:
    """Where trained base models are cached: ``$LTMP_CACHE`` or ``studies/cache`` here."""
    return Path(os.environ.get("LTMP_CACHE", "studies/cache"))


def weights_dir() -> Path:
    """Weights shipped with the package (``search/weights``): read before the cache."""
    return Path(__file__).resolve().parents[1] / "weights"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train_builtin_base(
    model: nn.Module,
    data: Splits,
    recipe: dict[str, Any],
    epochs: int,
    seed: int,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> float:
    """Train ``model`` on the tune split (AdamW, one-cycle, label smoothing, small random shifts).

    Returns the select-split accuracy. ``on_epoch(epoch, epochs, loss)`` reports progress.
    """
    r = recipe
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = data.train_x, data.train_y
    per_epoch = max(1, len(x) // r["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=max(1, epochs * per_epoch), pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        loss = torch.zeros(())
        for i in range(per_epoch):
            idx = order[i * r["batch_size"]:(i + 1) * r["batch_size"]]
            dy, dx = torch.randint(-r["shift"], r["shift"] + 1, (2,), generator=g).tolist()
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=r["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, loss.item())
    return accuracy(model, data.holdout_x, data.holdout_y)


def _builtin_key(name: str, img_size: int, num_classes: int, epochs: int, seed: int, data: Splits) -> str:
    """What decides the weights of a built-in model: a stored file is used only if all of it matches."""
    fingerprint = {
        "model": name, "img_size": img_size, "num_classes": num_classes, "epochs": epochs, "seed": seed,
        "recipe": BUILTIN_MODELS[name].recipe, "train": len(data.train_x), "holdout": len(data.holdout_x),
        "timm": timm.__version__.split(".")[0],
    }
    if name != "ltmp_vit_digits":  # the digits model's key predates the test split; its caches stay valid
        fingerprint.update(data=data.name, test=len(data.test_x))
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


SUPPORTED = f"{ltmp_core.SUPPORTED_MODELS}; and the built-in ltmp_vit_mnist, ltmp_vit_mnistm and ltmp_vit_digits"


def check_model_name(name: str, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse an unknown or unsupported model before anything is loaded; return its data config.

    The model is built on the meta device (no memory, no weights). The data config (input size,
    mean/std, crop, interpolation) is timm's ``resolve_model_data_config`` of that model.
    """
    from timm.data import resolve_model_data_config

    if not timm.is_model(name):
        raise LTMPError(f"model: unknown timm model {name!r}; supported: {SUPPORTED}")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **(model_kwargs or {}))
    except TypeError as e:
        raise LTMPError(f"model_kwargs: {name} does not take them ({e})") from None
    try:
        ltmp_core.check_model(model)
    except LTMPError as e:
        raise LTMPError(f"{e}. Supported: {SUPPORTED}") from None
    return resolve_model_data_config(model)


def _state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The weights inside a timm, DeiT or LTMP checkpoint (or a bare state dict)."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LTMPError("checkpoint: no state dict inside (expected a dict of tensors, or one under "
                        "'model', 'state_dict' or 'state_dict_ema')")
    out = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key.endswith(("_masker.threshold", ".merge_threshold", ".prune_threshold")):
            continue  # LTMP's and our learned thresholds belong to a plan, not to the weights
        out[key] = value
    return out


def _trained_plan(path: Path) -> ltmp_core.ReductionPlan | None:
    """The plan inside a model file written by ``search train`` (``None`` for other safetensors files)."""
    try:
        return ltmp_core.read_trained(path, weights=False)[1]
    except LTMPError:
        return None


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load weights from ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` into ``model``.

    Accepts timm and DeiT checkpoints (``model``/``state_dict``/EMA entries), LTMP checkpoints
    (their threshold entries are ignored) and ``search train`` model files (a plan that cuts width
    cuts ``model`` to its widths first). A checkpoint that does not fit is a clear error naming the
    first missing and unexpected keys.
    """
    p = Path(path)
    if not p.is_file():
        raise LTMPError(f"checkpoint: no such file {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(p))
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LTMPError(f"checkpoint: cannot read {path} ({reason[:200]})") from None
    state = _state_dict(raw)
    if p.suffix == ".safetensors":
        trained = _trained_plan(p)
        if trained is not None and trained.cuts_width:  # weights of a model cut to its plan's widths
            ltmp_core.prune_width(model, trained)
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    mismatch = ltmp_core.state_dict_mismatch(model, state)
    if mismatch:
        raise LTMPError(f"checkpoint: {path} does not fit {type(model).__name__} ({mismatch})")
    model.load_state_dict(state)


def _builtin_weights(model: nn.Module, name: str, data: Splits, epochs: int, seed: int,
                     on_train: Callable[[int, int, float], None] | None) -> dict[str, Any]:
    """Shipped weights, else cached ones, else trained here now (and cached) for a built-in model."""
    key = _builtin_key(name, model.patch_embed.img_size[0], data.num_classes, epochs, seed, data)
    for folder, source in ((weights_dir(), "shipped"), (cache_dir(), "cached")):
        path = folder / f"{name}-{key}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["state_dict"])
            return {"source": f"{source} {path}", "select_accuracy": float(saved["holdout_accuracy"])}
    path = cache_dir() / f"{name}-{key}.pt"
    acc = train_builtin_base(model, data, BUILTIN_MODELS[name].recipe, epochs, seed, on_train)
    saved = {"state_dict": model.state_dict(), "holdout_accuracy": acc}
    ltmp_core.write_atomic(path, lambda tmp: torch.save(saved, tmp))
    return {"source": f"trained here, cached at {path}", "select_accuracy": acc, "cached_at": str(path)}


def load_base_model(
    name: str,
    data: StudyData,
    *,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
    base_epochs: int = 30,
    seed: int = 0,
    on_train: Callable[[int, int, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Create the base model, load or train its weights, and check ltmp_core can patch it.

    Returns the model (eval mode, weights frozen, on the CPU) and facts about it for the study
    (``source``; ``select_accuracy`` for a built-in model, ``cached_at`` when it was trained here
    now; ``random_weights`` when nothing loaded weights). ``--pretrained`` needs the
    network; offline, the error names ``--checkpoint`` instead.
    """
    if not timm.is_model(name):
        raise LTMPError(f"model: unknown timm model {name!r}; supported: {SUPPORTED}")
    kwargs = dict(model_kwargs or {}, num_classes=data.num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        with torch.random.fork_rng(devices=[]):  # the same initial weights in every process
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except LTMPError:
        raise
    except Exception as e:
        if pretrained and checkpoint is None:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise LTMPError(
                f"model: could not get timm's pretrained weights for {name} ({reason}); offline, download "
                "them on a connected machine and pass the file with --checkpoint PATH"
            ) from None
        raise
    try:
        ltmp_core.check_model(model)
    except LTMPError as e:
        raise LTMPError(f"{e}. Supported: {SUPPORTED}") from None
    info: dict = {"model": name}
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        info["source"] = f"checkpoint {checkpoint}"
    elif pretrained:
        info["source"] = "timm pretrained"
    elif name in BUILTIN_MODELS and data.name == BUILTIN_MODELS[name].data:
        info.update(_builtin_weights(model, name, data, base_epochs, seed, on_train))
    else:
        info.update(source="random initialisation (no --pretrained or --checkpoint)", random_weights=True)
    model.eval()
    model.requires_grad_(False)
    return model, info
