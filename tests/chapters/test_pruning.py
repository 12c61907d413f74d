"""featmatch.chapters.pruning (notebook 03): tables from real pruning sweeps on a tiny model, and the claim rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _builders import jumprelu_sae

from featmatch.chapters import common
from featmatch.chapters import pruning as Pr
from featmatch.evaluation import transfer
from featmatch.evaluation.pruning import pruning_sweep
from featmatch.lm.activations import gather

from ._sae_match import D, F, model, word_tokens

LAYERS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def lm():
    return model()


@pytest.fixture(scope="module")
def tokens():
    return word_tokens(n_seq=4, seq_len=16)


@pytest.fixture(scope="module")
def saes():
    """Random SAEs at layers 0..3; layer 1 has two near-zero thresholds (features 0 and 1)."""
    out = {t: jumprelu_sae(D, F, seed=t, theta_range=(0.05, 0.2), hook_name=f"blocks.{t}.hook_resid_post") for t in LAYERS}
    with torch.no_grad():
        out[1].threshold[:2] = 1e-3
    return out


@pytest.fixture(scope="module")
def sweep(lm, tokens, saes):
    methods = ["encode_decode_previous", {"method": "encode_permute_decode", "fold": True},
               {"method": "encode_permute_decode", "fold": False}]
    return pruning_sweep(lm, tokens, saes, [0, 2], methods, batch_size=4, progress=False)


def test_hybrid_layers_at_the_papers_depths():
    assert Pr.hybrid_layers(list(range(30)), 30) == [3, 12, 23]
    assert Pr.hybrid_layers(list(range(26)), 26) == [3, 10, 20]  # the paper's own on Gemma-2-2B
    assert Pr.hybrid_layers([0, 1, 5, 6, 9], 10) == [0, 5]  # only layers with a next layer qualify


def test_theta_check_table_on_real_saes(saes):
    folded = common.pair_matchings(saes, common.next_layer_pairs([0, 2]), ["folded"])["folded"]
    t = Pr.theta_check_table(folded, saes)
    assert list(t.columns) == ["layer", "near_zero_theta_a", "near_zero_theta_b", "min_theta_ratio_a", "max_transfer_scale"]
    # layer 1's two tiny thresholds are B-side at layer 0 only; none at layer 2 -> 3
    assert t["near_zero_theta_b"].tolist() == [2, 0] and t["near_zero_theta_a"].tolist() == [0, 0]
    assert t.loc[0, "max_transfer_scale"] == pytest.approx(np.nanmax(transfer.transfer_scale(folded[(0, 1)], saes[0], saes[1])))


def test_sweep_reports_per_sequence_delta_ce(sweep, tokens):
    for r in sweep.itertuples():
        x = np.asarray(r.delta_ce_seq)
        assert x.shape == (tokens.shape[0],)
        # every sequence scores the same number of positions, so the mean of the per-sequence ΔCE is the ΔCE
        assert x.mean() == pytest.approx(r.delta_ce, rel=1e-9, abs=1e-12)


def test_early_layer_table_on_a_real_sweep(lm, tokens, saes, sweep):
    l0_stats = gather(lm, {x: saes[x] for x in common.layers_with_next([0, 2])}, tokens, top_k=0, n_samples=0,
                      cache=False, progress=False)
    e = Pr.early_layer_table(sweep, l0_stats)
    assert list(e.columns) == ["layer", "ev_shortfall", "l0_t", "l0_t1", "l0_gap"]
    assert e["layer"].tolist() == [0, 2] and e.index.tolist() == [0, 1]
    ev = sweep.set_index(["layer", "method"])["ev"]
    for r in e.itertuples():
        assert r.ev_shortfall == pytest.approx(ev[(r.layer, "encode_decode_previous")] - ev[(r.layer, "encode_permute_decode_folded")])
        assert (r.l0_t, r.l0_t1) == pytest.approx((l0_stats.l0(r.layer), l0_stats.l0(r.layer + 1)))
        assert r.l0_gap == pytest.approx(abs(r.l0_t - r.l0_t1) / (0.5 * (r.l0_t + r.l0_t1)))


def _seq_sweep(layers, n_seq=40, seed=0, **methods):
    """A sweep table whose rows carry per-sequence ΔCE: method -> per-layer mean ΔCE (noise sd 0.05)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, means in methods.items():
        for layer, (dce, ev) in zip(layers, means, strict=True):
            x = dce + rng.normal(0, 0.05, n_seq)
            rows.append({"layer": layer, "method": name, "delta_ce": float(x.mean()), "ev": ev, "delta_ce_seq": x})
    return pd.DataFrame(rows)


def test_early_and_folding_claims_from_tables():
    early = pd.DataFrame({"layer": [0, 3, 6, 9, 12, 20], "ev_shortfall": [0.2, 0.21, 0.19, 0.2, 0.5, 0.5]})
    assert Pr.claim_early_shortfall(early, n_layers=30).verdict == "held"
    assert Pr.claim_early_shortfall(early.assign(ev_shortfall=[-0.2, -0.21, -0.19, -0.2, 0, 0]), 30).verdict == "failed"
    assert Pr.claim_early_shortfall(early[early["layer"] >= 6], 30).verdict == "not testable"  # two early layers
    no_theta = pd.DataFrame({"near_zero_theta_a": [0, 0], "near_zero_theta_b": [0, 0]})
    good = [(0.05, 0.9)] * 4
    sw = _seq_sweep([0, 10, 20, 28], encode_decode_current=good, encode_permute_decode_folded=[(0.5, 0.5)] * 4,
                    encode_permute_decode_unfolded=[(1.0, 0.3)] * 4)
    assert Pr.claim_folding_improves_epd(sw, no_theta).verdict == "held"
    near = Pr.claim_folding_improves_epd(sw, no_theta.assign(near_zero_theta_b=[3, 0]))
    assert near.verdict == "not testable" and "near-zero θ" in near.precondition
    # ReLU SAEs: folded and unfolded identical on every sequence -> a tie, not a failure
    tie = sw[sw["method"] != "encode_permute_decode_unfolded"]
    tie = pd.concat([tie, tie[tie["method"] == "encode_permute_decode_folded"].assign(method="encode_permute_decode_unfolded")])
    assert Pr.claim_folding_improves_epd(tie, no_theta).verdict == "not testable"
    # SAEs that break the model themselves: not testable on this zoo
    bad = sw.assign(ev=np.where(sw["method"] == "encode_decode_current", 0.3, sw["ev"]))
    assert Pr.claim_folding_improves_epd(bad, no_theta).verdict == "not testable"


def test_hybrid_table_and_claim():
    rng = np.random.default_rng(0)
    rows = []
    for q, dce in ((0.0, 0.5), (0.5, 0.3), (1.0, 0.2)):
        rows.append({"layer": 3, "method": f"cost q={q:.2f}", "kind": "quantile_hybrid", "q": q, "delta_ce": dce, "ev": 1 - dce,
                     "delta_ce_seq": dce + rng.normal(0, 0.02, 30)})
    rows.append({"layer": 3, "method": "random q=0.50", "kind": "quantile_hybrid", "q": 0.5, "delta_ce": 0.6, "ev": 0.4,
                 "delta_ce_seq": 0.6 + rng.normal(0, 0.02, 30)})
    rows.append({"layer": 3, "method": "layer_drop", "kind": "layer_drop", "q": None, "delta_ce": 1.0, "ev": 0.1,
                 "delta_ce_seq": np.ones(30)})
    h = Pr.hybrid_table(pd.DataFrame(rows))
    assert len(h) == 3 + 3  # the random curve gets the order-free end points
    assert h[h["order"] == "random"]["ev"].tolist() == [0.5, 0.4, 0.8]
    c = Pr.claim_hybrid_cost_order(h)
    assert c.verdict == "held" and c.effect == pytest.approx(0.3, abs=0.02) and c.unit.startswith("sequences")
    flipped = h.copy()
    k = flipped.index[(flipped["order"] == "random") & (flipped["q"] == 0.5)][0]
    flipped.at[k, "delta_ce_seq"] = 0.1 + rng.normal(0, 0.02, 30)
    assert Pr.claim_hybrid_cost_order(flipped).verdict == "failed"
    assert Pr.claim_hybrid_cost_order(h[h["order"] == "cost"]).verdict == "not testable"
    no_random = Pr.hybrid_table(pd.DataFrame(rows[:3]))
    assert set(no_random["order"]) == {"cost"} and len(no_random) == 3


def test_l0_combinations():
    assert Pr.l0_combinations([14, 15]) == [(14, "main", "main"), (14, "main", "l0b"), (14, "l0b", "main"), (14, "l0b", "l0b")]
    assert Pr.l0_combinations([14, 16]) == []


def test_l0_study_on_tiny_model(lm, tokens):
    hooks = {t: f"blocks.{t}.hook_resid_post" for t in (1, 2)}
    saes = {
        "main": {t: jumprelu_sae(D, F, seed=t, theta_range=(0.05, 0.1), hook_name=h) for t, h in hooks.items()},
        "l0b": {t: jumprelu_sae(D, F, seed=10 + t, theta_range=(0.01, 0.02), hook_name=h) for t, h in hooks.items()},
    }
    l0 = {("main", 1): 5.0, ("main", 2): 6.0, ("l0b", 1): 12.0, ("l0b", 2): 11.0}
    study = Pr.l0_study(lm, tokens[:2], saes, l0, Pr.l0_combinations([1, 2]), batch_size=4)
    assert len(study) == 4 * 3
    assert set(study["method"]) == {"encode_decode_current", "encode_decode_previous", "encode_permute_decode_folded"}
    mixed = study[(study["variant_a"] == "main") & (study["variant_b"] == "l0b")].iloc[0]
    assert (mixed["l0_a"], mixed["l0_b"]) == (5.0, 11.0)
    assert mixed["l0_mismatch"] == pytest.approx(6 / 8) and not mixed["same_l0"]
    assert study.loc[study["same_l0"], "l0_mismatch"].max() < 0.2
    assert np.isfinite(study["delta_ce"]).all()
    # encode-decode current only reads SAE B: it does not depend on A's variant
    edc = study[study["method"] == "encode_decode_current"].set_index(["variant_a", "variant_b"])["ev"]
    assert edc[("main", "l0b")] == pytest.approx(edc[("l0b", "l0b")])
    assert Pr.l0_study(lm, tokens, saes, l0, []).empty


def test_zoo_l0_study_is_empty_for_hub_sets():
    assert Pr.zoo_l0_study(None, None, {}, "gpt2-small-res-jb", "tiny").empty


def _study(rows, n_seq=30, seed=0):
    rng = np.random.default_rng(seed)
    d = pd.DataFrame(rows, columns=["layer", "variant_a", "variant_b", "method", "same_l0", "l0_a", "ev", "delta_ce"])
    d["delta_ce_seq"] = [x + rng.normal(0, 0.02, n_seq) for x in d["delta_ce"]]
    return d


def test_claim_l0_mismatch_and_higher_l0_rules():
    m = "encode_permute_decode_folded"
    study = _study([
        (1, "main", "main", m, True, 5.0, 0.8, 0.3), (1, "main", "l0b", m, False, 5.0, 0.6, 0.5),
        (1, "l0b", "l0b", m, True, 12.0, 0.9, 0.2), (1, "l0b", "main", m, False, 12.0, 0.95, 0.4),
    ])
    c = Pr.claim_l0_mismatch(study)  # other-L0 partners cost 0.2 more nats on both sides
    assert c.verdict == "held" and c.effect == pytest.approx(0.2, abs=0.02)
    h = Pr.claim_higher_l0(study)  # the denser same-L0 pair has the lower ΔCE by 0.1
    assert h.effect == pytest.approx(0.1, abs=0.02) and h.verdict in ("held", "mixed")
    flipped = _study([(1, "main", "main", m, True, 5.0, 0.8, 0.2), (1, "l0b", "l0b", m, True, 12.0, 0.9, 0.5)])
    assert Pr.claim_higher_l0(flipped).verdict == "failed"
    assert Pr.claim_l0_mismatch(study, method="layer_drop").verdict == "not testable"


def test_pruning_claims():
    good = [(0.05, 0.9)] * 4
    sw = _seq_sweep(
        [0, 10, 20, 28],
        encode_decode_current=good,
        layer_drop=[(0.2, 0.5)] * 4,
        encode_permute_decode_folded=[(2.0, 0.1), (0.06, 0.85), (0.07, 0.85), (0.06, 0.85)],
        top1_cosine_folded=[(1.0, 0.3), (0.03, 0.9), (0.03, 0.9), (0.03, 0.9)],
    )
    cheap, beats_drop = Pr.claim_pruning_cheap_later(sw, n_layers=30)
    assert cheap.verdict == "held" and cheap.our_value == pytest.approx(0.013, abs=0.03)
    assert beats_drop.verdict == "held"
    costly = sw.assign(delta_ce_seq=[x + (1.0 if mth == "encode_permute_decode_folded" else 0) for x, mth in zip(sw["delta_ce_seq"], sw["method"], strict=True)])
    cheap, beats_drop = Pr.claim_pruning_cheap_later(costly, 30)
    assert cheap.verdict == "failed" and beats_drop.verdict == "failed"
    assert [c.verdict for c in Pr.claim_pruning_cheap_later(sw.iloc[:0], 30)] == ["not testable"] * 2
    assert Pr.claim_top1_beats_permutation(sw).verdict == "held"  # layer 0: 1.0 nats better
    assert Pr.claim_top1_beats_permutation(sw[sw["method"] != "top1_cosine_folded"]).verdict == "not testable"
    x = np.linspace(0, 1, 12)
    assert Pr.claim_l0_explains_early(x, x ** 2).verdict == "held"
    assert Pr.claim_l0_explains_early(x, -x).verdict == "failed"
    assert Pr.claim_l0_explains_early([0.1, 0.1, 0.1], [0.0, 0.1, 0.2]).verdict == "not testable"  # equal L0 everywhere
