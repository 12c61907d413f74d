"""Tests of featmatch.chapters.semantic_ot (support of the Semantic OT notebook)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from featmatch.chapters import semantic_ot as R
from featmatch.matching import Matching
from featmatch.semantic import FeatureDistributions, pair_distances, reference_coordinates

SEQ_LEN = 12


def _m(perm, n_b=None):
    perm = np.asarray(perm, dtype=np.int64)
    return Matching(perm=perm, cost=np.zeros(len(perm)), n_b=n_b or int(perm.max()) + 1)


# --------------------------------------------------------------------------------------
# pairs and reference spaces
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected",
    [
        (12, [(5, 6), (5, 11), (0, 11)]),  # GPT-2 small, the paper's pairs
        (26, [(12, 13), (12, 25), (0, 25)]),  # Gemma-2-2B, the paper's pairs
        (30, [(14, 15), (14, 29), (0, 29)]),  # SmolLM2-135M
    ],
)
def test_paper_pairs_reproduce_the_papers_choice(n, expected):
    assert R.paper_pairs(range(n)) == expected
    kinds = [R.pair_kind(p, range(n)) for p in expected]
    assert kinds == ["adjacent", "mid→last", "first→last"]
    assert R.pair_kind((1, 2), range(n)) == "other"


def test_paper_pairs_small_and_unsorted_sets():
    assert R.paper_pairs([7, 3]) == [(3, 7)]  # all three coincide
    assert R.paper_pairs([9, 1, 4, 6]) == [(4, 6), (4, 9), (1, 9)]
    with pytest.raises(ValueError, match="two layers"):
        R.paper_pairs([3])


def test_resolve_reference():
    assert R.resolve_reference("layer:mid", 30)[1] == "blocks.15.hook_resid_post"
    assert R.resolve_reference("layer:-1", 30)[1] == "blocks.29.hook_resid_post"
    assert R.resolve_reference("final", 12)[1] == "blocks.11.hook_resid_post"
    assert R.resolve_reference("embed", 12)[1] == "hook_embed"
    assert R.resolve_reference("hook:blocks.3.hook_resid_pre", 12)[1] == "blocks.3.hook_resid_pre"
    with pytest.raises(ValueError, match="out of range"):
        R.resolve_reference("layer:12", 12)
    with pytest.raises(ValueError, match="unknown reference space"):
        R.resolve_reference("middle", 12)


def test_reference_spaces_one_pass_equals_reference_coordinates():
    from _builders import tiny_model, tiny_tokens

    model = tiny_model(n_layers=3, d_model=16, n_ctx=SEQ_LEN)
    tokens = tiny_tokens(n_seq=6, seq_len=SEQ_LEN)
    specs = {
        "mid": ("layer:mid", 5),
        "mid raw": ("layer:mid", None),
        "final": ("final", 4),
        "embed": ("embed", 3),
    }
    spaces = R.reference_spaces(model, tokens, specs, batch_size=4)
    assert list(spaces) == list(specs)
    for label, (space, k) in specs.items():
        oracle = reference_coordinates(model, tokens, space=space, pca_k=k, batch_size=4)
        got = spaces[label]
        np.testing.assert_allclose(got.coords, oracle.coords, atol=1e-5)
        assert got.name == oracle.name and got.space_id == oracle.space_id
        assert got.tokens_sha == oracle.tokens_sha and got.hook_name == oracle.hook_name
    only_embed = R.reference_spaces(model, tokens, {"e": ("embed", 3)})
    assert only_embed["e"].space_id == spaces["embed"].space_id
    with pytest.raises(ValueError, match="LongTensor"):
        R.reference_spaces(model, tokens[0], specs)


# --------------------------------------------------------------------------------------
# scores, judge tables, paper layout
# --------------------------------------------------------------------------------------


def _fake_stats():
    """Two layers of 3 features over 10 positions, with exact co-activation sums."""
    rng = np.random.default_rng(0)
    fa = (rng.random((10, 3)) < 0.5) * rng.random((10, 3))
    fa[:, 2] = 0.0  # feature 2 of A never fires
    fb = np.concatenate([fa[:, [1, 0]], rng.random((10, 1))], 1)  # B0 = A1, B1 = A0
    pos = lambda f: (f > 0).astype(float)  # noqa: E731
    return SimpleNamespace(
        n_tokens=10,
        fire_count={0: (fa > 0).sum(0), 1: (fb > 0).sum(0)},
        act_sum={0: fa.sum(0), 1: fb.sum(0)},
        act_sq_sum={0: (fa**2).sum(0), 1: (fb**2).sum(0)},
        coact={(0, 1): pos(fa).T @ pos(fb)},
        prod_sum={(0, 1): fa.T @ fb},
    )


def test_score_table_perfect_matching_scores_one():
    stats = _fake_stats()
    right, wrong = _m([1, 0, 2], 3), _m([0, 1, -1], 3)
    t = R.score_table(stats, {(0, 1): {"right": right, "wrong": wrong}})
    assert list(t.columns) == [
        "layer_a",
        "layer_b",
        "pair",
        "method",
        "matching_score",
        "correlation",
        "n_scored",
        "n_matched",
        "one_to_one",
    ]
    r = t.set_index("method")
    assert r.loc["right", "matching_score"] == pytest.approx(1.0)
    assert r.loc["right", "correlation"] == pytest.approx(1.0)
    assert r.loc["right", "n_scored"] == 2  # feature 2 never fires
    assert r.loc["wrong", "n_matched"] == 2 and r.loc["wrong", "correlation"] < 1
    assert (t.pair == "0→1").all()
    # by default both methods are scored on the features every method matches (0 and 1)
    assert (t.n_scored == 2).all()
    alone = R.score_table(stats, {(0, 1): {"right": right, "none": _m([-1, 0, -1], 3)}}).set_index("method")
    assert alone.loc["right", "n_scored"] == 1 and alone.loc["right", "matching_score"] == pytest.approx(1.0)
    own = R.score_table(stats, {(0, 1): {"right": right, "none": _m([-1, 0, -1], 3)}}, common=False)
    assert own.set_index("method").loc["right", "n_scored"] == 2


def test_judge_features_same_for_all_methods_and_seeded():
    stats = SimpleNamespace(fire_count={0: np.array([10, 10, 1, 10, 10, 10])})
    ms = {"a": _m([0, 1, 2, -1, 4, 5], 6), "b": _m([1, 1, 1, 1, 1, 1], 6)}
    feats = R.judge_features(stats, 0, ms, n=10, min_fires=4)
    np.testing.assert_array_equal(feats, [0, 1, 4, 5])  # 2 is rare, 3 unmatched by "a"
    f1 = R.judge_features(stats, 0, ms, n=2, seed=3)
    np.testing.assert_array_equal(f1, R.judge_features(stats, 0, ms, n=2, seed=3))
    assert len(f1) == 2 and set(f1) <= {0, 1, 4, 5} and list(f1) == sorted(f1)


def test_judge_pairs_and_judge_table():
    class Texts:
        def explain_many(self, keys):
            return {(la, f): f"L{la}F{f}" for la, f in keys}

    ms = {"x": _m([1, 0, 2], 3), "y": _m([2, 2, 2], 3)}
    pairs = R.judge_pairs(Texts(), 3, 7, ms, [0, 2])
    assert list(pairs.method) == ["x", "x", "y", "y"]
    assert list(pairs.text_b) == ["L7F1", "L7F2", "L7F2", "L7F2"]
    verdicts = pairs.assign(label=pd.array([3, 1, 2, None], dtype="Int64"), judge="proxy:test")
    jt = R.judge_table(verdicts).set_index("method")
    assert jt.loc["x", "judge_mean"] == pytest.approx(2.0)
    assert jt.loc["x", "judge_se"] == pytest.approx(np.std([3, 1], ddof=1) / np.sqrt(2))
    assert jt.loc["y", "n_judged"] == 1 and np.isnan(jt.loc["y", "judge_se"])
    assert (jt.loc["x", ["DIFFERENT", "MAYBE", "SAME"]].tolist()) == [1, 0, 1]
    assert jt.loc["x", "pair"] == "3→7" and jt.loc["x", "judge"] == "proxy:test"


def test_paper_layout_puts_our_row_beside_each_analogue():
    layers = list(range(30))
    ours = pd.DataFrame(
        [
            (la, lb, m, v)
            for (la, lb), base in {(14, 15): 2.0, (14, 29): 1.5, (0, 29): 1.2}.items()
            for m, v in zip(R.PAPER_METHODS, (base, base - 0.1, base - 0.2), strict=True)
        ],
        columns=["layer_a", "layer_b", "method", "judge_mean"],
    )
    t = R.paper_layout(ours, "SmolLM2", layers, source="ours (proxy)")
    assert len(t) == 9
    assert list(t.kind) == ["adjacent"] * 3 + ["mid→last"] * 3 + ["first→last"] * 3
    assert list(t.source[:3]) == ["paper (LLM judge)", "paper (LLM judge)", "ours (proxy)"]
    ours_adj = t[(t.model == "SmolLM2") & (t.kind == "adjacent")].iloc[0]
    assert (
        ours_adj.pair == "14→15"
        and ours_adj["Semantic OT"] == 2.0
        and ours_adj["SAE Match"] == pytest.approx(1.8)
    )
    gpt = t[(t.model == "GPT-2 small") & (t.pair == "5→6")].iloc[0]
    assert (gpt["Semantic OT"], gpt["Feature Flow"], gpt["SAE Match"]) == (2.53, 2.46, 2.25)
    gem = t[(t.model == "Gemma-2-2B") & (t.pair == "0→25")].iloc[0]
    assert (gem["Semantic OT"], gem["Feature Flow"], gem["SAE Match"]) == (1.83, 1.23, 1.21)


# --------------------------------------------------------------------------------------
# verdict rules
# --------------------------------------------------------------------------------------


def test_beats_and_verdicts():
    t = pd.DataFrame(
        [
            ("p1", "Semantic OT", 0.9),
            ("p1", "Feature Flow", 0.5),
            ("p1", "SAE Match", 0.4),
            ("p2", "Semantic OT", 0.5),
            ("p2", "Feature Flow", 0.6),
            ("p2", "SAE Match", 0.4),
            ("p3", "Semantic OT", np.nan),
            ("p3", "Feature Flow", 0.1),
            ("p3", "SAE Match", 0.1),
        ],
        columns=["pair", "method", "v"],
    )
    w = R.beats(t, "v")
    assert list(w.index) == ["p1", "p2", "p3"] and list(w) == [True, False, False]
    assert not R.beats(t, "v", margin=0.5).any()
    assert R.wins_verdict(w) == "mixed"
    assert R.wins_verdict([True, True]) == "held"
    assert R.wins_verdict([False]) == "failed"
    assert R.wins_verdict([]) == "not tested"
    assert R.threshold_verdict([0.96, 0.99], 0.95) == "held"
    assert R.threshold_verdict([0.96, np.nan], 0.95) == "mixed"
    assert R.threshold_verdict([0.5], 0.95) == "failed"


def test_beats_ties_do_not_count():
    t = pd.DataFrame(
        [("p", "Semantic OT", 1.0), ("p", "Feature Flow", 1.0), ("p", "SAE Match", 0.0)],
        columns=["pair", "method", "v"],
    )
    assert R.wins_verdict(R.beats(t, "v")) == "failed"


def test_disagreements_ranked_both_ways():
    scores = {
        "first": np.array([0.9, 0.2, 0.5, 0.7, np.nan]),
        "second": np.array([0.1, 0.8, 0.5, 0.6, 0.3]),
    }
    m1, m2 = _m([0, 1, 2, 3, 4], 6), _m([5, 4, 3, 3, 1], 6)
    stats = SimpleNamespace(
        fire_count={0: np.array([10, 10, 10, 2, 10])},
        pair_score=lambda la, lb, perm: scores["first"] if perm[0] == 0 else scores["second"],
    )
    d = R.disagreements(stats, 0, 1, m1, m2, n=2)
    # feature 2: tie; 3: same partner and rare; 4: NaN score
    assert list(d.feature_a) == [0, 1]
    assert list(d.winner) == ["first", "second"]
    assert d.gap.iloc[0] == pytest.approx(0.8) and d.gap.iloc[1] == pytest.approx(-0.6)
    assert list(d.b_first) == [0, 1] and list(d.b_second) == [5, 4]


# --------------------------------------------------------------------------------------
# approximation sample and plots
# --------------------------------------------------------------------------------------


def _dists(rng, F=6, N=5, k=3, space="s"):
    coords = rng.normal(size=(F, N, k)).astype(np.float32) + rng.normal(size=(F, 1, k)).astype(np.float32) * 3
    w = rng.random((F, N)) + 0.1
    return FeatureDistributions(coords, w / w.sum(1, keepdims=True), np.arange(F), space)


def test_approximation_sample_matches_pair_distances(rng):
    a, b = _dists(rng), _dists(rng)
    s = R.approximation_sample(a, b, {"sl": ("sliced", {"n_projections": 32})}, n_pairs=10, seed=1)
    assert len(s) == 10 and len(set(zip(s.row_a, s.row_b, strict=True))) == 10
    pairs = s[["row_a", "row_b"]].to_numpy()
    np.testing.assert_allclose(s.exact, pair_distances(a, b, pairs, "exact"))
    np.testing.assert_allclose(s.sl, pair_distances(a, b, pairs, "sliced", n_projections=32))
    assert len(R.approximation_sample(a, b, {}, n_pairs=1000)) == 36  # capped at all pairs


def test_plots_draw_labelled_axes(rng):
    scores = pd.DataFrame(
        [("0→1", m, v) for m, v in zip(R.METHODS, (0.5, 0.4, 0.3, 0.6), strict=True)],
        columns=["pair", "method", "matching_score"],
    )
    fig, axes = plt.subplots(2, 2)
    ax = R.plot_method_scores(axes[0, 0], scores, "matching_score", "score", "T1")
    assert ax.get_title() == "T1" and ax.get_xlabel() and ax.get_ylabel() == "score"
    assert len(ax.patches) == 4
    jt = pd.DataFrame(
        {"pair": ["0→1"], "method": ["x"], "n_judged": [4], "DIFFERENT": [1], "MAYBE": [1], "SAME": [2]}
    )
    ax = R.plot_judge_labels(axes[0, 1], jt, "proxy")
    assert "proxy" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == pytest.approx([0.25, 0.25, 0.5])
    sample = pd.DataFrame({"exact": rng.random(20) + 1})
    sample["approx"] = sample.exact / 3
    ax = R.plot_approximation(axes[1, 0], sample, "approx", rho=1.0)
    assert "Spearman 1.000" in ax.get_title() and "exact / 3" in ax.get_legend().get_texts()[0].get_text()
    t = pd.DataFrame({"space": ["a", "b"], "v": [0.1, 0.2]})
    ax = R.plot_reference_spaces(axes[1, 1], t, "v", "value", "T4")
    assert ax.get_title() == "T4" and ax.get_ylabel() == "reference space" and len(ax.patches) == 2
    plt.close(fig)


def test_paper_table_constant_matches_papers_md():
    t = R.PAPER_JUDGE.set_index(["model", "layer_a", "layer_b"])
    assert tuple(t.loc[("GPT-2 small", 5, 11)][list(R.PAPER_METHODS)]) == (1.56, 1.49, 1.49)
    assert tuple(t.loc[("GPT-2 small", 0, 11)][list(R.PAPER_METHODS)]) == (1.39, 1.34, 1.27)
    assert tuple(t.loc[("Gemma-2-2B", 12, 25)][list(R.PAPER_METHODS)]) == (1.83, 1.26, 1.26)
    assert tuple(t.loc[("Gemma-2-2B", 12, 13)][list(R.PAPER_METHODS)]) == (2.32, 1.51, 1.41)
    assert torch is not None  # the module imports torch-based helpers
