"""Accuracy against compute, read from rows: the plot, the search's margin at equal compute, the compute factor.

    python benchmarks/curves_report.py ROWS.jsonl [ROWS.jsonl ...] [--proxy mnist] [--flops 0.35]
        [--at "24 trials"] [--plot docs/compute_curves_mnist_0.35.png] [--json]

ROWS are the JSON lines of ``benchmarks/compute_curves.py --json`` (and of ``benchmarks/proxy_search.py --json``:
one row per method and seed, its whole study), any number of seeds and methods; each row has ``method``,
``seed``, ``forward_equivalents``, ``select_top1``, ``test_top1`` and, from rows written since issue 26,
``test_correct`` / ``test_images`` (which test images it got right, :func:`search.setup.evaluation.pack_correct`).
Rows of one proxy and one FLOPs target are read (``--proxy`` / ``--flops`` pick them when the files hold several).

- **Plot** (``--plot``): test top-1 against forward equivalents, log x, one curve per method. The points
  are a method's *settings* (``"k trials"``, ``"e epochs"``): at each, the mean over seeds of its forward
  equivalents and of its test top-1, and a band from the lowest to the highest seed's test top-1. A
  method with one setting is one point with a min-max bar. The search's compared point is ringed.
- **Margin at equal compute**: the search's row at ``--at`` (default: its largest setting, the default
  study's compute), per seed. For each other method, per seed, the row it would have chosen with at most
  that seed's search compute: the highest ``select_top1`` among its rows on the FLOPs target (on select:
  ``select_flops_ratio`` at most ``flops_target``, :func:`on_budget`) with ``forward_equivalents`` at
  most the search's (ties: the cheaper, as the search's best-so-far keeps its earlier trial), never chosen
  on test; the report names the rows a tie passed over. Margin = search test top-1 minus that row's,
  mean over seeds. "best baseline" chooses the same way among all other methods' rows together, the search's
  own variants (methods named ``search...``, e.g. ``search+tune``) left out. The 95%
  interval is a paired percentile bootstrap over test images, pooled over seeds: 10,000 resamples (fixed
  generator), each drawing every seed's test images with replacement (the two methods' answers on an
  image stay together) and averaging the seeds' margins. An image's paired difference is -1, 0 or +1, so
  drawing n images with replacement is drawing the three counts from a multinomial; that is what is
  computed. Without ``test_correct`` on both rows of every seed there is no interval, and the report says so.
- **Compute factor**: each other method's curve, read the same way (at each of its settings, per seed,
  the best row on select at or under that compute; the test top-1 of that row, mean over seeds): the first
  setting at which it reaches the search's mean test top-1 at ``--at``, its mean forward equivalents
  divided by the search's. Settings are measured points, so the crossing lies between that setting and
  the one before. When no setting reaches it: "not reached", the factor above the largest measured
  compute over the search's.
- **Refined against parent, on select** (rows of ``compute_curves.py --methods search+refine``): for every
  refined trial, its select top-1 minus its parent trial's (the same shape before the refine stage), and
  their mean; the refine stage's default is decided on this, never on test.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SEARCH = "search"
RESAMPLES = 10_000
RNG_SEED = 0
NO_INTERVAL = "no interval: no per-image test data"


def read_rows(paths: list[str]) -> list[dict]:
    """Every JSON line of ``paths`` that was scored on test and counted its compute."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("test_top1") is not None and row.get("forward_equivalents") is not None:
                    rows.append(row)
    return rows


def setting_of(row: dict) -> str:
    """The row's compute setting: ``setting``, else (older rows) its trials or epochs."""
    if row.get("setting"):
        return row["setting"]
    if row.get("epochs") is not None:
        return f"{row['epochs']} epochs"
    return f"{row.get('trials', 1)} trials"


def one_group(rows: list[dict], proxy: str | None = None, flops: float | None = None) -> list[dict]:
    """The rows of one proxy and FLOPs target, each keyed once per (method, seed, setting): the last wins."""
    rows = [r for r in rows if (proxy is None or r.get("proxy") == proxy)
            and (flops is None or abs(r.get("flops_target", flops) - flops) < 1e-9)]
    groups = {(r.get("proxy"), r.get("flops_target")) for r in rows}
    if len(groups) != 1:
        raise SystemExit(f"expected the rows of one proxy and FLOPs target, found {sorted(groups, key=str)}: "
                         "pick one with --proxy and --flops")
    kept: dict[tuple, dict] = {}
    for r in rows:
        key = (r["method"], r.get("seed", 0), setting_of(r))
        if key in kept:
            print(f"note: two rows for {key}; the later one is used", file=sys.stderr)
        kept[key] = {**r, "seed": r.get("seed", 0), "setting": setting_of(r)}
    return list(kept.values())


def by_method_seed(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    out: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[r["method"]][r["seed"]].append(r)
    return out


def on_budget(row: dict) -> bool:
    """Whether a row is an answer at its FLOPs target, judged as a user could judge it, on select: its
    ``select_flops_ratio`` at or under ``flops_target``. Rows without that figure were chosen under the
    target by their own study (the search's best feasible trial, ToMe's and TPS's counts) and count as on
    it. A row over the target is drawn but never chosen: more FLOPs buy accuracy, so it is no answer."""
    ratio, target = row.get("select_flops_ratio"), row.get("flops_target")
    return ratio is None or target is None or ratio <= target + 1e-12


def chosen_within(rows: list[dict], budget: float) -> dict | None:
    """The row chosen on select among ``rows`` on their FLOPs budget (:func:`on_budget`) and at or under
    ``budget`` forward equivalents (ties: the cheaper)."""
    within = [r for r in rows if r["forward_equivalents"] <= budget and r.get("select_top1") is not None
              and on_budget(r)]
    return max(within, key=lambda r: (r["select_top1"], -r["forward_equivalents"]), default=None)


@dataclass
class Point:
    """One setting of a method over its seeds."""

    setting: str
    forward_equivalents: float  # mean over seeds
    top1: float  # mean test top-1
    low: float  # lowest seed's
    high: float  # highest seed's
    seeds: int


def curve(rows: list[dict], *, envelope: bool = False) -> list[Point]:
    """One method's points by setting, cheapest first. ``envelope``: at each setting and seed, the row chosen on
    select at or under that compute (what a user of the method would pick having spent it), not the setting's own."""
    per_seed = defaultdict(list)
    for r in rows:
        per_seed[r["seed"]].append(r)
    groups = defaultdict(list)
    for r in rows:
        scored = chosen_within(per_seed[r["seed"]], r["forward_equivalents"]) if envelope else r
        if scored is not None:  # with nothing on the budget yet, the envelope has no point there
            groups[r["setting"]].append((r["forward_equivalents"], scored["test_top1"]))
    points = [Point(s, float(np.mean([f for f, _ in v])), float(np.mean([t for _, t in v])),
                    min(t for _, t in v), max(t for _, t in v), len(v)) for s, v in groups.items()]
    return sorted(points, key=lambda p: p.forward_equivalents)


def default_setting(search_rows: list[dict]) -> str:
    """The search's largest setting that every seed reached (the default study's compute)."""
    seeds = {r["seed"] for r in search_rows}
    common = [p for p in curve(search_rows) if p.seeds == len(seeds)]
    if not common:
        raise SystemExit("no search setting is present for every seed; name one with --at")
    return common[-1].setting


def paired_interval(pairs: list[tuple[np.ndarray, np.ndarray]], *, resamples: int = RESAMPLES,
                    seed: int = RNG_SEED) -> tuple[float, float]:
    """95% percentile bootstrap of mean over seeds of mean(a - b), images resampled within each seed.

    ``pairs``: per seed, the two methods' per-image correctness on the same images in the same order."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"paired vectors differ in length: {a.shape} and {b.shape}")
        d = a.astype(np.int8) - b.astype(np.int8)
        n = len(d)
        counts = rng.multinomial(n, [np.mean(d == 1), np.mean(d == -1), np.mean(d == 0)], size=resamples)
        total += (counts[:, 0] - counts[:, 1]) / n
    low, high = np.percentile(total / len(pairs), [2.5, 97.5])
    return float(low), float(high)


def correct_of(row: dict) -> np.ndarray | None:
    """The row's per-image test correctness, checked against its test top-1; None if it has none."""
    if not row.get("test_correct"):
        return None
    from search.setup.evaluation import unpack_correct

    vector = unpack_correct(row["test_correct"], row["test_images"])
    if abs(vector.mean() - row["test_top1"]) > 1e-9:
        raise ValueError(f"{row['method']} seed {row['seed']} {row['setting']}: per-image mean {vector.mean()} "
                         f"is not its test_top1 {row['test_top1']}")
    return vector


@dataclass
class Margin:
    """The search against one baseline (or the best of them) at the search's compute."""

    baseline: str
    seeds: list[int]
    margin: float | None  # points, mean over seeds
    interval: tuple[float, float] | None  # points
    chosen: list[str]  # per seed: the baseline row chosen (method, setting, forward equivalents, test top-1)
    note: str = ""


def margin_against(search: dict[int, dict], rows: dict[int, list[dict]], name: str) -> Margin:
    """``search``: per seed, the search's compared row; ``rows``: per seed, the baseline's rows."""
    pairs, seeds, diffs, chosen = [], [], [], []
    for seed, s in sorted(search.items()):
        b = chosen_within(rows.get(seed, []), s["forward_equivalents"])
        if b is None:
            continue
        seeds.append(seed)
        diffs.append(s["test_top1"] - b["test_top1"])
        over = " over the target" if b.get("flops_ratio", 0) > b.get("flops_target", 1) + 1e-12 else ""
        ties = [f"{r['method']} {r['setting']}" for r in rows.get(seed, []) if r is not b
                and r["forward_equivalents"] <= s["forward_equivalents"] and r.get("select_top1") == b["select_top1"]]
        tied = f"; tied on select with {', '.join(ties)} (the cheaper is kept)" if ties else ""
        chosen.append(f"seed {seed}: {b['method']} {b['setting']} at {b['forward_equivalents']:,.0f} f.e., "
                      f"{100 * b['select_top1']:.1f}% select, {100 * b['test_top1']:.1f}% test "
                      f"(FLOPs {b.get('flops_ratio', float('nan')):.3f}{over}){tied}")
        pairs.append((correct_of(s), correct_of(b)))
    if not seeds:
        return Margin(name, [], None, None, [], "no row on the FLOPs target at or under the search's compute")
    margin = 100 * float(np.mean(diffs))
    if any(a is None or b is None for a, b in pairs):
        return Margin(name, seeds, margin, None, chosen, NO_INTERVAL)
    low, high = paired_interval(pairs)
    return Margin(name, seeds, margin, (100 * low, 100 * high), chosen)


def margins(rows: list[dict], setting: str, search: str = SEARCH) -> list[Margin]:
    """The search at ``setting`` against each other method, then against the best of them chosen on select."""
    grouped = by_method_seed(rows)
    at = {seed: r for seed, rs in grouped[search].items() for r in rs if r["setting"] == setting}
    others = sorted(m for m in grouped if m != search)
    out = [margin_against(at, grouped[m], m) for m in others]
    # Variants of the search (``search+tune``, ``search+refine``, another setting's ``search``) are compared
    # one by one, but they are not baselines: the best baseline is chosen among the other methods only.
    baselines = [m for m in others if not m.startswith("search")]
    pooled = defaultdict(list)
    for m in baselines:
        for seed, rs in grouped[m].items():
            pooled[seed].extend(rs)
    if len(baselines) > 1:
        out.append(margin_against(at, pooled, "best baseline"))
    return out


@dataclass
class Factor:
    """How much compute a baseline needs to reach the search's test top-1, over the search's."""

    baseline: str
    factor: float | None  # at the first setting that reaches it; None: not reached
    after: float | None  # the setting before that one (the crossing lies between), or the bound when not reached
    setting: str | None


def compute_factors(rows: list[dict], setting: str, search: str = SEARCH) -> tuple[Point, list[Factor]]:
    grouped = by_method_seed(rows)
    point = next(p for p in curve([r for rs in grouped[search].values() for r in rs]) if p.setting == setting)
    out = []
    for method in sorted(m for m in grouped if m != search):
        points = curve([r for rs in grouped[method].values() for r in rs], envelope=True)
        reached = [i for i, p in enumerate(points) if p.top1 >= point.top1 - 1e-12]
        if not reached:
            out.append(Factor(method, None, points[-1].forward_equivalents / point.forward_equivalents, None))
            continue
        i = reached[0]
        before = points[i - 1].forward_equivalents / point.forward_equivalents if i else None
        out.append(Factor(method, points[i].forward_equivalents / point.forward_equivalents, before, points[i].setting))
    return point, out


def plot(rows: list[dict], path: str, *, setting: str, search: str = SEARCH) -> None:
    """Test top-1 against forward equivalents (log x): per method the mean over seeds, a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = by_method_seed(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted(grouped, key=lambda m: (m != search, m)):
        points = curve([r for rs in grouped[method].values() for r in rs])
        x = [p.forward_equivalents for p in points]
        y = np.array([100 * p.top1 for p in points])
        low, high = np.array([100 * p.low for p in points]), np.array([100 * p.high for p in points])
        seeds = len(grouped[method])
        label = f"{method} ({seeds} seed{'s' if seeds > 1 else ''})"
        if len(points) == 1:
            # Equal seeds give a mean a rounding error off their min and max: no bar is below zero.
            ax.errorbar(x, y, yerr=[np.clip(y - low, 0, None), np.clip(high - y, 0, None)], fmt="o", capsize=3,
                        label=label)
            continue
        line, = ax.plot(x, y, marker=".", label=label, drawstyle="steps-post" if method == search else "default")
        ax.fill_between(x, low, high, alpha=0.2, color=line.get_color(), step="post" if method == search else None)
        if method == search:
            p = next(p for p in points if p.setting == setting)
            ax.plot([p.forward_equivalents], [100 * p.top1], "o", mfc="none", ms=12, color=line.get_color(),
                    label=f"{search} at {setting} (compared)")
    first = rows[0]
    ax.set_xscale("log")
    ax.set_xlabel("forward equivalents (images through the model, backward passes counted)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{first.get('proxy')} proxy, FLOPs target {first.get('flops_target')}: mean over seeds, "
                 "band min-max", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def refined_on_select(rows: list[dict], search: str = SEARCH) -> dict | None:
    """Per refined trial of ``search``'s rows, select top-1 refined minus parent (``None`` without such rows)."""
    pairs = [{"seed": r["seed"], "parent": r["refined_from"], "trial": r.get("refined_trial"),
              "difference": r["refined_select_top1"] - r["parent_select_top1"]}
             for r in rows if r["method"] == search and r.get("refined_select_top1") is not None
             and r.get("parent_select_top1") is not None]
    if not pairs:
        return None
    differences = [p["difference"] for p in pairs]
    return {"pairs": pairs, "mean": float(np.mean(differences)), "better": sum(d > 0 for d in differences),
            "worse": sum(d < 0 for d in differences)}


def report(rows: list[dict], setting: str, search: str = SEARCH) -> dict:
    """Everything the text and ``--json`` print."""
    point, factors = compute_factors(rows, setting, search)
    reached = [f for f in factors if f.factor is not None]
    return {
        "proxy": rows[0].get("proxy"), "flops_target": rows[0].get("flops_target"),
        "seeds": sorted({r["seed"] for r in rows if r["method"] == search}),
        "search": {"setting": setting, **asdict(point)},
        "margins": [asdict(m) for m in margins(rows, setting, search)],
        "factors": [asdict(f) for f in factors],
        "best_factor": min(reached, key=lambda f: f.factor).baseline if reached else None,
        "resamples": RESAMPLES, "rng_seed": RNG_SEED,
        "refined_on_select": refined_on_select(rows, search),
    }


def render(result: dict) -> str:
    s = result["search"]
    lines = [f"{result['proxy']} at FLOPs {result['flops_target']}, seeds {result['seeds']}: search at {s['setting']}, "
             f"{s['forward_equivalents']:,.0f} forward equivalents (mean), test top-1 {100 * s['top1']:.2f}% "
             f"(min {100 * s['low']:.1f}, max {100 * s['high']:.1f})", "",
             "Margin at equal compute (search minus the baseline's row chosen on select within the search's compute):"]
    for m in result["margins"]:
        if m["margin"] is None:
            lines.append(f"  {m['baseline']}: {m['note']}")
            continue
        ci = (f"95% CI [{m['interval'][0]:+.2f}, {m['interval'][1]:+.2f}] (paired bootstrap over test images, "
              f"{result['resamples']:,} resamples)" if m["interval"] else m["note"])
        lines.append(f"  {m['baseline']}: {m['margin']:+.2f} points over seeds {m['seeds']}; {ci}")
        lines.extend(f"      {c}" for c in m["chosen"])
    if any(m["note"] == NO_INTERVAL for m in result["margins"]):
        lines.append("  (an interval needs per-image test data, test_correct, on both rows of every seed: "
                     "rows written since issue 26 carry it)")
    lines += ["", "Compute factor (a baseline's forward equivalents to reach the search's test top-1, over the search's):"]
    for f in result["factors"]:
        if f["factor"] is None:
            lines.append(f"  {f['baseline']}: not reached within the measured compute (its largest is {f['after']:.2f}x "
                         f"the search's): factor > {f['after']:.2f}")
        else:
            between = f" (first measured at {f['setting']}; the crossing lies above {f['after']:.2f})" \
                if f["after"] is not None else f" (at its first setting, {f['setting']})"
            lines.append(f"  {f['baseline']}: {f['factor']:.2f}{between}")
    if result["best_factor"] is None:
        lines.append("  no baseline reached it within its measured compute")
    else:
        lines.append(f"  the least: {result['best_factor']}")
    refined = result.get("refined_on_select")
    if refined:
        lines += ["", f"Refined minus parent on select ({len(refined['pairs'])} refined trials): mean "
                      f"{100 * refined['mean']:+.2f} points, {refined['better']} better, {refined['worse']} worse"]
        lines.extend(f"  seed {p['seed']}: trial {p['parent']} -> {p['trial']}: {100 * p['difference']:+.1f}"
                     for p in refined["pairs"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", help="JSONL files of compute_curves.py / proxy_search.py --json")
    parser.add_argument("--proxy", help="the rows of this proxy (when the files hold several)")
    parser.add_argument("--flops", type=float, help="the rows of this FLOPs target (when the files hold several)")
    parser.add_argument("--search", default=SEARCH, help="the method compared with the others")
    parser.add_argument("--at", help="the search's setting to compare at (default: its largest, e.g. '24 trials')")
    parser.add_argument("--plot", help="write the plot to this PNG")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = one_group(read_rows(args.rows), args.proxy, args.flops)
    searched = [r for r in rows if r["method"] == args.search]
    if not searched:
        raise SystemExit(f"no rows of method {args.search!r}")
    setting = args.at or default_setting(searched)
    result = report(rows, setting, args.search)
    if args.plot:
        plot(rows, args.plot, setting=setting, search=args.search)
        result["plot"] = args.plot
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
