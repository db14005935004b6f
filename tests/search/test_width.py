"""Plans that cut width through the tool: a `joint` study on a real SQLite database, `search validate`
replaying a trial's cut exactly, and `search bench` of such a plan."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import ltmp_core
from tests.search.helpers import cli, folder_with, isolate, preset, run_study

JOINT = preset(holdout=120, base_epochs=2, space="joint", width_recovery=2, n_trials=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return folder_with(tmp_path_factory, "width", {"joint.toml": JOINT})


@pytest.fixture(autouse=True)
def _isolated(workdir, monkeypatch):
    isolate(monkeypatch, workdir)


@pytest.fixture(scope="module")
def study(workdir):
    url, _ = run_study(workdir, "joint.toml", "joint")
    return url, optuna.load_study(study_name="joint", storage=url)


def _cut(study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(states=(TrialState.COMPLETE,))
            if ltmp_core.ReductionPlan.from_dict(t.user_attrs["plan"]).cuts_width]


def test_joint_trials_cut_width_and_count_it_in_their_flops(study):
    _, s = study
    trials = _cut(s)
    assert trials, "a joint study of 4 trials (1 seeded at full width) cuts width in some"
    assert not ltmp_core.ReductionPlan.from_dict(s.trials[0].user_attrs["plan"]).cuts_width  # LTMP's seed
    for t in trials:
        plan = ltmp_core.ReductionPlan.from_dict(t.user_attrs["plan"])
        assert plan.meta["width"] == {"importance": "taylor", "calib_images": 32, "seed": 0, "recover_steps": 2,
                                      "recover_lr": 1e-3, "recover_batch": 64}
        # The target holds for width and tokens together: the measured ratio is the constraint's.
        assert t.user_attrs["flops_ratio"] - 0.5 == pytest.approx(t.constraints["flops"])
        assert t.user_attrs["flops_ratio"] <= 0.5 * 1.05


def test_validate_replays_the_trials_width_cut_exactly(study, workdir):
    url, s = study
    for t in _cut(s)[-1:]:
        code, _, err = cli("export", "joint", "--storage", url, "--trial", str(t.number), "-o", f"t{t.number}.json",
                           "--force")
        assert code == 0, err
        code, out, err = cli("validate", f"t{t.number}.json", "--preset", "joint.toml", "--split", "select", "--json")
        assert code == 0, err
        result = json.loads(out)
        # The same heads and units cut, the same recovery: the trial's score and token counts to the last digit.
        assert result["top1"] == t.value
        assert result["flops_ratio"] == pytest.approx(t.user_attrs["flops_ratio"], rel=1e-12)
        assert result["kept_tokens"] == pytest.approx(t.user_attrs["kept_tokens"], rel=1e-12)


def test_show_and_the_layer_rows_give_the_widths_each_block_keeps(study):
    url, s = study
    trial = _cut(s)[0]
    code, out, _ = cli("show", "joint", "--storage", url, "--json")
    assert code == 0
    plan = ltmp_core.ReductionPlan.from_dict(trial.user_attrs["plan"])
    rows = [r for r in json.loads(out)["layers"] if r["trial_number"] == trial.number]
    assert [(r["heads"], r["mlp_hidden"]) for r in rows] == [(l.heads, l.mlp_hidden) for l in plan.layers]
    from search.present.ui import plan_columns, plan_rows

    plan = trial.user_attrs["plan"]
    assert plan_columns(plan)[-2:] == ("heads", "MLP units")
    rows = plan_rows(plan, trial.user_attrs["kept_tokens"])
    g = plan["geometry"]
    assert [r[-2:] for r in rows] == [
        ("all" if l["heads"] is None else f"{l['heads']}/{g['num_heads']}",
         "all" if l["mlp_hidden"] is None else f"{l['mlp_hidden']}/{g['mlp_hidden']}") for l in plan["layers"]]


def test_bench_times_a_width_plan_on_a_model_cut_to_it(study, workdir):
    url, s = study
    trial = _cut(s)[0]
    cli("export", "joint", "--storage", url, "--trial", str(trial.number), "-o", "bench.json", "--force")
    code, out, err = cli("bench", "bench.json", "-b", "2", "--runs", "1", "--warmup", "0", "--storage", url, "--json")
    assert code == 0, err
    row = json.loads(out.splitlines()[0]) if out.startswith("{") else json.loads(out)["rows"][0]
    plan = ltmp_core.load_plan(workdir / "bench.json")
    assert row["flops_ratio"] == pytest.approx(ltmp_core.plan_flops_ratio(plan, static=True), rel=0.03)
    assert row["flops_ratio"] < ltmp_core.plan_flops_ratio(plan.with_layers(heads=[None] * plan.depth,
                                                                            mlp_hidden=[None] * plan.depth), static=True)
