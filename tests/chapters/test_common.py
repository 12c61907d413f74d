"""featmatch.chapters.common: layer choices, matchings of named variants, judging, the early-layer claim."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import common as C
from featmatch.judging.explanations import ContextExplanations
from featmatch.judging.judges import ProxyJudge
from featmatch.lm.activations import gather
from featmatch.matching import Matching

from ._sae_match import F, minilm_tokenizer, model, planted_chain, twin, word_tokens


@pytest.fixture(scope="module")
def chain():
    return planted_chain()


@pytest.fixture(scope="module")
def twins():
    saes, perm = twin()
    stats = gather(model(), saes, word_tokens(), pairs=[(0, 1)], top_k=4, n_samples=4, cache=False, progress=False)
    return saes, perm, stats, ContextExplanations(stats, minilm_tokenizer())


# ---- layers ---------------------------------------------------------------------------


def test_adjacent_pairs_and_every_kth():
    assert C.adjacent_pairs([3, 1, 2, 2]) == [(1, 2), (2, 3)]
    assert C.adjacent_pairs([5]) == []
    assert C.every_kth(range(10), 3) == [0, 3, 6, 8]  # 9 has no layer 10; the last eligible (8) is kept
    assert C.every_kth(range(10), 3, include_last=False) == [0, 3, 6]
    assert C.every_kth(range(4), 1, need_next=False) == [0, 1, 2, 3]
    assert C.every_kth([0, 1, 5, 6], 1) == [0, 5]  # 1 and 6 have no next layer
    with pytest.raises(ValueError):
        C.every_kth(range(4), 0)


def test_next_layer_pairs_and_layers_with_next():
    assert C.next_layer_pairs([4, 0]) == [(4, 5), (0, 1)]  # order kept
    assert C.layers_with_next([4, 0, 1]) == [0, 1, 2, 4, 5]


def test_layers_at_depth_picks_the_nearest_and_breaks_ties_early():
    # the paper's 10, 12, 20 of 26 on a 30-layer model: 11.5 -> 12, 13.8 -> 14, 23.1 -> 23
    assert C.layers_at_depth(range(29), 30, (10 / 26, 12 / 26, 20 / 26)) == [12, 14, 23]
    assert C.layers_at_depth([2, 4], 6, (0.5,)) == [2]  # 3 is as near to 2 as to 4: the first candidate wins
    assert C.layers_at_depth([4, 2], 6, (0.5,)) == [4]
    assert C.layers_at_depth([0, 9], 10, (0.1, 0.2, 0.3)) == [0]  # de-duplicated


def test_early_late_split():
    early, late = C.early_late_split(range(30), 30)
    assert early == list(range(10)) and late == list(range(10, 30))
    with pytest.raises(ValueError):
        C.early_late_split(range(3), 3, early_fraction=1.5)


# ---- matchings -----------------------------------------------------------------------


def test_pair_matchings_recover_planted_chain(chain):
    saes, perms = chain
    pairs = C.adjacent_pairs(saes)
    ms = C.pair_matchings(saes, pairs, ["folded", "unfolded", "decoder", "folded+b_enc"])
    assert set(ms) == {"folded", "unfolded", "decoder", "folded+b_enc"}
    for v, by_pair in ms.items():
        for (la, lb), m in by_pair.items():
            np.testing.assert_array_equal(m.perm, perms[la])
            assert m.meta["variant"] == v and m.meta["layers"] == [la, lb]
    with pytest.raises(ValueError, match="unknown match variants"):
        C.pair_matchings(saes, pairs, ["nope"])
    with pytest.raises(ValueError, match="no SAEs"):
        C.pair_matchings(saes, [(0, 9)], ["folded"])
    custom = C.pair_matchings(saes, pairs[:1], {"mine": {"on": "decoder", "metric": "cosine"}})
    np.testing.assert_array_equal(custom["mine"][pairs[0]].perm, perms[0])


def test_by_first_layer():
    a = Matching(perm=np.array([0]), cost=np.zeros(1), n_b=1)
    b = Matching(perm=np.array([0]), cost=np.ones(1), n_b=1)
    assert C.by_first_layer({(3, 4): a, (7, 8): b}) == {3: a, 7: b}
    with pytest.raises(ValueError, match="share a first layer"):
        C.by_first_layer({(3, 4): a, (3, 5): b})


def test_permutation_change():
    a = Matching(perm=np.array([0, 1, 2, -1]), cost=np.zeros(4), n_b=4)
    b = Matching(perm=np.array([0, 2, 1, -1]), cost=np.zeros(4), n_b=4)
    c = Matching(perm=np.array([0, 1, -1, -1]), cost=np.zeros(4), n_b=4)
    assert C.permutation_change(a, a) == 0.0
    assert C.permutation_change(a, b) == pytest.approx(2 / 3)
    assert C.permutation_change(a, c) == pytest.approx(1 / 3)  # matched by one only: changed
    assert math.isnan(C.permutation_change(np.array([-1]), np.array([-1])))
    with pytest.raises(ValueError):
        C.permutation_change(np.arange(3), np.arange(4))


# ---- judging -------------------------------------------------------------------------


def test_sample_features_is_seeded_and_filtered(twins):
    _, _, stats, _ = twins
    a = C.sample_features(stats, 0, 5, min_fires=1, seed=3)
    np.testing.assert_array_equal(a, C.sample_features(stats, 0, 5, min_fires=1, seed=3))
    assert len(a) == 5 and (np.diff(a) > 0).all()
    assert (stats.fire_count[0][a] >= 1).all()
    assert C.sample_features(stats, 0, 5, min_fires=1, among=np.zeros(F, bool)).size == 0
    n_firing = int((stats.fire_count[0] >= 1).sum())
    assert C.sample_features(stats, 0, 10 * F, min_fires=1).size == n_firing  # all eligible when n is large


def test_judge_matched_pairs_with_the_proxy_judge(twins):
    """The twin SAEs' exact matching pairs features with identical contexts: the proxy sees
    identical texts (cosine 1, SAME); a shifted matching pairs different features."""
    saes, perm, stats, source = twins
    exact = Matching(perm=perm, cost=np.zeros(F), n_b=F)
    shifted = Matching(perm=np.roll(perm, 1), cost=np.ones(F), n_b=F)
    judged = C.judge_matched_pairs(ProxyJudge(variant="examples"), source, stats,
                                   {"exact": {(0, 1): exact}, "shifted": {(0, 1): shifted}}, n_per_pair=6, min_fires=1)
    assert {"matching", "cost", "label", "similarity", "feature_a", "feature_b", "text_a", "text_b"} <= set(judged.columns)
    e, s = judged[judged["matching"] == "exact"], judged[judged["matching"] == "shifted"]
    # paired samples: the same features of layer 0 for both matchings
    assert sorted(e["feature_a"]) == sorted(s["feature_a"]) and 0 < len(e) <= 6
    np.testing.assert_array_equal(e["feature_b"], perm[e["feature_a"]])
    assert (e["text_a"] == e["text_b"]).all() and (e["text_a"].str.startswith("top tokens: ")).all()
    assert (e["label"] == 3).all() and np.allclose(e["similarity"], 1.0, atol=1e-5)
    assert (e["cost"] == 0).all() and (s["cost"] == 1).all()
    assert s["similarity"].mean() < 0.999  # different features, different contexts
    assert C.judge_names(judged) == "proxy:all-MiniLM-L6-v2"
    assert C.judge_names(judged.iloc[:0]) == "none"
    with pytest.raises(ValueError, match="no matchings"):
        C.judge_matched_pairs(ProxyJudge(), source, stats, {})


# ---- correlations and the early-layer claim ------------------------------------------


def test_pearson_and_spearman_drop_non_finite_and_need_three_points():
    assert C.pearson([1, 2, 3, np.nan], [2, 4, 6.5, 1]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])
    assert C.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert C.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(C.pearson([1, 2], [1, 2]))
    assert math.isnan(C.spearman([1, 1, 1], [1, 2, 3]))  # constant side


def test_claim_early_layer_drop():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"layer_a": range(30), "matching_score": np.r_[np.full(10, 0.1), np.full(20, 0.5)] + rng.normal(0, 0.01, 30)})
    drop = C.claim_early_layer_drop(rows, "matching_score", n_layers=30)
    assert drop.verdict == "held" and drop.our_value == pytest.approx(0.4, abs=0.03) and abs(drop.chance) < 0.2
    assert drop.effect == pytest.approx(drop.our_value - drop.chance)
    flat = C.claim_early_layer_drop(rows.assign(matching_score=0.5 + rng.normal(0, 0.005, 30)), "matching_score", 30)
    assert flat.verdict == "failed"
    only_late = C.claim_early_layer_drop(rows[rows["layer_a"] >= 10], "matching_score", 30)
    assert only_late.verdict == "not testable"
    custom = C.claim_early_layer_drop(rows.rename(columns={"layer_a": "layer"}), "matching_score", 30, layer="layer",
                                      claim="x", source="y", chapter="03")
    assert (custom.claim, custom.source, custom.verdict, custom.chapter) == ("x", "y", "held", "03")



def test_random_matchings_and_label_share():
    m = {(0, 1): Matching(perm=np.arange(50), cost=np.zeros(50), n_b=60)}
    r = C.random_matchings(m, seed=3)[(0, 1)]
    assert r.n_a == 50 and r.n_b == 60 and len(set(r.perm.tolist())) == 50 and r.perm.max() < 60
    assert np.array_equal(r.perm, C.random_matchings(m, seed=3)[(0, 1)].perm)  # seeded
    j = pd.DataFrame({"matching": ["random"] * 4 + ["folded"], "label": pd.array([3, 1, 1, None, 3], dtype="Int64")})
    assert C.label_share(j, "random") == pytest.approx(1 / 3) and math.isnan(C.label_share(j, "none"))
