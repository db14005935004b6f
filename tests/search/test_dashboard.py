"""What optuna-dashboard shows: served through its WSGI app, and seen in a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore
from PIL import Image

import ltmp_core
from tests.search.helpers import cli, cli_in, preset
from search.present.plots import DIM, OUTLINE, SQUEEZE_MARK, accuracy_flops_plot, token_map

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]




@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("dash")
    (work / "p.toml").write_text(preset())
    url = f"sqlite:///{work / 'd.db'}"
    code, _, err = cli_in(work, "run", "--flops", "0.5", "--preset", "p.toml", "--storage", url, "--study-name", "dash",
                          "--quiet")
    assert code == 0, err
    return work, url


def wsgi_get(app, path: str) -> tuple[str, dict, bytes]:
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
    got: dict = {}

    def start_response(status, headers, exc_info=None):
        got.update(status=status, headers=dict(headers))

    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


def test_dashboard_serves_metric_names_constraints_notes_and_pictures(study):
    import optuna_dashboard

    work, url = study
    storage = optuna.storages.RDBStorage(url)
    app = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(work / "d-artifacts")))
    status, _, body = wsgi_get(app, "/api/studies")
    assert status.startswith("200") and b'"dash"' in body
    study_id = optuna.load_study(study_name="dash", storage=url)._study_id
    status, _, body = wsgi_get(app, f"/api/studies/{study_id}")
    data = json.loads(body)
    assert data["objective_names"] == ["top-1 accuracy"]
    assert "Target: measured FLOPs at most **0.5**" in data["note"]["body"]
    complete = [t for t in data["trials"] if t["state"] == "Complete"]
    assert complete
    # Trial 0 runs the seeded LTMP-shaped plan, and its note says so.
    assert complete[0]["number"] == 0 and complete[0]["note"]["body"].startswith("## Trial 0: the LTMP shape, seeded")
    for t in complete:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert {"constraint", "flops_ratio", "gmacs", "feasible"} <= set(attrs)
        assert t["note"]["body"].startswith(f"## Trial {t['number']}")
        assert "| layer | op | budget (keep) | merge threshold | prune threshold | mean tokens after |" in t["note"]["body"]
        names = {a["filename"]: a for a in t["artifacts"]}
        assert set(names) == {"token-map.png", "kept-tokens.png"}
        status, headers, png = wsgi_get(app, f"/artifacts/{study_id}/{t['trial_id']}/{names['token-map.png']['artifact_id']}")
        assert status.startswith("200") and png.startswith(b"\x89PNG")


def test_token_map_of_a_hand_built_case_draws_tokens_as_tome_does():
    """2x2 patches of 4 px: patches 0 (red) and 1 (blue) merged into one token, patch 2 (green)
    pruned, patch 3 (yellow) alone; a second block squeezes patch 3 into the merged token."""
    colours = [(200, 0, 0), (0, 0, 200), (0, 200, 0), (200, 200, 0)]
    image = torch.zeros(1, 3, 8, 8)
    for p, colour in enumerate(colours):
        r, c = divmod(p, 2)
        image[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = torch.tensor(colour).view(3, 1, 1) / 255
    owner = torch.tensor([[[1, 1, -1, 2]], [[1, 1, -1, 1]]])  # [depth=2, B=1, 4 patches]
    fate = torch.tensor([[[0, 0, ltmp_core.PRUNED, 0]], [[0, 0, ltmp_core.PRUNED, ltmp_core.SQUEEZED]]])
    trace = ltmp_core.TokenTrace(owner, fate, (2, 2))
    sheet = token_map(image, trace, ops=["merge+prune", "squeeze"], scale=2, gap=0, legend=False)
    assert sheet.size == (3 * 16, 26 + 16), "the image, then both reducing blocks"
    after = lambda block, x, y: sheet.getpixel((16 * (block + 1) + x, 26 + y))  # noqa: E731
    mean = (100, 0, 100)  # patches 0 and 1: one token, their mean colour
    for x, y in [(1, 1), (5, 5), (9, 1), (13, 5)]:
        assert after(0, x, y) == mean, (x, y, after(0, x, y))
    assert after(0, 7, 3) == mean, "no outline inside a token"
    assert after(0, 7, 11) == OUTLINE, "an outline between two tokens (the pruned patch and patch 3)"
    assert after(0, 2, 11) == (0, round(200 * DIM), 0), "pruned: dimmed, still its own colour"
    assert after(0, 12, 12) == (200, 200, 0), "a patch alone keeps its pixels"
    # Block 1: patch 3 was squeezed into the merged token: it takes the token's colour and a mark.
    fused = (133, 67, 67)  # the mean of red, blue and yellow: patches 0, 1 and 3 are one token now
    assert after(1, 9, 9) == fused and after(1, 1, 1) == fused
    assert after(1, 9, 14) == SQUEEZE_MARK, "the squeezed patch is marked"
    assert sheet.getpixel((0 + 3, 26 + 3)) == colours[0], "the first column is the image itself"


def test_token_map_titles_every_reducing_block_and_has_a_legend():
    image = torch.rand(1, 3, 8, 8)
    owner = torch.tensor([[[0, 1, 2, 3]]] * 4)
    fate = torch.zeros_like(owner)
    ops = ["merge", "none", "prune", "merge+squeeze"]
    plain = token_map(image, ltmp_core.TokenTrace(owner, fate, (2, 2)), ops=ops, scale=4, gap=4, legend=False)
    assert plain.size[0] == 4 * (32 + 4) - 4, "image + blocks 0, 2 and 3 (block 1 does not reduce)"
    keyed = token_map(image, ltmp_core.TokenTrace(owner, fate, (2, 2)), ops=ops, scale=4, gap=4)
    assert keyed.size[1] > plain.size[1], "a legend below the maps"


FEASIBLE, OVER, FRONT, TARGET = (0x4C, 0x72, 0xB0), (0xC4, 0x4E, 0x52), (0x55, 0xA8, 0x68), (0x81, 0x72, 0xB2)


def colour_pixels(path) -> dict[tuple[int, int, int], int]:
    """How many pixels of each of the plot's colours the picture holds (the legend's marks included)."""
    with Image.open(path) as img:
        counts = dict((c, n) for n, c in img.convert("RGB").getcolors(1 << 20))
    return {c: counts.get(c, 0) for c in (FEASIBLE, OVER, FRONT, TARGET)}


def test_accuracy_flops_plot_marks_feasible_and_over_target_trials(tmp_path):
    both, over = tmp_path / "both.png", tmp_path / "over.png"
    accuracy_flops_plot([(0.30, 0.90, True, 0), (0.32, 0.93, True, 1), (0.50, 0.97, False, 2)], 0.35, str(both))
    accuracy_flops_plot([(0.50, 0.97, False, 2)], 0.35, str(over))
    drawn, alone = colour_pixels(both), colour_pixels(over)
    assert all(n > 20 for n in drawn.values()), drawn  # two dots, a cross, the front, the target line
    assert alone[FEASIBLE] == 0 and alone[FRONT] == 0 and alone[OVER] > 20 and alone[TARGET] > 20
    two_dots = tmp_path / "two.png"
    accuracy_flops_plot([(0.30, 0.90, True, 0), (0.20, 0.80, True, 1)], 0.35, str(two_dots))
    one_dot = tmp_path / "one.png"
    accuracy_flops_plot([(0.30, 0.90, True, 0)], 0.35, str(one_dot))
    assert colour_pixels(two_dots)[FEASIBLE] > colour_pixels(one_dot)[FEASIBLE]


def test_show_plot_draws_the_trials(study, tmp_path):
    _, url = study
    path = tmp_path / "front.png"
    code, out, err = cli("show", "dash", "--storage", url, "--plot", str(path))
    assert code == 0, err
    trials = optuna.load_study(study_name="dash", storage=url).get_trials(states=[optuna.trial.TrialState.COMPLETE])
    feasible = [t for t in trials if t.user_attrs.get("feasible")]
    drawn = colour_pixels(path)
    assert drawn[TARGET] > 20
    assert (drawn[FEASIBLE] > 20) == bool(feasible) and (drawn[FRONT] > 20) == bool(feasible)
    assert (drawn[OVER] > 20) == (len(feasible) < len(trials))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(*args: str, timeout: float = 90) -> str:
    done = subprocess.run([shutil.which("chromium"), *CHROMIUM_FLAGS, *args], capture_output=True, text=True,
                          timeout=timeout)
    return done.stdout


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
def test_dashboard_in_a_real_browser(study, tmp_path):
    work, url = study
    server, port = serve_dashboard(url, work)
    try:
        study_id = optuna.load_study(study_name="dash", storage=url)._study_id
        profile = ["--user-data-dir=" + str(tmp_path / "profile"), "--virtual-time-budget=15000"]
        page = chromium(*profile, "--dump-dom", f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
        assert "dash" in page and "top-1 accuracy" in page
        trials = chromium(*profile, "--dump-dom", f"http://127.0.0.1:{port}/dashboard/studies/{study_id}/trials")
        assert 'alt="token-map.png"' in trials
        src = trials.split('alt="token-map.png" src="', 1)[1].split('"', 1)[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{src}", timeout=5) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"
        shot = tmp_path / "trials.png"
        chromium(*profile, "--window-size=1400,1000", f"--screenshot={shot}",
                 f"http://127.0.0.1:{port}/dashboard/studies/{study_id}/trials")
        with Image.open(shot) as img:
            assert img.size == (1400, 1000)
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20, "the page rendered, not blank"
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert "127.0.0.1" in server.stderr.read()


def two_trial_study(url: str, name: str = "two") -> optuna.Study:
    """Trial 0 feasible (80% at 0.34 of the FLOPs), trial 1 more accurate but over the 0.35 target."""
    import timm

    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr("config", {"flops": 0.35})
    model = timm.create_model("vit_small_patch16_224", depth=2, embed_dim=48, num_heads=3, img_size=32, patch_size=8)
    plan = ltmp_core.make_plan(model, op="merge", keep=0.5).to_dict()

    def objective(trial):
        accuracy, ratio = [(0.80, 0.34), (0.90, 0.40)][trial.number]
        trial.set_constraint("flops", ratio - 0.35)
        for key, value in {"accuracy": accuracy, "flops_ratio": ratio, "feasible": ratio <= 0.35, "plan": plan}.items():
            trial.set_user_attr(key, value)
        return accuracy

    study.optimize(objective, n_trials=2)
    return study


def test_dashboard_best_trial_and_infeasible_marks_agree_with_export(tmp_path):
    # optuna-dashboard 0.21 reads constraints only from the legacy list attribute and takes the best
    # trial from storage.get_best_trial (constraints ignored): it showed trial 1 as the best.
    import optuna_dashboard

    from search.present.dashboard import DashboardStorage
    from search.study.results import best_trial

    url = f"sqlite:///{tmp_path / 'two.db'}"
    study = two_trial_study(url)
    assert best_trial(study).number == 0
    code, out, err = cli("export", "two", "--storage", url, "-o", str(tmp_path / "plan.json"), "--json")
    assert code == 0, err
    assert json.loads(out)["trial"] == 0
    plain = json.loads(wsgi_get(optuna_dashboard.wsgi(optuna.storages.RDBStorage(url)), f"/api/studies/{study._study_id}")[2])
    assert [t["number"] for t in plain["best_trials"]] == [1], "the defect this storage exists for"
    app = optuna_dashboard.wsgi(DashboardStorage(url))
    data = json.loads(wsgi_get(app, f"/api/studies/{study._study_id}")[2])
    assert [t["number"] for t in data["best_trials"]] == [0]
    assert {t["number"]: t["constraints"] for t in data["trials"]} == {0: [pytest.approx(-0.01)],
                                                                       1: [pytest.approx(0.05)]}


def serve_dashboard(url: str, cwd) -> tuple[subprocess.Popen, int]:
    """`search dashboard` in a process, once it answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", "--storage", url, "--port", str(port)],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90  # a loaded 2-core machine can take over 30 s to import and bind
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=1)
            return server, port
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"dashboard did not start: {server.communicate()[1]}")
            time.sleep(0.3)


def visible_text(html: str) -> str:
    import re

    html = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
def test_browser_shows_the_feasible_best_trial_and_marks_the_infeasible_one(tmp_path):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    study_id = two_trial_study(url)._study_id
    server, port = serve_dashboard(url, tmp_path)
    try:
        profile = ["--user-data-dir=" + str(tmp_path / "profile"), "--virtual-time-budget=15000"]
        page = visible_text(chromium(*profile, "--dump-dom", f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"))
        assert "Best Trial (number=0)" in page, page[:2000]
        assert "Infeasible" in page, "the history plot's legend marks trial 1 infeasible"
        listing = visible_text(chromium(*profile, "--dump-dom",
                                        f"http://127.0.0.1:{port}/dashboard/studies/{study_id}/trials"))
        assert "Trial 0 Complete Best Trial Trial 1 Complete" in listing, listing[:2000]
    finally:
        server.terminate()
        server.wait(timeout=10)
