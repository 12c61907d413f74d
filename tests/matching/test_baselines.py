"""Tests for featmatch.matching.baselines: the top-1 decoder cosine (Feature Flow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae

from featmatch.evaluation import pruning
from featmatch.matching.baselines import TOP1_COSINE_META, top1_cosine_matching, top1_cosine_perm
from featmatch.saes import fold, weights
from featmatch.semantic import decoder_cosine_match


def test_one_implementation_behind_the_old_names():
    """pruning.top1_cosine_* and semantic.decoder_cosine_match are this module's function:
    the same map and cost; only the meta differs (each chapter's label)."""
    a, b = jumprelu_sae(d_in=16, d_sae=50, seed=1), jumprelu_sae(d_in=16, d_sae=37, seed=2)
    assert pruning.top1_cosine_perm is top1_cosine_perm
    assert pruning.top1_cosine_matching is top1_cosine_matching
    perm, cos = top1_cosine_perm(a, b)
    m, d = pruning.top1_cosine_matching(a, b), decoder_cosine_match(a, b)
    for other in (m, d):
        np.testing.assert_array_equal(other.perm, perm)
        np.testing.assert_array_equal(other.cost, 1.0 - cos)
        assert other.n_b == 37 and other.meta["many_to_one"]
    assert m.meta == TOP1_COSINE_META
    assert d.meta == {"method": "decoder_cosine", "mode": "top1", "many_to_one": True}
    # against a direct float64 computation, and invariant to folding (a positive row scale)
    A, B = (torch.nn.functional.normalize(s.W_dec.detach().double(), dim=1) for s in (a, b))
    np.testing.assert_array_equal(perm, (A @ B.T).argmax(1).numpy())
    np.testing.assert_allclose(cos, (A @ B.T).max(1).values.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(top1_cosine_perm(weights(fold(a)), weights(fold(b)))[0], perm)
    # other row blocks: other float32 products, the same map (no near-ties here)
    np.testing.assert_array_equal(top1_cosine_perm(a, b, block=7)[0], perm)


def test_inputs_ties_and_errors():
    w = np.eye(3, dtype=np.float32)
    perm, cos = top1_cosine_perm(w, np.vstack([w[:1], w[:1], w[1:]]))  # tie: the first wins
    np.testing.assert_array_equal(perm, [0, 2, 3])
    perm, cos = top1_cosine_perm(torch.zeros(2, 3), torch.eye(3))  # zero rows: cosine 0
    assert (cos == 0).all()
    with pytest.raises(ValueError, match="different widths"):
        top1_cosine_perm(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="W_dec"):
        top1_cosine_perm(np.array([[np.nan, 1.0]]), np.ones((2, 2)))
    with pytest.raises(TypeError, match="decoder matrix"):
        top1_cosine_perm("sae", np.ones((2, 2)))


# --------------------------------------------------------------------------------------
# the co-activation baseline
# --------------------------------------------------------------------------------------


def _planted_acts(n=3000, f=40, seed=0):
    """Sparse non-negative activations of A; B's feature perm[i] is a noisy copy of A's i."""
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(seed)
    a = rng.exponential(size=(n, f)) * (rng.random((n, f)) < 0.1)
    perm = rng.permutation(f)
    b = np.zeros_like(a)
    b[:, perm] = a * rng.uniform(0.5, 2.0, f) + 0.3 * rng.exponential(size=(n, f)) * (
        rng.random((n, f)) < 0.05
    )
    a[:, 3] = 0.0  # a dead feature of A: no correlation is defined
    return a, b, perm, csr_matrix(a.astype(np.float32)), csr_matrix(b.astype(np.float32))


def _ref_corr(a, b):
    """numpy's Pearson matrix between the columns of a and b (NaN for the dead column)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(a.T, b.T)[: a.shape[1], a.shape[1] :]


class _Stats:
    """The sums an ActivationStats holds for one dense pair, from a dense activation matrix."""

    def __init__(self, a, b):
        self.n_tokens = a.shape[0]
        self.act_sum = {0: a.sum(0), 1: b.sum(0)}
        self.act_sq_sum = {0: (a**2).sum(0), 1: (b**2).sum(0)}
        self._prod = a.T @ b

    def d_sae(self, layer):
        return len(self.act_sum[layer])

    def _pair(self, la, lb):
        return None, self._prod


def test_correlation_matrix_equals_numpy_corrcoef():
    from featmatch.matching.baselines import activation_correlation_matrix

    a, b, _, _, _ = _planted_acts()
    r = activation_correlation_matrix(_Stats(a, b), 0, 1)
    ref = _ref_corr(a, b)
    live = a.std(0) > 0
    np.testing.assert_allclose(r[live], ref[live], atol=1e-10)
    assert np.isnan(r[~live]).all()


@pytest.mark.parametrize("use_sparse", [False, True])
def test_coactivation_topk_and_matchings_against_numpy_and_scipy(use_sparse):
    from scipy.optimize import linear_sum_assignment

    from featmatch.matching.baselines import coactivation_matching, coactivation_topk

    a, b, perm, sa, sb = _planted_acts()
    src = (sa, sb) if use_sparse else _Stats(a, b)
    ref = _ref_corr(a, b)
    live = a.std(0) > 0
    idx, corr = coactivation_topk(src, 0, 1, k=5, block=7)  # blocks that do not divide F
    np.testing.assert_array_equal(idx[live], np.argsort(-ref[live], axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(corr[live], -np.sort(-ref[live], axis=1)[:, :5], atol=1e-6)
    assert (idx[~live] == -1).all()
    top1 = coactivation_matching(src, 0, 1, mode="top1")
    assert (top1.perm[live] == perm[live]).all() and top1.perm[3] == -1  # planted truth
    lap = coactivation_matching(src, 0, 1, mode="assignment")
    r_, c_ = linear_sum_assignment(-ref[live])
    np.testing.assert_array_equal(lap.perm[np.flatnonzero(live)[r_]], c_)
    assert lap.is_injective and lap.perm[3] == -1 and lap.meta["method"] == "coactivation"
    np.testing.assert_allclose(lap.cost[live], 1.0 - ref[live][r_, c_], atol=1e-6)


@pytest.mark.parametrize("sparse_path", [False, True])
def test_candidate_assignment_equals_scipy_on_the_graph(sparse_path, monkeypatch):
    from scipy.optimize import linear_sum_assignment

    from featmatch.matching import baselines
    from featmatch.matching.baselines import candidate_assignment

    if sparse_path:  # scipy's min_weight_full_bipartite_matching instead of the dense matrix
        monkeypatch.setattr(baselines, "DENSE_ASSIGN_MAX", 0)

    rng = np.random.default_rng(3)
    C = rng.random((30, 45))
    idx = np.argsort(C, axis=1)[:, :6]
    G = np.full_like(C, 1e3)
    np.put_along_axis(G, idx, np.take_along_axis(C, idx, 1), 1)
    rows, cols = candidate_assignment(idx, np.take_along_axis(C, idx, 1), 45)
    r, c = linear_sum_assignment(G)
    assert G[r, c].max() < 1e3  # the graph admits a full matching, so both are the same problem
    np.testing.assert_allclose(C[rows, cols].sum(), G[r, c].sum(), rtol=1e-12)
    assert len(set(cols.tolist())) == len(cols) == 30
    # more rows than columns: every column used once, the same optimum as scipy on the transpose
    rows_t, cols_t = candidate_assignment(np.tile(np.arange(20), (45, 1)), C.T[:, :20], 20)
    r2, c2 = linear_sum_assignment(C.T[:, :20])
    np.testing.assert_allclose(C.T[rows_t, cols_t].sum(), C.T[r2, c2].sum(), rtol=1e-12)
    assert len(set(cols_t.tolist())) == 20
