"""`search bench`: figures that add up, stored in the database, listed by --history."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import ltmp_core
from tests.search.helpers import cli
from tests.conftest import counted_macs, tiny_model

KWARGS = dict(patch_size=8, depth=4, embed_dim=48, num_heads=3, img_size=32)
TINY = ["--model", "vit_small_patch16_224", "--model-kwargs", *(f"{k}={v}" for k, v in KWARGS.items())]


def test_quick_look_measures_each_configuration_and_stores_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    code, out, err = cli("bench", *TINY, "--flops", "0.5", "-b", "2,4", "--mode", "static,dynamic", "--runs", "2",
                         "--warmup", "1", "--json", "--storage", url)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["mode"], r["batch"]) for r in rows] == [("static", 2), ("static", 4), ("dynamic", 2), ("dynamic", 4)]
    # The static plan's ratio against PyTorch's own FLOP counter on the same quick-look plan.
    stock = timm.create_model("vit_small_patch16_224", pretrained=False, **KWARGS).eval()
    g = ltmp_core.ViTGeometry.from_model(stock)
    x = torch.randn(1, 3, 32, 32)
    base = counted_macs(stock, x)
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * 4, [1.0] * 4, g, 0.5)
    ltmp_core.apply_plan(stock, ltmp_core.make_plan(stock, op="merge+prune", keep=keeps, importance="mean"))
    counted = counted_macs(stock, x) / base
    for r in rows:
        assert r["speedup"] > 0 and r["latency_ms_base"] > 0
        if r["mode"] == "static":
            assert r["flops_ratio"] == pytest.approx(counted, rel=0.01)
        else:  # thresholds calibrated for the budgets: near the target, image by image
            assert r["flops_ratio"] == pytest.approx(0.5, abs=0.06)
    assert rows[2]["calibrated_on_random_images"] and not rows[0]["calibrated_on_random_images"]
    code, out, _ = cli("bench", "--history", "--json", "--storage", url)
    history = [json.loads(line) for line in out.splitlines()]
    assert [h["id"] for h in history] == [r["id"] for r in reversed(rows)]
    for row in (rows[0], history[-1]):  # what scripts read, in the rows and in the stored history alike
        assert {"batch", "mode", "compiled", "ideal_fraction", "speedup"} <= set(row)
    assert [(h["batch"], h["mode"], h["compiled"]) for h in history[::-1]] == [(2, "static", False), (4, "static", False),
                                                                             (2, "dynamic", False), (4, "dynamic", False)]
    # The quick look scores prune tokens as a study does by default (mean attention received).
    assert history[0]["plan"].startswith("vit_small_patch16_224 merge+prune (mean) at 0.5")
    code, out, _ = cli("bench", "--history", "--storage", url)
    assert code == 0 and "of ideal" in out


def test_bench_of_an_exported_plan_uses_its_thresholds(tmp_path):
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.6, model_name="deit_small_patch16_224")
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, torch.randn(8, 3, 32, 32))
    # Thresholds that cut nothing (no similarity clears 2, no importance is below -1e9): calibrating
    # again for keep=0.6 would cut to about 0.6 of the FLOPs; the plan's own thresholds keep all.
    keep_all = ltmp_core.get_plan(model).with_layers(merge_threshold=[2.0] * 4, prune_threshold=[-1e9] * 4)
    path = ltmp_core.save_plan(keep_all, tmp_path / "plan.json")
    code, out, err = cli("bench", str(path), "--model-kwargs", "patch_size=8", "depth=4", "embed_dim=48",
                         "num_heads=3", "--mode", "dynamic", "-b", "2", "--runs", "1", "--warmup", "0", "--json",
                         "--storage", f"sqlite:///{tmp_path / 'b.db'}")
    assert code == 0, err
    row = json.loads(out)
    assert row["model"] == "deit_small_patch16_224" and not row["calibrated_on_random_images"]
    assert row["flops_ratio"] >= 1.0  # every token kept, and the reducers' own work on top


def test_bench_needs_a_plan_or_a_model_and_target(tmp_path):
    code, _, err = cli("bench", "--storage", f"sqlite:///{tmp_path / 'b.db'}")
    assert code == 2 and "give PLAN.json, or --model and --flops" in err


def test_every_static_plan_compiled_in_one_process_gets_its_own_graph(monkeypatch):
    """Each plan is a graph of timm's same ``forward``; past Dynamo's recompile limit the rest of a process's
    models would run eager with no more than a log line (benchmarks/latency.py compiled six models and its
    last three ran at 0.48-0.55 of the FLOP-ideal). Here the limit starts at 2 and four plans are compiled
    through ``compile_static``, with a backend that records each graph instead of running Inductor."""
    from search.deploy.program import compile_static

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=record, dynamic=kw.get("dynamic")))
    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32)
    # Dynamo's own patch, undone on exit (pytest's monkeypatch of its config module hides the setting when undone)
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for keep in (0.5, 0.6, 0.7, 0.8):
                model = tiny_model("deit_small")
                plan = ltmp_core.make_plan(model, op="merge", keep=keep)
                ltmp_core.apply_plan(model, plan, mode="static")
                with torch.no_grad():
                    expected = model(x)
                    got = compile_static(model, torch.device("cpu"))(x)
                torch.testing.assert_close(got, expected)
    finally:
        torch._dynamo.reset()
    assert len(graphs) >= 4, f"{len(graphs)} graphs for 4 plans: the later plans ran eager"
