"""Helpers shared by the search tests: the CLI in-process, and tiny digits presets."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from search.cli import main

#: The digits preset shrunk for tests: a 1-epoch base model, 2 tuning steps, few images.
TINY_DIGITS = dict(model="ltmp_vit_digits", data="digits", img_size=32, holdout=60, calib_images=32, batch_size=32,
                   base_epochs=1, trial_steps=2, eval_every=100, eval_images=32, n_trials=3, seed=0)


def preset(**overrides) -> str:
    """TOML text of :data:`TINY_DIGITS` with ``overrides``."""
    values = {**TINY_DIGITS, **overrides}
    return "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in values.items())


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``search ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own exits (usage errors: 2)
            code = e.code
    return code, out.getvalue(), err.getvalue()


def isolate(mp: pytest.MonkeyPatch, workdir: Path) -> None:
    """Work in ``workdir``, with its own cache of trained base models and no ``OPTUNA_STORAGE`` from outside."""
    mp.chdir(workdir)
    mp.setenv("LTMP_CACHE", str(workdir / "cache"))
    mp.delenv("OPTUNA_STORAGE", raising=False)


def cli_in(workdir: Path, *args: str) -> tuple[int, str, str]:
    """:func:`cli` run inside ``workdir`` (:func:`isolate`), for module fixtures, which have no ``monkeypatch``."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, workdir)
        return cli(*args)


def folder_with(factory: pytest.TempPathFactory, name: str, files: dict[str, str]) -> Path:
    """A fresh module folder holding ``files`` (name: text), e.g. the presets its studies run."""
    path = factory.mktemp(name)
    for file, text in files.items():
        (path / file).write_text(text)
    return path


def run_study(workdir: Path, preset_file: str, name: str, flops: float = 0.5) -> tuple[str, str]:
    """``search run --flops F --preset P`` into ``workdir/NAME.db`` as study NAME; its URL and stdout."""
    url = f"sqlite:///{workdir / name}.db"
    code, out, err = cli_in(workdir, "run", "--flops", str(flops), "--preset", preset_file, "--storage", url,
                            "--study-name", name, "--quiet")
    assert code == 0, err
    return url, out
