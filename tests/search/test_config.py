"""The configuration is declared once: flags, checks, saved fields and rankings all follow from it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search.setup.config import MODEL_SHAPE_FIELDS, RESULT_FIELDS, StudyConfig, option_fields, resolve
from search.study.results import best_trial, ranked_trials


def test_every_setting_with_a_flag_is_on_the_command_line():
    from search.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run._actions}
    flagged = {f.name for f in option_fields()}
    assert flagged <= dests
    # The parsed flags are exactly the settings' names, so that resolve() takes them as they are.
    args = run.parse_args(["--n-trials", "7", "-b", "16", "--ops", "merge,prune", "--model-kwargs", "depth=2",
                           "--no-amp"])
    config = resolve(None, {f.name: getattr(args, f.name) for f in option_fields()})
    assert (config.n_trials, config.batch_size, config.ops, config.model_kwargs, config.amp) == (
        7, 16, ("merge", "prune"), {"depth": 2}, False)
    # Shape fields are reset for another model; result fields are what a resume must match.
    assert set(MODEL_SHAPE_FIELDS) == {"img_size", "model_kwargs"}
    assert "n_trials" not in RESULT_FIELDS and "trial_steps" in RESULT_FIELDS
    assert len(fields(StudyConfig)) == len(set(f.name for f in fields(StudyConfig)))


@pytest.mark.parametrize(("args", "message"), [
    (("--sampler", "cmaes"), "--sampler: unknown sampler 'cmaes' (choose from tpe, nsga2, random, gp)"),
    (("--pruner", "sha"), "--pruner: unknown pruner 'sha'"),
    (("--n-trials", "0"), "--n-trials: must be >= 1, got 0"),
    (("-b", "0"), "--batch-size: must be >= 1, got 0"),
    (("--budget", "both"), "--budget: unknown budget term 'both'"),
    (("--importance", "max"), "--importance: unknown importance 'max'"),
])
def test_bad_settings_name_the_flag_and_are_refused_before_torch_loads(args, message, tmp_path):
    code = ("import sys\nfrom search.cli import main\nrc = main(['run', *sys.argv[1:]])\n"
            "sys.stderr.write(f'torch loaded: {\"torch\" in sys.modules}\\n')\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    first, second = done.stderr.splitlines()
    assert first == f"search: error: {message}" or first.startswith(f"search: error: {message}"), first
    assert second == "torch loaded: False"


def _trial(value, ratio, number):
    return create_trial(value=value, user_attrs={"flops_ratio": ratio, "feasible": ratio <= 0.5},
                        state=TrialState.COMPLETE)


def test_one_ranking_feasible_first_then_accuracy_then_fewer_flops():
    study = optuna.create_study(direction="maximize")
    # (top-1, measured ratio) by hand: the best is trial 2, the most accurate feasible one with fewer FLOPs
    # than trial 3; trial 0 is more accurate but over the target.
    for i, (value, ratio) in enumerate([(0.95, 0.55), (0.80, 0.45), (0.90, 0.40), (0.90, 0.48), (0.70, 0.60)]):
        study.add_trial(_trial(value, ratio, i))
    assert [t.number for t in ranked_trials(study)] == [2, 3, 1, 0, 4]
    assert best_trial(study).number == 2
    infeasible = optuna.create_study(direction="maximize")
    infeasible.add_trial(_trial(0.99, 0.9, 0))
    assert best_trial(infeasible) is None and [t.number for t in ranked_trials(infeasible)] == [0]


def test_terminal_and_dashboard_show_the_same_plan_table():
    from rich.console import Console

    from search.present.dashboard import plan_note
    from search.present.ui import plan_table

    plan = {"layers": [{"op": "merge", "keep": 0.8, "merge_threshold": 0.95, "prune_threshold": None},
                       {"op": "none", "keep": 1.0}]}
    note = plan_note(3, plan, [13.0, 13.0], 0.9, 0.4, 0.5)
    assert "| 0 | merge | 0.800 | 0.950 | - | 13.0 |" in note and "| 1 | none | 1.000 | - | - | 13.0 |" in note
    console = Console(record=True, width=120)
    console.print(plan_table(plan, [13.0, 13.0], "plan"))
    text = console.export_text()
    assert "merge" in text and "0.800" in text and "0.950" in text and "13.0" in text
