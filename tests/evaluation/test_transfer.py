"""featmatch.evaluation.transfer: thresholds, folded transfer scales, the small-θ guard, hybrid specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae, standard_sae

from featmatch.evaluation import transfer as T
from featmatch.matching import Matching
from featmatch.saes import fold


def test_thetas_of_jumprelu_and_relu_saes():
    sae = jumprelu_sae(d_sae=8, seed=3)
    th = T.thetas(sae)
    assert th.dtype == np.float64 and th.shape == (8,)
    np.testing.assert_allclose(th, sae.threshold.detach().double().numpy())
    np.testing.assert_array_equal(T.thetas(standard_sae(d_sae=5)), np.ones(5))  # no threshold: θ = 1


def test_transfer_scale_is_what_folding_does_to_a_feature():
    """Folding (Eq. 4) multiplies decoder row i by θ_i, so the ratio of folded to raw decoder
    norms is θ: the transfer scale is that ratio at B's partner over that at A's feature."""
    a, b = jumprelu_sae(d_sae=6, seed=1), jumprelu_sae(d_sae=6, seed=2)
    perm = np.array([5, 4, 3, 2, 1, 0])
    m = Matching(perm=perm, cost=np.zeros(6), n_b=6)
    scale = T.transfer_scale(m, a, b)
    fa, fb = fold(a), fold(b)
    # folded decoder norms: ‖θ W_dec‖; their ratio per matched pair, over the raw ratio, is the scale
    na, nb = a.W_dec.detach().double().norm(dim=1).numpy(), b.W_dec.detach().double().norm(dim=1).numpy()
    fna, fnb = fa.W_dec.detach().double().norm(dim=1).numpy(), fb.W_dec.detach().double().norm(dim=1).numpy()
    np.testing.assert_allclose(scale, (fnb[perm] / nb[perm]) / (fna / na), rtol=1e-5)


def test_transfer_scale_and_drop_small_thresholds():
    """Planted: feature 1 of A has a near-zero θ (scale 1000x), B's feature 0 has one too;
    the pairs touching either are dropped, the others keep their partner and cost."""
    a, b = jumprelu_sae(d_sae=4, seed=1), jumprelu_sae(d_sae=3, seed=2)
    with torch.no_grad():
        a.threshold.copy_(torch.tensor([1.0, 1e-3, 2.0, 0.5]))
        b.threshold.copy_(torch.tensor([1e-3, 1.0, 0.5]))
    m = Matching(perm=np.array([1, 2, -1, 0]), cost=np.array([0.1, 0.2, np.nan, 0.3]), n_b=3, meta={"variant": "folded"})
    scale = T.transfer_scale(m, a, b)
    np.testing.assert_allclose(scale, [1.0, 500.0, np.nan, 2e-3], rtol=1e-6)
    g = T.drop_small_thresholds(m, a, b, 1e-2)
    np.testing.assert_array_equal(g.perm, [1, -1, -1, -1])
    assert g.cost[0] == 0.1 and np.isnan(g.cost[1:]).all()
    assert g.meta == {"variant": "folded", "min_theta": 1e-2, "n_small_theta_dropped": 2}
    np.testing.assert_array_equal(m.perm, [1, 2, -1, 0])  # the input is not modified
    np.testing.assert_array_equal(T.drop_small_thresholds(m, a, b, 1e-4).perm, m.perm)
    with pytest.raises(ValueError, match="min_theta"):
        T.drop_small_thresholds(m, a, b, 0.0)
    with pytest.raises(ValueError, match="number of features"):
        T.transfer_scale(m, b, a)


def test_drop_small_thresholds_by_layer_keys_by_first_layer():
    saes = {t: jumprelu_sae(d_sae=4, seed=t, hook_name=f"blocks.{t}.hook_resid_post") for t in (0, 1, 4, 5)}
    with torch.no_grad():
        saes[5].threshold[2] = 1e-3
    ident = Matching(perm=np.arange(4), cost=np.zeros(4), n_b=4)
    out = T.drop_small_thresholds_by_layer({(4, 5): ident, (0, 1): ident}, saes, 1e-2)
    assert list(out) == [4, 0]
    assert out[4].meta["n_small_theta_dropped"] == 1 and out[4].perm[2] == -1
    assert out[0].meta["n_small_theta_dropped"] == 0


def test_shuffled_cost_permutes_matched_costs_only():
    m = Matching(perm=np.array([1, 0, -1, 2, 3]), cost=np.array([0.1, 0.2, np.nan, 0.3, 0.4]), n_b=4)
    s = T.shuffled_cost(m, seed=1)
    np.testing.assert_array_equal(s.perm, m.perm)
    assert np.isnan(s.cost[2]) and sorted(s.cost[s.perm >= 0]) == [0.1, 0.2, 0.3, 0.4]
    assert s.meta["cost"] == "shuffled"
    np.testing.assert_array_equal(T.shuffled_cost(m, seed=1).cost, s.cost)  # seeded
    assert any(not np.array_equal(T.shuffled_cost(m, seed=k).cost, m.cost, equal_nan=True) for k in range(5))


def test_hybrid_methods():
    m = Matching(perm=np.array([1, 0, -1, 2]), cost=np.array([0.1, 0.2, np.nan, 0.3]), n_b=3)
    specs = T.hybrid_methods({4: m, 7: m}, [0.0, 0.5, 1.0], seed=2)
    assert [x["label"] for x in specs] == ["cost q=0.00", "cost q=0.50", "random q=0.50", "cost q=1.00"]
    assert [x["q"] for x in specs] == [0.0, 0.5, 0.5, 1.0]
    assert all(x["method"] == "quantile_hybrid" and x["fold"] for x in specs)
    assert specs[0]["matching"][4] is m
    rnd = specs[2]["matching"]
    np.testing.assert_array_equal(rnd[7].cost, T.shuffled_cost(m, seed=2 + 7).cost)  # seed + layer
    assert not T.hybrid_methods({4: m}, [0.5], random_control=False, fold=False)[0]["fold"]
    assert len(T.hybrid_methods({4: m}, [0.5], random_control=False)) == 1
    with pytest.raises(ValueError):
        T.hybrid_methods({4: m}, [1.5])
