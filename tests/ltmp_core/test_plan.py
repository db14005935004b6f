"""Plans: validation, JSON round trip, every invalid case raising the one project error."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ltmp_core
from ltmp_core import LayerPlan, LTMPError, ReductionPlan
from ltmp_core.plan import stage_counts
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def plan() -> ReductionPlan:
    model = tiny_model("deit_small")
    return ltmp_core.make_plan(
        model,
        op=["merge", "merge+prune", "squeeze", "merge+squeeze"],
        keep=[0.75, 0.6, 0.8, 0.5],
        merge_keep=[None, 0.8, None, None],
        meta={"target": 0.35, "note": "hand-made"},
    ).with_layers(
        merge_threshold=[0.9, 0.8, None, 0.7],
        prune_threshold=[None, 0.01, 0.02, 0.03],
    )


def test_make_plan_reads_model_geometry(plan):
    assert plan.depth == 4
    assert plan.model == "deit_small_patch16_224"
    g = plan.geometry
    assert (g.num_patches, g.num_prefix_tokens, g.embed_dim, g.num_heads, g.depth) == (16, 1, 48, 3, 4)
    assert plan.ops == ("merge", "merge+prune", "squeeze", "merge+squeeze")


def test_json_round_trip(plan, tmp_path):
    path = ltmp_core.save_plan(plan, tmp_path / "sub" / "plan.json")
    loaded = ltmp_core.load_plan(path)
    assert loaded == plan
    data = json.loads(path.read_text())
    assert data["format"] == "ltmp-plan" and data["version"] == 3
    assert data["layers"][1] == {
        "op": "merge+prune", "keep": 0.6, "merge_keep": 0.8,
        "merge_threshold": 0.8, "prune_threshold": 0.01, "tau": 0.1, "importance": "mean",
        "merge_order": "keep", "squeeze_host": "keys", "importance_scale": "relative",
        "heads": None, "mlp_hidden": None,
    }
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["plan.json"], "no temporary file left behind"


def test_a_write_that_fails_leaves_the_old_file_whole_and_no_temporary_file(plan, tmp_path):
    path = ltmp_core.save_plan(plan, tmp_path / "plan.json")
    before = path.read_bytes()

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"format": "ltmp-pl')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ltmp_core.write_atomic(path, half_then_fail)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_version_1_plans_load_with_the_default_variants(plan, tmp_path):
    """A plan written by the first release (no variant fields) still loads, and means what it meant."""
    data = plan.to_dict()
    data["version"] = 1
    for layer in data["layers"]:
        for name in ("merge_order", "squeeze_host", "importance_scale", "heads", "mlp_hidden"):
            del layer[name]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    assert ltmp_core.load_plan(path) == plan
    data["version"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(LTMPError, match="version: plan format version 4 is not supported"):
        ltmp_core.load_plan(path)


def test_version_2_plans_load_at_full_width_and_cannot_cut_it(plan, tmp_path):
    """A plan of the release before width cuts loads as one that keeps every head and MLP unit."""
    data = plan.to_dict()
    data["version"] = 2
    for layer in data["layers"]:
        del layer["heads"], layer["mlp_hidden"]
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(data))
    loaded = ltmp_core.load_plan(path)
    assert loaded == plan and not loaded.cuts_width and loaded.widths() == [(3, 192)] * 4
    data["layers"][2]["heads"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(LTMPError, match=r"layers\[2\]\.heads: a version 2 plan cannot cut width"):
        ltmp_core.load_plan(path)


def test_width_round_trips_and_full_width_reads_as_none(tmp_path):
    model = tiny_model("deit_small")  # 3 heads, 192 MLP units
    plan = ltmp_core.make_plan(model, op=["none", "merge", "prune", "none"], keep=0.8, heads=[3, 2, 1, 3],
                               mlp_hidden=[192, 100, 192, 8])
    assert [(layer.heads, layer.mlp_hidden) for layer in plan.layers] == [(None, None), (2, 100), (1, None), (None, 8)]
    assert plan.widths() == [(3, 192), (2, 100), (1, 192), (3, 8)] and plan.cuts_width
    assert ltmp_core.load_plan(ltmp_core.save_plan(plan, tmp_path / "w.json")) == plan
    full = ltmp_core.make_plan(model, op="merge", keep=0.8, heads=3, mlp_hidden=192)
    assert full == ltmp_core.make_plan(model, op="merge", keep=0.8) and not full.cuts_width


@pytest.mark.parametrize(("heads", "mlp_hidden", "message"), [
    (4, None, r"layers\[1\]\.heads: 4 is more than the model's 3"),
    (None, 193, r"layers\[1\]\.mlp_hidden: 193 is more than the model's 192"),
    (0, None, r"layers\[1\]\.heads: expected a whole number >= 1"),
    (1.5, None, r"layers\[1\]\.heads: expected a whole number"),
    (None, True, r"layers\[1\]\.mlp_hidden: expected a whole number"),
])
def test_widths_the_model_does_not_have_are_refused_naming_the_layer(heads, mlp_hidden, message):
    with pytest.raises(LTMPError, match=message):
        ltmp_core.make_plan(tiny_model("deit_small"), op="merge", keep=0.8, heads=[None, heads, None, None],
                            mlp_hidden=[None, mlp_hidden, None, None])


def test_none_layers_keep_everything():
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op=["none", "prune", "none", "merge"], keep=0.7)
    assert plan.keeps == (1.0, 0.7, 1.0, 0.7)


def test_default_merge_keep_splits_the_cut_evenly():
    layer = LayerPlan(op="merge+prune", keep=0.64)
    assert layer.stage_keeps == pytest.approx((0.8, 0.64))
    # A merge cannot remove more than half: the merge stage stops at 0.5.
    assert LayerPlan(op="merge+squeeze", keep=0.1).stage_keeps == pytest.approx((0.5, 0.1))


@pytest.mark.parametrize(
    ("n", "layer", "expected"),
    [
        (16, LayerPlan(op="prune", keep=0.7), [11]),  # 11.2 -> 11
        (16, LayerPlan(op="merge", keep=0.5), [8]),
        (17, LayerPlan(op="merge", keep=0.5), [9]),  # at most 17 // 2 = 8 merged
        (16, LayerPlan(op="merge+prune", keep=0.25, merge_keep=0.5), [8, 4]),
        (3, LayerPlan(op="squeeze", keep=0.01), [1]),  # at least one token stays
        (16, LayerPlan(op="none"), []),
    ],
)
def test_stage_counts_hand_computed(n, layer, expected):
    assert stage_counts(n, layer) == expected


BAD_LAYERS = [
    ({"op": "shuffle"}, "op"),
    ({"op": "prune", "keep": 0.0}, "keep"),
    ({"op": "prune", "keep": 1.5}, "keep"),
    ({"op": "prune", "keep": -0.2}, "keep"),
    ({"op": "prune", "keep": math.nan}, "keep"),
    ({"op": "prune", "keep": "0.5"}, "keep"),
    ({"op": "prune", "keep": True}, "keep"),
    ({"op": "none", "keep": 0.5}, "keep"),
    ({"op": "merge", "keep": 0.3}, "keep"),
    ({"op": "prune", "keep": 0.5, "merge_keep": 0.7}, "merge_keep"),
    ({"op": "merge+prune", "keep": 0.6, "merge_keep": 0.5}, "merge_keep"),
    ({"op": "merge", "keep": 0.8, "merge_threshold": math.inf}, "merge_threshold"),
    ({"op": "prune", "keep": 0.8, "prune_threshold": math.nan}, "prune_threshold"),
    ({"op": "prune", "keep": 0.8, "tau": 0.0}, "tau"),
]


@pytest.mark.parametrize(("fields", "name"), BAD_LAYERS)
def test_invalid_layer_raises_naming_the_field(fields, name):
    with pytest.raises(LTMPError, match=rf"^{name}:"):
        LayerPlan(**fields)


def _mutations(plan: ReductionPlan):
    good = plan.to_dict()

    def change(fn):
        d = json.loads(json.dumps(good))
        fn(d)
        return d

    yield "format", change(lambda d: d.update(format="torch-checkpoint"))
    yield "version", change(lambda d: d.update(version=4))
    yield "version", change(lambda d: d.pop("version"))
    yield "layers: 3 layers", change(lambda d: d["layers"].pop())
    yield "layers", change(lambda d: d.update(layers={"op": "merge"}))
    yield r"layers\[2\]\.op", change(lambda d: d["layers"][2].update(op="drop"))
    yield r"layers\[0\].keep", change(lambda d: d["layers"][0].update(keep=2))
    yield r"layers\[1\].colour", change(lambda d: d["layers"][1].update(colour="red"))
    yield "extra", change(lambda d: d.update(extra=1))
    yield "geometry.depth", change(lambda d: d["geometry"].update(depth="4"))
    yield "geometry.num_patches", change(lambda d: d["geometry"].pop("num_patches"))


def test_invalid_json_plans_raise_naming_the_field(plan, tmp_path):
    for name, data in _mutations(plan):  # name: a regex the message must contain
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(data))
        with pytest.raises(LTMPError, match=name):
            ltmp_core.load_plan(path)


def test_nan_in_json_is_refused(plan, tmp_path):
    text = json.dumps(plan.to_dict()).replace('"keep": 0.75', '"keep": NaN')
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(LTMPError, match=r"layers\[0\]\.keep: must be finite"):
        ltmp_core.load_plan(path)


def test_unreadable_files_raise_project_error(tmp_path):
    with pytest.raises(LTMPError, match="no such plan file"):
        ltmp_core.load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LTMPError, match="not valid JSON"):
        ltmp_core.load_plan(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(LTMPError, match="expected a JSON object"):
        ltmp_core.load_plan(bad)


def test_save_plan_failure_leaves_old_file_whole(plan, tmp_path, monkeypatch):
    path = ltmp_core.save_plan(plan, tmp_path / "plan.json")
    before = path.read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ltmp_core.plan.os.replace", boom)
    with pytest.raises(OSError):
        ltmp_core.save_plan(plan.with_layers(tau=[0.5] * 4), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_random_json_never_crashes_load_plan(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("p") / "plan.json"
    path.write_text(json.dumps(value))
    with pytest.raises(LTMPError):
        ltmp_core.load_plan(path)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_plans_load_or_raise_project_error(plan, tmp_path_factory, data):
    d = plan.to_dict()
    layer = data.draw(st.integers(0, 3))
    key = data.draw(st.sampled_from(["op", "keep", "merge_keep", "merge_threshold", "prune_threshold", "tau"]))
    d["layers"][layer][key] = data.draw(json_values)
    path = tmp_path_factory.mktemp("p") / "plan.json"
    path.write_text(json.dumps(d))
    try:
        loaded = ltmp_core.load_plan(path)
    except LTMPError as e:
        assert f"layers[{layer}]" in str(e)
    else:  # accepted: the value is kept as written, and nothing else changed
        written = loaded.to_dict()["layers"]
        assert written[layer][key] == d["layers"][layer][key]
        assert [w for i, w in enumerate(written) if i != layer] == [
            w for i, w in enumerate(plan.to_dict()["layers"]) if i != layer]


@pytest.mark.parametrize(("keep", "n", "kept"), [
    (0.75, 16, 12), (0.6, 16, 10), (0.5, 3, 2), (0.5, 5, 3), (0.3, 7, 2), (0.01, 16, 1), (1.0, 16, 16),
])  # by hand: round to nearest, halves up, at least one
def test_kept_count_rounds_to_nearest_and_keeps_one(keep, n, kept):
    import torch

    assert ltmp_core.kept_count(keep, n) == kept
    assert ltmp_core.kept_count(keep, torch.tensor([float(n)])).tolist() == [kept]


def test_measured_plan_keeps_the_fraction_each_layer_passed_on(plan):
    """16 patches and a class token enter. Mean tokens after each block 13, 13, 11, 4: the merge kept
    12 of 16, the merge+prune 10 of 12 (its merge_keep 0.8 rises to that), the squeeze 3 of 10, the
    merge+squeeze 3 of 3."""
    got = ltmp_core.measured_plan(plan, [13.0, 11.0, 4.0, 4.0])
    assert got.keeps == pytest.approx((12 / 16, 10 / 12, 3 / 10, 1.0))
    assert got.layers[1].merge_keep == pytest.approx(10 / 12)
    assert got.ops == plan.ops and got.meta == plan.meta and got.geometry == plan.geometry
    assert [(layer.merge_threshold, layer.prune_threshold) for layer in got.layers] == [
        (layer.merge_threshold, layer.prune_threshold) for layer in plan.layers]


def test_measured_plan_stays_within_what_each_op_can_keep(plan):
    """A merge keeps at least half, any other cut at least one token of 16 (even where none was left),
    a none layer everything, no layer more than it was given."""
    ops = ltmp_core.make_plan(plan.geometry, op=["merge", "none", "prune", "squeeze"], keep=0.75)
    assert ltmp_core.measured_plan(ops, [6.0, 6.0, 1.0, 1.0]).keeps == (0.5, 1.0, 1 / 16, 1 / 16)
    assert ltmp_core.measured_plan(ops, [18.0, 18.0, 18.0, 9.0]).keeps == (1.0, 1.0, 1.0, 8 / 17)
    bare = dataclasses.replace(ops, geometry=None)
    assert ltmp_core.measured_plan(bare, [13.0] * 4, plan.geometry).keeps == (0.75, 1.0, 1.0, 1.0)
    with pytest.raises(LTMPError, match="geometry: the plan carries no geometry"):
        ltmp_core.measured_plan(bare, [13.0] * 4)
    with pytest.raises(LTMPError, match="kept_tokens: 3 counts for 4 layers"):
        ltmp_core.measured_plan(ops, [13.0] * 3)
    with pytest.raises(LTMPError, match=r"kept_tokens\[2\]: must be finite"):
        ltmp_core.measured_plan(ops, [13.0, 13.0, math.nan, 13.0])


def test_plan_vocabulary_and_json_load_without_torch(tmp_path, plan):
    """A command line checks its arguments and reads plans before torch is imported (and fast)."""
    import subprocess
    import sys

    path = ltmp_core.save_plan(plan, tmp_path / "plan.json")
    code = ("import sys, ltmp_core; p = ltmp_core.load_plan(sys.argv[1]); "
            "assert 'merge+prune' in ltmp_core.OPS and p.depth == 4; "
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
