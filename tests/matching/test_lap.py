"""Tests for featmatch.matching._lap: the sparse exact solver and its certificate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae, largest_duals_reference
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from featmatch.matching import Matching, assign, match, pairwise_cost
from featmatch.matching import _lap as lap
from featmatch.matching._costs import feature_vectors, rounding_bound
from featmatch.matching._costs import gamma as _gamma
from featmatch.matching._lap import _candidate_pass, _costs_from_g, _Side, sparse_match
from featmatch.synthetic import permuted_vectors, planted_vectors


def _dense(a: torch.Tensor, b: torch.Tensor, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cost = pairwise_cost(a, b, metric=metric)
    perm, pc = assign(cost)
    return perm, pc, cost


def _rounding_slack(a, b, metric, perm, perm_dense, info) -> float:
    """How far the sparse total may be from the dense optimum without either being wrong.

    The sparse solver is optimal up to ``info.gap_bound`` (n tau) for the numbers it used,
    which are pairwise_cost's formula on its own float32 products; those differ from the
    dense path's by at most ``rounding_bound`` per pair, so the two totals may differ by that
    summed over both assignments (the *Rounding* paragraph of featmatch.matching._lap)."""
    delta = rounding_bound(a, b, metric)
    r, rd = np.flatnonzero(perm >= 0), np.flatnonzero(perm_dense >= 0)
    return info.gap_bound + delta[r, perm[r]].sum() + delta[rd, perm_dense[rd]].sum()


def _assert_optimal(a, b, metric, perm, cost, info) -> tuple[np.ndarray, np.ndarray]:
    """The sparse result's total equals the dense optimum up to :func:`_rounding_slack`."""
    assert info.certified
    pd, cd, _ = _dense(a, b, metric)
    assert abs(np.nansum(cost) - np.nansum(cd)) <= _rounding_slack(a, b, metric, perm, pd, info)
    return pd, cd


def _unique_optimum(cost: np.ndarray, perm: np.ndarray, margin: float = 1e-6) -> bool:
    """True if every other assignment costs at least ``margin`` (relative) more: checked by
    forbidding each chosen edge in turn (enough for the second-best assignment)."""
    from scipy.optimize import linear_sum_assignment

    rows = np.flatnonzero(perm >= 0)
    best = cost[rows, perm[rows]].sum()
    for i in rows:
        c2 = cost.copy()
        c2[i, perm[i]] = 1e9
        r, c = linear_sum_assignment(c2)
        if c2[r, c].sum() - best <= margin * max(abs(best), 1e-12):
            return False
    return True


# --------------------------------------------------------------------------------------
# Certificate
# --------------------------------------------------------------------------------------


def test_certificate_rejects_truncated_candidates_and_recovers():
    """Crafted: every row's single best column is the same column 0, so with k=1 the
    candidate graph has no full matching except through the dummies, and the first
    certificate must fail; the matcher must then add edges and reach the dense optimum.
    (General sparse loop, ``core=False``: the fast path would see that this problem has no
    structure and solve it as one dense core.)"""
    rng = np.random.default_rng(0)
    n, d = 40, 8
    hub = rng.standard_normal(d)
    a = hub + 0.05 * rng.standard_normal((n, d))
    b = np.vstack([hub, rng.standard_normal((n - 1, d))])
    a_t, b_t = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    for metric in ("mse", "cosine"):
        perm, cost, info = sparse_match(a_t, b_t, metric=metric, k=1, core=False, return_info=True)
        # the first round was not certified: rows rechecked, and dummies or violations found
        assert info.rows_rechecked[0] > 0
        assert info.dummies_used[0] > 0 or info.violations[0] > 0
        assert info.rounds >= 2
        assert info.certified and info.fallback is None and info.path == "sparse"
        _assert_optimal(a_t, b_t, metric, perm, cost, info)


def test_fast_path_certificate_rejects_truncated_candidates_and_recovers():
    """Fast path with k=2 on a planted pair: some mutual-best pairs it fixes first are not in
    the optimum. The first certificate must find excluded pairs with negative reduced cost
    (the truncated candidate lists hide them), move those rows into the dense core, and the
    second round must reach the dense optimum, certified. (Weak pairs are left fixed here:
    moving them to the core up front is what normally avoids that second round.)"""
    a, b = permuted_vectors(600, 128, seed=3)
    perm, cost, info = sparse_match(a, b, k=2, weak_pairs=False, return_info=True)
    assert info.path == "core" and info.certified and info.fallback is None
    assert info.violations[0] > 0 and info.rounds >= 2
    assert info.core_rows[1] > info.core_rows[0]
    pd, cd = _assert_optimal(a, b, "mse", perm, cost, info)
    assert np.array_equal(perm, pd)
    # stopped after the rejected round (no fallback), the result is flagged, not certified
    with pytest.warns(RuntimeWarning, match="not certified"):
        _, _, info1 = sparse_match(
            a, b, k=2, max_rounds=1, dense_fallback=False, weak_pairs=False, return_info=True
        )
    assert not info1.certified
    # with the weak pairs moved up front: the same optimum
    perm2, cost2, info2 = sparse_match(a, b, k=2, return_info=True)
    assert info2.certified and info2.weak_moved > 0
    assert np.array_equal(perm2, pd)


def test_certificate_rejects_a_feasible_but_suboptimal_candidate_set():
    """k=5 on a random 30x30 case (general sparse loop, ``core=False``): the candidate graph has a full matching (no dummy), but
    its optimum is not the global one. The certificate must find excluded pairs with
    negative reduced cost; stopped after that round (no fallback) the result is worse than
    dense and flagged; allowed to continue, the matcher recovers the optimum."""
    rng = np.random.default_rng(65)
    a = torch.tensor(rng.standard_normal((30, 4)), dtype=torch.float32)
    b = torch.tensor(rng.standard_normal((30, 4)), dtype=torch.float32)
    _, cd, _ = _dense(a, b, "mse")
    with pytest.warns(RuntimeWarning, match="not certified"):
        perm1, cost1, info1 = sparse_match(
            a, b, k=5, max_rounds=1, dense_fallback=False, core=False, return_info=True
        )
    assert info1.dummies_used == [0] and info1.violations[0] > 0 and not info1.certified
    assert info1.path == "sparse"
    perm, cost, info = sparse_match(a, b, k=5, core=False, return_info=True)
    assert info.certified and info.fallback is None and info.rounds > 1
    pd, _ = _assert_optimal(a, b, "mse", perm, cost, info)
    perm1 = np.asarray(perm1)
    assert np.nansum(cost1) > np.nansum(cd) + _rounding_slack(a, b, "mse", perm1, pd, info)


def _main_pass_products(ra: _Side, cb: _Side, block_size: int) -> torch.Tensor:
    """The float32 products exactly as :func:`_candidate_pass` computes them: the same
    ``torch.mm`` calls on the same row blocks into a buffer of the same shape (the same BLAS
    call on the same machine and settings gives the same bits)."""
    n, m = ra.n, cb.n
    bs = max(1, min(block_size, n))
    buf = torch.empty(bs, m)
    out = torch.empty(n, m)
    for i0 in range(0, n, bs):
        i1 = min(i0 + bs, n)
        torch.mm(ra.rows()[i0:i1], cb.cols_t(), out=buf[: i1 - i0])
        out[i0:i1] = buf[: i1 - i0]
    return out


@pytest.mark.parametrize("metric,n,m", [("mse", 60, 60), ("mse", 40, 70), ("cosine", 50, 50)])
def test_row_bounds_are_valid_lower_bounds(metric, n, m):
    """What the candidate costs are, and what the bounds bound (checked exhaustively).

    The candidate costs are pairwise_cost's float64 arithmetic on *the blocked pass's own*
    float32 products, bit for bit, and its row bounds hold for every excluded pair of those
    numbers. Against pairwise_cost (a separate product, here with other row blocks: 16 rows
    against all n, so possibly another BLAS kernel) they agree only up to the rounding of a
    float32 product, ``rounding_bound``; on some CPUs and thread counts a few candidate costs
    differ from pairwise_cost's in the last bits (seen: 4.9e-8 for cosine at D = 12, where
    the bound is 1.4e-6)."""
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, 12, generator=g) * 3, torch.randn(m, 12, generator=g)
    ra, cb = _Side(a, cpu), _Side(b, cpu)
    cols, costs, bounds = _candidate_pass(ra, cb, metric, 5, 16, metric == "mse" and n == m)
    c = cols.numpy()
    main = _costs_from_g(_main_pass_products(ra, cb, 16), ra.sq[:, None], cb.sq[None, :], metric, 12).numpy()
    np.testing.assert_array_equal(costs.numpy(), np.take_along_axis(main, c, 1))
    excluded = np.ones((n, m), dtype=bool)
    np.put_along_axis(excluded, c, False, 1)
    lower = bounds.A[:, None] + bounds.alpha[None, :] - bounds.sigma[:, None] * bounds.beta[None, :]
    assert (main[excluded] >= lower[excluded]).all()
    # pairwise_cost's numbers: the same up to float32 rounding of the products
    full = pairwise_cost(a, b, metric=metric)
    delta = rounding_bound(a, b, metric)
    assert (np.abs(main - full) <= delta).all()
    assert (np.abs(costs.numpy() - np.take_along_axis(full, c, 1)) <= np.take_along_axis(delta, c, 1)).all()
    assert (full[excluded] >= lower[excluded] - delta[excluded]).all()


def test_rounding_bound_is_what_float32_products_can_differ_by():
    """rounding_bound is 2 gamma_D |a||b| * 2/D (mse) or 2 gamma_D (cosine) plus float64 terms,
    and pairwise_cost (one float32 product) stays within half of it (one side of two
    evaluations) of the costs computed in float64 from the same float32 vectors."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(70, 300, generator=g) * 3, torch.randn(50, 300, generator=g)
    for metric in ("mse", "cosine"):
        delta = rounding_bound(a, b, metric)
        a64, b64 = a.double().numpy(), b.double().numpy()
        if metric == "mse":
            ref = ((a64[:, None, :] - b64[None, :, :]) ** 2).mean(-1)
            ra, rb = np.linalg.norm(a64, axis=1)[:, None], np.linalg.norm(b64, axis=1)[None, :]
            assert np.allclose(delta, 4 * _gamma(300) * ra * rb / 300, rtol=1e-6, atol=0)
        else:
            na, nb = np.linalg.norm(a64, axis=1)[:, None], np.linalg.norm(b64, axis=1)[None, :]
            ref = 1 - (a64 @ b64.T) / (na * nb)
            assert np.allclose(delta, 2 * _gamma(300), rtol=1e-6, atol=0)
        assert (np.abs(pairwise_cost(a, b, metric=metric) - ref) <= delta / 2).all()


# --------------------------------------------------------------------------------------
# Sparse equals dense
# --------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 30),
    m=st.integers(1, 30),
    square=st.booleans(),
    d=st.integers(1, 6),
    k=st.integers(1, 6),
    metric=st.sampled_from(["mse", "cosine"]),
    seed=st.integers(0, 2**31 - 1),
    core=st.booleans(),
    keep=st.sampled_from([True, False, None]),
)
def test_sparse_equals_dense_property(n, m, square, d, k, metric, seed, core, keep):
    if square:
        m = n
    rng = np.random.default_rng(seed)
    a = torch.tensor(rng.standard_normal((n, d)) * rng.uniform(0.2, 3, (n, 1)), dtype=torch.float32)
    b = torch.tensor(rng.standard_normal((m, d)) * rng.uniform(0.2, 3, (m, 1)), dtype=torch.float32)
    perm, cost, info = sparse_match(a, b, metric=metric, k=k, core=core, return_info=True, keep_products=keep)
    assert info.products_kept is (keep is True)
    pd, cd, full = _dense(a, b, metric)
    assert info.certified
    ok = perm >= 0
    assert ok.sum() == min(n, m)
    assert np.unique(perm[ok]).size == ok.sum()
    assert np.isnan(cost[~ok]).all()
    # the costs are the dense path's formula on other float32 products (other blocks, the
    # core, B @ A^T when n > m): equal up to the rounding of a product
    rows = np.flatnonzero(ok)
    delta = rounding_bound(a, b, metric)
    assert (np.abs(cost[ok] - full[rows, perm[ok]]) <= delta[rows, perm[ok]]).all()
    # optimal for its own numbers up to n tau, so for the dense ones up to that plus the rounding
    # (sum of delta over the two assignments; see the Rounding paragraph of featmatch.matching._lap)
    dense_rows = np.flatnonzero(pd >= 0)
    slack = info.gap_bound + delta[rows, perm[ok]].sum() + delta[dense_rows, pd[dense_rows]].sum()
    assert abs(np.nansum(cost) - np.nansum(cd)) <= slack
    if n <= 12 and m <= 12 and _unique_optimum(full, pd, margin=1e-4):
        assert np.array_equal(perm, pd)


@pytest.mark.parametrize("metric", ["mse", "cosine"])
@pytest.mark.parametrize("shape", [(300, 300), (250, 320), (320, 250)])
def test_sparse_equals_dense_planted(metric, shape):
    n, m = shape
    a, b = permuted_vectors(max(n, m), 24, seed=3)
    a, b = a[:n], b[:m]
    perm, cost, info = sparse_match(a, b, metric=metric, k=8, return_info=True)
    pd, _ = _assert_optimal(a, b, metric, perm, cost, info)
    assert np.array_equal(perm, pd)


# --------------------------------------------------------------------------------------
# The dense core: lapjv with potentials, Dijkstra duals, weak pairs
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.one_of(st.integers(2, 40), st.integers(256, 400)),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=400, ties=True, seed=1)
@example(n=300, ties=False, seed=2)
def test_core_lsa_and_dijkstra_duals_match_references(n, ties, seed):
    """lapjv (or scipy below its size) reaches scipy's optimum, also with many tied costs; the
    Dijkstra duals from its potentials equal plain Bellman-Ford's largest feasible duals."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    E = rng.integers(0, 5 * n, (n, n)).astype(float) if ties else rng.standard_normal((n, n))
    pc, pot, name = lap._lsa_with_potentials(E)
    assert name == ("lapjv" if n >= lap._LAPJV_MIN else "scipy")
    assert np.array_equal(np.sort(pc), np.arange(n))
    r, c = linear_sum_assignment(E)
    assert E[np.arange(n), pc].sum() == pytest.approx(E[r, c].sum(), rel=1e-12, abs=1e-9)
    if pot is None:
        import lapjv

        row_to_col, _, (_, _, p) = lapjv.lapjv(E, force_doubles=True)
        pc, pot = np.asarray(row_to_col, dtype=np.int64), np.asarray(p, dtype=float)
    v = lap._largest_duals_dijkstra(E, pc, pot)
    np.testing.assert_allclose(v, largest_duals_reference(E, pc), rtol=0, atol=1e-9)
    e = E[np.arange(n), pc]
    assert (E - e[:, None] + v[pc][:, None] - v[None, :]).min() >= -1e-9


def test_core_solver_without_lapjv_falls_back_to_scipy(monkeypatch):
    """Unstructured 400 x 400: the whole problem is one square core. Same optimum with lapjv
    and, when it cannot be imported, with scipy and the label-correcting duals."""
    rng = np.random.default_rng(7)
    a = torch.tensor(rng.standard_normal((400, 12)), dtype=torch.float32)
    b = torch.tensor(rng.standard_normal((400, 12)), dtype=torch.float32)
    perm1, cost1, info1 = sparse_match(a, b, k=4, return_info=True)
    monkeypatch.setitem(__import__("sys").modules, "lapjv", None)
    perm2, cost2, info2 = sparse_match(a, b, k=4, return_info=True)
    assert info1.core_solver in ("lapjv", "lapjv+augment") and info2.core_solver == "scipy"
    for perm, cost, info in ((perm1, cost1, info1), (perm2, cost2, info2)):
        assert info.certified and info.path == "core"
        pd, _ = _assert_optimal(a, b, "mse", perm, cost, info)
        assert np.array_equal(perm, pd)


def test_weak_pairs_join_the_core_and_one_round_certifies():
    """Planted pair with unpartnered features on both sides (the benchmark's generator):
    chance mutual-best pairs among unpartnered features are moved into the core up front,
    so the first certificate passes; the result is the dense optimum. (A heuristic for speed:
    at d = 192 the gaps separate less well and a second round can still occur.)"""
    a, b, truth = planted_vectors(2048, 512, seed=0)
    _, _, plain = sparse_match(a, b, weak_pairs=False, return_info=True)
    assert plain.rounds == 2 and plain.violations[0] > 0  # what the rule avoids
    perm, cost, info = sparse_match(a, b, return_info=True)
    assert info.certified and info.path == "core"
    assert info.weak_moved > 0
    assert info.rounds == 1
    pd, _ = _assert_optimal(a, b, "mse", perm, cost, info)
    assert np.array_equal(perm, pd)


def test_dense_fallback_when_rounds_run_out():
    a, b = permuted_vectors(80, 6, seed=5, unmatched=0.5)
    perm, cost, info = sparse_match(a, b, k=1, max_rounds=1, return_info=True)
    pd, _ = _assert_optimal(a, b, "mse", perm, cost, info)
    if info.fallback == "dense":
        assert np.array_equal(perm, pd)


def test_uncertified_without_fallback_warns():
    a, b = permuted_vectors(80, 6, seed=5, unmatched=0.5)
    _, _, info = sparse_match(a, b, k=1, max_rounds=1, core=False, return_info=True)
    if info.rounds == 1 and info.fallback is None:
        pytest.skip("certified in one round; nothing to fall back from")
    with pytest.warns(RuntimeWarning, match="not certified"):
        sparse_match(a, b, k=1, max_rounds=1, dense_fallback=False, core=False)


def test_input_checks():
    a = torch.randn(5, 3)
    with pytest.raises(ValueError, match="feature vectors"):
        sparse_match(a, torch.randn(5, 4))
    with pytest.raises(ValueError, match="metric"):
        sparse_match(a, a, metric="l1")
    with pytest.raises(ValueError, match="k must"):
        sparse_match(a, a, k=0)
    with pytest.raises(ValueError, match="NaN"):
        sparse_match(a, torch.full((5, 3), float("nan")))
    perm, cost = sparse_match(torch.zeros(0, 3), a)
    assert perm.shape == (0,) and cost.shape == (0,)


def test_zero_vectors_and_ties():
    a = torch.zeros(6, 4)
    b = torch.zeros(6, 4)
    for metric in ("mse", "cosine"):
        perm, cost = sparse_match(a, b, metric=metric, k=2)
        assert sorted(perm.tolist()) == list(range(6))
        assert np.allclose(cost, 0.0 if metric == "mse" else 1.0)


# --------------------------------------------------------------------------------------
# Integration: match(solver="sparse"), match_stack
# --------------------------------------------------------------------------------------


def test_match_sparse_integrates():
    sa, sb = jumprelu_sae(d_in=16, d_sae=48, seed=1), jumprelu_sae(d_in=16, d_sae=48, seed=2)
    ms = match(sa, sb, solver="sparse", k=4)
    md = match(sa, sb, solver="dense")
    assert isinstance(ms, Matching)
    assert ms.meta["solver"] == "sparse"
    assert np.array_equal(ms.perm, md.perm)
    # the same pairs; their costs agree up to the rounding of the float32 products
    delta = rounding_bound(feature_vectors(sa), feature_vectors(sb), "mse")[np.arange(48), md.perm]
    assert (np.abs(ms.cost - md.cost) <= delta).all()
    mq = match(sa, sb, solver="sparse", unmatched_quantile=0.9)
    assert mq.n_matched < 48


def test_auto_solver_threshold(monkeypatch):
    sa, sb = jumprelu_sae(d_in=8, d_sae=20, seed=1), jumprelu_sae(d_in=8, d_sae=20, seed=2)
    assert match(sa, sb).meta["solver"] == "dense"
    monkeypatch.setattr(lap, "AUTO_SPARSE_ABOVE", 10)
    assert match(sa, sb).meta["solver"] == "sparse"
    # memory rule: a dense matrix over 25% of the available RAM goes sparse at any size
    assert lap.auto_solver(20, 20, available_bytes=1e9) == "sparse"  # AUTO_SPARSE_ABOVE patched
    monkeypatch.setattr(lap, "AUTO_SPARSE_ABOVE", 10**12)
    assert lap.auto_solver(1000, 1000, available_bytes=1e12) == "dense"
    assert lap.auto_solver(1000, 1000, available_bytes=3.1e7) == "sparse"  # 8 MB > 25% of 31 MB
    assert lap.auto_solver(1000, 1000, available_bytes=3.3e7) == "dense"
    # the calibrated size rule (measured: docs/benchmarks.md, section solver="auto")
    monkeypatch.undo()
    assert lap.auto_solver(2560, 2560, available_bytes=1e12) == "sparse"
    assert lap.auto_solver(2048, 3072, available_bytes=1e12) == "dense"
