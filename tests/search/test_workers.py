"""Many workers and faults, on the real databases of this machine.

PostgreSQL and MariaDB URLs come from ``LTMP_TEST_POSTGRES_URL`` / ``LTMP_TEST_MYSQL_URL`` (e.g.
``postgresql://postgres@127.0.0.1:5432/test``, ``mysql+pymysql://root@127.0.0.1:3306/test``): a test is
skipped, saying so, when its variable is not set, and fails when it is set and the server does not answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
from tests.search.helpers import cli, preset
import pytest
import sqlalchemy as sa
import torch
from optuna.trial import TrialState

import search.study.tuning
import search.study.objective
from ltmp_core import LTMPError
from search.study.tables import LayerResult, Store

POSTGRES = "LTMP_TEST_POSTGRES_URL"
MYSQL = "LTMP_TEST_MYSQL_URL"


def server(variable: str) -> str:
    """The URL in ``variable``; the test is skipped when it is not set and fails when the server does not answer."""
    url = os.environ.get(variable)
    if not url:
        pytest.skip(f"{variable} is not set")
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as e:
        pytest.fail(f"{variable} is set, but no database server answers at {url.split('@')[-1]}: "
                    f"{type(e).__name__}", pytrace=False)
    return url


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workers")
    (path / "cache").mkdir()
    return path


def preset_file(workdir: Path, n: int, steps: int = 2) -> str:
    path = workdir / f"p{n}-{steps}.toml"
    path.write_text(preset(n_trials=n, trial_steps=steps, heartbeat=1))
    return str(path)


def env(workdir: Path) -> dict[str, str]:
    return {**os.environ, "LTMP_CACHE": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}


def search_cli(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=workdir, env=env(workdir),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def study_name(request):
    """A fresh study name, removed from the shared database afterwards."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    urls: list[str] = []
    yield name, urls
    for url in urls:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass
        store = Store(url, write=True)
        with store.session() as s:
            s.execute(sa.delete(LayerResult).where(LayerResult.study_name == name))
        store.dispose()


def watch(url: str, name: str, deadline: float) -> optuna.Study | None:
    """The study another process is creating, opened once for polling; None if it is not there by ``deadline``.

    One engine without a pool: a storage opened per poll holds a connection until it is collected,
    and a slow start of the workers then exhausts the server's connections.
    """
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        while True:
            try:
                with engine.connect() as conn:
                    if conn.execute(sa.text("select 1 from studies where study_name = :n"), {"n": name}).first():
                        break
            except sa.exc.DBAPIError:  # the workers have not created Optuna's tables yet
                pass
            if time.time() > deadline:
                return None
            time.sleep(0.1)
    finally:
        engine.dispose()
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sa.pool.NullPool})
    return optuna.load_study(study_name=name, storage=storage)


def check_exact(url: str, name: str, n: int) -> optuna.Study:
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    store = Store(url)
    rows = store.layers(study)
    store.dispose()
    for t in finished:
        if t.state == TrialState.COMPLETE:
            assert [r.layer for r in rows if r.trial_number == t.number] == [0, 1, 2, 3], t.number
    return study


def test_postgresql_four_workers_exactly_24_trials(workdir, study_name):
    name, urls = study_name
    url = server(POSTGRES)
    urls.append(url)
    start = time.perf_counter()
    done = search_cli(workdir, "run", "--flops", "0.5", "--preset", preset_file(workdir, 24), "--storage", url,
                  "--study-name", name, "--jobs", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    study = check_exact(url, name, 24)
    workers = {t.user_attrs.get("worker") for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(workers) > 1, "several workers ran trials"
    print(f"postgresql: 4 workers, 24 trials in {time.perf_counter() - start:.1f} s")


def test_postgresql_worker_killed_mid_trial_is_retried(workdir, study_name):
    name, urls = study_name
    url = server(POSTGRES)
    urls.append(url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "run", "--flops", "0.5", "--preset", preset_file(workdir, 24, steps=12),
         "--storage", url, "--study-name", name, "--jobs", "4", "--quiet"],
        cwd=workdir, env=env(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 120
    study = watch(url, name, deadline)
    while study is not None and victim is None and time.time() < deadline:
        time.sleep(0.1)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number >= 2 and "worker" in t.user_attrs:  # mid-trial, after the first ones
                victim = t
                break
    assert victim is not None, "no running trial seen"
    worker = victim.user_attrs["worker"]
    os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    study = check_exact(url, name, 24)
    # The worker may have moved on to its next trial before the signal landed: the killed trial is the
    # one of that worker that ended failed.
    killed = [t for t in study.trials if t.user_attrs.get("worker") == worker and t.state == TrialState.FAIL]
    assert len(killed) == 1, [(t.number, t.state.name) for t in study.trials if t.user_attrs.get("worker") == worker]
    killed = killed[0]
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # The retry repeats the parameters the killed trial had sampled (the kill may land mid-sampling).
    assert {k: retries[0].params[k] for k in killed.params} == killed.params


def test_mariadb_two_workers(workdir, study_name):
    name, urls = study_name
    url = server(MYSQL)
    urls.append(url)
    done = search_cli(workdir, "run", "--flops", "0.5", "--preset", preset_file(workdir, 8), "--storage", url,
                  "--study-name", name, "--jobs", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    check_exact(url, name, 8)


def test_sqlite_three_local_workers(workdir, study_name):
    name, _ = study_name
    url = f"sqlite:///{workdir / 'three.db'}"
    done = search_cli(workdir, "run", "--flops", "0.5", "--preset", preset_file(workdir, 15), "--storage", url,
                  "--study-name", name, "--jobs", "3", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "locked" not in done.stderr
    check_exact(url, name, 15)


def test_ctrl_c_marks_the_trial_interrupted_and_the_study_resumes(workdir, study_name):
    name, _ = study_name
    url = f"sqlite:///{workdir / 'ctrlc.db'}"
    args = ["run", "--flops", "0.5", "--preset", preset_file(workdir, 1, steps=60), "--storage", url, "--study-name", name]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then keeps
    # it ignored (as a CLI should). Give the child the default action, as a terminal's Ctrl-C would find.
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=workdir, env=env(workdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupt once the worker has taken the trial (it records itself on it): the trial is under way,
    # however slowly the host runs; no sleep guesses when that is.
    deadline = time.time() + 300
    running = None
    study = watch(url, name, deadline)
    while study is not None and running is None and time.time() < deadline:
        time.sleep(0.1)
        running = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                        if "worker" in t.user_attrs), None)
    assert running is not None, "no trial was taken by a worker"
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    # A hang detector, not a timing: it exits in about 2 s, also beside two busy processes.
    out, err = proc.communicate(timeout=60)
    print(f"exit {proc.returncode} {time.time() - sent:.1f} s after SIGINT")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "so far" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    study = optuna.load_study(study_name=name, storage=url)
    interrupted = study.trials[running.number]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # The same command resumes and finishes the study.
    done = search_cli(workdir, *args, "--quiet", timeout=600)
    assert done.returncode == 0, done.stderr
    check_exact(url, name, 1)


# -- faults inside a trial, in-process ----------------------------------------------------------




@pytest.fixture
def local(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LTMP_CACHE", str(workdir / "cache"))
    return f"sqlite:///{workdir / f'{uuid.uuid4().hex[:6]}.db'}"


def fail_once(monkeypatch, module, name, error: BaseException, times: int = 1):
    original = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_ctrl_c_whose_storage_writes_fail_still_exits_130_and_the_study_resumes(workdir, local, monkeypatch):
    """A Ctrl-C can land while the storage is busy or half way through a call: however the trial's last
    writes fare (here the fail reason and Optuna's FAIL are both refused once), the run stops as
    interrupted (130, not a crash), and the next run fails the stale trial and finishes the study."""
    fail_once(monkeypatch, search.study.objective, "tune_thresholds", KeyboardInterrupt())
    refused = []
    rdb = optuna.storages.RDBStorage
    set_attr, set_state = rdb.set_trial_user_attr, rdb.set_trial_state_values

    def attr(self, trial_id, key, value):
        if key == "fail_reason" and not refused:
            refused.append(key)
            raise optuna.exceptions.StorageInternalError("database is locked")
        return set_attr(self, trial_id, key, value)

    def state(self, trial_id, state, values=None):
        if state == TrialState.FAIL and len(refused) == 1:
            refused.append("FAIL")
            raise optuna.exceptions.StorageInternalError("database is locked")
        return set_state(self, trial_id, state, values)

    monkeypatch.setattr(rdb, "set_trial_user_attr", attr)
    monkeypatch.setattr(rdb, "set_trial_state_values", state)
    args = ("run", "--flops", "0.5", "--preset", preset_file(workdir, 1, steps=4), "--storage", local, "--study-name", "k")
    code, _, err = cli(*args)
    assert code == 130 and refused == ["fail_reason", "FAIL"], (refused, err)
    assert "interrupted" in err and "Traceback" not in err
    left = optuna.load_study(study_name="k", storage=local)
    assert [t.state for t in left.trials if t.state != TrialState.WAITING] == [TrialState.RUNNING]  # neither write landed
    time.sleep(3.5)  # the heartbeat's grace (3 beats of 1 s) passes: the trial is stale
    code, _, err = cli(*args, "--quiet")
    assert code == 0, err
    study = check_exact(local, "k", 1)
    stale = study.get_trials(states=(TrialState.FAIL,))
    assert len(stale) == 1 and stale[0].number == 0


def test_nan_loss_fails_the_trial_with_reason_and_the_study_goes_on(workdir, local, monkeypatch):
    original = search.study.tuning.F.cross_entropy
    calls = {"n": 0}

    def nan_once(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(search.study.tuning.F, "cross_entropy", nan_once)
    code, _, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 3), "--storage", local, "--study-name", "n",
                       "--quiet")
    assert code == 0, err
    study = check_exact(local, "n", 3)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("tuning loss is nan at step 1")


def test_other_exceptions_are_recorded_and_the_worker_goes_on(workdir, local, monkeypatch):
    fail_once(monkeypatch, search.study.objective, "evaluate", RuntimeError("disk went away"), times=2)
    code, _, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 3), "--storage", local, "--study-name", "e",
                       "--quiet")
    assert code == 0, err
    study = check_exact(local, "e", 3)
    reasons = [t.user_attrs["fail_reason"] for t in study.get_trials(states=(TrialState.FAIL,))]
    assert reasons and all(r == "RuntimeError: disk went away" for r in reasons)


def watch_batches(monkeypatch, module, name: str, runs: list, oom_first: bool = False) -> None:
    """Wrap ``module.name(model, ...)`` so that every call appends ``(name, batch sizes the model ran)`` to
    ``runs``, seen by a forward hook on the model; with ``oom_first`` its first call runs out of CUDA memory."""
    original = getattr(module, name)

    def call(model, *args, **kwargs):
        sizes: list[int] = []
        runs.append((name, sizes))
        if oom_first and [r[0] for r in runs].count(name) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA oom")
        handle = model.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[0]))
        try:
            return original(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(module, name, call)


def test_cuda_oom_retries_once_with_half_the_batch(workdir, local, monkeypatch):
    """The retry runs the model on batches of 16 (the preset's 32, halved), in tuning and in scoring; the
    next trial is back at 32."""
    runs: list[tuple[str, list[int]]] = []
    watch_batches(monkeypatch, search.study.objective, "tune_thresholds", runs, oom_first=True)
    watch_batches(monkeypatch, search.study.objective, "evaluate", runs)
    code, _, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 2), "--storage", local, "--study-name", "o",
                       "--quiet")
    assert code == 0, err
    study = check_exact(local, "o", 2)
    first, second = study.trials[0], study.trials[1]
    assert first.state == second.state == TrialState.COMPLETE and first.user_attrs["oom_retry_batch_size"] == 16
    # Trial 0: tuning ran out of memory before a batch; the retry tuned 2 steps and scored the 60
    # select images at 16; trial 1 did the same at 32.
    assert runs == [("tune_thresholds", []), ("tune_thresholds", [16, 16]), ("evaluate", [16, 16, 16, 12]),
                    ("tune_thresholds", [32, 32]), ("evaluate", [32, 28])]
    assert "oom_retry_batch_size" not in second.user_attrs


def test_cuda_oom_twice_fails_the_trial_with_reason(workdir, local, monkeypatch):
    fail_once(monkeypatch, search.study.objective, "tune_thresholds", torch.cuda.OutOfMemoryError("CUDA oom"), times=2)
    code, _, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 2), "--storage", local, "--study-name", "o2",
                       "--quiet")
    assert code == 0, err
    study = check_exact(local, "o2", 2)
    assert "again at 16" in study.trials[0].user_attrs["fail_reason"]


def test_configuration_error_in_a_trial_stops_the_run(workdir, local, monkeypatch):
    fail_once(monkeypatch, search.study.objective, "evaluate", LTMPError("plan: does not fit"), times=99)
    code, out, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 3), "--storage", local, "--study-name", "c",
                         "--quiet")
    assert code == 2 and err == "search: error: plan: does not fit\n"
    study = optuna.load_study(study_name="c", storage=local)
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 1


def test_a_trial_that_always_fails_stops_after_five(workdir, local, monkeypatch):
    fail_once(monkeypatch, search.study.objective, "evaluate", ValueError("always"), times=99)
    code, _, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 3), "--storage", local, "--study-name", "a",
                       "--quiet")
    assert code == 2 and "5 trials in a row failed" in err and "ValueError: always" in err


@pytest.mark.parametrize("url", [
    "postgresql://ltmp:s3cr3t-pw@127.0.0.1:1/nodb",
    "mysql+pymysql://root:s3cr3t-pw@127.0.0.1:1/nodb",
])
def test_unreachable_storage_never_shows_the_password(workdir, local, url):
    for args in (("studies", "--storage", url), ("run", "--preset", preset_file(workdir, 2), "--storage", url)):
        code, out, err = cli(*args)
        assert code == 2 and err.count("\n") == 1 and "cannot open" in err
        assert "s3cr3t" not in out + err and "***" in err


def test_saved_config_holds_no_storage(workdir, local):
    code, _, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 1), "--storage", local, "--study-name", "s",
                       "--quiet")
    assert code == 0, err
    saved = optuna.load_study(study_name="s", storage=local).user_attrs["config"]
    assert "storage" not in saved and not any("sqlite" in str(v) for v in saved.values())


def test_dashboard_binds_to_loopback_by_default(workdir, local, monkeypatch):
    import optuna_dashboard

    code, _, err = cli("run", "--flops", "0.5", "--preset", preset_file(workdir, 1), "--storage", local, "--quiet")
    assert code == 0, err
    served = {}
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: served.update(kw))
    code, _, err = cli("dashboard", "--storage", local)
    assert code == 0, err
    assert served["host"] == "127.0.0.1" and "http://127.0.0.1:8080" in err


def test_only_slots_run_a_trial_is_failed_as_surplus(tmp_path):
    """Slots carry the user attribute ``slot``; a trial `ask` made up (the last slot was taken) never runs."""
    from search.study.record import TrialRecord
    from search.study.worker import Surplus, _guarded, ensure_slots

    url = f"sqlite:///{tmp_path / 'slots.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    store = Store(url, write=True)
    assert ensure_slots(study, store, 2, [("a seed", {"x": 1.0})]) == 2
    assert ensure_slots(study, store, 2) == 0
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [TrialRecord.from_trial(t).slot for t in waiting] == [True, True]
    assert [TrialRecord.from_trial(t).seed_of for t in waiting] == ["a seed", None]
    ran = []
    guarded = _guarded(lambda trial: ran.append(trial.number) or 1.0)
    slot = study.ask()  # pops the first slot
    assert guarded(slot) == 1.0
    study.ask()  # the second slot, taken by "another worker"
    stray = study.ask()  # nothing waits any more: a fresh trial, not a slot
    with pytest.raises(Surplus):
        guarded(stray)
    assert ran == [slot.number]
    assert study.trials[stray.number].user_attrs["fail_reason"].startswith("surplus")
    store.dispose()


def test_slots_left_by_an_interrupted_run_do_not_override_a_smaller_n_trials(tmp_path):
    # Reproduces: `--n-trials 30` interrupted at trial 11 leaves its unused slots WAITING; a later
    # `--n-trials 14` with 20 finished ran 9 more trials instead of saying there was nothing to do.
    from search.study.record import TrialRecord
    from search.study.worker import ensure_slots, work

    url = f"sqlite:///{tmp_path / 'left.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    store = Store(url, write=True)
    objective = lambda trial: trial.suggest_float("x", 0, 1)  # noqa: E731
    ensure_slots(study, store, 3)
    assert len(work(study, objective, store, 3)) == 3
    for _ in range(2):  # what an interrupted `--n-trials 5` leaves behind
        study.enqueue_trial({}, user_attrs=TrialRecord(slot=True).to_user_attrs(), skip_if_exists=False)

    def finished() -> int:
        return len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))

    assert work(study, objective, store, 2) == [] and finished() == 3  # nothing to do
    assert work(study, objective, store, 3) == [] and finished() == 3
    assert len(work(study, objective, store, 4)) == 1 and finished() == 4  # one more, from a left slot
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    assert len(work(study, objective, store, 6)) == 2 and finished() == 6
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING, TrialState.FAIL))
    store.dispose()
