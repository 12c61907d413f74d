"""Issue 18: exact matching when many features have no partner, and the thresholded problem.

References no one here wrote: scipy ``linear_sum_assignment`` on the full matrix and, for
the thresholded problem, on the matrix augmented with explicit dummy columns (row i may take
its own dummy at cost lambda); planted truth from featmatch.synthetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae, largest_duals_reference
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from featmatch.matching import _lap as lap
from featmatch.matching import assign, match, pairwise_cost
from featmatch.matching._costs import feature_vectors, rounding_bound
from featmatch.synthetic import planted_vectors


def _augmented_optimum(cost: np.ndarray, lam: float) -> float:
    """min over partial matchings of sum C + lam * (unmatched rows): scipy on [C | lam on a diagonal]."""
    n, m = cost.shape
    big = 10.0 * (np.abs(cost).max() + abs(lam)) + 1.0
    aug = np.full((n, m + n), big)
    aug[:, :m] = cost
    aug[np.arange(n), m + np.arange(n)] = lam
    r, c = linear_sum_assignment(aug)
    return float(aug[r, c].sum())


def _objective(cost: np.ndarray, perm: np.ndarray, lam: float) -> float:
    ok = perm >= 0
    return float(cost[np.flatnonzero(ok), perm[ok]].sum()) + lam * int((~ok).sum())


def _vectors(seed: int, n: int, m: int, d: int, structured: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if structured:  # planted partners for part of A, fresh rows elsewhere
        a, b, _ = planted_vectors(max(n, m), d, seed, unmatched=0.4, noise=0.8)
        return a[:n].contiguous(), b[:m].contiguous()
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    d=st.integers(1, 8),
    q=st.floats(0.0, 1.0),
    k=st.integers(1, 6),
    metric=st.sampled_from(["mse", "cosine"]),
    structured=st.booleans(),
)
def test_threshold_match_equals_dense_reference_with_dummy_columns(seed, n, m, d, q, k, metric, structured):
    """The sparse thresholded solve reaches the optimum of scipy on the augmented matrix, up to
    the rounding of its own float32 products (rounding_bound, summed over rows)."""
    a, b = _vectors(seed, n, m, d, structured)
    cost = pairwise_cost(a, b, metric=metric)
    lam = float(np.quantile(cost, q))
    perm, pc, info = lap.threshold_match(a, b, lam, metric=metric, k=k, return_info=True)
    assert info.certified and info.path == "threshold"
    ok = perm >= 0
    assert np.unique(perm[ok]).size == ok.sum()  # injective
    assert np.all(pc[ok] < lam) and np.isnan(pc[~ok]).all()
    slack = 2.0 * rounding_bound(a, b, metric).max(1).sum()
    ref = _augmented_optimum(cost, lam)
    assert abs(_objective(cost, perm, lam) - ref) <= slack + 1e-12 * max(1.0, abs(ref))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 30),
    m=st.integers(1, 30),
    q=st.floats(0.0, 1.0),
)
def test_threshold_assign_equals_augmented_lsa_and_clipped_lap(seed, n, m, q):
    """Dense thresholded solve = scipy on the augmented matrix (same numbers, float64 exact), and
    (square / F_A <= F_B) = the full assignment's optimum on min(C, lambda)."""
    rng = np.random.default_rng(seed)
    cost = rng.random((n, m))
    lam = float(np.quantile(cost, q))
    perm, pc = lap.threshold_assign(cost, lam)
    ok = perm >= 0
    assert np.all(pc[ok] < lam)
    ref = _augmented_optimum(cost, lam)
    got = _objective(cost, perm, lam)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)
    if n <= m:
        clipped = np.minimum(cost, lam)
        r, c = linear_sum_assignment(clipped)
        assert got == pytest.approx(float(clipped[r, c].sum()), rel=1e-12, abs=1e-12)
    # never worse than masking the full permutation (the old unmatched_above)
    fp, _ = assign(cost)
    masked = np.where((fp >= 0) & (cost[np.arange(n), np.maximum(fp, 0)] <= lam), fp, -1)
    assert got <= _objective(cost, masked, lam) + 1e-12


@pytest.mark.parametrize(("n", "m"), [(240, 240), (180, 240), (240, 180)])
@pytest.mark.parametrize("noise", [0.3, 0.8])
def test_sparse_match_many_unpartnered_is_optimal_and_certified(n, m, noise):
    """40-60% unpartnered features (the cores this issue is about: past the old n/3 rule) —
    the certified solver agrees with scipy on the dense matrix."""
    for unp in (0.4, 0.6):
        a, b, _ = planted_vectors(max(n, m), 24, 7, unmatched=unp, noise=noise)
        a, b = a[:n].contiguous(), b[:m].contiguous()
        perm, cost, info = lap.sparse_match(a, b, return_info=True)
        assert info.certified
        dense = pairwise_cost(a, b)
        pd, cd = assign(dense)
        slack = info.gap_bound + 2.0 * rounding_bound(a, b, "mse").max(1).sum()
        assert abs(np.nansum(cost) - np.nansum(cd)) <= slack
        assert (perm >= 0).sum() == min(n, m)


def test_core_block_grows_in_place():
    """_CoreBlock holds E[R][:, C] in the block's order (previous rows and columns first): a
    grown core computes only the new rows and the old rows' new columns, in place within the
    spare capacity; past it the block moves once; a core that does not contain the previous
    one is computed afresh. Every view equals the directly indexed matrix."""
    rng = np.random.default_rng(0)
    full = rng.random((500, 600))
    calls = []

    def compute(r, c, out):
        calls.append((r.size, c.size))
        out[...] = full[np.ix_(r, c)]

    blk = lap._CoreBlock(compute, 500, 600, spare=0.125, min_spare=4)
    R0, C0 = np.array([1, 5, 9, 20]), np.array([0, 3, 4, 40, 59])
    R, C, E = blk.update(R0, C0)
    np.testing.assert_array_equal(E, full[np.ix_(R, C)])
    assert calls == [(4, 5)] and blk.reallocations == 1
    base = blk.buf
    calls.clear()
    R1, C1 = np.array([1, 2, 5, 9, 20, 33]), np.array([0, 3, 4, 7, 40, 59])
    R, C, E = blk.update(R1, C1)
    assert list(R[:4]) == list(R0) and list(C[:5]) == list(C0)  # old ids first, in their order
    assert sorted(R) == list(R1) and sorted(C) == list(C1)
    np.testing.assert_array_equal(E, full[np.ix_(R, C)])
    assert calls == [(2, 6), (4, 1)]  # only the new rows, and the old rows' new column
    assert blk.buf is base and blk.reallocations == 1 and np.shares_memory(E, base)  # in place
    # past the capacity: moved once into a larger block, still the same numbers
    R2 = np.union1d(R1, np.arange(100, 140))
    R, C, E = blk.update(R2, C1)
    np.testing.assert_array_equal(E, full[np.ix_(R, C)])
    assert blk.reallocations == 2 and blk.buf is not base
    # a block that does not contain the previous one is computed afresh
    R3 = np.array([0, 1])
    R, C, E = blk.update(R3, C1)
    np.testing.assert_array_equal(E, full[np.ix_(R, C)])
    assert list(R) == [0, 1] and blk.reallocations == 3
    # no spare capacity beyond the budget (entries)
    tight = lap._CoreBlock(compute, 500, 600, budget=20.0)
    tight.update(R0, C0)
    assert tight.buf.shape == (4, 5)


@pytest.mark.parametrize("solver", ["dense", "sparse"])
def test_match_unmatched_above_solves_the_thresholded_problem(solver):
    """match(unmatched_above=lam) returns the thresholded optimum (dense reference with dummy
    columns); unmatched_mode="mask" is the old full-permutation-then-mask result."""
    sa, sb = jumprelu_sae(d_in=8, d_sae=60, seed=3), jumprelu_sae(d_in=8, d_sae=70, seed=4)
    xa, xb = feature_vectors(sa, on="both", fold=True), feature_vectors(sb, on="both", fold=True)
    cost = pairwise_cost(xa, xb)
    full_perm, full_cost = assign(cost)
    lam = float(np.quantile(full_cost, 0.6))
    m = match(sa, sb, solver=solver, unmatched_above=lam)
    assert m.meta["unmatched_mode"] == "solve" and m.meta["unmatched_threshold"] == lam
    slack = 2.0 * rounding_bound(xa, xb, "mse").max(1).sum()
    assert abs(_objective(cost, m.perm, lam) - _augmented_optimum(cost, lam)) <= slack + 1e-12
    assert np.nanmax(m.cost) < lam
    old = match(sa, sb, solver=solver, unmatched_above=lam, unmatched_mode="mask")
    expect = np.where(full_cost <= lam, full_perm, -1)
    np.testing.assert_array_equal(old.perm, expect)
    assert _objective(cost, m.perm, lam) <= _objective(cost, old.perm, lam) + slack
    with pytest.raises(ValueError, match="unmatched_mode"):
        match(sa, sb, unmatched_above=lam, unmatched_mode="drop")


def test_threshold_match_rejects_bad_input():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match="threshold must be finite"):
        lap.threshold_match(a, a, float("nan"))
    with pytest.raises(ValueError, match="k must be >= 1"):
        lap.threshold_match(a, a, 1.0, k=0)
    perm, cost = lap.threshold_match(a[:0], a, 1.0)
    assert perm.shape == (0,) and cost.shape == (0,)


def test_auto_switch_solves_a_large_rectangular_core_densely():
    """auto_dense_share: a predicted rectangular core above the share goes to the dense solver
    (same optimum, marked in the info); square problems never switch."""
    a, b, _ = planted_vectors(160, 16, 2, unmatched=0.6, noise=0.8)
    a = a[:120].contiguous()
    perm, cost, info = lap.sparse_match(a, b, return_info=True, auto_dense_share=0.25)
    assert info.fallback == "auto-dense" and info.path == "dense" and info.certified
    pd, cd = assign(pairwise_cost(a, b))
    assert abs(np.nansum(cost) - np.nansum(cd)) <= 1e-9 * abs(np.nansum(cd))
    perm2, _, info2 = lap.sparse_match(a, b, return_info=True, auto_dense_share=0.99)
    assert info2.fallback is None and info2.path == "core"
    sq_a, sq_b, _ = planted_vectors(160, 16, 2, unmatched=0.6, noise=0.8)
    assert lap.sparse_match(sq_a, sq_b, return_info=True, auto_dense_share=0.0)[2].fallback is None


def test_threshold_components_too_large_to_clip_use_the_sparse_solver(monkeypatch):
    """_threshold_lap solves a component densely (clipped costs) or, when its block would not
    fit, by LAPJVsp with one dummy per row: both reach the augmented-matrix optimum."""
    rng = np.random.default_rng(5)
    cost = rng.random((30, 25))
    lam = float(np.quantile(cost, 0.4))
    ref = _augmented_optimum(cost, lam)
    assert _objective(cost, lap.threshold_assign(cost, lam)[0], lam) == pytest.approx(ref, rel=1e-12)

    class _NoMemory:
        available = 0.0

    monkeypatch.setattr(lap.psutil, "virtual_memory", lambda: _NoMemory())
    assert _objective(cost, lap.threshold_assign(cost, lam)[0], lam) == pytest.approx(ref, rel=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 60),
    grow=st.integers(1, 8),
    ties=st.booleans(),
    shuffled=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=300, grow=4, ties=False, shuffled=False, seed=0)
@example(n=300, grow=6, ties=True, shuffled=True, seed=1)
def test_warm_assign_reaches_the_optimum_of_the_grown_core(n, grow, ties, shuffled, seed):
    """_warm_assign: a core grown by a few rows and as many columns, solved from the previous
    round's optimum and potentials by augmenting paths, reaches scipy's optimum of the grown
    block, and its potentials are feasible and tight (what the Dijkstra duals need). Ids may
    come in any order (``shuffled``: _CoreBlock's arrival order)."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    size = n + grow
    E = rng.integers(0, 4 * size, (size, size)).astype(float) if ties else rng.standard_normal((size, size))
    R = np.arange(size) * 3 + 1  # global row/column ids
    C = np.arange(size) * 2
    if shuffled:
        R, C = rng.permutation(R), rng.permutation(C)
    keep_r = np.sort(rng.choice(size, n, replace=False))
    keep_c = np.sort(rng.choice(size, n, replace=False))
    E0 = E[np.ix_(keep_r, keep_c)]
    import lapjv

    row_to_col, _, (_, _, p0) = lapjv.lapjv(E0 - E0.min(axis=1, keepdims=True), force_doubles=True)
    pc0 = np.asarray(row_to_col, dtype=np.int64)
    out = lap._warm_assign(E, R, C, (R[keep_r], C[keep_c], pc0, np.asarray(p0, dtype=float)))
    assert out is not None
    pc, p = out
    assert np.array_equal(np.sort(pc), np.arange(size))
    r, c = linear_sum_assignment(E)
    assert E[np.arange(size), pc].sum() == pytest.approx(E[r, c].sum(), rel=1e-12, abs=1e-9)
    u = E[np.arange(size), pc] - p[pc]
    assert (E - u[:, None] - p[None, :]).min() >= -1e-9
    # a previous core that is not contained in the new one: the caller solves from scratch
    assert lap._warm_assign(E[:2, :2], R[:2], C[:2], (R[keep_r], C[keep_c], pc0, p0)) is None


@pytest.mark.parametrize("keep", [True, False, None])
def test_grown_square_cores_are_warm_started_and_optimal(keep):
    """A unit-vector planted pair with 40 % unpartnered features, without the weak-pair rule,
    grows its core over two or more rounds; the later rounds are warm-started, with products
    kept or recomputed, and the result is the dense optimum."""
    a, b, _ = planted_vectors(2048, 128, 0, unmatched=0.4, noise=0.8, unit=True)
    perm, cost, info = lap.sparse_match(a, b, return_info=True, keep_products=keep, weak_pairs=False)
    assert info.products_kept is (keep is True)
    assert info.certified and info.path == "core"
    assert info.rounds >= 2 and min(info.core_rows) >= lap._LAPJV_MIN, info.core_rows
    assert info.core_solver in ("lapmod+augment", "lapjv+augment")
    pd, cd = assign(pairwise_cost(a, b))
    slack = info.gap_bound + 2.0 * rounding_bound(a, b, "mse").max(1).sum()
    assert abs(np.nansum(cost) - np.nansum(cd)) <= slack


@pytest.mark.parametrize(("n", "m"), [(300, 300), (240, 300), (300, 240)])
@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_kept_products_give_the_same_result(n, m, metric):
    """keep_products=True gathers every later number from the main pass's products; False
    recomputes them. Same assignment, both certified; the kept products' costs are the
    main pass's, so each pair cost is within the rounding bound of pairwise_cost's."""
    a, b, _ = planted_vectors(max(n, m), 24, 5, unmatched=0.5, noise=0.8)
    a, b = a[:n].contiguous(), b[:m].contiguous()
    p1, c1, i1 = lap.sparse_match(a, b, metric=metric, return_info=True, keep_products=True)
    p2, c2, i2 = lap.sparse_match(a, b, metric=metric, return_info=True, keep_products=False)
    p3, c3, i3 = lap.sparse_match(a, b, metric=metric, return_info=True)  # the predicted rows
    assert (i1.products_kept, i2.products_kept, i3.products_kept) == (True, False, False)
    assert (i1.rows_kept, i2.rows_kept) == (min(n, m), 0) and 0 < i3.rows_kept <= min(n, m)
    assert i1.certified and i2.certified and i3.certified
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(p1, p3)
    ok = p1 >= 0
    full = pairwise_cost(a, b, metric=metric)
    delta = rounding_bound(a, b, metric)
    rows = np.flatnonzero(ok)
    assert (np.abs(c1[ok] - full[rows, p1[ok]]) <= delta[rows, p1[ok]]).all()


def test_costs_from_g_numpy_path_equals_torch_arithmetic():
    """The CPU mse path of _costs_from_g (numpy, in place) gives bit-identical numbers to the
    torch expression it replaced."""
    rng = np.random.default_rng(3)
    g = torch.tensor(rng.standard_normal((37, 41)), dtype=torch.float32)
    sq_a = torch.tensor(rng.random((37, 1)) * 5)
    sq_b = torch.tensor(rng.random((1, 41)) * 5)
    ref = (g.double() * -2.0 + sq_a + sq_b).div_(7).clamp_(min=0.0)
    got = lap._costs_from_g(g, sq_a, sq_b, "mse", 7)
    assert torch.equal(got, ref)
    assert torch.equal(lap._costs_from_g(g.T.contiguous().T, sq_a, sq_b, "mse", 7), ref)  # strided input


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(40, 400),
    spread=st.sampled_from([0.0, 0.5, 2.0]),
    k=st.sampled_from([2, 4, 32]),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=400, spread=0.0, k=32, seed=0)
@example(n=300, spread=2.0, k=4, seed=1)
def test_sparse_core_assign_is_optimal_or_declines(n, spread, k, seed):
    """_sparse_core_assign (LAPMOD on each row's k cheapest entries, label-correcting duals,
    dense check) either returns scipy's optimum of the whole block with the largest feasible
    duals, or None; never a wrong answer. Random unit vectors (the cores of pairs with many
    unpartnered features) are solved; column norms spread by ``spread`` (log scale) are where
    the rows' cheapest entries can miss the optimum."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    d = 32
    a = rng.standard_normal((n, d))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.standard_normal((n, d))
    b *= np.exp(rng.uniform(-spread, spread, (n, 1))) / np.linalg.norm(b, axis=1, keepdims=True)
    E = -2.0 * (a @ b.T) / d
    out = lap._sparse_core_assign(E, eps=1e-15, tau=1e-12, k=k)
    if spread == 0.0 and k == 32:
        assert out is not None  # what it is for: random cores are solved from 32 entries per row
    if out is None:
        return
    pc, v, largest = out
    assert np.array_equal(np.sort(pc), np.arange(n))
    r, c = linear_sum_assignment(E)
    assert E[np.arange(n), pc].sum() == pytest.approx(E[r, c].sum(), rel=1e-12, abs=1e-12)
    u = E[np.arange(n), pc] - v[pc]
    assert (E - u[:, None] - v[None, :]).min() >= -1e-12  # feasible potentials for the whole block
    if largest:
        np.testing.assert_allclose(v, largest_duals_reference(E, pc), rtol=0, atol=1e-12)


def test_square_cores_without_lap_use_lapjv(monkeypatch):
    """Without the ``lap`` package the square core goes to lapjv; same optimum."""
    a, b, _ = planted_vectors(1024, 64, 0, unmatched=0.5, noise=0.8, unit=True)
    p1, c1, i1 = lap.sparse_match(a, b, return_info=True)
    monkeypatch.setitem(__import__("sys").modules, "lap", None)
    p2, c2, i2 = lap.sparse_match(a, b, return_info=True)
    assert i1.core_solver.startswith("lapmod") and i2.core_solver.startswith("lapjv")
    assert i1.certified and i2.certified
    np.testing.assert_array_equal(p1, p2)


def test_products_are_kept_only_when_asked_and_within_the_memory_limit(monkeypatch):
    """keep_products: all of them only when asked (True) and within the memory limit; by
    default the predicted rows, as many as the limit allows; False none."""
    a, b, _ = planted_vectors(400, 128, 2, unmatched=0.6, noise=0.3, unit=True)
    rect = a[:300].contiguous()
    for x in (a, rect):
        info = lap.sparse_match(x, b, return_info=True)[2]
        assert not info.products_kept and 0 < info.rows_kept < x.shape[0]
        assert lap.sparse_match(x, b, return_info=True, keep_products=False)[2].rows_kept == 0
    assert lap.sparse_match(rect, b, return_info=True, keep_products=True)[2].products_kept
    monkeypatch.setattr(lap, "KEEP_PRODUCTS_MAX_BYTES", 4 * 400 * 10)  # ten rows of B's width
    assert not lap.sparse_match(rect, b, return_info=True, keep_products=True)[2].products_kept
    info = lap.sparse_match(rect, b, return_info=True)[2]
    assert info.rows_kept == 10 and info.certified


def test_kept_rows_are_the_rows_without_a_partner():
    """The main pass's prediction (:class:`_KeptRows`) on planted truth: at 2,048 x 512 unit
    vectors with 40 % unpartnered features (noise 0.8/sqrt(d)), it keeps every unpartnered
    row and almost no partnered one; with no unpartnered features (noise 0.3) it keeps none.
    (At d = 128 the random rows' top scores spread as far as a partner's lead over them, and
    a third of the partnered rows are kept too: a cost in memory, not in results.)"""
    for unp, noise in ((0.4, 0.8), (0.0, 0.3)):
        a, b, truth = planted_vectors(2048, 512, 3, unmatched=unp, noise=noise, unit=True)
        sa, sb = lap._Side(a, torch.device("cpu")), lap._Side(b, torch.device("cpu"))
        kept = lap._keep_products(2048, 2048, torch.device("cpu"), None)
        assert kept is not None and not kept.full
        lap._candidate_pass(sa, sb, "mse", 16, 512, True, kept)
        is_kept = kept.slot >= 0
        assert kept.used == is_kept.sum()
        assert is_kept[truth < 0].all()
        assert is_kept[truth >= 0].mean() <= 0.01
        # each kept row holds the pass's float32 products of that row
        rows = np.flatnonzero(is_kept)[:50]
        if rows.size:
            ref = a[torch.from_numpy(rows)] @ b.T
            got = kept.store[torch.from_numpy(kept.slot[rows])]
            assert torch.allclose(got, ref, rtol=0, atol=1e-5)


def test_eff_block_gathers_kept_rows_and_multiplies_the_others():
    """With some rows kept, ``_eff_block`` takes those rows' numbers from the store and
    multiplies the others afresh. The store is offset by -1 so the two routes differ."""
    a, b, _ = planted_vectors(64, 8, 4, unmatched=0.5, noise=0.8)
    sa, sb = lap._Side(a, torch.device("cpu")), lap._Side(b, torch.device("cpu"))
    kept = lap._KeptRows(64, 64, torch.device("cpu"), 64, predict=True)
    rows_k = np.arange(0, 64, 3)
    kept.store[: rows_k.size] = (a[torch.from_numpy(rows_k)] @ b.T) - 1.0
    kept.slot[rows_k] = np.arange(rows_k.size)
    kept.used = rows_k.size
    rows = np.array([5, 3, 9, 10, 0, 63, 2], dtype=np.int64)
    cols = np.array([7, 1, 40, 2], dtype=np.int64)
    alpha = np.zeros(64)
    got = lap._eff_block(sa, sb, rows, cols, "mse", alpha, kept=kept).numpy()
    fresh = lap._eff_block(sa, sb, rows, cols, "mse", alpha).numpy()
    shifted = fresh + 2.0 / a.shape[1]  # mse = (|a|^2 + |b|^2 - 2 g)/D with g - 1
    is_k = np.isin(rows, rows_k)
    np.testing.assert_allclose(got[is_k], shifted[is_k], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[~is_k], fresh[~is_k])
    # every row kept: all gathered
    got_k = lap._eff_block(sa, sb, rows_k[:4], cols, "mse", alpha, kept=kept).numpy()
    fresh_k = lap._eff_block(sa, sb, rows_k[:4], cols, "mse", alpha).numpy()
    np.testing.assert_allclose(got_k, fresh_k + 2.0 / a.shape[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("unp", "n"), [(0.1, 600), (0.4, 600), (0.6, 600), (0.6, 200)])
def test_predicted_core_share_estimates_the_first_core(unp, n):
    """The sampled estimate (256 rows, or all rows when fewer) is within 4 standard errors of
    the share of rows that are not mutual-best, counted on the full cost matrix."""
    a, b, _ = planted_vectors(800, 32, 3, unmatched=unp, noise=0.8, unit=True)
    ra, cb = lap._Side(a[:n].contiguous(), torch.device("cpu")), lap._Side(b, torch.device("cpu"))
    est = lap.predicted_core_share(ra, cb, "mse")
    cost = pairwise_cost(a[:n], b)
    best = cost.argmin(1)
    true = float(np.mean(cost[:, best].argmin(0) != np.arange(n)))
    s = min(n, lap.AUTO_SAMPLE_ROWS)
    se = 0.5 / np.sqrt(s) * np.sqrt(max(0.0, (n - s) / max(n - 1, 1)))  # finite-population correction
    assert abs(est - true) <= 4 * se + 1e-12, (est, true)


def test_auto_switch_when_a_has_more_features_than_b():
    """F_A > F_B (solved transposed): the sampled switch goes dense and the result, mapped back
    to A's rows, is the dense optimum."""
    a, b, _ = planted_vectors(160, 16, 2, unmatched=0.6, noise=0.8)
    b = b[:120].contiguous()
    perm, cost, info = lap.sparse_match(a, b, return_info=True, auto_dense_share=0.2)
    assert info.transposed and info.path == "dense" and info.fallback == "auto-dense"
    assert info.predicted_core_share > 0.2
    pd, cd = assign(pairwise_cost(a, b))
    np.testing.assert_array_equal(perm, pd)
    np.testing.assert_array_equal(np.isnan(cost), np.isnan(cd))
    assert np.nansum(cost) == np.nansum(cd)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 120),
    extra=st.integers(0, 200),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=700, extra=900, ties=False, seed=0)  # several row chunks, a rectangular core's shape
def test_dense_core_duals_are_the_largest_feasible_duals(n, extra, ties, seed):
    """_dense_core_duals (chunked dense sweeps with sparse settling) reaches the same fixpoint
    as plain Bellman-Ford sweeps (tests/_builders.largest_duals_reference) on scipy's optimum
    of a rectangular or square block, and those duals are feasible for every entry."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    m = n + extra
    E = rng.integers(0, 3 * m, (n, m)).astype(float) if ties else rng.standard_normal((n, m))
    r, c = linear_sum_assignment(E)
    pc = np.empty(n, dtype=np.int64)
    pc[r] = c
    e = E[np.arange(n), pc]
    times: dict[str, float] = {}
    v = lap._dense_core_duals(E, pc, e, 1e-15, times, chunk=64)
    assert v is not None
    ref = largest_duals_reference(E, pc)
    np.testing.assert_allclose(v, ref, rtol=0, atol=1e-9 * max(1.0, float(np.abs(E).max())))
    u = e - v[pc]
    assert (E - u[:, None] - v[None, :]).min() >= -1e-9 * max(1.0, float(np.abs(E).max()))
    assert v.max() <= 0.0
