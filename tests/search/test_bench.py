"""`search bench`: figures that add up, stored in the database, listed by --history."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import ltmp_core
from search.cli import main
from tests.conftest import tiny_model

TINY = ["--model", "vit_small_patch16_224", "--model-kwargs", "patch_size=8", "depth=4", "embed_dim=48",
        "num_heads=3", "img_size=32"]


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_quick_look_measures_each_configuration_and_stores_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    code, out, err = cli("bench", *TINY, "--flops", "0.5", "-b", "2,4", "--mode", "static,dynamic", "--runs", "2",
                         "--warmup", "1", "--json", "--storage", url)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["mode"], r["batch_size"]) for r in rows] == [("static", 2), ("static", 4), ("dynamic", 2), ("dynamic", 4)]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["images_per_s_plan"] / r["images_per_s_base"])
        assert r["ideal_fraction"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        assert r["latency_ms_base"] == pytest.approx(1000 * r["batch_size"] / r["images_per_s_base"])
        assert r["flops_ratio"] == pytest.approx(0.5, abs=0.06)
    assert rows[2]["calibrated_on_random_images"] and not rows[0]["calibrated_on_random_images"]
    code, out, _ = cli("bench", "--history", "--json", "--storage", url)
    history = [json.loads(line) for line in out.splitlines()]
    assert [h["id"] for h in history] == [r["id"] for r in reversed(rows)]
    assert history[0]["plan"].startswith("vit_small_patch16_224 merge+prune (cls) at 0.5")
    code, out, _ = cli("bench", "--history", "--storage", url)
    assert code == 0 and "of ideal" in out


def test_bench_of_an_exported_plan_uses_its_thresholds(tmp_path):
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.6, model_name="deit_small_patch16_224")
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, torch.randn(8, 3, 32, 32))
    path = ltmp_core.save_plan(ltmp_core.get_plan(model), tmp_path / "plan.json")
    code, out, err = cli("bench", str(path), "--model-kwargs", "patch_size=8", "depth=4", "embed_dim=48",
                         "num_heads=3", "--mode", "dynamic", "-b", "2", "--runs", "1", "--warmup", "0", "--json",
                         "--storage", f"sqlite:///{tmp_path / 'b.db'}")
    assert code == 0, err
    row = json.loads(out)
    assert row["model"] == "deit_small_patch16_224" and not row["calibrated_on_random_images"]


def test_bench_needs_a_plan_or_a_model_and_target(tmp_path):
    code, _, err = cli("bench", "--storage", f"sqlite:///{tmp_path / 'b.db'}")
    assert code == 2 and "give PLAN.json, or --model and --flops" in err
