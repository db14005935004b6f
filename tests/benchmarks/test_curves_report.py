"""benchmarks/curves_report.py on synthetic rows whose answers are known by hand (no training)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from search.setup.evaluation import pack_correct

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("curves_report", ROOT / "benchmarks" / "curves_report.py")
cr = sys.modules["curves_report"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(cr)

N = 1000


def row(method: str, seed: int, setting: str, fe: float, select: float, correct=None, test: float | None = None):
    r = {"method": method, "proxy": "mnist", "seed": seed, "flops_target": 0.35, "setting": setting,
         "forward_equivalents": fe, "select_top1": select, "flops_ratio": 0.34}
    if correct is not None:
        r.update(test_top1=float(correct.mean()), test_images=len(correct), test_correct=pack_correct(correct))
    else:
        r["test_top1"] = test
    return r


def vectors(plus: int, minus: int, base: int = 800, n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(search, baseline): both right on ``base`` images, the search alone on ``plus``, the baseline alone on
    ``minus``, in a shuffled order."""
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:base] = b[:base] = True
    a[base:base + plus] = True
    b[base + plus:base + plus + minus] = True
    order = np.random.default_rng(seed).permutation(n)
    return a[order], b[order]


def test_ten_images_all_for_the_search_is_one_point_with_an_interval_excluding_zero():
    a, b = vectors(10, 0)
    rows = [row("search", 0, "24 trials", 1000, 0.9, a), row("ltmp", 0, "1 epochs", 900, 0.9, b)]
    (m,) = cr.margins(rows, "24 trials")
    assert m.margin == pytest.approx(1.0)
    low, high = m.interval
    assert 0 < low < 1.0 < high
    # The count of "+1" images among 1,000 drawn is Binomial(1000, 0.01): its 2.5% and 97.5% quantiles (4 and 17
    # images), to within one image.
    from scipy.stats import binom

    expected = binom.ppf([0.025, 0.975], N, 0.01) / N * 100
    assert (low, high) == (pytest.approx(expected[0], abs=0.1), pytest.approx(expected[1], abs=0.1))


def test_ten_images_split_evenly_is_zero_with_an_interval_around_it():
    a, b = vectors(5, 5)
    rows = [row("search", 0, "24 trials", 1000, 0.9, a), row("ltmp", 0, "1 epochs", 900, 0.9, b)]
    (m,) = cr.margins(rows, "24 trials")
    assert m.margin == pytest.approx(0.0)
    assert m.interval[0] < 0 < m.interval[1]
    assert m.interval[0] == pytest.approx(-m.interval[1], abs=0.15)


def test_pooled_over_seeds_is_the_mean_of_the_seeds_margins_with_a_normal_theory_interval():
    """Seed 0: +100 / -60 images (+4.0 points); seed 1: +30 / -30 (0). Mean +2.0 points. The bootstrap of a mean
    of two independent per-seed means is close to normal: half the root sum of the per-seed variances."""
    pairs = [vectors(100, 60, seed=1), vectors(30, 30, seed=2)]
    rows = [row("search", s, "24 trials", 1000, 0.9, a) for s, (a, _) in enumerate(pairs)]
    rows += [row("ltmp", s, "1 epochs", 900, 0.9, b) for s, (_, b) in enumerate(pairs)]
    (m,) = cr.margins(rows, "24 trials")
    assert m.margin == pytest.approx(2.0) and m.seeds == [0, 1]
    var = sum((p + q) / N - ((p - q) / N) ** 2 for p, q in [(100, 60), (30, 30)]) / N
    half = 100 * 1.96 * math.sqrt(var) / 2
    assert m.interval == (pytest.approx(2.0 - half, abs=0.1), pytest.approx(2.0 + half, abs=0.1))


def test_the_interval_is_that_of_resampling_image_indices():
    """The multinomial draw is the same bootstrap as drawing image indices with replacement."""
    pairs = [vectors(40, 25, seed=3), vectors(15, 5, seed=4)]
    rng = np.random.default_rng(7)
    naive = np.zeros(4000)
    for a, b in pairs:
        d = a.astype(int) - b.astype(int)
        naive += d[rng.integers(0, N, size=(4000, N))].mean(axis=1)
    expected = np.percentile(naive / 2, [2.5, 97.5])
    assert cr.paired_interval(pairs) == (pytest.approx(expected[0], abs=0.002), pytest.approx(expected[1], abs=0.002))


def test_the_baseline_row_is_chosen_on_select_within_the_search_compute_never_on_test():
    a, _ = vectors(100, 0)  # 90% right
    rows = [row("search", 0, "24 trials", 1000, 0.95, a),
            row("ltmp", 0, "1 epochs", 300, 0.90, test=0.80),
            row("ltmp", 0, "2 epochs", 600, 0.93, test=0.85),   # best on select within 1,000
            row("ltmp", 0, "3 epochs", 900, 0.92, test=0.89),   # best on test: not chosen
            row("ltmp", 0, "4 epochs", 1200, 0.99, test=0.95)]  # over the search's compute
    (m,) = cr.margins(rows, "24 trials")
    assert m.margin == pytest.approx(100 * (0.9 - 0.85))
    assert "2 epochs" in m.chosen[0]
    assert m.interval is None and "per-image" in m.note



def test_a_row_over_its_flops_target_on_select_is_never_chosen():
    rows = [row("search", 0, "24 trials", 1000, 0.95, test=0.90),
            {**row("ltmp", 0, "1 epochs", 300, 0.97, test=0.93), "select_flops_ratio": 0.37},  # over 0.35: no answer
            {**row("ltmp", 0, "2 epochs", 600, 0.90, test=0.86), "select_flops_ratio": 0.349}]
    (m,) = cr.margins(rows, "24 trials")
    assert m.margin == pytest.approx(100 * (0.90 - 0.86)) and "2 epochs" in m.chosen[0]
    only_over = [rows[0], rows[1]]
    (m,) = cr.margins(only_over, "24 trials")
    assert m.margin is None and "on the FLOPs target" in m.note
    # The compute factor reads the same rows: the over-target row's 93% does not reach the search's 90% for it.
    _, (factor,) = cr.compute_factors(rows, "24 trials")
    assert factor.factor is None

def test_best_baseline_is_chosen_on_select_across_methods_per_seed():
    rows = [row("search", 0, "24 trials", 1000, 0.95, test=0.90),
            row("ltmp", 0, "1 epochs", 500, 0.91, test=0.88),
            row("tome", 0, "1 trials", 100, 0.93, test=0.70)]
    margins = {m.baseline: m for m in cr.margins(rows, "24 trials")}
    assert set(margins) == {"ltmp", "tome", "best baseline"}
    assert margins["best baseline"].margin == pytest.approx(20.0) and "tome" in margins["best baseline"].chosen[0]


def test_the_searchs_own_variants_are_compared_but_never_the_best_baseline():
    rows = [row("search", 0, "24 trials", 1000, 0.95, test=0.90),
            row("search+tune", 0, "3 trials", 500, 0.99, test=0.91),  # best on select of all: a variant
            row("ltmp", 0, "1 epochs", 500, 0.91, test=0.88),
            row("tome", 0, "1 trials", 100, 0.93, test=0.70)]
    margins = {m.baseline: m for m in cr.margins(rows, "24 trials")}
    assert set(margins) == {"ltmp", "tome", "search+tune", "best baseline"}
    assert margins["search+tune"].margin == pytest.approx(-1.0)
    assert margins["best baseline"].margin == pytest.approx(20.0) and "tome" in margins["best baseline"].chosen[0]


def test_compute_factor_at_the_first_setting_that_reaches_the_search():
    rows = [row("search", s, "24 trials", 1000, 0.9, test=0.90) for s in (0, 1)]
    for s in (0, 1):
        rows += [row("ltmp", s, "1 epochs", 500, 0.80, test=0.80), row("ltmp", s, "4 epochs", 2000, 0.85, test=0.85),
                 row("ltmp", s, "8 epochs", 4000, 0.91, test=0.90 + 0.02 * s)]
    _, (factor,) = cr.compute_factors(rows, "24 trials")
    assert (factor.factor, factor.after, factor.setting) == (4.0, 2.0, "8 epochs")


def test_a_baseline_that_never_reaches_the_search_has_a_lower_bound():
    rows = [row("search", 0, "24 trials", 1000, 0.9, test=0.90)]
    rows += [row("ltmp", 0, f"{e} epochs", 1000 * e, 0.80, test=0.89) for e in (1, 2, 8)]
    result = cr.report(rows, "24 trials")
    (factor,) = result["factors"]
    assert factor["factor"] is None and factor["after"] == 8.0 and result["best_factor"] is None
    assert "not reached within the measured compute" in cr.render(result) and "factor > 8.00" in cr.render(result)


def test_the_envelope_keeps_the_best_row_on_select_not_the_settings_own():
    """LTMP at 8 epochs selects worse than at 4: a user with 8 epochs of compute keeps the 4-epoch row."""
    rows = [row("search", 0, "24 trials", 1000, 0.9, test=0.90),
            row("ltmp", 0, "4 epochs", 2000, 0.92, test=0.91), row("ltmp", 0, "8 epochs", 4000, 0.85, test=0.95)]
    _, (factor,) = cr.compute_factors(rows, "24 trials")
    assert factor.setting == "4 epochs" and factor.factor == 2.0 and factor.after is None


def test_default_setting_is_the_largest_every_seed_reached():
    rows = [row("search", 0, f"{k} trials", 100 * k, 0.9, test=0.9) for k in (1, 2, 3)]
    rows += [row("search", 1, f"{k} trials", 100 * k, 0.9, test=0.9) for k in (1, 2)]
    assert cr.default_setting(rows) == "2 trials"


def test_per_image_data_that_disagrees_with_the_row_is_refused():
    a, b = vectors(10, 0)
    bad = row("ltmp", 0, "1 epochs", 900, 0.9, b)
    bad["test_top1"] += 0.01
    with pytest.raises(ValueError, match="is not its test_top1"):
        cr.margins([row("search", 0, "24 trials", 1000, 0.9, a), bad], "24 trials")


def test_command_line_reads_older_rows_without_setting_and_draws_the_plot(tmp_path, capsys):
    rows = [{"method": "search", "seed": 0, "flops_target": 0.35, "trials": k, "forward_equivalents": 1000 * k,
             "select_top1": 0.9 + 0.01 * k, "test_top1": 0.9 + 0.01 * k, "flops_ratio": 0.34, "proxy": "mnist"}
            for k in (1, 2, 3)]
    rows.append({"method": "ltmp", "seed": 0, "flops_target": 0.35, "epochs": 1, "forward_equivalents": 1500,
                 "select_top1": 0.9, "test_top1": 0.9, "flops_ratio": 0.34, "proxy": "mnist"})
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = tmp_path / "plot.png"
    assert cr.main([str(path), "--plot", str(png), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["search"]["setting"] == "3 trials"
    assert result["margins"][0]["margin"] == pytest.approx(3.0) and result["margins"][0]["interval"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tie_on_select_keeps_the_cheaper_row_and_says_so():
    rows = [row("search", 0, "24 trials", 1000, 0.95, test=0.90),
            row("ltmp", 0, "2 epochs", 400, 0.93, test=0.85), row("ltmp", 0, "4 epochs", 800, 0.93, test=0.87)]
    (m,) = cr.margins(rows, "24 trials")
    assert m.margin == pytest.approx(5.0)
    assert m.chosen[0].startswith("seed 0: ltmp 2 epochs") and "tied on select with ltmp 4 epochs" in m.chosen[0]


def test_refined_minus_parent_is_read_on_select_per_refined_trial():
    rows = [row("search+refine", 0, "24 trials", 100, 0.96, test=0.97),
            {**row("search+refine", 0, "24 trials + 1 refined", 130, 0.965, test=0.964),
             "refined_from": 8, "refined_trial": 24, "refined_select_top1": 0.965, "parent_select_top1": 0.96},
            {**row("search+refine", 1, "24 trials + 1 refined", 130, 0.95, test=0.99),
             "refined_from": 3, "refined_trial": 24, "refined_select_top1": 0.94, "parent_select_top1": 0.95},
            row("ltmp", 0, "1 epochs", 50, 0.90, test=0.99)]
    result = cr.refined_on_select(rows, "search+refine")
    assert [p["parent"] for p in result["pairs"]] == [8, 3]
    assert result["mean"] == pytest.approx((0.005 - 0.01) / 2)
    assert (result["better"], result["worse"]) == (1, 1)
    assert cr.refined_on_select(rows, "ltmp") is None
