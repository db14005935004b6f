"""Base models: timm ViTs by name, and the embedded digits ViT trained here once and cached.

The base model is loaded once per process; every trial patches a deep copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

import ltmp_core
from ltmp_core import LTMPError

from .data import Splits

__all__ = ["ltmp_vit_digits", "check_model_name", "load_base_model", "train_digits_base", "cache_dir"]

DIGITS_RECIPE = dict(lr=2e-3, weight_decay=0.05, batch_size=64, label_smoothing=0.1, shift=2, version=2)


@register_model
def ltmp_vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny ViT for the embedded digits preset: 32 px, patch 4 (64 tokens), 4 blocks, width 64."""
    if pretrained:
        raise LTMPError("model: ltmp_vit_digits has no published weights; it is trained here on the digits data")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = model.default_cfg = dict(
        architecture="ltmp_vit_digits", num_classes=args["num_classes"],
        input_size=(3, args["img_size"], args["img_size"]), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        crop_pct=1.0, interpolation="bilinear",
    )
    return model


def cache_dir() -> Path:
    """Where trained base models are cached: ``$LTMP_CACHE`` or ``studies/cache`` here."""
    return Path(os.environ.get("LTMP_CACHE", "studies/cache"))


def _save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train_digits_base(
    model: nn.Module,
    data: Splits,
    epochs: int,
    seed: int,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> float:
    """Train ``model`` on the tuning split (AdamW, one-cycle, label smoothing, small random shifts).

    Returns the held-out accuracy. ``on_epoch(epoch, epochs, loss)`` reports progress.
    """
    r = DIGITS_RECIPE
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


def _digits_key(name: str, img_size: int, num_classes: int, epochs: int, seed: int, data: Splits) -> str:
    fingerprint = {
        "model": name, "img_size": img_size, "num_classes": num_classes, "epochs": epochs, "seed": seed,
        "recipe": DIGITS_RECIPE, "train": len(data.train_x), "holdout": len(data.holdout_x),
        "timm": timm.__version__.split(".")[0],
    }
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict (``.pth``/``.pt`` or ``.safetensors``) with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        raise LTMPError(f"checkpoint: no such file {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one clear line
        raise LTMPError(f"checkpoint: cannot read {path} ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = checkpoint_filter_fn(state, model) if isinstance(model, VisionTransformer) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LTMPError(
            f"checkpoint: {path} does not fit the model (missing: {', '.join(missing[:3]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:3]) or 'none'})"
        )


def check_model_name(name: str) -> None:
    """Refuse an unknown or unsupported model before anything is loaded (built on the meta device)."""
    if not timm.is_model(name):
        raise LTMPError(f"model: unknown timm model {name!r}")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    ltmp_core.check_model(model)


def load_base_model(
    name: str,
    data: Splits,
    *,
    img_size: int,
    pretrained: bool = False,
    checkpoint: str | None = None,
    base_epochs: int = 30,
    seed: int = 0,
    on_train: Callable[[int, int, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Create the base model, load or train its weights, and check ltmp_core can patch it.

    Returns the model (eval mode, weights frozen, on the CPU) and facts about it for the study
    (``source``, and ``holdout_accuracy`` when it was trained here).
    """
    kwargs = dict(num_classes=data.num_classes, img_size=img_size)
    try:
        with torch.random.fork_rng(devices=[]):  # the same initial weights in every process
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise LTMPError(f"model: unknown timm model {name!r}") from None
        raise
    ltmp_core.check_model(model)
    info: dict = {"model": name}
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        info["source"] = f"checkpoint {checkpoint}"
    elif pretrained:
        info["source"] = "timm pretrained"
    elif name == "ltmp_vit_digits":
        if data.name != "digits":
            raise LTMPError("model: ltmp_vit_digits is trained on the digits data; give --pretrained or --checkpoint")
        key = _digits_key(name, img_size, data.num_classes, base_epochs, seed, data)
        path = cache_dir() / f"{name}-{key}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["state_dict"])
            info.update(source=f"cached {path}", holdout_accuracy=float(saved["holdout_accuracy"]))
        else:
            acc = train_digits_base(model, data, base_epochs, seed, on_train)
            _save_atomic({"state_dict": model.state_dict(), "holdout_accuracy": acc}, path)
            info.update(source=f"trained here, cached at {path}", holdout_accuracy=acc)
    else:
        info["source"] = "random initialisation"
    model.eval()
    model.requires_grad_(False)
    return model, info
