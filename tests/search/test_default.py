"""The README's main job on a fresh directory: `search run --flops 0.35` with the embedded default,
then the commands a user runs next (export, validate on the test split)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import optuna
import pytest

from search.cli import main


def _main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_embedded_default_runs_offline_then_exports_and_validates_on_test(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LTMP_CACHE", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    code, text, err = _main("run", "--flops", "0.35", "--n-trials", "3")
    assert code == 0, err
    db = Path("studies/search.db")
    assert db.is_file() and not Path("studies/cache").exists(), "the shipped base model is used, nothing trained"
    study = optuna.load_study(study_name="mnist-structured-flops0.35", storage=f"sqlite:///{db}")
    base = study.user_attrs["base"]
    assert base["source"].startswith("shipped") and base["evaluated_accuracy"] >= 0.96
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 3 and study.user_attrs["seed_trials"] == 1
    assert "Unreduced base model" in text and "Dashboard:   search dashboard" in text
    feasible = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs["feasible"]]
    assert feasible, "the seeded LTMP shape, its thresholds solved for the target, is feasible"
    assert "search export mnist-structured-flops0.35" in text
    code, _, err = _main("export", "mnist-structured-flops0.35", "-o", "plan.json")
    assert code == 0, err
    # validate scores the test split by default: images no search has seen.
    code, out, err = _main("validate", "plan.json", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["split"] == "test" and result["images"] == 1000 and result["flops_ratio"] <= 0.35
    assert result["top1"] > 0.9
    # The unreduced model on the same 1,000 test images, and the plan's drop from it.
    assert result["base_top1"] == pytest.approx(0.978, abs=0.002) and result["top1_drop"] == result["base_top1"] - result["top1"]
    code, out, err = _main("validate", "plan.json")
    assert code == 0 and "unreduced: top-1 97.80%" in out and "top-1 drop" in out


def test_validate_reads_the_same_test_split_as_the_search():
    # `search validate` opens the data without a select split for folders; a built-in data set must
    # still be split as the study configured it, or its "test" images would overlap the select ones.
    import torch

    from search.setup.config import resolve
    from search.setup.workbench import open_data

    config = resolve("mnist", {"flops": 0.35})
    searched = open_data(config, torch.device("cpu"))
    validated = open_data(config, torch.device("cpu"), holdout=False)
    assert torch.equal(searched.test_index, validated.test_index)
    assert torch.equal(searched.holdout_index, validated.holdout_index)
    assert not set(validated.test_index.tolist()) & set(searched.holdout_index.tolist())
