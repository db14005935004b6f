"""benchmarks/coverage.py's classification on a few models (fast), and its whole walk over timm's
ViT-like models (``-m benchmark``: minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def coverage():
    spec = importlib.util.spec_from_file_location("coverage_benchmark", ROOT / "benchmarks" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "status"), [
    ("vit_small_patch16_rope_224", "supported"),
    ("vit_relpos_small_patch16_224", "supported"),
    ("vit_small_r26_s32_224", "refused"),  # a hybrid ResNet stem
])
def test_coverage_classifies(name, status):
    cov = coverage()
    got, detail = cov.classify(cov.build(name))
    assert got == status, detail
    assert "\n" not in detail


@pytest.mark.benchmark
def test_no_timm_vit_is_patched_wrong():
    rows = coverage().run("*")
    wrong = [(name, detail) for _, name, status, detail in rows if status == "wrong"]
    assert not wrong
