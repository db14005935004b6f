"""ImageNet-layout folders, checkpoints and `search validate`, on PNG files generated here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import ltmp_core
from tests.search.helpers import cli
from ltmp_core import LTMPError
from search.setup.data import FolderData
from search.setup.models import load_base_model, load_checkpoint
from search.setup.workbench import open_data
from search.setup.config import resolve

TINY = ["--model", "vit_small_patch16_224", "--model-kwargs", "patch_size=8", "depth=4", "embed_dim=48",
        "num_heads=3", "--img-size", "32", "--workers", "0"]
KWARGS = dict(patch_size=8, depth=4, embed_dim=48, num_heads=3)
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]




def make_folder(root: Path, train: int = 20, val: int = 5, corrupt: bool = True) -> Path:
    """Three classes of 40x40 PNGs (noisy solid colours) in train/ and val/, plus one corrupt file."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, colour in enumerate(COLOURS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(0, 40, (40, 40, 3)) + colour, 0, 255).astype("uint8")
                Image.fromarray(pixels).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "class1" / "broken.png").write_bytes(b"this is not an image")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images") / "data")


@pytest.fixture(scope="module")
def study(folder, tmp_path_factory):
    """A 3-trial search over the folder with a tiny random ViT at 32 px."""
    work = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{work / 'folder.db'}"
    code, out, err = cli("run", "--flops", "0.5", "--data-dir", str(folder), *TINY, "--holdout", "15", "--flops-margin", "0.1",
                         "--n-trials", "3", "--trial-steps", "3", "-b", "16", "--storage", url, "--study-name", "f",
                         "--quiet")
    assert code == 0, err
    return url, work, out, err


def test_search_over_a_folder_scores_trials_on_the_holdout(study):
    url, _, _, err = study
    s = optuna.load_study(study_name="f", storage=url)
    done = s.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) >= 1
    for t in done:
        # top-1 over exactly the 15 held-out images: a count of them over 15
        assert t.value * 15 == pytest.approx(round(t.value * 15), abs=1e-9)
        # tokens were removed: after each block at most as many as before it, from 1 + 16 patches (32 px,
        # patch 8), at least the class token and one patch; the FLOPs went down with them
        kept = [17.0, *t.user_attrs["kept_tokens"]]
        assert len(kept) == 5 and all(a >= b >= 2 for a, b in zip(kept, kept[1:])) and kept[-1] < 17
        assert 0 < t.user_attrs["flops_ratio"] < 0.75
    assert s.user_attrs["config"]["holdout"] == 15
    # The corrupt file was skipped, counted and named; the run went on.
    assert "skipped 1 unreadable image" in err and "broken.png" in err
    # The random weights were named up front, once (no --pretrained, --checkpoint or --random-weights).
    assert err.count("searched with random weights") == 1 and "--random-weights" in err
    import optuna_dashboard

    from tests.search.test_dashboard import wsgi_get

    note = json.loads(wsgi_get(optuna_dashboard.wsgi(optuna.storages.RDBStorage(url)), f"/api/studies/{s._study_id}")[2])
    assert "Warning: the base model has random weights" in note["note"]["body"]
    assert [Path(p).name for p in s.user_attrs["skipped_images"]] == ["broken.png"]


def test_default_study_name_names_the_folder(folder):
    config = resolve(None, {"data": str(folder), "model": "deit_tiny_patch16_224"})
    assert config.default_study_name() == "data-deit_tiny_patch16_224-structured-flops0.35"


def test_validate_reproduces_the_trial_on_the_holdout(study):
    url, work, _, _ = study
    plan = work / "plan.json"
    code, out, err = cli("export", "f", "--storage", url, "-o", str(plan), "--json")
    assert code == 0, err
    trial = json.loads(out)["trial"]
    s = optuna.load_study(study_name="f", storage=url)
    recorded = s.trials[trial]
    data_dir = s.user_attrs["config"]["data"]
    code, out, err = cli("validate", str(plan), "--data-dir", data_dir, *TINY, "--holdout", "15", "--split", "holdout",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["top1"] == recorded.value
    assert result["flops_ratio"] == pytest.approx(recorded.user_attrs["flops_ratio"], rel=1e-12)
    assert result["images"] + len(result["skipped_images"]) == 15 and result["mode"] == "dynamic"
    code, out, err = cli("validate", str(plan), "--data-dir", data_dir, *TINY, "--json")
    val = json.loads(out)
    assert code == 0 and val["split"] == "test" and val["images"] == 15 and 0 <= val["top5"] <= 1
    assert val["top5"] >= val["top1"] and val["geometry_note"] is None
    # The static plan compiled (one graph, Inductor) predicts as the eager static plan.
    static = [cli("validate", str(plan), "--data-dir", data_dir, *TINY, "--mode", "static", "--json", *extra)
              for extra in ([], ["--compile"])]
    assert [c for c, _, _ in static] == [0, 0], static[1][2]
    eager, compiled = (json.loads(o) for _, o, _ in static)
    assert compiled["top1"] == eager["top1"] and compiled["flops_ratio"] == eager["flops_ratio"]
    # Without --model and --img-size: the plan's own model at the size it was searched at (32 px),
    # not the default preset's; another size still runs, with a warning naming both grids.
    no_size = [a for a in TINY if a not in ("--img-size", "32", "--model", "vit_small_patch16_224")]
    code, out, err = cli("validate", str(plan), "--data-dir", data_dir, *no_size, "--json")
    assert code == 0, err
    assert json.loads(out)["flops_ratio"] == val["flops_ratio"] and json.loads(out)["top1"] == val["top1"]
    code, out, err = cli("validate", str(plan), "--data-dir", data_dir, *no_size, "--img-size", "48")
    assert code == 0, err
    assert "searched on 16 patches (32 px)" in err and "36 (48 px)" in err


def test_another_model_does_not_inherit_the_presets_input_size(folder):
    default = resolve(None, {})
    assert default.img_size == 32  # the default preset's size, for its own model
    other = resolve(None, {"data": str(folder), "model": "vit_small_patch16_224"})
    assert other.img_size is None and other.model_kwargs == {}  # the model's own 224 px
    sized = resolve(None, {"model": "vit_small_patch16_224", "img_size": 64, "model_kwargs": {"depth": 4}})
    assert sized.img_size == 64 and sized.model_kwargs == {"depth": 4}
    # A built-in model named with the default preset keeps the size it was built for.
    from search.setup.models import check_model_name

    other_builtin = resolve(None, {"model": "ltmp_vit_digits"})
    assert other_builtin.img_size is None  # its own size, which is 32 px:
    assert check_model_name("ltmp_vit_digits", {})["input_size"][-1] == 32
    assert resolve("digits", {}).img_size == 32


def test_holdout_is_balanced_disjoint_and_the_same_every_time(folder):
    def data(**kw):
        return FolderData(folder, transform=lambda img: torch.zeros(3, 8, 8), holdout=9, **kw)

    a, b = data(), data(trial_images=10)
    assert torch.equal(a.holdout_index, b.holdout_index)
    assert not set(a.holdout_index.tolist()) & set(a.train_index.tolist())
    assert len(a.train_index) + len(a.holdout_index) == len(a.samples) == 61
    labels = torch.tensor([a.samples[i][1] for i in a.holdout_index.tolist()])
    assert torch.bincount(labels).tolist() == [3, 3, 3]
    assert len(b.tune_index) == 10 and set(b.tune_index.tolist()) <= set(b.train_index.tolist())


def test_folder_batches_follow_the_models_preprocessing(tmp_path):
    """Images of one solid colour each: whatever the resize and crop, every pixel the model gets is that
    colour normalised with the model's own mean and std (vit_small_patch16_224: 0.5 and 0.5), worked
    out here by hand. Raw [0, 1] pixels or ImageNet's mean and std give other numbers."""
    root = tmp_path / "solid"
    for split in ("train", "val"):
        for c, colour in enumerate(COLOURS):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), colour).save(root / split / f"class{c}" / f"{i}.png")
    config = resolve(None, {"data": str(root), "model": "vit_small_patch16_224", "model_kwargs": KWARGS,
                            "img_size": 32, "holdout": 3, "workers": 0})
    data = open_data(config, torch.device("cpu"))
    # (200, 40, 40) -> (200/255 - 0.5) / 0.5 = 0.5686, (40/255 - 0.5) / 0.5 = -0.6863
    expected = torch.tensor([[(v / 255 - 0.5) / 0.5 for v in colour] for colour in COLOURS])
    assert expected[0].tolist() == pytest.approx([0.5686, -0.6863, -0.6863], abs=1e-4)

    def check(x: torch.Tensor, y: torch.Tensor) -> None:
        assert x.shape == (len(y), 3, 32, 32) and y.dtype == torch.long
        torch.testing.assert_close(x, expected[y][:, :, None, None].expand_as(x), rtol=0, atol=1e-6)

    x, y = next(data.train_batches(8, seed=0))
    check(x, y)
    for x, y in [*data.holdout_batches(2), *data.test_batches(5)]:
        check(x, y)
    calib = data.calibration_batch(6)
    assert calib.shape == (6, 3, 32, 32)
    nearest = (calib[:, None] - expected[None, :, :, None, None]).abs().amax(dim=(2, 3, 4)).min(dim=1).values
    assert (nearest <= 1e-6).all(), nearest


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "no such folder"),
        ("no_train", "has no train/ folder"),
        ("empty", "holds no images"),
        ("one_class", "1 class folder"),
    ],
)
def test_wrong_layout_is_a_clear_error(tmp_path, layout, message):
    root = tmp_path / "d"
    if layout == "no_train":
        (root / "val" / "a").mkdir(parents=True)
    elif layout == "empty":
        (root / "train" / "a").mkdir(parents=True)
    elif layout == "one_class":
        make_folder(root, train=5, val=0, corrupt=False)
        for c in (1, 2):
            for f in (root / "train" / f"class{c}").iterdir():
                f.unlink()
            (root / "train" / f"class{c}").rmdir()
    code, out, err = cli("run", "--flops", "0.5", "--data-dir", str(root), *TINY, "--storage",
                         f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2 and message in err and err.count("\n") == 1
    if layout != "missing":
        assert "ImageNet layout" in err
    assert not (tmp_path / "x.db").exists()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=3, img_size=32, **KWARGS).eval()


@pytest.mark.parametrize("style", ["timm", "deit", "ltmp", "ddp", "safetensors"])
def test_checkpoint_round_trip_gives_the_same_logits(tiny, tmp_path, folder, style):
    state = tiny.state_dict()
    path = tmp_path / ("w.safetensors" if style == "safetensors" else "w.pth")
    if style == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif style == "deit":
        torch.save({"model": state, "epoch": 3}, path)
    elif style == "ltmp":  # LTMP's checkpoints carry their learned thresholds: they are not weights
        torch.save({"state_dict": {**state, "blocks.0.merge_masker.threshold": torch.tensor([0.9])}}, path)
    elif style == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    config = resolve(None, {"data": str(folder), "model": "vit_small_patch16_224", "model_kwargs": KWARGS,
                            "img_size": 32, "holdout": 9, "workers": 0})
    data = open_data(config, torch.device("cpu"))
    model, info = load_base_model("vit_small_patch16_224", data, img_size=32, model_kwargs=KWARGS,
                                  checkpoint=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny(x), rtol=0, atol=0)
    assert info["source"] == f"checkpoint {path}"


def test_wrong_checkpoint_is_a_clear_error(tiny, tmp_path):
    other = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              depth=2, embed_dim=48, num_heads=3)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(LTMPError, match=r"does not fit VisionTransformer \(missing: blocks\.2\."):
        load_checkpoint(tiny, str(tmp_path / "other.pth"))
    wide = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             depth=4, embed_dim=64, num_heads=4)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(LTMPError, match="wrong shape"):
        load_checkpoint(tiny, str(tmp_path / "wide.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01junk")
    with pytest.raises(LTMPError, match="cannot read"):
        load_checkpoint(tiny, str(tmp_path / "junk.pth"))
    with pytest.raises(LTMPError, match="no such file"):
        load_checkpoint(tiny, str(tmp_path / "none.pth"))


def test_pretrained_offline_names_checkpoint(folder, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = cli("run", "--flops", "0.5", "--data-dir", str(folder), "--model", "deit_tiny_patch16_224",
                         "--pretrained", "--img-size", "32", "--workers", "0", "--holdout", "9",
                         "--storage", f"sqlite:///{tmp_path / 'p.db'}")
    assert code == 2 and err.count("\n") == 1
    assert "pretrained weights for deit_tiny_patch16_224" in err and "--checkpoint" in err
    assert not (tmp_path / "p.db").exists()


def test_run_with_a_bad_checkpoint_writes_no_database(folder, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01junk")
    code, _, err = cli("run", "--flops", "0.5", "--data-dir", str(folder), *TINY, "--holdout", "15",
                       "--checkpoint", str(tmp_path / "junk.pth"), "--storage", f"sqlite:///{tmp_path / 'c.db'}")
    assert code == 2 and err.count("\n") == 1 and "cannot read" in err
    assert not (tmp_path / "c.db").exists()


def test_unsupported_model_lists_the_supported_families(tmp_path):
    code, _, err = cli("run", "--model", "convnext_atto", "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2 and "Supported:" in err and "deit_*" in err


@pytest.mark.benchmark  # torch.compile takes about a minute on 2 CPU cores
def test_compiled_static_plan_gives_the_same_logits_and_counts(tiny):
    plan = ltmp_core.make_plan(tiny, op=["merge+prune", "squeeze", "merge", "prune"], keep=0.7)
    ltmp_core.apply_plan(tiny, plan, mode="static")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = tiny(x)
        compiled = torch.compile(tiny, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert ltmp_core.token_counts(tiny)[:, 0].tolist() == [17.0] + [1.0 + n for n in plan.static_counts()]


def test_random_weights_on_purpose_are_searched_without_a_warning(folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = cli("run", "--flops", "0.5", "--data-dir", str(folder), *TINY, "--holdout", "15", "--n-trials", "1",
                       "--trial-steps", "0", "--random-weights", "--storage", url, "--study-name", "r", "--quiet")
    assert code == 0, err
    assert "random weights" not in err
    base = optuna.load_study(study_name="r", storage=url).user_attrs["base"]
    assert base["source"].startswith("random initialisation")
