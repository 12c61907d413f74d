"""featmatch.chapters.folding (notebook 01): tables on a planted chain, and the claim rules."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import common
from featmatch.chapters import folding as Fo
from featmatch.chapters.claims import claims_table
from featmatch.judging.explanations import ContextExplanations
from featmatch.lm.activations import gather
from featmatch.matching import Matching

from ._sae_match import N_LAYERS, F, minilm_tokenizer, model, planted_chain, word_tokens


@pytest.fixture(scope="module")
def chain():
    return planted_chain()


@pytest.fixture(scope="module")
def stats(chain):
    saes, _ = chain
    return gather(model(), saes, word_tokens(), pairs=common.adjacent_pairs(saes), top_k=4, n_samples=4,
                  cache=False, progress=False)


@pytest.fixture(scope="module")
def matchings(chain):
    saes, _ = chain
    return common.pair_matchings(saes, common.adjacent_pairs(saes), ["folded", "unfolded", "folded+b_enc", "unfolded+b_enc"])


# ---- Fig. 1 --------------------------------------------------------------------------


def test_threshold_and_norm_tables(chain, stats, matchings):
    saes, _ = chain
    t = Fo.threshold_norm_table(saes, stats)
    assert t["layer"].tolist() == list(range(N_LAYERS))
    assert np.allclose(t["theta_mean"], t["theta_mean"].iloc[0])  # same θ multiset on every layer
    th = saes[0].threshold.detach().double().numpy()
    dec = saes[0].W_dec.detach().double().norm(dim=1).numpy()
    assert t["folded_dec_norm_mean"].iloc[0] == pytest.approx(float((th * dec).mean()))
    assert t["resid_norm_mean"].tolist() == pytest.approx([stats.resid_norm_mean[x] for x in range(N_LAYERS)])
    assert t["l0"].tolist() == pytest.approx([stats.l0(x) for x in range(N_LAYERS)])
    assert Fo.threshold_norm_table(saes)["resid_norm_mean"].isna().all()
    nd = Fo.norm_dynamics_table(saes, stats, matchings["folded"])
    assert len(nd) == N_LAYERS - 1
    assert np.allclose(nd["matched_dec_norm_change"], 0.0, atol=1e-6)  # exact permutation: same folded norms
    assert nd["resid_norm_change"].iloc[0] == pytest.approx(stats.resid_norm_mean[1] - stats.resid_norm_mean[0])
    # half the features under the identity pairs different features: the mean over them changes
    half = np.where(np.arange(F) < F // 2, np.arange(F), -1)
    ident = {p: Matching(perm=half, cost=np.zeros(F), n_b=F) for p in matchings["folded"]}
    assert not np.allclose(Fo.norm_dynamics_table(saes, stats, ident)["matched_dec_norm_change"], 0.0, atol=1e-6)


def test_norm_correlations_are_plain_pearson():
    norms = pd.DataFrame({"theta_mean": [1, 2, 3.0], "folded_dec_norm_mean": [3, 2, 1.0], "resid_norm_mean": [1, 2, 3.5]})
    dyn = pd.DataFrame({"resid_norm_change": [1, 2, 3.0], "matched_dec_norm_change": [1, 2, 3.0]})
    r = Fo.norm_correlations(norms, dyn)
    assert r["theta"] == pytest.approx(np.corrcoef([1, 2, 3], [1, 2, 3.5])[0, 1])
    assert r["dec"] == pytest.approx(-r["theta"]) and r["dyn"] == pytest.approx(1.0)
    # unlike the claim rule, a NaN propagates (the notebook prints it as nan)
    assert math.isnan(Fo.norm_correlations(norms.assign(theta_mean=[1, np.nan, 3]), dyn)["theta"])


# ---- Fig. 3 --------------------------------------------------------------------------


def test_parameter_mse_table_shape_and_order(chain, matchings):
    saes, _ = chain
    t = Fo.parameter_mse_table(saes, matchings, parts=("encoder", "decoder", "both"))
    assert len(t) == (N_LAYERS - 1) * 3 * 3
    assert t["variant"].iloc[:3].tolist() == ["vanilla", "folded", "unfolded"]
    # the planted chain is an exact permutation: matched MSE is 0, the identity is not
    assert (t.loc[t["variant"] != "vanilla", "mse"] < 1e-10).all()
    assert (t.loc[t["variant"] == "vanilla", "mse"] > 1e-4).all()


# ---- scores and costs ----------------------------------------------------------------


def test_score_and_feature_tables(stats, matchings):
    s = Fo.score_table(stats, {k: matchings[k] for k in ("folded", "unfolded")})
    assert len(s) == 2 * (N_LAYERS - 1)
    assert set(s.columns) >= {"layer_a", "layer_b", "variant", "matching_score", "correlation", "n_scored"}
    assert s["matching_score"].between(0, 1).all()
    f = Fo.feature_table(stats, 0, 1, matchings["folded"][(0, 1)])
    assert len(f) == F and (f["feature_b"] >= 0).all()
    assert (f["fires_a"] == stats.fire_count[0]).all()
    assert (f["fires_b"] == stats.fire_count[1][f["feature_b"]]).all()
    # the score table's mean is the mean over the features of A that fire
    fired = f[f["fires_a"] >= 1]
    row = s[(s["variant"] == "folded") & (s["layer_a"] == 0)].iloc[0]
    assert row["matching_score"] == pytest.approx(fired["matching_score"].mean())
    assert row["n_scored"] == len(fired)


def test_folding_change_table():
    a = Matching(perm=np.array([0, 1, 2, -1]), cost=np.zeros(4), n_b=4)
    b = Matching(perm=np.array([0, 2, 1, -1]), cost=np.zeros(4), n_b=4)
    t = Fo.folding_change_table({"folded": {(0, 1): a}, "unfolded": {(0, 1): b}})
    assert list(t.columns) == ["layer_a", "layer_b", "comparison", "frac_changed"]
    assert t["comparison"].tolist() == ["fold, no b_enc"]  # comparisons with missing variants are skipped
    assert t["frac_changed"].iloc[0] == pytest.approx(2 / 3)
    assert Fo.folding_change_table({}).empty


def test_folding_changes_nothing_on_the_planted_chain(matchings):
    t = Fo.folding_change_table(matchings)
    assert set(t["comparison"]) == {"fold, no b_enc", "fold, with b_enc", "b_enc (folded)"}
    assert (t["frac_changed"] == 0).all()


def test_cost_score_correlation_and_bins():
    rng = np.random.default_rng(0)
    cost = rng.random(200)
    feats = pd.DataFrame({"cost": cost, "matching_score": 1 - cost + 0.05 * rng.random(200), "fires_a": 10})
    assert Fo.cost_score_correlation(feats) < -0.9
    b = Fo.binned_scores(feats, n_bins=5)
    assert len(b) == 5 and b["n"].sum() == 200
    assert b["score_mean"].is_monotonic_decreasing
    assert math.isnan(Fo.cost_score_correlation(feats.head(2)))
    assert math.isnan(Fo.cost_score_correlation(feats.assign(fires_a=0), min_fires=1))
    assert Fo.binned_scores(feats.assign(fires_a=0), min_fires=1).empty


def test_cost_score_correlations_per_pair(stats, matchings):
    rhos = Fo.cost_score_correlations(stats, matchings["folded"], min_fires=1)
    assert list(rhos.columns) == ["layer_a", "layer_b", "rho", "rho_lift"]
    assert list(zip(rhos["layer_a"], rhos["layer_b"], strict=True)) == list(matchings["folded"])
    for r in rhos.itertuples():
        want = Fo.cost_score_correlation(Fo.feature_table(stats, r.layer_a, r.layer_b, matchings["folded"][(r.layer_a, r.layer_b)]))
        assert (math.isnan(want) and math.isnan(r.rho)) or r.rho == pytest.approx(want)


def test_focus_pair():
    pairs = [(t, t + 1) for t in range(6)]
    assert Fo.focus_pair(pairs) == (4, 5)  # round(2/3 * 6) = 4
    assert Fo.focus_pair(pairs[:1]) == (0, 1)
    assert Fo.focus_pair(pairs, fraction=1.0) == (5, 6)  # clipped to the last pair
    with pytest.raises(ValueError):
        Fo.focus_pair([])


def test_best_worst_pairs_with_context_explanations(stats, matchings):
    source = ContextExplanations(stats, minilm_tokenizer())
    feats = Fo.feature_table(stats, 0, 1, matchings["folded"][(0, 1)])
    feats["cost"] = np.linspace(0, 1, F)  # a known cost order
    t = Fo.best_worst_pairs(feats, source, n=2, min_fires=2)
    eligible = feats[(feats["fires_a"] >= 2) & (feats["fires_b"] >= 2)]
    assert len(eligible) >= 4  # the planted SAEs fire
    assert t["end"].tolist() == ["best", "best", "worst", "worst"]
    assert t["feature_a"].tolist() == [*eligible["feature_a"].iloc[:2], *eligible["feature_a"].iloc[-2:]]
    for r in t.itertuples():
        assert r.text_a == source.explain(0, r.feature_a) and r.text_b == source.explain(1, r.feature_b)
        assert r.text_a.startswith("top tokens: ") and "«" in r.text_a
    few = Fo.best_worst_pairs(feats.head(3), source, n=2, min_fires=0)
    assert few["end"].tolist() == ["best", "best", "worst"]  # a pair is never both best and worst


# ---- claims --------------------------------------------------------------------------


def _scores(folded, unfolded, encoder=None, decoder=None):
    rows = []
    for k in range(len(folded)):
        for v, vals in (("folded", folded), ("unfolded", unfolded), ("encoder", encoder), ("decoder", decoder)):
            if vals is not None:
                rows.append({"layer_a": k, "layer_b": k + 1, "variant": v, "matching_score": vals[k]})
    return pd.DataFrame(rows)


def test_claims_from_score_tables():
    rng = np.random.default_rng(0)
    n = 20  # layer pairs
    unf = rng.uniform(0.3, 0.6, n)
    # planted: folding adds 0.1 to every pair (tolerance 0.01) -> held
    s = _scores(unf + 0.1 + rng.normal(0, 0.01, n), unf, encoder=unf - 0.2, decoder=unf + 0.1 + rng.normal(0, 0.002, n))
    c = Fo.claim_folding_improves(s)
    assert c.verdict == "held" and c.effect == pytest.approx(0.1, abs=0.01) and c.unit == "layer pairs"
    # planted: folding hurts -> failed
    assert Fo.claim_folding_improves(_scores(unf - 0.1, unf)).verdict == "failed"
    # a tie by construction (ReLU SAEs: folded == unfolded everywhere) -> not testable, not failed
    tie = Fo.claim_folding_improves(_scores(unf, unf))
    assert tie.verdict == "not testable" and "tie" in tie.precondition
    par, worse = Fo.claim_encoder_decoder(s)
    assert par.verdict == "held" and worse.verdict == "held"
    off = _scores(unf, unf, encoder=unf + 0.001, decoder=unf - 0.2)
    par, worse = Fo.claim_encoder_decoder(off)
    assert par.verdict == "failed" and worse.verdict == "failed"
    tbl = claims_table([c, par, worse])
    assert tbl["verdict"].tolist() == ["held", "failed", "failed"]
    assert tbl["chapter"].eq("01").all() and tbl["ci_low"].notna().all()


def _features(n_pairs, slope, seed=0, n=200, n_tokens=1000):
    """Feature tables with lift = -slope * cost + noise, and the partner's firing rate unrelated."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(n_pairs):
        cost = rng.uniform(0, 1, n)
        lift = -slope * cost + rng.normal(0, 0.1, n)
        out[(k, k + 1)] = pd.DataFrame({"cost": cost, "lift": lift, "fires_a": np.full(n, 10), "matching_score": lift + 0.1})
    return out


def test_claim_cost_reflects_similarity():
    held = Fo.claim_cost_reflects_similarity(_features(10, slope=0.5), n_null=20)
    assert held.verdict == "held" and held.our_value < -0.5 and abs(held.chance) < 0.05
    null = Fo.claim_cost_reflects_similarity(_features(10, slope=0.0), n_null=20)
    assert null.verdict in ("failed", "not testable")  # no planted effect
    few = Fo.claim_cost_reflects_similarity(_features(2, slope=0.5), n_null=5)
    assert few.verdict == "not testable"  # fewer than 5 usable layer pairs


def test_claim_theta_tracks_norm():
    rng = np.random.default_rng(1)
    h = np.cumprod(1 + rng.uniform(0.0, 0.3, 25))
    norms = pd.DataFrame({"layer": range(25), "theta_mean": h * (1 + rng.normal(0, 0.01, 25)), "resid_norm_mean": h,
                          "folded_dec_norm_mean": h})
    dh = np.diff(h)
    dyn = pd.DataFrame({"resid_norm_change": dh, "matched_dec_norm_change": dh + rng.normal(0, 0.01 * dh.std(), 24)})
    theta, dec = Fo.claim_theta_tracks_norm(norms, dyn, theta_carries_scale=True)
    assert theta.verdict == "held" and dec.verdict == "held" and theta.unit == "layer transitions"
    # θ in normalised units (the zoo): the θ row cannot be tested, whatever the numbers say
    theta, _ = Fo.claim_theta_tracks_norm(norms, dyn, theta_carries_scale=False)
    assert theta.verdict == "not testable" and "unnormalised" in theta.precondition
    # changes unrelated to the norm changes -> not held
    _, dec = Fo.claim_theta_tracks_norm(norms, dyn.assign(matched_dec_norm_change=rng.normal(size=24)), theta_carries_scale=True)
    assert dec.verdict != "held"


def test_theta_carries_scale_reads_the_training_record():
    from types import SimpleNamespace as NS

    zoo_old = NS(cfg=NS(normalize_activations="none", metadata=NS(featmatch={"profile": "quick"})))
    zoo_raw = NS(cfg=NS(normalize_activations="none", metadata=NS(featmatch={"train_normalize_activations": "none"})))
    hub = NS(cfg=NS(normalize_activations="none", metadata=NS()))
    assert not Fo.theta_carries_scale(zoo_old) and Fo.theta_carries_scale(zoo_raw) and Fo.theta_carries_scale(hub)


def test_claim_folding_barely_matters_rule():
    def table(a, b, n=12):
        rows = []
        for k in range(n):
            rows += [{"layer_a": k, "layer_b": k + 1, "comparison": "fold, no b_enc", "frac_changed": a + 0.001 * (k % 3)},
                     {"layer_a": k, "layer_b": k + 1, "comparison": "fold, with b_enc", "frac_changed": b + 0.001 * (k % 2)}]
        return pd.DataFrame(rows)

    barely, more = Fo.claim_folding_barely_matters(table(0.02, 0.3))
    assert barely.verdict == "held" and more.verdict == "held"
    barely, more = Fo.claim_folding_barely_matters(table(0.4, 0.3))
    assert barely.verdict == "failed" and more.verdict == "failed"
    empty = Fo.claim_folding_barely_matters(pd.DataFrame({"layer_a": [], "layer_b": [], "comparison": [], "frac_changed": []}))
    assert [c.verdict for c in empty] == ["not testable"]


def test_claim_judge_folding():
    rows = []
    for k in range(8):
        rows += [{"layer_a": k, "matching": "folded", "label": 3, "judge": "proxy"},
                 {"layer_a": k, "matching": "unfolded", "label": 1 + (k % 2), "judge": "proxy"}]
    j = pd.DataFrame(rows).astype({"label": "Int64"})
    c = Fo.claim_judge_folding(j)
    assert c.verdict == "held" and c.effect == pytest.approx(1.5) and "proxy" in c.claim
    assert Fo.claim_judge_folding(j.iloc[:0]).verdict == "not testable"
    assert Fo.claim_judge_folding(j[j["matching"] == "folded"]).verdict == "not testable"


def test_claim_judge_cost():
    rng = np.random.default_rng(2)
    lab = rng.integers(1, 4, 120)
    j = pd.DataFrame({"matching": "folded", "label": lab, "cost": 1.0 - 0.3 * lab + rng.normal(0, 0.1, 120), "judge": "proxy"})
    c = Fo.claim_judge_cost(j)
    assert c.verdict == "held" and c.our_value < -0.5
    flipped = Fo.claim_judge_cost(j.assign(cost=-j["cost"]))  # SAME pairs cost more: the data contradict the claim
    assert flipped.verdict == "failed"
    assert Fo.claim_judge_cost(j.iloc[:5]).verdict == "not testable"
