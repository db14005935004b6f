"""The README's main job on a fresh directory: `search run --flops 0.35` with the embedded default.

Trains the real digits base model (about a minute on 2 cores), so it is marked slow; it still runs in
CI because it is the promise of the README.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import optuna
import pytest

from search.cli import main


@pytest.mark.slow
def test_embedded_default_runs_offline_with_a_good_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LTMP_CACHE", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["run", "--flops", "0.35", "--n-trials", "2"])
    assert code == 0, err.getvalue()
    db = Path("studies/search.db")
    assert db.is_file() and list(Path("studies/cache").glob("ltmp_vit_digits-*.pt"))
    study = optuna.load_study(study_name="digits-layerwise-flops0.35", storage=f"sqlite:///{db}")
    assert study.user_attrs["base"]["holdout_accuracy"] >= 0.94
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 2
    text = out.getvalue()
    assert "Unreduced base model" in text and "Dashboard:   search dashboard" in text
    feasible = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs["feasible"]]
    assert ("search export digits-layerwise-flops0.35" in text) == bool(feasible)
    assert ("No trial is at or under" in text) == (not feasible)
    assert "training the base model" in err.getvalue()
