"""`search` end to end on a tiny configuration: a real SQLite database, the real CLI in-process."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import ltmp_core
from tests.search.helpers import cli, folder_with, isolate, preset, run_study
from search.setup.data import builtin, load_data
from search.setup.evaluation import evaluate
from search.setup.models import load_base_model
from search.study.tables import Store

TINY_PRESET = preset(holdout=120, base_epochs=2, trial_steps=4, eval_every=2, eval_images=64)




@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return folder_with(tmp_path_factory, "search", {"tiny.toml": TINY_PRESET})


@pytest.fixture(autouse=True)
def _isolated(workdir, monkeypatch):
    isolate(monkeypatch, workdir)


@pytest.fixture(scope="module")
def first_run(workdir):
    return run_study(workdir, "tiny.toml", "tiny")


def test_run_records_trials_constraints_plans_and_layer_rows(first_run):
    url, out = first_run
    study = optuna.load_study(study_name="tiny", storage=url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete, "at least one trial completed"
    store = Store(url)
    for trial in complete:
        a = trial.user_attrs
        assert 0.0 <= trial.value <= 1.0
        # Optuna's constraint and the dashboard's mirror agree, and say "feasible" exactly when the
        # measured ratio is at or under the 0.5 asked for.
        assert trial.constraints["flops"] == pytest.approx(a["constraint"])
        assert (a["constraint"] <= 0) == a["feasible"] == (a["flops_ratio"] <= 0.5)
        plan = ltmp_core.ReductionPlan.from_dict(a["plan"])
        assert plan.depth == 4 and len(a["kept_tokens"]) == 4
        assert a["time_tune_s"] >= 0 and a["time_eval_s"] > 0 and a["device"] == "cpu"
        rows = store.layers(study, trial.number)
        assert [r.layer for r in rows] == [0, 1, 2, 3]
        assert [r.op for r in rows] == list(plan.ops)
        assert [r.kept_tokens for r in rows] == pytest.approx(a["kept_tokens"])
        assert [r.merge_threshold for r in rows] == [layer.merge_threshold for layer in plan.layers]
    store.dispose()
    assert study.metric_names == ["top-1 accuracy"]
    assert study.user_attrs["config"]["flops"] == 0.5
    best = [t for t in complete if t.user_attrs["feasible"]]
    assert ("Best plan" in out) == bool(best) and ("No trial is at or under" in out) == (not best)


def test_show_and_studies_print_the_trials(first_run):
    url, _ = first_run
    code, out, _ = cli("studies", "--storage", url)
    assert code == 0 and "tiny" in out
    code, out, _ = cli("show", "tiny", "--storage", url)
    assert code == 0 and "Trials of tiny" in out and "complete" in out
    code, out, _ = cli("show", "tiny", "--storage", url, "--json")
    data = json.loads(out)
    assert [t["number"] for t in data["trials"]] == [0, 1, 2]
    # The study started from LTMP's shape (1 seed for 3 trials): the trial says so, in JSON and in the table.
    assert [t["seed_of"] for t in data["trials"]] == ["LTMP shape", None, None]
    wide = io.StringIO()
    from rich.console import Console

    from search.present import ui
    from search.study.results import trial_summary

    study = optuna.load_study(study_name="tiny", storage=url)
    rows = [trial_summary(t) for t in study.trials]
    Console(file=wide, width=250).print(ui.trials_table(rows, "t", 0.5, base_accuracy=0.9))
    lines = {line.split("│")[1].strip(): line for line in wide.getvalue().splitlines() if line.count("│") > 5}
    assert "0 (LTMP shape)" in lines and "1" in lines
    for t in study.trials:
        cells = [c.strip() for c in lines[f"{t.number} (LTMP shape)" if t.number == 0 else str(t.number)].split("│")]
        if t.state == TrialState.COMPLETE:  # top-1 and its drop from the unreduced 90%
            assert cells[3] == f"{100 * t.value:.1f}%" and cells[4] == f"{100 * (t.value - 0.9):+.1f}"
        else:  # no intermediate score in the top-1 column; the reason instead of ops
            assert cells[3] == "-" and cells[4] == "-"
    assert {r["trial_number"] for r in data["layers"]} == {t["number"] for t in data["trials"] if t["state"] == "complete"}
    code, out, _ = cli("studies", "--storage", url, "--json")
    assert json.loads(out)[0]["study"] == "tiny"


def test_export_reproduces_the_trial_exactly(first_run, workdir):
    url, _ = first_run
    code, out, err = cli("export", "tiny", "--storage", url, "-o", "best.json", "--json")
    assert code == 0, err
    exported = json.loads(out)
    study = optuna.load_study(study_name="tiny", storage=url)
    trial = study.trials[exported["trial"]]
    assert trial.user_attrs["feasible"]
    plan = ltmp_core.load_plan(workdir / "best.json")
    assert plan.meta["trial"] == trial.number and plan.meta["top1"] == trial.value

    data = load_data("digits", img_size=32, holdout=120)
    model, _ = load_base_model("ltmp_vit_digits", data, img_size=32, base_epochs=2)
    ltmp_core.apply_plan(model, plan, mode="dynamic")
    result = evaluate(model, data.holdout_batches(32), device=torch.device("cpu"))
    assert result.accuracy == trial.value
    assert result.macs / ltmp_core.unreduced_macs(plan.geometry) == pytest.approx(trial.user_attrs["flops_ratio"], rel=1e-12)


def test_rerun_resumes_the_study(first_run):
    url, _ = first_run
    code, out, _ = cli("run", "--flops", "0.5", "--preset", "tiny.toml", "--storage", url, "--study-name", "tiny",
                       "--quiet")
    assert code == 0 and "already has 3 finished trials" in out
    code, _, err = cli("run", "--flops", "0.5", "--preset", "tiny.toml", "--storage", url, "--study-name", "tiny",
                       "--n-trials", "4", "--quiet", "--json")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert len(optuna.get_all_study_names(url)) == 1


def test_rerun_with_other_settings_is_refused(first_run):
    url, _ = first_run
    code, out, err = cli("run", "--flops", "0.4", "--preset", "tiny.toml", "--storage", url, "--study-name", "tiny")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "flops=0.5" in err


def test_existing_study_is_checked_before_the_base_model_loads(first_run, tmp_path):
    # An unreadable checkpoint would fail the base model; the resume check comes first and says why.
    url, _ = first_run
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    code, out, err = cli("run", "--flops", "0.4", "--preset", "tiny.toml", "--storage", url, "--study-name", "tiny",
                         "--checkpoint", str(tmp_path / "junk.pth"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "other settings" in err and "cannot read" not in err


def test_same_seed_gives_same_parameters_and_values(workdir):
    results = []
    for name in ("a", "b"):
        url = f"sqlite:///{workdir / f'seed-{name}.db'}"
        code, _, err = cli("run", "--flops", "0.5", "--preset", "tiny.toml", "--storage", url, "--study-name", "s",
                           "--n-trials", "3", "--seed", "7", "--quiet")
        assert code == 0, err
        trials = optuna.load_study(study_name="s", storage=url).trials
        results.append([(t.params, t.value, t.state) for t in trials])
    assert results[0] == results[1]


def test_export_of_a_study_without_feasible_trial_is_refused(workdir):
    url = f"sqlite:///{workdir / 'tome.db'}"
    # ToMe merges at most half the tokens per layer: 10% of the FLOPs is out of its reach.
    code, _, err = cli("run", "--flops", "0.1", "--preset", "tiny.toml", "--storage", url, "--space", "tome",
                       "--n-trials", "1", "--quiet")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny-tome-flops0.1", storage=url)
    assert study.trials[0].state == TrialState.PRUNED
    assert "ToMe" in study.trials[0].user_attrs["pruned_reason"]
    code, out, err = cli("export", "tiny-tome-flops0.1", "--storage", url, "-o", "never.json")
    assert code == 2 and "no feasible trial" in err and err.count("\n") == 1
    assert not (workdir / "never.json").exists()


@pytest.mark.parametrize("flops", ["0", "-0.2", "1.5", "nan", "abc", "inf"])
def test_bad_flops_is_one_line_and_exit_2(workdir, flops):
    code, out, err = cli("run", "--flops", flops, "--storage", f"sqlite:///{workdir / 'never.db'}")
    assert code == 2
    assert out == "" and err.count("\n") == 1 and "FLOPs ratio" in err
    assert not (workdir / "never.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--preset", "imagenet9"), "unknown preset 'imagenet9'"),
        (("run", "--ops", "merge,drop", "--preset", "tiny.toml"), "unknown operation 'drop'"),
        (("run", "--space", "grid", "--preset", "tiny.toml"), "unknown search space 'grid'"),
        (("run", "--model", "no_such_vit", "--preset", "tiny.toml", "--storage", "sqlite:///x.db"), "unknown timm model"),
        (("show", "nope", "--storage", "sqlite:///tiny.db"), "no study named 'nope'"),
        (("export", "nope", "--storage", "sqlite:///tiny.db"), "no study named 'nope'"),
        (("show", "tiny", "--storage", "sqlite:///missing.db"), "no database at missing.db"),
        (("run", "--model", "resnet18", "--preset", "tiny.toml", "--storage", "sqlite:///x.db"), "not a timm VisionTransformer"),
        (("studies", "--storage", "postgresql+nodriver://u:secret@h/db"), "cannot open"),
        (("studies", "--storage", "not a url"), "not a database URL"),
        (("show", "tiny", "--storage", "sqlite:///tiny.db", "--plot", "front.txt"), "--plot: cannot draw a .txt file"),
        (("show", "tiny", "--storage", "sqlite:///tiny.db", "--plot", "no/such/dir/f.png"), "--plot: no folder"),
        (("run", "--preset", "tiny.toml", "--storage", "sqlite:////nonexistent/dir/x.db"),
         "--storage: no folder /nonexistent/dir"),
        (("export", "tiny", "--storage", "sqlite:///tiny.db", "-o", "/nonexistent/dir/p.json"),
         "-o: no folder /nonexistent/dir"),
        (("run", "--jobs", "0", "--preset", "tiny.toml", "--storage", "sqlite:///x.db"), "--jobs: must be >= 1, got 0"),
        (("export-model", "m.safetensors", "-o", "m.pt2"), "--static: only the static mode"),
        (("export-model", "m.safetensors", "--static", "-o", "/nonexistent/dir/m.pt2"), "-o: no folder /nonexistent/dir"),
        (("export-model", "m.safetensors", "--static", "-o", "m.pt2", "-b", "0"), "-b: must be >= 1, got 0"),
    ],
)
def test_bad_input_is_one_clear_line(first_run, workdir, args, message):
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert "secret" not in err
    assert not (workdir / "x.db").exists() and not (workdir / "missing.db").exists()
    assert not Path("/nonexistent").exists() and not (workdir / "no").exists() and not (workdir / "front.txt").exists()
    assert not (workdir / "m.pt2").exists()


def test_export_does_not_overwrite_a_plan_without_force(first_run, workdir):
    target = workdir / "mine.json"
    target.write_text("my notes, not a plan\n")
    code, out, err = cli("export", "tiny", "--storage", "sqlite:///tiny.db", "-o", str(target))
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    assert target.read_text() == "my notes, not a plan\n"
    code, _, err = cli("export", "tiny", "--storage", "sqlite:///tiny.db", "-o", str(target), "--force")
    assert code == 0, err
    assert ltmp_core.load_plan(target).depth == 4


def test_dashboard_on_a_taken_port_is_one_line(first_run, workdir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = cli("dashboard", "--storage", "sqlite:///tiny.db", "--port", str(port))
    assert code == 2 and err.count("\n") == 1 and f"--port: cannot listen on 127.0.0.1:{port}" in err, err


def test_bad_preset_key_is_refused(workdir):
    (workdir / "bad.toml").write_text('model = "ltmp_vit_digits"\nlearning_rate = 0.1\n')
    code, _, err = cli("run", "--preset", "bad.toml")
    assert code == 2 and "unknown key 'learning_rate'" in err


def test_version():
    from search.cli import main

    with pytest.raises(SystemExit) as e, redirect_stdout(io.StringIO()) as out:
        main(["--version"])
    assert e.value.code == 0 and "ltmp-search" in out.getvalue()


@pytest.mark.parametrize(("name", "total", "select", "test"), [("digits", 1797, 360, 200), ("mnist", 5000, 1000, 1000)])
def test_tune_select_and_test_splits_are_balanced_disjoint_and_fixed(name, total, select, test):
    a, b = builtin(name, holdout=select, test=test), builtin(name, holdout=select, test=test)
    assert torch.equal(a.holdout_index, b.holdout_index) and torch.equal(a.test_index, b.test_index)
    splits = [set(a.train_index.tolist()), set(a.holdout_index.tolist()), set(a.test_index.tolist())]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert sum(len(s) for s in splits) == total and (len(splits[1]), len(splits[2])) == (select, test)
    for y, n in ((a.holdout_y, select), (a.test_y, test)):
        counts = torch.bincount(y, minlength=10)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n


def test_search_can_choose_the_importance_per_layer(workdir):
    url = f"sqlite:///{workdir / 'imp.db'}"
    code, _, err = cli("run", "--flops", "0.5", "--preset", "tiny.toml", "--storage", url, "--study-name", "imp",
                       "--importance", "mean,cls", "--ops", "prune,squeeze", "--n-trials", "2", "--quiet")
    assert code == 0, err
    study = optuna.load_study(study_name="imp", storage=url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete and {t.params["imp_0"] for t in study.trials} <= {"mean", "cls"}
    for t in complete:
        plan = ltmp_core.ReductionPlan.from_dict(t.user_attrs["plan"])
        assert [layer.importance for layer in plan.layers] == [t.params[f"imp_{i}"] for i in range(4)]
    assert study.user_attrs["config"]["importance"] == ["mean", "cls"]


def test_range_positions_are_the_van_der_corput_sequence_and_fill_every_bin_once():
    from search.study.objective import range_position

    # By hand: the binary digits of the trial number, mirrored behind the point.
    assert [range_position(n) for n in range(8)] == [0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]
    assert range_position(6) == 0b011 / 8  # 6 = 0b110
    for k in range(1, 8):  # the first 2**k trials put exactly one aim in each of 2**k equal bins
        bins = sorted(int(range_position(n) * 2 ** k) for n in range(2 ** k))
        assert bins == list(range(2 ** k))


def test_a_range_of_targets_is_one_two_objective_study_and_exports_any_budget_in_it(workdir):
    url = f"sqlite:///{workdir / 'range.db'}"
    code, out, err = cli("run", "--flops", "0.3:0.7", "--preset", "tiny.toml", "--storage", url, "--space", "structured",
                         "--n-trials", "6", "--quiet", "--json")
    assert code == 0, err
    name = json.loads(out)["study"]
    assert name == "tiny-structured-flops0.3-0.7"
    study = optuna.load_study(study_name=name, storage=url)
    assert len(study.directions) == 2 and study.metric_names == ["top-1 accuracy", "FLOPs ratio"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert done and all(0.3 <= t.user_attrs["target"] <= 0.7 for t in done)
    for t in done:  # the objectives are what was measured; feasible means under the trial's own target
        assert t.values == [t.user_attrs["accuracy"], t.user_attrs["flops_ratio"]]
        assert t.user_attrs["feasible"] == (t.user_attrs["flops_ratio"] <= t.user_attrs["target"])
    # Each trial's target comes from what its shape reaches: a trial is pruned as out of reach only
    # when its shape cannot reach even the top of the range (aim 0.7 * (1 - 0.02) = 0.686), and the
    # measured ratios spread over the range instead of gathering at one end.
    unreachable = [t.user_attrs["pruned_reason"] for t in study.get_trials(states=(TrialState.PRUNED,))
                   if "reach" in t.user_attrs.get("pruned_reason", "")]
    assert all(reason.startswith("a FLOPs ratio of 0.686 ") for reason in unreachable), unreachable
    ratios = sorted(t.user_attrs["flops_ratio"] for t in done)
    assert len(done) >= 4 and ratios[-1] - ratios[0] >= 0.5 * (0.7 - 0.3), ratios
    limit = sorted(t.user_attrs["flops_ratio"] for t in done if t.user_attrs["feasible"])[-1]
    code, out, err = cli("export", name, "--storage", url, "--flops", f"{limit:.6f}", "-o", "range.json", "--json")
    assert code == 0, err
    exported = json.loads(out)
    chosen = study.trials[exported["trial"]]
    under = [t for t in done if t.user_attrs["feasible"] and t.user_attrs["flops_ratio"] <= limit]
    assert chosen.values[0] == max(t.values[0] for t in under)
    assert exported["plan"]["meta"]["target_flops_ratio"] == pytest.approx(limit, abs=1e-6)
    code, _, err = cli("export", name, "--storage", url, "--flops", "0.01", "-o", "none.json")
    assert code == 2 and "no feasible trial" in err


@pytest.mark.parametrize("command", ["run", "export", "validate", "show", "studies", "bench", "dashboard"])
def test_every_command_prints_its_help(command):
    # Help strings of the generated flags are evaluated only when help is shown; argparse must get text.
    code, out, err = cli(command, "--help")
    assert code == 0, err
    assert out.startswith("usage: search ")
    if command != "dashboard":  # every command that prints results takes --json
        assert "--json" in out
    if command == "run":
        assert "--n-trials" in out and "tpe, nsga2, random" in out and "--flops" in out


def layer_row_count(url: str, name: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("select count(*) from ltmp_layer_results where study_name = :n"), {"n": name}).scalar()
    engine.dispose()
    return n


def test_a_study_deleted_by_another_tool_leaves_nothing_on_a_new_one_of_its_name(workdir):
    # Reproduces: optuna-dashboard's trash icon (optuna.delete_study) left ltmp_layer_results rows;
    # a new study of the same name then showed 1 trial but the old study's layer rows.
    url = f"sqlite:///{workdir / 'reuse.db'}"
    args = ["run", "--flops", "0.5", "--preset", "tiny.toml", "--storage", url, "--study-name", "again", "--quiet"]
    assert cli(*args, "--n-trials", "3")[0] == 0
    old = optuna.load_study(study_name="again", storage=url)
    assert len(old.get_trials(states=(TrialState.COMPLETE,))) >= 2, "rows the new study's one trial cannot replace"
    assert layer_row_count(url, "again") == 4 * len(old.get_trials(states=(TrialState.COMPLETE,)))
    optuna.delete_study(study_name="again", storage=url)
    code, _, err = cli(*args, "--n-trials", "1")
    assert code == 0, err
    new = optuna.load_study(study_name="again", storage=url)
    complete = new.get_trials(states=(TrialState.COMPLETE,))
    assert layer_row_count(url, "again") == 4 * len(complete)
    store = Store(url)
    assert {r.trial_number for r in store.layers(new)} == {t.number for t in complete}
    store.dispose()


def test_search_delete_removes_the_study_its_rows_and_pictures(workdir, monkeypatch):
    url = f"sqlite:///{workdir / 'delete.db'}"
    assert cli("run", "--flops", "0.5", "--preset", "tiny.toml", "--storage", url, "--study-name", "gone",
               "--n-trials", "2", "--quiet")[0] == 0
    pictures = workdir / "delete-artifacts"
    assert any(pictures.iterdir()) and layer_row_count(url, "gone") > 0
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: nothing can be asked
    code, out, err = cli("delete", "gone", "--storage", url)
    assert code == 2 and err.count("\n") == 1 and "--yes" in err
    assert optuna.load_study(study_name="gone", storage=url)  # still there
    code, _, err = cli("delete", "nosuch", "--storage", url, "--yes")
    assert code == 2 and "no study named 'nosuch'" in err
    code, out, err = cli("delete", "gone", "--storage", url, "--yes", "--json")
    assert code == 0, err
    removed = json.loads(out)["deleted"]
    assert removed["trials"] == 2 and removed["pictures"] >= 2 and removed["layer_rows"] > 0
    with pytest.raises(KeyError):
        optuna.load_study(study_name="gone", storage=url)
    assert layer_row_count(url, "gone") == 0 and not any(pictures.iterdir())


def test_old_study_flag_still_names_a_preset_with_one_deprecation_line(workdir):
    code, out, err = cli("run", "--study", "imagenet9")
    assert code == 2
    assert err.splitlines() == [
        "search: warning: --study is deprecated and will be removed in the next release; use --preset",
        err.splitlines()[1],
    ] and "unknown preset 'imagenet9'" in err.splitlines()[1]


def test_optunas_format_flag_means_json(first_run):
    url, _ = first_run
    code, out, err = cli("show", "tiny", "--storage", url, "-f", "json")
    assert code == 0, err
    same = cli("show", "tiny", "--storage", url, "--json")[1]
    assert json.loads(out) == json.loads(same)
    studies = json.loads(cli("studies", "--storage", url, "--format", "json")[1])
    # One name for top-1 in every JSON output: top1 (as search validate reports it).
    assert "best_top1" in studies[0] and all("top1" in t for t in json.loads(out)["trials"])


def test_plain_progress_is_timestamped_and_ends_with_the_count_by_state(first_run, workdir):
    import re

    url = f"sqlite:///{workdir / 'progress.db'}"
    code, out, err = cli("run", "--flops", "0.5", "--preset", "tiny.toml", "--storage", url, "--study-name", "p",
                         "--n-trials", "2")
    assert code == 0, err
    study = optuna.load_study(study_name="p", storage=url)
    for t in study.trials:  # not a terminal: one timestamped line per finished trial
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] trial {t.number}: ", err, re.M), err
    from search.study.results import best_trial

    best = best_trial(study)
    if best is not None:
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] best is trial {best.number}: top-1 ", err, re.M), err
    states = [t.state for t in study.trials]
    assert (f"2 trials: {states.count(TrialState.COMPLETE)} complete, {states.count(TrialState.PRUNED)} pruned, "
            f"0 failed (this run: 2)") in out
