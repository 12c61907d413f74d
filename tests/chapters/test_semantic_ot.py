"""Tests of featmatch.chapters.semantic_ot (support of the Semantic OT notebook)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import semantic_ot as R
from featmatch.evaluation.metrics import matching_score
from featmatch.matching import Matching
from featmatch.semantic import FeatureDistributions, pair_distances, reference_coordinates

from ._real_parts import planted_pair, planted_stats, smollm2_tokenizer

SEQ_LEN = 12


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


def test_resolve_pairs_and_comparison_pair():
    assert R.resolve_pairs(None, range(30)) == [(14, 15), (14, 29), (0, 29)]
    assert R.resolve_pairs([[2, 4], (np.int64(4), 6)], range(30)) == [(2, 4), (4, 6)]
    assert all(type(x) is int for p in R.resolve_pairs([[np.int64(2), 4]], []) for x in p)
    assert R.comparison_pair([(14, 15), (14, 29), (0, 29)]) == (14, 29)
    assert R.comparison_pair([(3, 7)]) == (3, 7)
    with pytest.raises(ValueError):
        R.comparison_pair([])


def test_comparison_spaces_label_the_default_first():
    specs = R.comparison_spaces("layer:mid", 16, 30)
    assert list(specs.values()) == [("layer:mid", 16), ("layer:mid", None), ("final", 16), ("embed", 16)]
    first = next(iter(specs))
    assert first == "layer:mid (blocks.15.hook_resid_post), PCA 16"
    assert "final (blocks.29.hook_resid_post), PCA 16" in specs
    raw = R.comparison_spaces("layer:2", None, 4)  # without PCA the default is the "no PCA" space
    assert list(raw) == [
        "layer:2 (blocks.2.hook_resid_post), no PCA",
        "final (blocks.3.hook_resid_post), no PCA",
        "embed (hook_embed), no PCA",
    ]


# --------------------------------------------------------------------------------------
# distributions, matchings and scores on real statistics of a planted pair
# (SAE B = SAE A with its features permuted, both reading the same hook: see _real_parts)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    model, tokens, saes, perm = planted_pair()
    stats = planted_stats()
    spaces = R.reference_spaces(model, tokens, R.comparison_spaces("layer:1", 4, int(model.cfg.n_layers)))
    return model, tokens, saes, perm, stats, spaces


def test_distributions_and_all_eight_matchings_recover_the_planted_permutation(planted):
    _, _, saes, perm, stats, spaces = planted
    ref = next(iter(spaces.values()))
    dists = R.feature_distributions(stats, ref, (1, 2), n=8)
    summary = R.distribution_summary(dists).set_index("layer")
    fires = {L: np.asarray(stats.fire_count[L]) for L in (1, 2)}
    for L in (1, 2):
        assert summary.loc[L, "features"] == len(perm)
        assert summary.loc[L, "never fire (excluded)"] == int((fires[L] == 0).sum())
        assert summary.loc[L, "with samples"] == int((fires[L] > 0).sum())
        assert 0 < summary.loc[L, "mean samples per feature"] <= 8
    assert summary.loc[1, "never fire (excluded)"] >= 1  # the planted dead feature
    fired = np.flatnonzero(fires[1] > 0)
    for candidates in (None, 3):  # all pairs, and the nearest-neighbour search
        ms = R.pair_matchings(
            dists[1], dists[2], saes[1], saes[2], "exact", candidates, fit_stats=stats, pair=(1, 2)
        )
        assert list(ms) == list(R.METHODS)
        for method, m in ms.items():
            np.testing.assert_array_equal(np.asarray(m.perm)[fired], perm[fired], err_msg=method)
        for method, (_, form) in R.FORMS.items():
            assert ms[method].is_injective == (form == "assignment") or form == "top-1", method
        assert ms["Semantic OT"].is_injective and ms["SAE Match"].is_injective
        assert ms["Co-activation"].is_injective and ms["Feature Flow assignment"].is_injective
    without = R.pair_matchings(dists[1], dists[2], saes[1], saes[2], "exact", 3)
    assert "Co-activation" not in without and len(without) == len(R.METHODS) - 2


def test_method_scores_on_the_planted_pair(planted):
    _, _, _, perm, stats, _ = planted
    fired = np.asarray(stats.fire_count[1]) > 0
    right = Matching(perm=perm.copy(), cost=np.zeros(len(perm)), n_b=len(perm))
    wrong_perm = np.roll(perm, 1)
    wrong_perm[0] = -1  # feature 0 of A unmatched by "wrong"
    wrong = Matching(perm=wrong_perm, cost=np.zeros(len(perm)), n_b=len(perm))
    t = R.method_scores(stats, {(1, 2): {"right": right, "wrong": wrong}})
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
        "n_partners",
    ]
    assert t.set_index("method").loc["right", "n_partners"] == len(perm)
    r = t.set_index("method")
    assert r.loc["right", "matching_score"] == pytest.approx(1.0)
    assert r.loc["right", "correlation"] == pytest.approx(1.0)
    assert r.loc["wrong", "matching_score"] < 0.9 and r.loc["wrong", "correlation"] < 0.9
    # both scored on the features both match (all but 0) that fire
    common = int(fired[1:].sum())
    assert (t.n_scored == common).all()
    assert r.loc["right", "n_matched"] == len(perm) and r.loc["wrong", "n_matched"] == len(perm) - 1
    assert (t.pair == "1→2").all() and bool(r.loc["right", "one_to_one"])
    own = R.method_scores(stats, {(1, 2): {"right": right, "wrong": wrong}}, common=False).set_index("method")
    assert own.loc["right", "n_scored"] == int(fired.sum())
    wide = R.method_scores_wide(t)
    assert list(wide.index) == ["1→2"]
    assert wide[("matching_score", "right")].iloc[0] == pytest.approx(1.0)
    assert set(wide.columns.get_level_values(0)) == {"matching_score", "correlation"}


def test_reference_space_table_on_the_planted_pair(planted):
    _, _, _, perm, stats, spaces = planted
    default = next(iter(spaces))
    right = Matching(perm=perm.copy(), cost=np.zeros(len(perm)), n_b=len(perm))
    scores = pd.DataFrame(
        [
            ("1→2", "Feature Flow", 0.5),
            ("1→2", "SAE Match", 0.7),
            ("1→2", "Semantic OT", 0.9),
            ("0→2", "SAE Match", 2.0),
        ],
        columns=["pair", "method", "matching_score"],
    )
    table, best = R.reference_space_table(
        stats, stats, spaces, default, (1, 2), right, scores, n_samples=8, method="exact", candidates=None
    )
    assert best == pytest.approx(0.7)  # the best baseline of this pair only (from `scores`)
    assert table.n_features.nunique() == 1  # every space on the same features
    assert list(table.space) == list(spaces)
    assert list(table.k) == [s.k for s in spaces.values()]
    # identical distributions in every space: Semantic OT finds the planted partners everywhere
    assert np.allclose(table.matching_score, 1.0) and np.allclose(table.agreement_with_default, 1.0)
    assert table.beats_best_baseline.all()
    worse = R.reference_space_table(
        stats,
        stats,
        {default: spaces[default]},
        default,
        (1, 2),
        Matching(perm=np.roll(perm, 1), cost=np.zeros(len(perm)), n_b=len(perm)),
        scores,
        n_samples=8,
        method="exact",
        candidates=None,
    )[0]
    assert worse.matching_score.iloc[0] < 0.7 and not worse.beats_best_baseline.iloc[0]


def test_judge_sample_and_proxy_judge_on_real_contexts(planted):
    from featmatch.judging.explanations import ContextExplanations
    from featmatch.judging.judges import ProxyJudge

    _, _, _, perm, stats, _ = planted
    texts = ContextExplanations(stats, smollm2_tokenizer())
    right = Matching(perm=perm.copy(), cost=np.zeros(len(perm)), n_b=len(perm))
    shifted = Matching(perm=np.roll(perm, 5), cost=np.zeros(len(perm)), n_b=len(perm))
    ms = {(1, 2): {"right": right, "shifted": shifted}}
    pairs = R.judge_sample(texts, stats, ms, n=6, seed=0)
    feats = R.judge_features(stats, 1, ms[(1, 2)], 6, seed=0)
    assert len(feats) == 6 and list(pairs.method) == ["right"] * 6 + ["shifted"] * 6
    assert list(pairs.feature_a[:6]) == list(feats) == list(pairs.feature_a[6:])
    assert list(pairs.feature_b[:6]) == list(perm[feats])
    # B's planted partner fires where A's feature fires: the same contexts, the same text
    assert (pairs.text_a[:6].to_numpy() == pairs.text_b[:6].to_numpy()).all()
    assert (pairs.text_a[6:].to_numpy() != pairs.text_b[6:].to_numpy()).all()
    judge = ProxyJudge(variant="examples")
    verdicts = judge.score_many(pairs, progress=False)
    jt = R.judge_table(verdicts).set_index("method")
    assert (
        jt.loc["right", "judge_mean"] == 3.0 and jt.loc["right", "SAME"] == jt.loc["right", "n_judged"] == 6
    )
    # the tiny model's contexts are short runs of random tokens, so the proxy's labels hardly
    # separate wrong partners; its similarity still does
    sim = judge.similarity(list(pairs.text_a), list(pairs.text_b))
    assert np.allclose(sim[:6], 1.0, atol=1e-5) and (sim[6:] < 0.999).all()
    assert jt.loc["right", "pair"] == "1→2" and jt.loc["right", "judge"].startswith("proxy")


def test_judge_features_same_for_all_methods_and_seeded(planted):
    stats = planted[4]
    fires = np.asarray(stats.fire_count[1])
    n = len(fires)
    ms = {
        "a": Matching(perm=np.where(np.arange(n) % 3 == 0, -1, 0), cost=np.zeros(n), n_b=n),
        "b": Matching(perm=np.zeros(n, dtype=np.int64), cost=np.zeros(n), n_b=n),
    }
    every = R.judge_features(stats, 1, ms, n=100, min_fires=50)
    np.testing.assert_array_equal(every, np.flatnonzero((fires >= 50) & (np.arange(n) % 3 != 0)))
    f1 = R.judge_features(stats, 1, ms, n=2, seed=3, min_fires=50)
    np.testing.assert_array_equal(f1, R.judge_features(stats, 1, ms, n=2, seed=3, min_fires=50))
    assert len(f1) == 2 and set(f1) <= set(every) and list(f1) == sorted(f1)


def test_judge_table_means_and_counts():
    verdicts = pd.DataFrame(
        {
            "method": ["x", "x", "y", "y"],
            "layer_a": 3,
            "layer_b": 7,
            "label": pd.array([3, 1, 2, None], dtype="Int64"),
            "judge": "proxy:test",
        }
    )
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
    assert len(t) == len(R.PAPER_JUDGE) + 3
    assert list(t.kind) == ["adjacent"] * 3 + ["mid→last"] * 3 + ["first→last"] * 3
    assert list(t.source[:3]) == ["paper (LLM judge)", "paper (LLM judge)", "ours (proxy)"]
    ours_adj = t[(t.model == "SmolLM2") & (t.kind == "adjacent")].iloc[0]
    assert (
        ours_adj.pair == "14→15"
        and ours_adj["Semantic OT"] == 2.0
        and ours_adj["SAE Match"] == pytest.approx(1.8)
    )
    # every paper row is carried over unchanged, under the pair's kind
    for r in R.PAPER_JUDGE.itertuples():
        row = t[(t.model == r.model) & (t.pair == f"{r.layer_a}→{r.layer_b}")]
        assert len(row) == 1 and row.kind.iloc[0] == r.kind
        assert tuple(row[list(R.PAPER_METHODS)].iloc[0]) == tuple(
            R.PAPER_JUDGE.loc[r.Index, list(R.PAPER_METHODS)]
        )


# --------------------------------------------------------------------------------------
# verdict rules
# --------------------------------------------------------------------------------------


def _by_pair(values):
    """Long table ``pair, method, v`` from ``{pair: (Semantic OT, Feature Flow, SAE Match)}``."""
    return pd.DataFrame(
        [(p, m, v) for p, vs in values.items() for m, v in zip(R.PAPER_METHODS, vs, strict=True)],
        columns=["pair", "method", "v"],
    )


def test_beats():
    t = _by_pair({"p1": (0.9, 0.5, 0.4), "p2": (0.5, 0.6, 0.4), "p3": (np.nan, 0.1, 0.1)})
    w = R.beats(t, "v")
    assert list(w.index) == ["p1", "p2", "p3"] and list(w) == [True, False, False]
    assert not R.beats(t, "v", margin=0.5).any()
    assert not R.beats(_by_pair({"p": (1.0, 1.0, 0.0)}), "v").any()  # a tie does not beat


def test_method_scores_ci_and_chance_on_the_planted_pair(planted):
    _, _, _, perm, stats, _ = planted
    n = len(perm)
    right = Matching(perm=perm.copy(), cost=np.zeros(n), n_b=n)
    many = Matching(perm=np.roll(perm, 2), cost=np.zeros(n), n_b=n)
    t = R.method_scores(stats, {(1, 2): {"Semantic OT": right, "Feature Flow": many}}, ci=True, chance=True)
    r = t.set_index("method")
    assert (
        r.loc["Semantic OT", "ms_low"]
        <= r.loc["Semantic OT", "matching_score"]
        <= r.loc["Semantic OT", "ms_high"]
    )
    assert r.loc["Semantic OT", "form"] == "assignment" and r.loc["Feature Flow", "form"] == "top-1"
    # random matchings are far below the planted partner, and above 0 (features do co-fire)
    assert 0 < r.loc["Semantic OT", "chance_ms"] < 0.8
    pf = R.feature_scores(stats, {(1, 2): {"Semantic OT": right, "Feature Flow": many}})
    assert set(pf.method) == {"Semantic OT", "Feature Flow"}
    sem = pf[pf.method == "Semantic OT"]
    assert sem.matching_score.mean() == pytest.approx(r.loc["Semantic OT", "matching_score"])


def test_chance_scores_equal_a_direct_average_over_random_permutations(planted):
    from featmatch.chapters.claims import null_distribution

    _, _, _, perm, stats, _ = planted
    feats = np.flatnonzero(np.asarray(stats.fire_count[1]) > 0)
    ms, _ = R.chance_scores(stats, 1, 2, feats, "assignment", n=20, seed=4)

    def draw(rng):
        p = np.full(len(perm), -1)
        p[feats] = rng.permutation(len(perm))[: len(feats)]
        return float(np.nanmean(matching_score(stats, 1, 2, p).per_feature[feats]))

    assert ms == pytest.approx(null_distribution(draw, 20, 4).mean())


def _long(values, value="matching_score", form="assignment"):
    """Per-feature long table from ``{method: per-feature array}`` on one pair."""
    return pd.concat(
        [
            pd.DataFrame({"pair": "1→2", "method": m, "feature": np.arange(len(v)), value: v})
            for m, v in values.items()
        ],
        ignore_index=True,
    )


def test_comparison_claims_verdicts_follow_the_paired_effect():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.random(n)
    per_feature = _long(
        {
            "Semantic OT": base + 0.1,  # clearly better than both decoder baselines
            "Feature Flow assignment": base,  # the decoder baselines in the assignment form
            "SAE Match": base - 0.05,
            "Co-activation": base + 0.1 + rng.normal(0, 0.002, n),  # indistinguishable from Semantic OT
        }
    )
    per_feature["correlation"] = per_feature["matching_score"]
    scores = per_feature.groupby("method", sort=False)[["matching_score", "correlation"]].mean().reset_index()
    scores["pair"] = "1→2"
    scores["base"] = scores.method.map(lambda m: R.FORMS[m][0])
    scores["form"] = scores.method.map(lambda m: R.FORMS[m][1])
    scores["chance_ms"] = 0.1
    scores["chance_corr"] = 0.0
    claims = R.comparison_claims(per_feature, scores)
    assert [c.verdict for c in claims] == ["held", "held", "failed"]
    assert "best decoder-vector baseline (Feature Flow assignment)" in claims[0].claim  # the stronger one
    assert claims[0].effect == pytest.approx(0.1) and claims[0].ci_low > 0.09
    assert claims[2].source == R.BOOK_SOURCE and claims[0].source == R.PAPER_SOURCE
    assert all(c.section == R.SECTION_SCORES and c.n == n for c in claims)
    assert claims[0].chance == pytest.approx(0.1)
    # too few common features make the comparison not testable (precondition)
    few = per_feature[per_feature.feature < R.MIN_FEATURES - 1]
    assert R.comparison_claims(few, scores)[0].verdict == "not testable"
    table = pd.DataFrame([c.__dict__ for c in claims])
    lines = R.win_summary(scores, table)
    assert lines[0] == (
        "1→2, assignment: Semantic OT wins against the best decoder-vector baseline (Feature Flow assignment)"
    )
    assert lines[1].startswith("1→2, assignment: Semantic OT no clear difference from co-activation")


def test_recall_space_and_judge_claims():
    per_query = pd.DataFrame({"c": 32, "query": np.arange(500), "hit1": np.r_[np.ones(498), np.zeros(2)]})
    c = R.recall_claim(per_query, 32, 1000)
    assert c.verdict == "held" and c.our_value == pytest.approx(0.996) and c.chance == pytest.approx(0.032)
    worse = R.recall_claim(per_query.assign(hit1=np.r_[np.ones(450), np.zeros(50)]), 32, 1000)
    assert worse.verdict == "failed"
    space = pd.DataFrame(
        {
            "space": ["a", "b"],
            "matching_score": [0.5, 0.4],
            "diff_vs_best": [0.1, -0.05],
            "diff_low": [0.08, -0.07],
            "diff_high": [0.12, -0.03],
            "n_features": [300, 300],
        }
    )
    sc = R.space_claim(space, (1, 3))
    assert sc.verdict == "failed" and "worst space: b" in sc.unit
    verdicts = pd.DataFrame(
        {
            "layer_a": 1,
            "layer_b": 3,
            "method": ["Semantic OT"] * 30 + ["SAE Match"] * 30,
            "feature_a": np.tile(np.arange(30), 2),
            "label": np.r_[np.full(30, 3), np.full(30, 1)],
        }
    )
    scores = pd.DataFrame(
        {
            "pair": "1→3",
            "method": ["SAE Match", "Feature Flow assignment"],  # the better one is not judged
            "base": ["SAE Match", "Feature Flow"],
            "form": ["assignment", "assignment"],
            "matching_score": [0.5, 0.9],
        }
    )
    held = R.judge_claims(verdicts, scores, "llm:x")[0]
    assert held.verdict == "held" and "than SAE Match" in held.claim and held.n == 30
    assert R.judge_claims(verdicts, scores, "proxy:x")[0].verdict == "not testable"


def test_disagreements_ranked_both_ways_on_real_statistics(planted):
    _, _, _, perm, stats, _ = planted
    n = len(perm)
    fires = np.asarray(stats.fire_count[1])
    wrong = np.roll(perm, 3)
    half = np.arange(n) < n // 2
    first = Matching(perm=np.where(half, perm, wrong), cost=np.zeros(n), n_b=n)  # right on the first half
    second = Matching(perm=np.where(half, wrong, perm), cost=np.zeros(n), n_b=n)  # right on the second
    d = R.disagreements(stats, 1, 2, first, second, n=2, min_fires=4)
    s1 = matching_score(stats, 1, 2, first).per_feature
    s2 = matching_score(stats, 1, 2, second).per_feature
    assert list(d.winner) == ["first", "first", "second", "second"]
    assert set(d.feature_a[:2]) <= set(np.flatnonzero(half)) and set(d.feature_a[2:]) <= set(
        np.flatnonzero(~half)
    )
    np.testing.assert_allclose(d.gap, s1[d.feature_a] - s2[d.feature_a])
    assert d.gap.iloc[0] >= d.gap.iloc[1] > 0 > d.gap.iloc[3] >= d.gap.iloc[2]
    eligible = (fires >= 4) & np.isfinite(s1) & np.isfinite(s2)
    assert d.gap.iloc[0] == pytest.approx(np.max((s1 - s2)[eligible]))
    assert (d.fires.to_numpy() == fires[d.feature_a]).all()
    assert list(d.b_first) == list(first.perm[d.feature_a]) and list(d.b_second) == list(
        second.perm[d.feature_a]
    )
    # nothing to show when the two agree
    assert R.disagreements(stats, 1, 2, first, first).empty


def test_disagreement_report_shows_both_directions_with_contexts(planted):
    from featmatch.judging.explanations import ContextExplanations

    _, _, _, perm, stats, _ = planted
    n = len(perm)
    wrong = np.roll(perm, 3)
    half = np.arange(n) < n // 2
    first = Matching(perm=np.where(half, perm, wrong), cost=np.zeros(n), n_b=n)
    second = Matching(perm=np.where(half, wrong, perm), cost=np.zeros(n), n_b=n)
    texts = ContextExplanations(stats, smollm2_tokenizer())
    report = R.disagreement_report(stats, texts, (1, 2), first, second, names=("Ours", "Theirs"), n=1)
    lines = report.split("\n")
    assert lines[0] == f"1→2: Ours and Theirs choose different partners for {n} of {n} features"
    d = R.disagreements(stats, 1, 2, first, second, n=1)
    heads = [ln for ln in lines if ln.startswith("=== ")]
    assert heads == [
        f"=== layer 1 feature {r.feature_a} ({r.fires} firings; better partner: {who}) ==="
        for r, who in zip(d.itertuples(), ("Ours", "Theirs"), strict=True)
    ]
    r = d.iloc[0]
    assert f"  Ours → layer 2 feature {r.b_first} (matching score {r.score_first:.2f})" in lines
    for ctx in texts.examples(1, int(r.feature_a)):
        assert f"   A    {ctx}" in lines


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
