"""Tests of featmatch.semantic.nearest: the sparse exact top-k against POT's ot.emd2."""

from __future__ import annotations

import numpy as np
import ot
import pytest
from scipy.optimize import linear_sum_assignment

from featmatch.semantic import (
    FeatureDistributions,
    moment_lower_bound,
    nearest,
    semantic_match,
)

from .test_semantic import clustered_pair, planted_pair


def brute_force(a: FeatureDistributions, b: FeatureDistributions, p: int = 2) -> np.ndarray:
    """All-pairs W_p straight from POT (ot.dist + ot.emd2), the oracle."""
    out = np.empty((len(a), len(b)))
    for i in range(len(a)):
        wa = a.weights[i][a.weights[i] > 0]
        xa = a.coords[i][a.weights[i] > 0].astype(np.float64)
        for j in range(len(b)):
            wb = b.weights[j][b.weights[j] > 0]
            xb = b.coords[j][b.weights[j] > 0].astype(np.float64)
            M = ot.dist(xa, xb, metric="sqeuclidean" if p == 2 else "euclidean")
            out[i, j] = ot.emd2(wa / wa.sum(), wb / wb.sum(), M) ** (1.0 / p)
    return out


@pytest.fixture(scope="module")
def clustered():
    a, b = clustered_pair(F=30, N=16, k=8, seed=3)
    return a, b, brute_force(a, b)


def test_all_candidates_is_the_exact_top_k(clustered):
    a, b, D = clustered
    idx, dist = nearest(a, b, k=5, candidates=len(b))
    order = np.argsort(D, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(dist, np.take_along_axis(D, order, 1), rtol=1e-9, atol=1e-9)
    # recall 1.0: same neighbour sets (distances are continuous, so no ties)
    assert (np.sort(idx, 1) == np.sort(order, 1)).all()


@pytest.mark.parametrize("embed", ["both", "sliced", "moment"])
def test_certify_is_exact_with_few_candidates(clustered, embed):
    a, b, D = clustered
    idx, dist = nearest(a, b, k=3, candidates=1, certify=True, embed=embed)
    np.testing.assert_allclose(dist, np.sort(D, 1)[:, :3], rtol=1e-9, atol=1e-9)
    assert (idx[:, 0] == D.argmin(1)).all()


@pytest.mark.parametrize("embed", ["both", "sliced", "moment"])
def test_uncertified_distances_are_exact_on_the_returned_pairs(clustered, embed):
    a, b, D = clustered
    idx, dist = nearest(a, b, k=4, candidates=6, embed=embed)
    assert all(len(set(r)) == 4 for r in idx.tolist())  # no repeated candidate
    np.testing.assert_allclose(dist, np.take_along_axis(D, idx, 1), rtol=1e-9, atol=1e-9)
    assert (np.diff(dist, axis=1) >= 0).all()
    # a top-1 found among candidates is a true upper bound on the exact nearest distance
    assert (dist[:, 0] >= D.min(1) - 1e-12).all()


@pytest.mark.parametrize("p", [1, 2])
def test_moment_bound_is_below_every_exact_distance(clustered, p):
    a, b, D2 = clustered
    D = D2 if p == 2 else brute_force(a, b, p=1)
    lb = moment_lower_bound(a, b, p=p)
    assert lb.shape == D.shape
    assert (lb <= D + 1e-9).all()
    # and not vacuous: the bound explains a good part of the distance on clustered data
    assert np.median(lb / D) > 0.3


def test_planted_pairs_are_each_others_nearest_neighbours():
    a, b, perm = planted_pair(n_concepts=12, N=16, k=6)
    idx, _ = nearest(a, b, k=1, candidates=2)
    assert (b.feature_ids[idx[:, 0]] == perm).all()


def test_fewer_features_than_k_pads():
    a, b = clustered_pair(F=3, N=8, k=4, seed=1)
    small = b.subset([0, 1])
    idx, dist = nearest(a, small, k=4)
    assert (idx[:, 2:] == -1).all() and np.isinf(dist[:, 2:]).all()
    assert (idx[:, :2] >= 0).all() and np.isfinite(dist[:, :2]).all()


def test_semantic_match_through_nearest_equals_scipy_on_the_candidate_graph(clustered):
    a, b, D = clustered
    c = 8
    m = semantic_match(a, b, "exact", "assignment", candidates=c, progress=False)
    assert m.meta["search"] == "nearest"
    idx, _ = nearest(a, b, k=c, candidates=c)
    G = np.full_like(D, 1e6)  # the candidate graph with exact costs, prohibitive elsewhere
    np.put_along_axis(G, idx, np.take_along_axis(D, idx, 1), 1)
    r, cc = linear_sum_assignment(G)
    ok = G[r, cc] < 1e6
    np.testing.assert_allclose(m.cost[a.feature_ids[r[ok]]].sum(), G[r[ok], cc[ok]].sum(), rtol=1e-9)
    top = semantic_match(a, b, "exact", "topk", k=2, candidates=c, progress=False)
    np.testing.assert_allclose(top.cost[a.feature_ids], np.take_along_axis(D, idx[:, :1], 1)[:, 0])
    assert np.asarray(top.meta["topk_ids"]).shape == (a.n_features, 2)


def test_bad_arguments():
    a, b = clustered_pair(F=3, N=8, k=4, seed=1)
    with pytest.raises(ValueError, match="k must be"):
        nearest(a, b, k=0)
    with pytest.raises(ValueError, match="candidates must be"):
        nearest(a, b, candidates=0)
    with pytest.raises(ValueError, match="p must be"):
        nearest(a, b, p=3)
    with pytest.raises(ValueError, match="embed must be"):
        nearest(a, b, candidates=1, embed="pca")


@pytest.mark.parametrize(
    "opts", [{"candidates": 4, "embed": "both"}, {"candidates": 2, "certify": True}], ids=["both", "certified"]
)
def test_blocks_on_a_cluster_are_the_rows_of_one_process(dask_client, clustered, opts):
    """One task per block of 7 queries (5 blocks); identical indices and distances; exact against POT."""
    a, b, D = clustered
    local = nearest(a, b, k=3, **opts)
    dist = nearest(a, b, k=3, block=7, client=dask_client, **opts)
    np.testing.assert_array_equal(local[0], dist[0])
    np.testing.assert_array_equal(local[1], dist[1])
    if opts.get("certify"):
        np.testing.assert_allclose(dist[1], np.sort(D, 1)[:, :3], rtol=1e-9, atol=1e-9)
