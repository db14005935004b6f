"""Reducers as pure functions: hand-computed cases and contract tests over every registered stage."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from ltmp_core import OPS, REDUCERS
from ltmp_core.masking import masked_softmax, threshold_between, threshold_mask
from ltmp_core.reducers import Tokens, merge, squeeze, top_k_mask


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def five_tokens(importance: list[float], angles: list[float], size: list[float] | None = None) -> Tokens:
    """One image, a class token and four patch tokens with 2-d features and metrics."""
    x = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [0.0, 4.0], [-2.0, 2.0]]])
    return Tokens(
        x=x,
        size=torch.tensor([size or [1.0] * 5], dtype=torch.float32),
        alive=torch.ones(1, 5),
        metric=torch.tensor([[unit(a) for a in angles]]),
        importance=torch.tensor([importance]),
        num_prefix=1,
    )


def test_squeeze_equals_tps_formula_by_hand():
    # cls, p1 (0 deg, imp .4), p2 (10 deg, imp .1), p3 (80 deg, imp .3), p4 (90 deg, imp .05)
    t = five_tokens([math.inf, 0.4, 0.1, 0.3, 0.05], [45, 0, 10, 80, 90])
    out = squeeze(t, partial(top_k_mask, k=2))
    # p2 and p4 are the two least important; p2's nearest kept token is p1 (cos 10 deg beats
    # cos 70 deg), p4's is p3 (cos 10 deg beats cos 90 deg). TPS: host weight e, fused exp(sim).
    w = math.exp(math.cos(math.radians(10)))
    p1 = [(math.e * 1.0 + w * 3.0) / (math.e + w), (math.e * 2.0 + w * -1.0) / (math.e + w)]
    p3 = [(math.e * 0.0 + w * -2.0) / (math.e + w), (math.e * 4.0 + w * 2.0) / (math.e + w)]
    assert out.alive.tolist() == [[1, 1, 0, 1, 0]]
    torch.testing.assert_close(out.x[0, 1], torch.tensor(p1))
    torch.testing.assert_close(out.x[0, 3], torch.tensor(p3))
    torch.testing.assert_close(out.x[0, 0], t.x[0, 0], rtol=0, atol=0)
    assert out.size.tolist() == [[1, 2, 1, 2, 1]]


def test_squeeze_with_threshold_matches_top_k():
    t = five_tokens([math.inf, 0.4, 0.1, 0.3, 0.05], [45, 0, 10, 80, 90])
    by_count = squeeze(t, partial(top_k_mask, k=2))
    # prune where importance < 0.2, i.e. remove where -importance > -0.2
    by_threshold = squeeze(t, lambda score, eligible: (score > -0.2).float())
    torch.testing.assert_close(by_threshold.x, by_count.x)
    assert by_threshold.alive.tolist() == by_count.alive.tolist()


def test_merge_by_hand_is_size_weighted():
    # Ranks among patches: p1 (0, dst), p2 (1, src), p3 (2, dst), p4 (3, src).
    # p2 is 5 deg from p1; p4 is 60 deg from p3: only p2 merges when one token goes.
    t = five_tokens([math.inf, 0, 0, 0, 0], [45, 0, 5, 30, 90], size=[1, 1, 3, 1, 1])
    out = merge(t, partial(top_k_mask, k=1))
    assert out.alive.tolist() == [[1, 1, 0, 1, 1]]
    torch.testing.assert_close(out.x[0, 1], torch.tensor([(1 * 1.0 + 3 * 3.0) / 4, (1 * 2.0 + 3 * -1.0) / 4]))
    assert out.size.tolist() == [[1, 4, 3, 1, 1]]
    torch.testing.assert_close(out.x[0, 3:], t.x[0, 3:], rtol=0, atol=0)


def test_merge_never_pairs_within_one_set():
    # p2 and p4 (both sources) are identical, but a source only merges into a destination.
    t = five_tokens([math.inf, 0, 0, 0, 0], [0, 90, 0, -90, 0])
    out = merge(t, partial(top_k_mask, k=1))
    assert out.alive[0, 1].item() == 1 and out.alive[0, 3].item() == 1


def test_every_op_stage_is_registered():
    for op, stages in OPS.items():
        for stage in stages:
            assert stage in REDUCERS, f"{op} uses unregistered stage {stage}"


def random_tokens(seed: int = 0, b: int = 3, n: int = 11, c: int = 8, prefix: int = 2, dead: bool = True) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, 4, generator=g)
    alive = torch.ones(b, n)
    if dead:
        alive[:, -2:] = 0  # padding / already removed
        alive[0, 4] = 0
    importance = torch.rand(b, n, generator=g)
    importance[:, :prefix] = math.inf
    return Tokens(
        x=torch.randn(b, n, c, generator=g),
        size=torch.randint(1, 4, (b, n), generator=g).float(),
        alive=alive,
        metric=metric / metric.norm(dim=-1, keepdim=True),
        importance=importance,
        num_prefix=prefix,
    )


#: The published variants beside each stage's default: ToMe's token order, TPS's squeeze host.
VARIANTS = [{}, {"merge_order": "tome"}, {"squeeze_host": "tps"}]


@pytest.fixture(params=[(name, v) for name in sorted(REDUCERS) for v in VARIANTS],
                ids=lambda p: p[0] + "".join(f"-{v}" for v in p[1].values()))
def reducer(request):
    """A registered stage whose ``fn`` applies one of the variants to the tokens it is given."""
    name, variant = request.param
    stage = REDUCERS[name]

    def fn(t, decide):
        for key, value in variant.items():
            setattr(t, key, value)
        return stage.fn(t, decide)

    return type(stage)(stage.name, fn, stage.threshold, stage.needs_importance, stage.similarities), variant


def test_contract_prefix_and_dead_tokens_untouched(reducer):
    reducer, _ = reducer
    t = random_tokens()
    out = reducer.fn(t, lambda score, eligible: eligible.float())  # remove everything allowed
    p = t.num_prefix
    torch.testing.assert_close(out.x[:, :p], t.x[:, :p], rtol=0, atol=0)
    assert torch.equal(out.size[:, :p], t.size[:, :p])
    assert torch.equal(out.alive[:, :p], t.alive[:, :p])
    dead = t.alive == 0
    assert torch.all(out.alive[dead] == 0)
    assert torch.all(out.size[dead] == t.size[dead]), "dead tokens receive nothing"
    assert torch.all((out.alive[:, p:] > 0).sum(1) >= 1), "at least one patch token stays"


def test_contract_removing_nothing_changes_nothing(reducer):
    reducer, _ = reducer
    t = random_tokens()
    out = reducer.fn(t, lambda score, eligible: torch.zeros_like(score))
    for name in ("x", "size", "alive"):
        assert torch.equal(getattr(out, name), getattr(t, name)), name


def test_contract_removed_count_and_size_conservation(reducer):
    reducer, variant = reducer
    t = random_tokens(seed=3)
    out = reducer.fn(t, partial(top_k_mask, k=2))
    before = (t.alive > 0).sum(1)
    after = (out.alive > 0).sum(1)
    assert torch.equal(before - after, torch.full_like(before, 2))
    live_size_before = (t.size * t.alive).sum(1)
    live_size_after = (out.size * out.alive).sum(1)
    if reducer.name == "prune" or (reducer.name == "squeeze" and variant.get("squeeze_host") == "tps"):
        assert torch.all(live_size_after < live_size_before)  # TPS keeps no sizes: squeezed ones are lost
    else:  # merged or squeezed tokens hand their size to a live host
        torch.testing.assert_close(live_size_after, live_size_before)


def test_contract_soft_weights_carry_gradients(reducer):
    reducer, _ = reducer
    t = random_tokens(seed=5)
    theta = torch.tensor(0.0, requires_grad=True)
    out = reducer.fn(t, lambda score, eligible: threshold_mask(score, theta + score.median(), 0.1))
    (out.alive.sum() + out.x.sum()).backward()
    assert theta.grad is not None and theta.grad.abs() > 0


def test_fusing_only_the_moved_rows_equals_the_dense_fold(reducer):
    """Without gradients a fusing stage folds only the rows that move and the rows that receive (a padded
    dynamic batch removes a few tokens per image); with gradients it folds every row. Both give the same
    tokens, in float64, with images removing different numbers of tokens and several into one host."""
    reducer, _ = reducer
    t = random_tokens(seed=7, b=4, n=13)
    t = Tokens(x=t.x.double(), size=t.size.double(), alive=t.alive.double(), metric=t.metric.double(),
               importance=t.importance.double(), num_prefix=t.num_prefix)
    g = torch.Generator().manual_seed(1)
    chosen = torch.rand(t.alive.shape, generator=g, dtype=torch.float64) < torch.tensor([[0.2], [0.5], [0.7], [0.0]])

    def decide(score, eligible):
        return (chosen & eligible).to(score.dtype)

    sparse = reducer.fn(t, decide)
    dense_in = Tokens(x=t.x.clone().requires_grad_(), size=t.size, alive=t.alive, metric=t.metric,
                      importance=t.importance, num_prefix=t.num_prefix)
    dense = reducer.fn(dense_in, decide)
    assert sparse.alive.sum() < t.alive.sum() - 3  # something moved
    for name in ("x", "size", "alive", "metric"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name).detach(), rtol=0, atol=1e-12, msg=name)


def test_threshold_mask_is_hard_forward_sigmoid_backward():
    score = torch.tensor([0.1, 0.5, 0.9])
    theta = torch.tensor(0.5, requires_grad=True)
    m = threshold_mask(score, theta, tau=0.1)
    assert m.tolist() == [0.0, 0.0, 1.0]
    m.sum().backward()
    s = torch.sigmoid((score - 0.5) / 0.1)
    torch.testing.assert_close(theta.grad, -(s * (1 - s) / 0.1).sum())


def test_masked_softmax_equals_softmax_over_kept_entries():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 0, 1]], dtype=torch.float32)
    out = masked_softmax(logits, mask)
    for row in range(2):
        keep = mask[row].bool()
        expected = torch.zeros(7)
        expected[keep] = logits[row, keep].softmax(-1)
        torch.testing.assert_close(out[row], expected)


def test_threshold_between_selects_exactly_k():
    score = torch.tensor([[0.3, 0.9, 0.1, 0.5], [0.7, 0.2, 0.8, 0.0]])
    eligible = torch.ones_like(score, dtype=torch.bool)
    for k in range(0, 9):
        theta, scale = threshold_between(score, eligible, k)
        assert int((score > theta).sum()) == k
        assert scale > 0
    # The scale is the local gap around the cut: 8 scores, one on either side of the 4th.
    sorted_desc = [0.9, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0]
    assert threshold_between(score, eligible, 4)[1] == pytest.approx(sorted_desc[3] - sorted_desc[5])


def test_registering_a_stage_again_warns_and_replaces():
    from ltmp_core.reducers import REDUCERS, prune, register_reducer

    original = REDUCERS["prune"]
    try:
        with pytest.warns(UserWarning, match="Overwriting reducer stage 'prune'"):
            register_reducer("prune", threshold="prune_threshold", needs_importance=True, similarities=0)(prune)
        assert REDUCERS["prune"].fn is prune
    finally:
        REDUCERS["prune"] = original


def nine_tokens(angles: list[float], prefix: int = 1) -> Tokens:
    """One image: ``prefix`` prefix tokens then patch tokens p0, p1, ... with 2-d metrics at ``angles``;
    each token's feature is its own index, so where it went can be read off."""
    n = len(angles)
    return Tokens(x=torch.arange(n, dtype=torch.float32).view(1, n, 1).repeat(1, 1, 2),
                  size=torch.ones(1, n), alive=torch.ones(1, n), metric=torch.tensor([[unit(a) for a in angles]]),
                  importance=None, num_prefix=prefix, merge_order="tome")


def sequence(t: Tokens) -> list[int]:
    """The live tokens in sequence order, by their feature (= the original index of the token)."""
    key = t.order[0] if t.order is not None else torch.arange(t.alive.shape[1])
    live = [i for i in key.argsort().tolist() if t.alive[0, i] > 0.5]
    return [int(t.x[0, i, 0].round()) if t.size[0, i] == 1 else -i for i in live]


def test_tome_merge_order_and_parity_by_hand():
    """ToMe's bipartite_soft_matching on cls + 8 patches, r = 2, then its next layer's split.

    Positions 0..8 = [cls, p0 .. p7]. ToMe: a = even positions = [cls, p1, p3, p5, p7] (sources; the
    class token never merges), b = odd = [p0, p2, p4, p6]. p1 is 2 degrees from p0, p5 3 degrees from
    p6; p3 and p7 are far from every destination. r = 2 merges p1 -> p0 and p5 -> p6, and ToMe returns
    cat([unmerged a, b]) = [cls, p3, p7, p0+p1, p2, p4, p5+p6].
    """
    #          cls  p0  p1  p2   p3   p4   p5   p6   p7
    angles = [180, 0, 2, 40, 120, 80, 63, 60, 150]
    t = nine_tokens(angles)
    out = merge(t, partial(top_k_mask, k=2))
    assert out.alive.tolist() == [[1, 1, 0, 1, 1, 1, 0, 1, 1]]
    # Merged tokens (size 2) are shown as -index of the destination that holds them.
    assert sequence(out) == [0, 4, 8, -1, 3, 5, -7]
    torch.testing.assert_close(out.x[0, 1], torch.tensor([1.5, 1.5]))  # (p0 + p1) / 2: size-weighted mean
    torch.testing.assert_close(out.x[0, 7], torch.tensor([6.5, 6.5]))
    # The next layer's split runs over the new order [cls, p3, p7, d0, p2, p4, d6]: ToMe's a = even
    # positions = [cls, p7, p2, d6] -> sources p7, p2, d6; destinations p3, d0, p4.
    seen = {}

    def record(score, eligible):
        seen["sources"] = sorted(eligible[0].nonzero().flatten().tolist())
        return torch.zeros_like(score)

    merge(out, record)
    assert seen["sources"] == [3, 7, 8]  # token indices of p2, p6 (holding p5+p6) and p7


def test_tome_without_a_class_token_keeps_its_edge_order_by_hand():
    """ToMe with no class token (a gap ViT) on 8 patches, r = 2: a = even positions = [p0, p2, p4, p6]
    (sources), b = [p1, p3, p5, p7]. Best matches: p0 2 degrees (p1), p4 3 (p5), p6 10 (p3), p2 17
    (p5). ToMe merges p0 and p4 and, without a class token, does not sort the unmerged sources back
    into position order: cat([unm, dst]) = [p6, p2, p1+p0, p3, p5+p4, p7]."""
    #         p0 p1  p2   p3  p4  p5  p6   p7
    angles = [0, 2, 100, 40, 80, 83, 50, 150]
    out = merge(nine_tokens(angles, prefix=0), partial(top_k_mask, k=2))
    assert out.alive.tolist() == [[0, 1, 1, 1, 0, 1, 1, 1]]
    assert sequence(out) == [6, 2, -1, 3, -5, 7]
    # The same plan in static mode (a compact sequence) gives the same order.
    from ltmp_core.reducers import Compact, _static_merge

    t = nine_tokens(angles, prefix=0)
    c = Compact(x=t.x, index=None, size=t.size, keys=None, importance=None, num_prefix=0, merge_order="tome",
                metric=t.metric)
    static = _static_merge(c, 2)
    assert static.index[0].tolist() == [6, 2, 1, 3, 5, 7]
    # As a block's last stage (nothing later reads the metric) the sequence is built afresh, same tokens.
    last = Compact(x=t.x, index=None, size=t.size, keys=None, importance=None, num_prefix=0, merge_order="tome",
                   metric=t.metric, needs_metric=False, needs_importance=False)
    afresh = _static_merge(last, 2)
    assert afresh.index is None
    assert afresh.x[0, :, 0].tolist() == [6, 2, 0.5, 3, 4.5, 7]  # p1+p0 and p5+p4 are means
    assert afresh.size[0].tolist() == [1, 1, 2, 1, 2, 1]


def test_tome_parity_with_a_distillation_token():
    """With [cls, dist, p0, ...] ToMe's sources are the even patches (a = even positions): p0, p2, ..."""
    t = nine_tokens([180, 170, 0, 2, 40, 120, 80, 63, 60], prefix=2)
    seen = {}

    def record(score, eligible):
        seen["sources"] = eligible[0].nonzero().flatten().tolist()
        return torch.zeros_like(score)

    merge(t, record)
    assert seen["sources"] == [2, 4, 6, 8]  # p0, p2, p4, p6
    keep = nine_tokens([180, 170, 0, 2, 40, 120, 80, 63, 60], prefix=2)
    keep.merge_order = "keep"
    merge(keep, record)
    assert seen["sources"] == [3, 5, 7]  # this project's order-preserving split: the odd patches


def test_tps_squeeze_picks_its_host_by_feature_similarity_by_hand():
    """TPS: the host is the kept token with the most similar *features*; weights e and exp(cos), no sizes.

    The keys would send p2 to p1 (10 degrees apart); the features send it to p3.
    """
    t = five_tokens([math.inf, 0.4, 0.1, 0.3, 0.5], [45, 0, 10, 80, 90], size=[1, 1, 2, 1, 1])
    t.x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]])
    t.squeeze_host = "tps"
    # cos(p2, p1) = cos(p2, p3) = 1/sqrt(2), cos(p2, p4) = -1/sqrt(2): a tie, broken towards p3.
    t.x[0, 3] = torch.tensor([0.1, 1.0])
    out = squeeze(t, partial(top_k_mask, k=1))  # p2 (importance 0.1) is squeezed
    c = (1.0 * 0.1 + 1.0 * 1.0) / (math.sqrt(2) * math.sqrt(1.01))
    w = math.exp(c)
    expected = [(math.e * 0.1 + w * 1.0) / (math.e + w), (math.e * 1.0 + w * 1.0) / (math.e + w)]
    assert out.alive.tolist() == [[1, 1, 0, 1, 1]]
    torch.testing.assert_close(out.x[0, 3], torch.tensor(expected))
    torch.testing.assert_close(out.x[0, 1], t.x[0, 1], rtol=0, atol=0)  # the key-nearest token is untouched
    assert out.size.tolist() == t.size.tolist()  # TPS keeps no sizes
    t.squeeze_host = "keys"
    by_keys = squeeze(t, partial(top_k_mask, k=1))
    assert by_keys.size.tolist() == [[1, 3, 2, 1, 1]]  # this project's: p1 (by keys) takes p2's size
