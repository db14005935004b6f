"""Base models: timm ViTs by name, and the embedded digits ViT trained here once and cached.

The base model is loaded once per process; every trial patches a deep copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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

__all__ = ["ltmp_vit_digits", "check_model_name", "load_base_model", "load_checkpoint", "train_digits_base", "cache_dir"]

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


SUPPORTED = (
    "timm VisionTransformer models built from timm's pre-norm Block and Attention: deit_*, "
    "deit3_*, vit_* (including register-token and qk_norm variants) and ltmp_vit_digits"
)


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


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load weights from ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` into ``model``.

    Accepts timm and DeiT checkpoints (``model``/``state_dict``/EMA entries) and LTMP checkpoints
    (their threshold entries are ignored). A checkpoint that does not fit is a clear error naming the
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
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = [f"missing: {', '.join(missing[:3])}" if missing else "",
                  f"unexpected: {', '.join(unexpected[:3])}" if unexpected else "",
                  f"wrong shape: {wrong[0]} {tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}"
                  if wrong else ""]
        raise LTMPError(f"checkpoint: {path} does not fit {type(model).__name__} "
                        f"({'; '.join(d for d in detail if d)})")
    model.load_state_dict(state)


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
    (``source``, and ``holdout_accuracy`` when it was trained here). ``--pretrained`` needs the
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
    elif name == "ltmp_vit_digits" and data.name == "digits":
        key = _digits_key(name, model.patch_embed.img_size[0], data.num_classes, base_epochs, seed, data)
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
        info["source"] = "random initialisation (no --pretrained or --checkpoint)"
    model.eval()
    model.requires_grad_(False)
    return model, info
