"""Tests of featmatch.chapters.analysis on tiny builders: tables, planted chains, verdict rules, plots."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from _builders import jumprelu_sae, tiny_model, tiny_tokens

from featmatch.chapters import analysis as A
from featmatch.lm.activations import gather
from featmatch.chapters.claims import Claim, claims_table
from featmatch.matching import Matching

D, F, N_LAYERS = 16, 24, 4


def permuted(sae, perm: np.ndarray, hook: str):
    """A copy of ``sae`` whose feature j is feature perm^{-1}(j) of the original, read at ``hook``."""
    new = jumprelu_sae(d_in=D, d_sae=F, seed=99, hook_name=hook)
    inv = np.argsort(perm)  # new feature j = old feature inv[j]
    with torch.no_grad():
        new.W_enc.copy_(sae.W_enc[:, inv])
        new.W_dec.copy_(sae.W_dec[inv])
        new.b_enc.copy_(sae.b_enc[inv])
        new.b_dec.copy_(sae.b_dec)
        new.threshold.copy_(sae.threshold[inv])
    return new


@pytest.fixture(scope="module")
def chain():
    """SAEs at layers 0..3, each a known permutation of the previous one (a planted chain)."""
    rng = np.random.default_rng(0)
    base = jumprelu_sae(d_in=D, d_sae=F, seed=1, theta_range=(0.05, 0.2), hook_name="blocks.0.hook_resid_post")
    saes, perms = {0: base}, {}
    for layer in range(1, N_LAYERS):
        p = rng.permutation(F)
        perms[layer - 1] = p  # feature i of layer-1 is feature p[i] of layer
        saes[layer] = permuted(saes[layer - 1], p, f"blocks.{layer}.hook_resid_post")
    return saes, perms


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=N_LAYERS, d_model=D, d_vocab=50, n_ctx=16, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens(n_seq=8, seq_len=16)


@pytest.fixture(scope="module")
def stats(model, chain, tokens):
    saes, _ = chain
    pairs = A.adjacent_pairs(saes) + [(0, 2), (0, 3), (1, 3)]
    return gather(model, saes, tokens, pairs=pairs, top_k=4, n_samples=4, cache=False, progress=False)


# ---- layers ---------------------------------------------------------------------------


def test_adjacent_pairs_and_every_kth():
    assert A.adjacent_pairs([3, 1, 2, 2]) == [(1, 2), (2, 3)]
    assert A.adjacent_pairs([5]) == []
    assert A.every_kth(range(10), 3) == [0, 3, 6, 8]  # 9 has no layer 10; the last eligible (8) is kept
    assert A.every_kth(range(10), 3, include_last=False) == [0, 3, 6]
    assert A.every_kth(range(4), 1, need_next=False) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        A.every_kth(range(4), 0)


def test_early_late_split():
    early, late = A.early_late_split(range(30), 30)
    assert early == list(range(10)) and late == list(range(10, 30))
    with pytest.raises(ValueError):
        A.early_late_split(range(3), 3, early_fraction=1.5)


# ---- matchings -----------------------------------------------------------------------


def test_pair_matchings_recover_planted_chain(chain):
    saes, perms = chain
    pairs = A.adjacent_pairs(saes)
    ms = A.pair_matchings(saes, pairs, ["folded", "unfolded", "decoder", "folded+b_enc"])
    assert set(ms) == {"folded", "unfolded", "decoder", "folded+b_enc"}
    for v, by_pair in ms.items():
        for (la, lb), m in by_pair.items():
            np.testing.assert_array_equal(m.perm, perms[la])
            assert m.meta["variant"] == v and m.meta["layers"] == [la, lb]
    with pytest.raises(ValueError, match="unknown match variants"):
        A.pair_matchings(saes, pairs, ["nope"])
    with pytest.raises(ValueError, match="no SAEs"):
        A.pair_matchings(saes, [(0, 9)], ["folded"])
    custom = A.pair_matchings(saes, pairs[:1], {"mine": {"on": "decoder", "metric": "cosine"}})
    np.testing.assert_array_equal(custom["mine"][pairs[0]].perm, perms[0])


def test_permutation_change_and_table():
    a = Matching(perm=np.array([0, 1, 2, -1]), cost=np.zeros(4), n_b=4)
    b = Matching(perm=np.array([0, 2, 1, -1]), cost=np.zeros(4), n_b=4)
    c = Matching(perm=np.array([0, 1, -1, -1]), cost=np.zeros(4), n_b=4)
    assert A.permutation_change(a, a) == 0.0
    assert A.permutation_change(a, b) == pytest.approx(2 / 3)
    assert A.permutation_change(a, c) == pytest.approx(1 / 3)
    assert math.isnan(A.permutation_change(np.array([-1]), np.array([-1])))
    with pytest.raises(ValueError):
        A.permutation_change(np.arange(3), np.arange(4))
    ms = {"folded": {(0, 1): a}, "unfolded": {(0, 1): b}}
    t = A.folding_change_table(ms)
    assert list(t.columns) == ["layer_a", "layer_b", "comparison", "frac_changed"]
    assert t["comparison"].tolist() == ["fold, no b_enc"]  # comparisons with missing variants are skipped


def test_parameter_mse_table_shape_and_order(chain):
    saes, _ = chain
    pairs = A.adjacent_pairs(saes)
    ms = A.pair_matchings(saes, pairs, ["folded", "unfolded"])
    t = A.parameter_mse_table(saes, ms, parts=("encoder", "decoder", "both"))
    assert len(t) == len(pairs) * 3 * 3
    assert set(t["variant"]) == {"vanilla", "folded", "unfolded"}
    # the planted chain is an exact permutation: matched MSE is 0, the identity is not
    assert (t.loc[t["variant"] != "vanilla", "mse"] < 1e-10).all()
    assert (t.loc[t["variant"] == "vanilla", "mse"] > 1e-4).all()


def test_threshold_and_norm_tables(chain, stats):
    saes, _ = chain
    t = A.threshold_norm_table(saes, stats)
    assert t["layer"].tolist() == list(range(N_LAYERS))
    assert np.allclose(t["theta_mean"], t["theta_mean"].iloc[0])  # same θ multiset on every layer
    assert t["resid_norm_mean"].notna().all() and (t["l0"] >= 0).all()
    assert A.threshold_norm_table(saes)["resid_norm_mean"].isna().all()
    ms = A.pair_matchings(saes, A.adjacent_pairs(saes), ["folded"])["folded"]
    nd = A.norm_dynamics_table(saes, stats, ms)
    assert len(nd) == N_LAYERS - 1
    assert np.allclose(nd["matched_dec_norm_change"], 0.0, atol=1e-6)  # exact permutation: same folded norms


# ---- scores --------------------------------------------------------------------------


def test_score_and_feature_tables(chain, stats):
    saes, _ = chain
    pairs = A.adjacent_pairs(saes)
    ms = A.pair_matchings(saes, pairs, ["folded", "unfolded"])
    s = A.score_table(stats, ms)
    assert len(s) == 2 * len(pairs)
    assert set(s.columns) >= {"layer_a", "layer_b", "variant", "matching_score", "correlation", "n_scored"}
    assert s["matching_score"].between(0, 1).all()
    f = A.feature_table(stats, 0, 1, ms["folded"][(0, 1)])
    assert len(f) == F and (f["feature_b"] >= 0).all()
    assert (f["fires_a"] == stats.fire_count[0]).all()


def test_cost_score_correlation_and_bins():
    rng = np.random.default_rng(0)
    cost = rng.random(200)
    feats = pd.DataFrame({"cost": cost, "matching_score": 1 - cost + 0.05 * rng.random(200), "fires_a": 10})
    assert A.cost_score_correlation(feats) < -0.9
    b = A.binned_scores(feats, n_bins=5)
    assert len(b) == 5 and b["n"].sum() == 200
    assert b["score_mean"].is_monotonic_decreasing
    assert math.isnan(A.cost_score_correlation(feats.head(2)))


class FakeSource:
    name = "fake"

    def explain(self, layer, feature):
        return f"L{layer}F{feature}"

    def explain_many(self, keys):
        return {(int(a), int(b)): self.explain(a, b) for a, b in keys}


class FakeJudge:
    """Labels SAME when the two features have the same index, else DIFFERENT."""

    def score_many(self, pairs, progress=False):
        out = pairs.copy()
        same = [a.split("F")[1] == b.split("F")[1] for a, b in zip(out["text_a"], out["text_b"], strict=True)]
        out["label"] = pd.array([3 if s else 1 for s in same], dtype="Int64")
        out["malformed"] = False
        out["judge"] = "fake"
        return out


def test_best_worst_pairs():
    feats = pd.DataFrame(
        {
            "layer_a": 0, "feature_a": np.arange(10), "layer_b": 1, "feature_b": np.arange(10)[::-1],
            "cost": np.linspace(0, 1, 10), "matching_score": 0.5, "fires_a": 10, "fires_b": 10,
        }
    )
    feats.loc[0, "fires_a"] = 0  # not eligible
    t = A.best_worst_pairs(feats, FakeSource(), n=2)
    assert t["end"].tolist() == ["best", "best", "worst", "worst"]
    assert t["feature_a"].tolist() == [1, 2, 8, 9]
    assert t["text_b"].iloc[0] == "L1F8"


def test_judge_matched_pairs_uses_paired_samples(chain, stats):
    saes, _ = chain
    ms = A.pair_matchings(saes, A.adjacent_pairs(saes), ["folded", "unfolded"])
    j = A.judge_matched_pairs(FakeJudge(), FakeSource(), stats, ms, n_per_pair=3, min_fires=1)
    assert {"matching", "cost", "label", "layer_a", "feature_a", "feature_b"} <= set(j.columns)
    for _pair, g in j.groupby("layer_a"):
        fa = [sorted(g.loc[g["matching"] == v, "feature_a"]) for v in ("folded", "unfolded")]
        assert fa[0] == fa[1] and len(fa[0]) <= 3
    np.testing.assert_allclose(j["cost"], 0.0, atol=1e-5)  # float32 inner products in the cost


def test_sample_features_is_seeded_and_filtered(stats):
    a = A.sample_features(stats, 0, 5, min_fires=1, seed=3)
    b = A.sample_features(stats, 0, 5, min_fires=1, seed=3)
    np.testing.assert_array_equal(a, b)
    assert (stats.fire_count[0][a] >= 1).all()
    none = A.sample_features(stats, 0, 5, min_fires=1, among=np.zeros(F, bool))
    assert none.size == 0


# ---- persistence and paths -----------------------------------------------------------


def test_persistence_pairs():
    assert A.persistence_pairs([0, 2], range(5), max_distance=2) == [(0, 1), (0, 2), (2, 3), (2, 4)]
    with pytest.raises(ValueError):
        A.persistence_pairs([7], range(5))


def test_persistence_of_planted_chain(chain, stats):
    saes, perms = chain
    adjacent = A.pair_matchings(saes, A.adjacent_pairs(saes), ["folded"])["folded"]
    pairs = A.persistence_pairs([0, 1], range(N_LAYERS))
    ms = A.persistence_matchings(saes, pairs, adjacent)
    assert set(ms) == {"exact", "composed", "random"}
    t = A.persistence_table(stats, ms)
    assert len(t) == 3 * len(pairs)
    assert set(t["method"]) == {"exact", "composed", "random"}
    # a planted chain: composing the adjacent matches gives exactly the direct match
    assert (t["agreement"] == 1.0).all()
    p = t.pivot_table(index=["start", "target"], columns="method", values="matching_score")
    np.testing.assert_allclose(p["exact"], p["composed"])
    j = A.judge_matched_pairs(FakeJudge(), FakeSource(), stats, {k: ms[k] for k in ("exact", "composed")}, 4, min_fires=1)
    lt = A.label_table(j)
    assert set(lt["method"]) == {"exact", "composed"} and (lt["distance"] == lt["target"] - lt["start"]).all()
    steps = A.chain(adjacent, 0, 3)
    assert len(steps) == 3
    with pytest.raises(KeyError):
        A.chain(adjacent, 0, 7)


def test_persistence_length_rule():
    t = pd.DataFrame(
        {
            "start": 0, "distance": [1, 2, 3, 4, 5], "method": "exact",
            "matching_score": [0.8, 0.6, 0.45, 0.3, 0.5],
        }
    )
    assert A.persistence_length(t).loc[0] == 3  # 0.3 < 0.4 stops the run; the later 0.5 does not count
    assert A.persistence_length(t, ratio=0.3).loc[0] == 5
    c = A.claim_persistence(t)
    assert c.verdict == "held" and "3" in c.ours
    short = t.assign(matching_score=[0.8, 0.1, 0.1, 0.1, 0.1])
    assert A.claim_persistence(short).verdict == "failed"


def test_path_table_follows_planted_chain(chain, stats):
    saes, perms = chain
    adjacent = A.pair_matchings(saes, A.adjacent_pairs(saes), ["folded"])["folded"]
    t = A.path_table(adjacent, 0, [2, 5], stats=stats, source=FakeSource())
    assert len(t) == 2 * N_LAYERS
    p = t[t["path"] == 2].sort_values("layer")["feature"].tolist()
    want = [2]
    for layer in range(N_LAYERS - 1):
        want.append(int(perms[layer][want[-1]]))
    assert p == want
    assert t["text"].iloc[0] == "L0F2"
    assert math.isnan(t["step_cost"].iloc[0]) and t["step_cost"].iloc[1] == pytest.approx(0, abs=1e-5)
    short = A.path_table(adjacent, 1, [0], end=2)
    assert short["layer"].tolist() == [1, 2]


# ---- pruning helpers -----------------------------------------------------------------


def test_shuffled_cost_and_hybrid_methods():
    m = Matching(perm=np.array([1, 0, -1, 2]), cost=np.array([0.1, 0.2, np.nan, 0.3]), n_b=3)
    s = A.shuffled_cost(m, seed=1)
    np.testing.assert_array_equal(s.perm, m.perm)
    assert sorted(s.cost[s.perm >= 0]) == sorted(m.cost[m.perm >= 0])
    specs = A.hybrid_methods({4: m}, [0.0, 0.5, 1.0])
    assert [x["label"] for x in specs] == ["cost q=0.00", "cost q=0.50", "random q=0.50", "cost q=1.00"]
    assert all(x["method"] == "quantile_hybrid" for x in specs)
    with pytest.raises(ValueError):
        A.hybrid_methods({4: m}, [1.5])


def test_transfer_scale_and_drop_small_thresholds():
    """Planted: feature 1 of A has a near-zero θ (scale 1000x), B's feature 0 has one too;
    the pairs touching either are dropped, the others keep their partner and cost."""
    a, b = jumprelu_sae(d_sae=4, seed=1), jumprelu_sae(d_sae=3, seed=2)
    with torch.no_grad():
        a.threshold.copy_(torch.tensor([1.0, 1e-3, 2.0, 0.5]))
        b.threshold.copy_(torch.tensor([1e-3, 1.0, 0.5]))
    m = Matching(perm=np.array([1, 2, -1, 0]), cost=np.array([0.1, 0.2, np.nan, 0.3]), n_b=3)
    scale = A.transfer_scale(m, a, b)
    np.testing.assert_allclose(scale, [1.0, 500.0, np.nan, 2e-3], rtol=1e-6)
    g = A.drop_small_thresholds(m, a, b, 1e-2)
    np.testing.assert_array_equal(g.perm, [1, -1, -1, -1])
    assert g.cost[0] == 0.1 and np.isnan(g.cost[1:]).all()
    assert g.meta["n_small_theta_dropped"] == 2
    np.testing.assert_array_equal(A.drop_small_thresholds(m, a, b, 1e-4).perm, m.perm)
    with pytest.raises(ValueError, match="min_theta"):
        A.drop_small_thresholds(m, a, b, 0.0)
    with pytest.raises(ValueError, match="number of features"):
        A.transfer_scale(m, b, a)


def test_hybrid_table_and_claim():
    rows = []
    for q, ev in ((0.0, 0.5), (0.5, 0.7), (1.0, 0.8)):
        rows.append({"layer": 3, "method": f"cost q={q:.2f}", "kind": "quantile_hybrid", "q": q, "delta_ce": 1 - ev, "ev": ev})
    rows.append({"layer": 3, "method": "random q=0.50", "kind": "quantile_hybrid", "q": 0.5, "delta_ce": 0.4, "ev": 0.6})
    rows.append({"layer": 3, "method": "layer_drop", "kind": "layer_drop", "q": None, "delta_ce": 1.0, "ev": 0.1})
    h = A.hybrid_table(pd.DataFrame(rows))
    assert len(h) == 3 + 3  # the random curve gets the order-free end points
    assert set(h["order"]) == {"cost", "random"}
    assert A.claim_hybrid_cost_order(h).verdict == "held"
    h.loc[(h["order"] == "random") & (h["q"] == 0.5), "ev"] = 0.9
    assert A.claim_hybrid_cost_order(h).verdict == "failed"


def test_l0_combinations():
    assert A.l0_combinations([14, 15]) == [(14, "main", "main"), (14, "main", "l0b"), (14, "l0b", "main"), (14, "l0b", "l0b")]
    assert A.l0_combinations([14, 16]) == []


def test_l0_study_and_claims_on_tiny_model(model, tokens):
    hooks = {t: f"blocks.{t}.hook_resid_post" for t in (1, 2)}
    saes = {
        "main": {t: jumprelu_sae(D, F, seed=t, theta_range=(0.05, 0.1), hook_name=h) for t, h in hooks.items()},
        "l0b": {t: jumprelu_sae(D, F, seed=10 + t, theta_range=(0.01, 0.02), hook_name=h) for t, h in hooks.items()},
    }
    l0 = {("main", 1): 5.0, ("main", 2): 6.0, ("l0b", 1): 12.0, ("l0b", 2): 11.0}
    study = A.l0_study(model, tokens[:2], saes, l0, A.l0_combinations([1, 2]))
    assert len(study) == 4 * 3
    assert set(study["method"]) == {"encode_decode_current", "encode_decode_previous", "encode_permute_decode_folded"}
    assert study.loc[study["same_l0"], "l0_mismatch"].max() < 0.2
    assert np.isfinite(study["delta_ce"]).all()
    for c in (A.claim_l0_mismatch(study), A.claim_higher_l0(study)):
        assert c.verdict in A.VERDICTS and "%" in c.ours


# ---- verdict rules and claims --------------------------------------------------------


def test_verdict_fraction_rule():
    assert A.verdict_fraction([1, 1, 1, 0])[0] == "held"  # 75%
    assert A.verdict_fraction([1, 0, 0, 0])[0] == "failed"  # 25%
    assert A.verdict_fraction([1, 1, 0, 0])[0] == "mixed"
    assert A.verdict_fraction([True, math.nan, math.nan]) == ("held", 1.0, 1)
    assert A.verdict_fraction([])[0] == "not tested"
    with pytest.raises(ValueError):
        A.verdict_fraction([1], held_at=0.2, failed_at=0.5)


def test_verdict_threshold_rule_both_directions():
    assert A.verdict_threshold(0.8, held_at=0.7, failed_at=0.3) == "held"
    assert A.verdict_threshold(0.3, held_at=0.7, failed_at=0.3) == "failed"
    assert A.verdict_threshold(0.5, held_at=0.7, failed_at=0.3) == "mixed"
    assert A.verdict_threshold(0.05, held_at=0.1, failed_at=0.5) == "held"  # small values support the claim
    assert A.verdict_threshold(0.6, held_at=0.1, failed_at=0.5) == "failed"
    assert A.verdict_threshold(math.nan, held_at=0.1, failed_at=0.5) == "not tested"
    with pytest.raises(ValueError):
        A.verdict_threshold(1.0, 1.0, 1.0)


def _scores(folded, unfolded, encoder=None, decoder=None):
    rows = []
    for k in range(len(folded)):
        for v, vals in (("folded", folded), ("unfolded", unfolded), ("encoder", encoder), ("decoder", decoder)):
            if vals is not None:
                rows.append({"layer_a": k, "layer_b": k + 1, "variant": v, "matching_score": vals[k]})
    return pd.DataFrame(rows)


def test_claims_from_score_tables():
    s = _scores([0.5, 0.6, 0.7, 0.8], [0.4, 0.5, 0.6, 0.9], encoder=[0.1] * 4, decoder=[0.5, 0.61, 0.69, 0.8])
    c = A.claim_folding_improves(s)
    assert c.verdict == "held" and "75%" in c.ours
    assert A.claim_folding_improves(_scores([0.1] * 4, [0.2] * 4)).verdict == "failed"
    par, worse = A.claim_encoder_decoder(s)
    assert par.verdict == "held" and worse.verdict == "held"
    drop = A.claim_early_layer_drop(
        pd.DataFrame({"layer_a": range(9), "matching_score": [0.1] * 3 + [0.5] * 6}), "matching_score", n_layers=9
    )
    assert drop.verdict == "held"
    flat = A.claim_early_layer_drop(pd.DataFrame({"layer_a": range(9), "matching_score": [0.5] * 9}), "matching_score", 9)
    assert flat.verdict == "failed"
    assert A.claim_cost_reflects_similarity([-0.5, -0.2, -0.1, 0.1]).verdict == "held"
    tbl = claims_table([c, par, worse, drop, flat])
    assert list(tbl.columns) == ["Claim", "Source", "Our number", "Verdict"]


def test_claim_theta_tracks_norm():
    t = pd.DataFrame({"theta_mean": [1, 2, 3, 4.0], "folded_dec_norm_mean": [4, 3, 2, 1.0], "resid_norm_mean": [1, 2, 3, 4.1]})
    theta, dec = A.claim_theta_tracks_norm(t)
    assert theta.verdict == "held" and dec.verdict == "failed"


def test_claim_folding_barely_matters_rule():
    def table(a, b):
        return pd.DataFrame({"comparison": ["fold, no b_enc", "fold, with b_enc"], "frac_changed": [a, b]})

    assert A.claim_folding_barely_matters(table(0.02, 0.3)).verdict == "held"
    assert A.claim_folding_barely_matters(table(0.4, 0.3)).verdict == "failed"
    assert A.claim_folding_barely_matters(table(0.02, 0.03)).verdict == "mixed"
    assert A.claim_folding_barely_matters(table(0.4, 0.6)).verdict == "mixed"
    assert A.claim_folding_barely_matters(pd.DataFrame({"comparison": [], "frac_changed": []})).verdict == "not tested"


def test_claim_judge_folding():
    j = pd.DataFrame(
        {
            "layer_a": [0, 0, 1, 1], "matching": ["folded", "unfolded"] * 2,
            "label": pd.array([3, 1, 2, 2], dtype="Int64"), "judge": "fake",
        }
    )
    c = A.claim_judge_folding(j)
    assert c.verdict == "mixed" and "50%" in c.ours
    assert A.claim_judge_folding(j.iloc[:0]).verdict == "not tested"


def test_claim_composition_degrades_rule():
    rows = []
    for d in range(1, 6):
        rows += [
            {"start": 0, "distance": d, "method": "exact", "matching_score": 0.8 - 0.05 * d},
            {"start": 0, "distance": d, "method": "composed", "matching_score": 0.8 - 0.1 * d},
        ]
    t = pd.DataFrame(rows)
    assert A.claim_composition_degrades(t).verdict == "held"
    swapped = t.assign(method=t["method"].map({"exact": "composed", "composed": "exact"}))
    assert A.claim_composition_degrades(swapped).verdict == "failed"
    assert A.claim_composition_degrades(t[t["distance"] == 1]).verdict == "not tested"


def _sweep(layers, **methods):
    rows = []
    for name, vals in methods.items():
        for layer, (dce, ev) in zip(layers, vals, strict=True):
            rows.append({"layer": layer, "method": name, "delta_ce": dce, "ev": ev})
    return pd.DataFrame(rows)


def test_pruning_claims():
    sw = _sweep(
        [0, 10, 20, 28],
        encode_decode_current=[(0.1, 0.9)] * 4,
        encode_permute_decode_folded=[(2.0, 0.1), (0.15, 0.6), (0.12, 0.7), (0.2, 0.7)],
        top1_cosine_folded=[(1.0, 0.3), (0.1, 0.7), (0.1, 0.8), (0.1, 0.6)],
    )
    cheap = A.claim_pruning_cheap_later(sw, n_layers=30)
    assert cheap.verdict == "held"  # later layers: extra 0.05, 0.02, 0.1 -> median 0.05
    assert A.claim_top1_beats_permutation(sw).verdict == "held"  # 3 of 4 layers
    assert A.claim_pruning_cheap_later(sw.iloc[:0], 30).verdict == "not tested"
    assert A.claim_l0_explains_early([0.5, 0.3, 0.1, 0.0], [0.4, 0.2, 0.1, 0.05]).verdict == "held"
    assert A.claim_l0_explains_early([0.5, 0.3, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]).verdict == "failed"


def test_claims_are_claims():
    c = A.claim_fraction("x", "y", [1, 0, 1], "cases")
    assert isinstance(c, Claim) and c.verdict == "mixed" and "67% of 3" in c.ours
    t = A.claim_threshold("x", "y", 0.5, "v", held_at=0.7, failed_at=0.3)
    assert t.verdict == "mixed" and "0.5" in t.ours


# ---- plots ---------------------------------------------------------------------------


def test_plots_draw_labelled_axes():
    fig, axes = plt.subplots(2, 4, figsize=(12, 6))
    ax = axes.ravel()
    A.plot_by_layer(ax[0], _scores([0.5, 0.6], [0.4, 0.5]), "matching_score", title="t", labels={"folded": "F"})
    assert ax[0].get_legend().get_texts()[0].get_text() == "F"
    a1, a2 = A.plot_threshold_norm(ax[1], pd.DataFrame({"layer": [0, 1], "theta_mean": [1, 2], "resid_norm_mean": [3, 4]}))
    assert a1.get_ylabel() and a2.get_ylabel()
    counts = pd.DataFrame({"layer_a": [0, 1], "DIFFERENT": [1, 0], "MAYBE": [1, 0], "SAME": [0, 2]})
    A.plot_label_distribution(ax[2], counts, title="labels")
    feats = pd.DataFrame({"cost": np.linspace(0, 1, 20), "matching_score": np.linspace(1, 0, 20), "fires_a": 3})
    A.plot_cost_vs_score(ax[3], feats, title="c")
    judged = pd.DataFrame({"label": pd.array([1, 3, 3], dtype="Int64"), "cost": [0.3, 0.1, 0.2]})
    A.plot_cost_by_label(ax[4], judged)
    pt = pd.DataFrame({"start": 0, "target": [1, 2, 1, 2], "method": ["exact"] * 2 + ["composed"] * 2, "matching_score": [0.5, 0.4, 0.5, 0.3]})
    A.plot_persistence(ax[5], pt, 0)
    hy = pd.DataFrame({"layer": 3, "q": [0, 0.5, 1, 0, 0.5, 1], "order": ["cost"] * 3 + ["random"] * 3, "ev": [0.1, 0.5, 0.6, 0.1, 0.4, 0.6]})
    A.plot_hybrid(ax[6], hy, 3)
    for a in ax[:7]:
        assert a.get_xlabel() and a.get_ylabel(), a
    plt.close(fig)


def test_plot_norm_dynamics():
    fig, ax = plt.subplots()
    dyn = pd.DataFrame({"layer_a": [0, 1], "layer_b": [1, 2], "resid_norm_change": [1.0, 2.0], "matched_dec_norm_change": [0.1, 0.3]})
    A.plot_norm_dynamics(ax, dyn)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    plt.close(fig)


def test_persistence_length_above_chance():
    exact = [0.8, 0.7, 0.6, 0.5]
    rand = [0.2, 0.3, 0.5, 0.5]  # margins 0.6, 0.4, 0.1, 0.0 -> half of 0.6 is kept for 2 layers
    t = pd.DataFrame(
        {"start": 3, "distance": [1, 2, 3, 4] * 2, "method": ["exact"] * 4 + ["random"] * 4, "matching_score": exact + rand}
    )
    assert A.persistence_length(t).loc[3] == 2
    assert A.persistence_length(t, baseline=None).loc[3] == 4
