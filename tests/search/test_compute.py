"""A trial's recorded compute against what really ran through the model, counted by hooks: every
forward image and every backward pass, for a trial the pruner stops as for one that is scored."""

from __future__ import annotations

import optuna
import pytest
import torch

from search.setup.config import StudyConfig
from search.study.objective import Objective
from search.study.record import TrialRecord
from spaces import get_space
from tests.search.helpers import TINY_DIGITS, isolate


class _Always(optuna.pruners.BasePruner):
    """Stops every trial at its first intermediate score."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def _counted(objective: Objective) -> dict[str, int]:
    """Hooks on the base model, which every trial's model is a deep copy of (hooks are copied with it):
    images forward (trial model and teacher alike) and images backward."""
    seen = {"forward": 0, "backward": 0}

    def forward(module, args):
        seen["forward"] += args[0].shape[0]

    def backward(module, grad_output):
        seen["backward"] += grad_output[0].shape[0]

    objective.base.register_forward_pre_hook(forward)
    objective.base.register_full_backward_pre_hook(backward)
    return seen


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("pruned", [False, True])
def test_recorded_compute_is_what_ran_for_pruned_and_scored_trials(tmp_path, monkeypatch, pruned, distill):
    isolate(monkeypatch, tmp_path)
    config = StudyConfig(**{**TINY_DIGITS, "trial_steps": 3, "eval_every": 1, "distill": distill, "flops": 0.7})
    objective = Objective.open(config)
    seen = _counted(objective)
    study = optuna.create_study(direction="maximize", pruner=_Always() if pruned else optuna.pruners.NopPruner())
    # LTMP's shape (merge then prune in every block) reaches 0.7 of the FLOPs on any model
    study.enqueue_trial(get_space(config.space).seed_params(objective.geometry, config.ops, config.importance)[0])
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == (optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE)
    record = TrialRecord.from_trial(trial)
    assert record.images_processed == seen["forward"] > 0
    # a backward pass counts as two forwards
    assert record.forward_equivalents == seen["forward"] + 2 * seen["backward"]
    assert seen["backward"] == (1 if pruned else 3) * config.batch_size, "one tuning step before the pruner stopped it"


def test_count_images_counts_every_call_by_its_batch_and_stops_when_read():
    """Images, not calls: batches of 3 and 5 (one passed by name) are 8 images; once read, the count stops."""
    import timm

    from search.study.compute import count_images

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    count = count_images(model)
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
        model(x=torch.randn(5, 3, 32, 32))
        assert count() == 8
        model(torch.randn(2, 3, 32, 32))
    assert count() == 8
