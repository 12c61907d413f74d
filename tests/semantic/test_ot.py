"""Tests of featmatch.semantic._ot's exact kernels against POT's public API (ot.dist, ot.emd2)."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest

from featmatch.semantic import _ot, nearest

from .test_semantic import clustered_pair


@pytest.mark.parametrize("p, metric", [(1, "euclidean"), (2, "sqeuclidean")])
def test_ground_cost_is_ot_dist(p, metric):
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(17, 64)), rng.normal(size=(23, 64))
    M = _ot.ground_cost(xa, xb, p)
    # same float64 formula, summed in another order: a few ulps of the ~128-sized entries
    np.testing.assert_allclose(M, ot.dist(xa, xb, metric=metric), rtol=1e-12, atol=1e-12)
    assert M.flags.c_contiguous and M.dtype == np.float64
    assert _ot.ground_cost(xa, xa, p).min() >= 0.0  # clipped: no negative round-off on the diagonal


def random_problem(rng, n, m, zeros=0):
    wa, wb = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(m)) * rng.uniform(0.5, 2.0)
    wa[:zeros] = 0.0
    wa /= wa.sum()
    return wa, wb, ot.dist(rng.normal(size=(n, 8)), rng.normal(size=(m, 8)))


@pytest.mark.parametrize("zeros", [0, 3])
def test_emd2_cost_is_ot_emd2(zeros):
    """Same value as ot.emd2 (which also rescales b to a's mass and drops zero weights)."""
    rng = np.random.default_rng(1)
    for n, m in [(32, 32), (5, 40), (40, 7), (1, 1)]:
        wa, wb, M = random_problem(rng, n, m, zeros=min(zeros, n - 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ot.emd2's own "must have the same sum" check
            ref = ot.emd2(wa, wb * (wa.sum() / wb.sum()), M)
        assert _ot.emd2_cost(wa, wb, M) == pytest.approx(ref, rel=1e-12, abs=1e-14)


def test_emd2_cost_warns_like_ot_emd2_when_the_solver_stops_early():
    wa, wb, M = random_problem(np.random.default_rng(2), 40, 40)
    with pytest.warns(RuntimeWarning, match="numItermax"):
        _ot.emd2_cost(wa, wb, M, num_iter_max=3)


def test_emd2_cost_falls_back_to_ot_emd2(monkeypatch):
    wa, wb, M = random_problem(np.random.default_rng(3), 12, 9)
    fast = _ot.emd2_cost(wa, wb, M)
    monkeypatch.setattr(_ot, "_emd_c", None)
    assert _ot.emd2_cost(wa, wb, M) == pytest.approx(fast, rel=1e-12)

    def other_signature(*args):
        raise TypeError("emd_c() takes 3 positional arguments")

    monkeypatch.setattr(_ot, "_emd_c", other_signature)
    assert _ot.emd2_cost(wa, wb, M) == pytest.approx(fast, rel=1e-12)


def test_nearest_is_the_same_on_any_thread_count():
    a, b = clustered_pair(F=40, N=12, k=8, seed=5)
    one = nearest(a, b, k=5, candidates=12, certify=True, threads=1)
    two = nearest(a, b, k=5, candidates=12, certify=True, threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


@pytest.mark.parametrize("embed, certify", [("moment", False), ("sliced", False), ("both", True)])
def test_pruned_rerank_is_the_full_rerank(embed, certify, monkeypatch):
    """Skipping the candidates the moment bound excludes never changes the top-k (and does skip)."""
    a, b = clustered_pair(F=60, N=16, k=8, seed=11)
    calls = {"n": 0}
    pair_cost = _ot.pair_cost

    def counted(*args, **kw):
        calls["n"] += 1
        return pair_cost(*args, **kw)

    monkeypatch.setattr(_ot, "pair_cost", counted)
    solves = {}
    for k, c in [(1, 20), (5, 30), (10, 60)]:
        for prune in (False, True):
            calls["n"] = 0
            solves[prune] = (
                nearest(a, b, k=k, candidates=c, embed=embed, certify=certify, prune=prune, threads=1),
                calls["n"],
            )
        (full, n_full), (fast, n_fast) = solves[False], solves[True]
        np.testing.assert_array_equal(full[0], fast[0])
        np.testing.assert_array_equal(full[1], fast[1])
        assert n_fast <= n_full
    assert n_fast < n_full  # k=10 of 60 candidates: the bound excludes some on clustered features
