"""`search train`: a plan to a trained model on the embedded MNIST default, checked against what the
file holds, what `search validate` says of it, a resumed run, two gloo processes, and a torch.export
program loaded with torch alone."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ltmp_core
from search.setup.models import ltmp_vit_mnist
from search.train.loop import epoch_steps
from tests.search.helpers import cli

#: A short run: 300 of the 3,000 tune images in batches of 50 (6 steps an epoch).
QUICK = ("--train-images", "300", "-b", "50")


def _base() -> torch.nn.Module:
    import search.setup.models as models

    model = ltmp_vit_mnist()
    weights = next(models.weights_dir().glob("ltmp_vit_mnist-*.pt"))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["state_dict"])
    return model.eval()


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    """A merge+prune plan for the shipped MNIST model at 0.5 of the FLOPs, without thresholds (train
    calibrates them) and without a target (train reads the plan's predicted ratio)."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    model = _base()
    g = ltmp_core.ViTGeometry.from_model(model)
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * g.depth, [1.0] * g.depth, g, 0.5)
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=keeps, importance="cls", model_name="ltmp_vit_mnist")
    ltmp_core.save_plan(plan, path)
    return path


@pytest.fixture(scope="module")
def trained(plan_file, tmp_path_factory) -> tuple[Path, dict]:
    """LTMP's recipe on :func:`plan_file` for two epochs (its rate schedule shows from the second on)."""
    out = tmp_path_factory.mktemp("run") / "out"
    code, text, err = cli("train", str(plan_file), "-o", str(out), *QUICK, "--epochs", "2", "--json")
    assert code == 0, err
    return out, json.loads(text)


def test_ltmp_recipe_trains_the_thresholds_alone_and_writes_whole_outputs(trained, plan_file):
    out, result = trained
    assert sorted(p.name for p in out.iterdir()) == ["args.yaml", "model.safetensors", "plan.json", "plan_start.json",
                                                     "summary.csv"], "the resume checkpoint goes once the run is whole"
    weights = load_file(str(out / "model.safetensors"))
    base = _base().state_dict()
    assert set(weights) == set(base), "the file holds the stock timm weights, without thresholds"
    assert all(torch.equal(weights[k], base[k]) for k in base), "LTMP's recipe does not touch the weights"
    _, plan, facts = ltmp_core.read_trained(out / "model.safetensors")
    thresholds = [layer.merge_threshold for layer in plan.layers]
    assert all(t is not None and 0 <= t <= 1 for t in thresholds), "learned, clamped to [0, 1] as LTMP does"
    assert facts["recipe"] == "ltmp" and facts["soft_form"] == "project" and facts["steps"] == 12 and facts["test_top1"] == result["test_top1"]
    target = ltmp_core.plan_flops_ratio(ltmp_core.load_plan(plan_file))
    assert result["target_flops_ratio"] == pytest.approx(target)
    assert result["test_flops_ratio"] <= target and result["select_flops_ratio"] <= target
    assert result["test_top1"] > 0.9, "a trained MNIST model at half the FLOPs still reads digits"
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 2 and {"epoch", "train_loss", "budget_term", "eval_top1", "eval_top5", "eval_flops_ratio",
                                "lr"} <= set(rows[0])
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["recipe"] == "ltmp" and args["epochs"] == 2 and args["lr"] == 5e-3 and args["weight_decay"] == 0.0
    assert ltmp_core.load_plan(out / "plan.json").layers == plan.layers


def test_validate_of_the_file_equals_the_end_of_training(trained):
    out, result = trained
    code, text, err = cli("validate", str(out / "model.safetensors"), "--json")
    assert code == 0, err
    v = json.loads(text)
    assert v["images"] == 1000 and v["weights"] == f"checkpoint {out / 'model.safetensors'}"
    assert v["top1"] == result["test_top1"] and v["top5"] == result["test_top5"]
    assert v["flops_ratio"] == pytest.approx(result["test_flops_ratio"], rel=1e-12)
    assert v["base_top1"] == result["base_test_top1"]


def test_load_trained_applies_plan_and_weights_in_one_call(trained):
    out, _ = trained
    model = ltmp_core.load_trained(out / "model.safetensors", ltmp_vit_mnist(), mode="dynamic")
    _, plan, _ = ltmp_core.read_trained(out / "model.safetensors", weights=False)
    by_hand = ltmp_core.apply_plan(_base(), plan, mode="dynamic")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), by_hand(x)), "the LTMP recipe kept the base weights; the plan is the file's"
    with pytest.raises(ltmp_core.LTMPError, match="do not fit"):
        ltmp_core.load_trained(out / "model.safetensors", ltmp_vit_mnist(depth=4))


def test_export_model_runs_with_torch_alone_at_another_batch_size(trained, tmp_path):
    out, _ = trained
    program = tmp_path / "model.pt2"
    code, text, err = cli("export-model", str(out / "model.safetensors"), "--static", "-o", str(program), "--json")
    assert code == 0, err
    facts = json.loads(text)
    assert facts["dynamic_batch"] and facts["flops_ratio"] <= json.loads(
        (out / "plan.json").read_text())["meta"]["trained"]["aim"] + 1e-9
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys\n"
        "for name in ('timm', 'ltmp_core', 'search', 'spaces'):\n"
        "    sys.modules[name] = None  # importing any of them fails: the program needs torch alone\n"
        "import torch\n"
        f"m = torch.export.load({str(program)!r}).module()\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    from search.deploy.program import load_trained_model

    with torch.no_grad():
        expected = load_trained_model(out / "model.safetensors", "static")(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-5)
    code, _, err = cli("export-model", str(out / "model.safetensors"), "-o", str(tmp_path / "other.pt2"))
    assert code == 2 and "--static" in err and not (tmp_path / "other.pt2").exists()
    code, _, err = cli("export-model", str(out / "model.safetensors"), "--static", "-o", str(program))
    assert code == 2 and "--force" in err


def test_bench_reads_the_plan_of_a_trained_file(trained, tmp_path):
    out, _ = trained
    code, text, err = cli("bench", str(out / "model.safetensors"), "-b", "2", "--runs", "1", "--warmup", "0",
                          "--storage", f"sqlite:///{tmp_path}/b.db", "--json")
    assert code == 0, err
    row = json.loads(text.splitlines()[0])
    assert row["model"] == "ltmp_vit_mnist" and row["mode"] == "static" and row["batch"] == 2


def test_bad_input_is_one_line_and_writes_nothing(plan_file, trained, tmp_path):
    out, _ = trained
    fresh = tmp_path / "fresh"
    cases = [
        (("--model", "deit_tiny_patch16_224"), "--model: the plan was searched on ltmp_vit_mnist"),
        (("--img-size", "64"), "plan: searched on 12 blocks and 64 patches"),
        (("--checkpoint", str(plan_file)), "checkpoint:"),
        (("--mixup", "0.8"), "--mixup: only for --recipe full"),
        (("--recipe", "fast"), "--recipe: expected one of ltmp, full"),
        (("--epochs", "0"), "--epochs: must be > 0"),
        (("--resume",), "--resume: "),
    ]
    for flags, message in cases:
        code, _, err = cli("train", str(plan_file), "-o", str(fresh), *QUICK, *flags)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not fresh.exists(), flags
    code, _, err = cli("train", str(plan_file), "-o", str(out), *QUICK)
    assert code == 2 and "holds another run" in err and "--resume" in err
    code, _, err = cli("train", str(plan_file), "-o", str(out), *QUICK, "--resume")
    assert code == 2 and "finished run" in err


def test_epoch_batches_of_the_ranks_make_up_the_global_batch():
    one = epoch_steps(103, 20, seed=3, epoch=2)
    two = [epoch_steps(103, 20, seed=3, epoch=2, rank=r, world=2) for r in range(2)]
    assert len(one) == 5 and all(len(b) == 20 for b in one)
    for s, batch in enumerate(one):
        assert torch.equal(torch.cat([two[0][s], two[1][s]]), batch)
    assert not torch.equal(torch.cat(one), torch.cat(epoch_steps(103, 20, seed=3, epoch=3))), "a new order per epoch"


def _train_cmd(plan: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "search", "train", str(plan), "-o", str(out), "--quiet", "--recipe", "full",
            "--epochs", "2", *QUICK, "--save-every", "2", *extra]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LTMP_CACHE": str(tmp / "cache")}


def test_resume_after_sigkill_ends_with_the_weights_of_an_uninterrupted_run(plan_file, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_train_cmd(plan_file, whole), check=True, env=_env(tmp_path), timeout=300, capture_output=True)
    proc = subprocess.Popen(_train_cmd(plan_file, cut), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (cut / "last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(cut / "last.pth", weights_only=True)["step"]
    assert 0 < step < 12 and not (cut / "model.safetensors").exists(), "killed mid-run: the checkpoint is whole"
    done = subprocess.run(_train_cmd(plan_file, cut, "--resume", "--json"), env=_env(tmp_path), timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed_at"] == step
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "bitwise the same weights"
    assert any(not torch.equal(a[k], v) for k, v in _base().state_dict().items()), "the full recipe trains weights"
    pa = ltmp_core.read_trained(whole / "model.safetensors", weights=False)[1]
    pb = ltmp_core.read_trained(cut / "model.safetensors", weights=False)[1]
    assert pa.layers == pb.layers
    assert (whole / "summary.csv").read_text().count("\n") == (cut / "summary.csv").read_text().count("\n") == 3


def test_two_gloo_processes_train_as_one_with_the_same_global_batch(plan_file, tmp_path):
    """DDP averages the gradients of two halves of every batch, and the budget term squares the whole
    batch's FLOPs ratio (averaged over the ranks), so the runs differ by rounding only: weights within 1e-6
    after 6 steps that moved them by more than 1e-3, thresholds (behind steep sigmoid masks) within 1e-5. SGD with momentum (timm's ``momentum``) keeps those differences as small as the gradients' (Adam
    turns a rounding difference in a near-zero gradient into a step of the full learning rate)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--recipe", "full", "--opt", "momentum", "--lr", "0.01", "--warmup-epochs", "0", "--epochs", "1", *QUICK,
            "--quiet"]
    subprocess.run([sys.executable, "-m", "search", "train", str(plan_file), "-o", str(one), *args], check=True,
                   env=_env(tmp_path), timeout=300, capture_output=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "search", "train",
                           str(plan_file), "-o", str(two), *args], env=_env(tmp_path), timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load((two / "args.yaml").read_text())["world_size"] == 2
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    base = _base().state_dict()
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and gap < 1e-6, (moved, gap)  # measured: 6e-8
    pa = ltmp_core.read_trained(one / "model.safetensors", weights=False)[1]
    pb = ltmp_core.read_trained(two / "model.safetensors", weights=False)[1]
    for la, lb in zip(pa.layers, pb.layers):
        assert la.merge_threshold == pytest.approx(lb.merge_threshold, abs=1e-5)  # measured: 1.4e-6


def test_full_recipe_options_run_and_the_saved_model_is_the_moving_average(plan_file, tmp_path):
    """Mixup, CutMix, distillation and clipping run together. With --model-ema the file holds timm's
    average, which starts as a copy of the weights after the first step (ModelEmaV3) and at decay
    0.99999 stays there: it lags the weights of the same run without the average, which moved on for two
    more steps."""
    runs = {}
    for name, extra in (("ema", ("--model-ema", "--model-ema-decay", "0.99999")), ("plain", ())):
        code, text, err = cli("train", str(plan_file), "-o", str(tmp_path / name), "--recipe", "full", "--epochs", "1",
                              "--train-images", "150", "-b", "50", "--warmup-epochs", "0", "--lr", "1e-3", "--mixup",
                              "0.8", "--cutmix", "1.0", "--distill", "--clip-grad", "1.0", *extra, "--json")
        assert code == 0, err
        assert json.loads(text)["steps"] == 3
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    base = _base().state_dict()
    ema = max((runs["ema"][k] - base[k]).abs().max().item() for k in base)
    last = max((runs["plain"][k] - base[k]).abs().max().item() for k in base)
    assert 0 < ema < 0.7 * last, (ema, last)


def test_a_plan_that_cuts_width_trains_narrower_and_deploys(tmp_path):
    """A plan keeping 3 of 4 heads and half the MLP units: `search train --recipe full` cuts the base model as
    the plan says (Taylor on the calibration batch), trains it, and every reader of the file gets that model."""
    model = _base()
    g = ltmp_core.ViTGeometry.from_model(model)
    like = [ltmp_core.LayerPlan(op="merge+prune", heads=3, mlp_hidden=128)] * g.depth
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * g.depth, [1.0] * g.depth, g, 0.4, like=like)
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=keeps, heads=3, mlp_hidden=128, model_name="ltmp_vit_mnist")
    ltmp_core.save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "out"
    code, text, err = cli("train", str(tmp_path / "plan.json"), "-o", str(out), *QUICK, "-b", "25", "--recipe", "full",
                          "--epochs", "1", "--json")
    assert code == 0, err
    result = json.loads(text)
    weights = load_file(str(out / "model.safetensors"))
    assert weights["blocks.0.attn.qkv.weight"].shape == (3 * 3 * 16, 64) and weights["blocks.5.mlp.fc1.weight"].shape == (128, 64)
    _, trained_plan, facts = ltmp_core.read_trained(out / "model.safetensors", weights=False)
    assert trained_plan.widths() == [(3, 128)] * 12 and trained_plan.meta["width"]["importance"] == "taylor"
    # Per-layer budgets calibrated from a plan without thresholds, twelve steps of 25 images: far from tuned,
    # far above chance (0.1). Six steps of 50 ended at 0.494-0.51 of the test split, on which side of 0.5
    # depending on the order of float sums (OMP_NUM_THREADS=1 or 2); twelve end at 0.735 with one thread and 0.741 with two.
    assert result["steps"] == 12
    assert result["test_flops_ratio"] <= 0.4 and result["test_top1"] > 0.5
    code, text, err = cli("validate", str(out / "model.safetensors"), "--json")
    assert code == 0, err
    v = json.loads(text)
    assert v["top1"] == result["test_top1"] and v["flops_ratio"] == pytest.approx(result["test_flops_ratio"], rel=1e-12)
    from search.deploy.program import export_static, load_trained_model

    static = load_trained_model(out / "model.safetensors", "static")
    assert ltmp_core.block_widths(static) == [(3, 128)] * 12
    export_static(out / "model.safetensors", tmp_path / "model.pt2")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "model.pt2").module()(x), static(x), rtol=1e-5, atol=1e-5)


def test_the_study_margin_is_the_aim_of_training_unless_overridden(tmp_path, monkeypatch):
    """A study run with --flops-margin 0.05 records its budget in every plan; `search train` aims there."""
    from tests.search.helpers import isolate, preset, run_study

    isolate(monkeypatch, tmp_path)
    (tmp_path / "p.toml").write_text(preset(flops_margin=0.05, space="structured", n_trials=2))
    url, _ = run_study(tmp_path, "p.toml", "margin", flops=0.5)
    code, _, err = cli("export", "margin", "--storage", url, "-o", str(tmp_path / "plan.json"))
    assert code == 0, err
    meta = ltmp_core.load_plan(tmp_path / "plan.json").meta
    assert (meta["target_flops_ratio"], meta["flops_margin"]) == (0.5, 0.05)
    assert meta["aim"] == pytest.approx(0.475)
    quick = ("--preset", "p.toml", "--train-images", "64", "-b", "32", "--json")
    code, text, err = cli("train", str(tmp_path / "plan.json"), "-o", str(tmp_path / "study"), *quick)
    assert code == 0, err
    result = json.loads(text)
    assert (result["target_flops_ratio"], result["flops_margin"]) == (0.5, 0.05)
    assert result["aim"] == pytest.approx(0.475) and result["select_flops_ratio"] <= 0.475 + 1e-9
    assert yaml.safe_load((tmp_path / "study" / "args.yaml").read_text())["aim"] == pytest.approx(0.475)
    code, text, err = cli("train", str(tmp_path / "plan.json"), "-o", str(tmp_path / "mine"), *quick,
                          "--flops-margin", "0.1")
    assert code == 0, err
    assert json.loads(text)["aim"] == pytest.approx(0.45), "--flops-margin overrides the study's"


def test_ltmp_recipe_runs_its_one_epoch_at_the_full_rate(trained):
    """LTMP's scheduler steps per epoch: every update of an epoch runs at that epoch's cosine rate, the
    first at the full 5e-3 (a per-update decay would halve the mean rate of a one-epoch run)."""
    out, _ = trained
    rows = list(csv.DictReader((out / "summary.csv").open()))
    rates = [float(r["lr"]) for r in rows]
    # cosine over 2 epochs, no warm-up, min 0: 5e-3 in epoch 1, 5e-3 * (1 + cos(pi / 2)) / 2 in epoch 2
    assert rates == pytest.approx([5e-3, 2.5e-3])


@pytest.fixture(scope="module")
def ltmp_plan_file(tmp_path_factory) -> Path:
    """A plan LTMP's released forward runs: merge and prune in every block, ToMe's order, raw
    mean-attention importance, at 0.5 of the FLOPs."""
    path = tmp_path_factory.mktemp("ltmp_plan") / "plan.json"
    model = _base()
    g = ltmp_core.ViTGeometry.from_model(model)
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * g.depth, [1.0] * g.depth, g, 0.5)
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=keeps, importance="mean", merge_order="tome",
                               importance_scale="raw", model_name="ltmp_vit_mnist")
    ltmp_core.save_plan(plan, path)
    return path


def _learned(out: Path) -> tuple[list, dict]:
    _, plan, facts = ltmp_core.read_trained(out / "model.safetensors", weights=False)
    return [(layer.merge_threshold, layer.prune_threshold) for layer in plan.layers], facts


def test_ltmp_recipe_trains_through_ltmp_released_forward_where_the_plan_allows(ltmp_plan_file, plan_file, tmp_path):
    """`--recipe ltmp` trains an LTMP-shaped plan through LTMP's released soft forward by default, which
    learns other thresholds than this project's soft forward; a plan that forward cannot run is refused on
    the flag when it is asked for (and trains through the project's by default, `trained` above)."""
    runs = {}
    for name, extra in (("auto", ()), ("project", ("--soft-form", "project"))):
        code, _, err = cli("train", str(ltmp_plan_file), "-o", str(tmp_path / name), *QUICK, "--json", *extra)
        assert code == 0, err
        runs[name] = _learned(tmp_path / name)
    assert [f["soft_form"] for _, f in runs.values()] == ["ltmp", "project"]
    assert runs["auto"][0] != runs["project"][0], "the two soft forwards give the thresholds other gradients"

    code, text, err = cli("train", str(plan_file), "-o", str(tmp_path / "cls"), *QUICK, "--soft-form", "ltmp")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("search: error: --soft-form:"), err
    assert "merge_order" in lines[0] and not (tmp_path / "cls").exists(), "refused before anything is written"
    code, text, err = cli("train", str(plan_file), "-o", str(tmp_path / "bad"), *QUICK, "--soft-form", "released")
    assert code == 2 and "--soft-form" in err and not (tmp_path / "bad").exists()
