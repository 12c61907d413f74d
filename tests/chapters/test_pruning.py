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


def test_theta_table_on_a_real_sweep(lm, tokens, saes, sweep):
    folded = common.pair_matchings(saes, common.next_layer_pairs([0, 2]), ["folded"])["folded"]
    guarded = transfer.drop_small_thresholds_by_layer(folded, saes, 1e-2)
    guard = pruning_sweep(lm, tokens, saes, [0, 2],
                          [{"method": "encode_permute_decode", "fold": True, "matching": guarded,
                            "label": "encode_permute_decode_folded_min_theta"}], batch_size=4, progress=False)
    t = Pr.theta_table(folded, guarded, saes, sweep, guard)
    assert list(t.columns) == ["layer", "pairs_dropped", "max_transfer_scale", "ev_folded", "ev_folded_min_theta", "ev_unfolded"]
    assert t["layer"].tolist() == [0, 2]
    # layer 1's two tiny thresholds are B-side partners at layer 0 only
    assert t["pairs_dropped"].tolist() == [2, 0]
    assert t.loc[0, "max_transfer_scale"] == pytest.approx(
        np.nanmax(transfer.transfer_scale(folded[(0, 1)], saes[0], saes[1])))
    ev = sweep.set_index(["layer", "method"])["ev"]
    assert t["ev_folded"].tolist() == pytest.approx([ev[(x, "encode_permute_decode_folded")] for x in (0, 2)])
    assert t["ev_unfolded"].tolist() == pytest.approx([ev[(x, "encode_permute_decode_unfolded")] for x in (0, 2)])
    # nothing dropped at layer 2: the guarded run is the plain run
    assert t.loc[1, "ev_folded_min_theta"] == pytest.approx(t.loc[1, "ev_folded"])
    c = Pr.claim_folding_improves_epd_min_theta(t, 1e-2)
    assert c.claim.endswith("pairs with θ < 0.01 dropped")
    wins = float((t["ev_folded_min_theta"] > t["ev_unfolded"]).mean())
    assert f"{wins:.0%} of 2" in c.ours


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


def test_early_and_folding_claims_from_tables():
    early = pd.DataFrame({"layer": [0, 3, 6, 9, 12, 20], "ev_shortfall": [0.2, 0.1, -0.1, np.nan, 0.5, 0.5]})
    c = Pr.claim_early_shortfall(early, n_layers=30)  # layers < 10: 0.2, 0.1, -0.1 and a NaN (no success)
    assert c.verdict == "mixed" and "50% of 4" in c.ours
    assert Pr.claim_early_shortfall(early.assign(ev_shortfall=1.0), 30).verdict == "held"
    sw = _sweep([0, 1, 2, 3], encode_permute_decode_folded=[(0, 0.5), (0, 0.5), (0, np.nan), (0, 0.9)],
                encode_permute_decode_unfolded=[(0, 0.4), (0, 0.6), (0, 0.1), (0, 0.1)])
    f = Pr.claim_folding_improves_epd(sw)
    assert f.verdict == "mixed" and "50% of 4" in f.ours  # the NaN layer counts as a loss


def test_hybrid_table_and_claim():
    rows = []
    for q, ev in ((0.0, 0.5), (0.5, 0.7), (1.0, 0.8)):
        rows.append({"layer": 3, "method": f"cost q={q:.2f}", "kind": "quantile_hybrid", "q": q, "delta_ce": 1 - ev, "ev": ev})
    rows.append({"layer": 3, "method": "random q=0.50", "kind": "quantile_hybrid", "q": 0.5, "delta_ce": 0.4, "ev": 0.6})
    rows.append({"layer": 3, "method": "layer_drop", "kind": "layer_drop", "q": None, "delta_ce": 1.0, "ev": 0.1})
    h = Pr.hybrid_table(pd.DataFrame(rows))
    assert len(h) == 3 + 3  # the random curve gets the order-free end points
    assert h[h["order"] == "random"]["ev"].tolist() == [0.5, 0.6, 0.8]
    assert Pr.claim_hybrid_cost_order(h).verdict == "held"
    h.loc[(h["order"] == "random") & (h["q"] == 0.5), "ev"] = 0.9
    assert Pr.claim_hybrid_cost_order(h).verdict == "failed"
    assert Pr.claim_hybrid_cost_order(h[h["order"] == "cost"]).verdict == "not tested"
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


def _study(rows):
    return pd.DataFrame(rows, columns=["layer", "variant_a", "variant_b", "method", "same_l0", "l0_a", "ev", "delta_ce"])


def test_claim_l0_mismatch_and_higher_l0_rules():
    m = "encode_permute_decode_folded"
    study = _study([
        (1, "main", "main", m, True, 5.0, 0.8, 0.3), (1, "main", "l0b", m, False, 5.0, 0.6, 0.5),
        (1, "l0b", "l0b", m, True, 12.0, 0.9, 0.2), (1, "l0b", "main", m, False, 12.0, 0.95, 0.4),
    ])
    c = Pr.claim_l0_mismatch(study)
    assert c.verdict == "mixed" and "50% of 2" in c.ours and "encode-permute-decode (folded)" in c.ours
    h = Pr.claim_higher_l0(study)  # one (layer, method) cell: the denser pair has the lower ΔCE
    assert h.verdict == "held" and "100% of 1" in h.ours
    flipped = study.assign(delta_ce=[0.2, 0.5, 0.3, 0.4])
    assert Pr.claim_higher_l0(flipped).verdict == "failed"
    assert Pr.claim_l0_mismatch(study, method="layer_drop").verdict == "not tested"


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
    cheap = Pr.claim_pruning_cheap_later(sw, n_layers=30)
    assert cheap.verdict == "held" and "= 0.050" in cheap.ours  # later layers: extra 0.05, 0.02, 0.1 -> median 0.05
    assert "raw median ΔCE 0.150" in cheap.ours
    costly = sw.assign(delta_ce=np.where(sw["method"] == "encode_permute_decode_folded", 1.0, sw["delta_ce"]))
    assert Pr.claim_pruning_cheap_later(costly, 30).verdict == "failed"
    assert Pr.claim_pruning_cheap_later(sw.iloc[:0], 30).verdict == "not tested"
    assert Pr.claim_top1_beats_permutation(sw).verdict == "held"  # 3 of 4 layers
    assert Pr.claim_top1_beats_permutation(sw[sw["method"] != "top1_cosine_folded"]).verdict == "not tested"
    assert Pr.claim_l0_explains_early([0.5, 0.3, 0.1, 0.0], [0.4, 0.2, 0.1, 0.05]).verdict == "held"
    assert Pr.claim_l0_explains_early([0.5, 0.3, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]).verdict == "failed"
    assert Pr.claim_l0_explains_early([0.1, 0.1, 0.1], [0.0, 0.1, 0.2]).verdict == "not tested"  # equal L0 everywhere
