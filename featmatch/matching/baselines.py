r"""Baselines SAE Match and Semantic OT are compared with.

Two families: the data-free top-1 decoder cosine of Feature Flow (below), and the
data-driven **co-activation baseline** (:func:`coactivation_matching`, Pearson correlation
of the two features' activations on a token set, top-1 or assignment; Balcells et al.
2024), the fair comparator of any method that reads activations.

Feature Flow (Laptev et al. 2025) maps each feature of A to the feature of B whose decoder
row has the largest cosine with its own, independently per feature, so several features
of A may share one of B (a many-to-one map, not an assignment):

.. math::

    \pi(i) = \arg\max_j \frac{\langle W^A_{\mathrm{dec}}[i], W^B_{\mathrm{dec}}[j]\rangle}
    {\|W^A_{\mathrm{dec}}[i]\|\,\|W^B_{\mathrm{dec}}[j]\|}, \qquad
    \mathrm{cost}_i = 1 - \cos\big(W^A_{\mathrm{dec}}[i], W^B_{\mathrm{dec}}[\pi(i)]\big).

Folding rescales decoder rows by :math:`\theta > 0` and leaves the cosine unchanged, so
the map is the same folded or not.

References
----------
.. [1] D. Laptev, N. Balagansky, Y. Aksenov, D. Gavrilov. "Analyze Feature Flow to Enhance
   Interpretation and Steering in Language Models." 2025, arXiv:2502.03032.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from featmatch._io import check_finite
from featmatch.matching._matching import Matching

__all__ = [
    "decoder_rows",
    "top1_cosine_perm",
    "top1_cosine_matching",
    "TOP1_COSINE_META",
    "activation_correlation_matrix",
    "coactivation_topk",
    "coactivation_matching",
    "candidate_assignment",
    "COACTIVATION_METHOD",
]

#: ``meta`` of :func:`top1_cosine_matching` unless the caller gives its own.
TOP1_COSINE_META: dict[str, Any] = {"method": "top1_cosine", "metric": "cosine", "many_to_one": True}


def decoder_rows(sae: Any) -> torch.Tensor:
    """The ``(F, d)`` decoder of an SAE as a float32 CPU tensor.

    Parameters
    ----------
    sae : sae_lens.SAE, SAEWeights, torch.Tensor or np.ndarray
        Anything with a ``W_dec`` of shape ``(F, d)``, or the matrix itself.

    Returns
    -------
    (F, d) torch.Tensor, float32, detached, on the CPU

    Raises
    ------
    TypeError
        For anything else.
    ValueError
        If the matrix is not 2-D or holds NaN/Inf.
    """
    if isinstance(sae, torch.Tensor):
        w = sae
    elif isinstance(sae, np.ndarray):
        w = torch.as_tensor(sae)
    elif hasattr(sae, "W_dec"):
        w = sae.W_dec
    else:
        raise TypeError(f"expected an SAE, SAEWeights or a (F, d) decoder matrix, got {type(sae).__name__}")
    w = torch.as_tensor(w).detach().float().cpu()
    if w.ndim != 2:
        raise ValueError(f"decoder must be (F, d), got shape {tuple(w.shape)}")
    check_finite("W_dec", w)
    return w


def top1_cosine_perm(sae_a: Any, sae_b: Any, *, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    r"""Many-to-one top-1 decoder-cosine map A → B (Feature Flow, Laptev et al. 2025).

    :math:`\pi(i) = \arg\max_j \cos(W^A_{dec}[i], W^B_{dec}[j])`, computed in row blocks of
    float32 products of the normalised rows (:math:`w / \max(\|w\|, 10^{-12})`, so a zero
    row has cosine 0 with everything); ties go to the lowest index of B (``torch.max``).

    Parameters
    ----------
    sae_a, sae_b : sae_lens.SAE, SAEWeights, torch.Tensor or np.ndarray
        See :func:`decoder_rows`.
    block : int
        Rows of A per matrix product.

    Returns
    -------
    perm : (F_A,) np.ndarray of int64
        Index into B (never -1; repeats allowed).
    cos : (F_A,) np.ndarray of float64
        The best cosine.

    Raises
    ------
    ValueError
        If the decoders have different widths, or see :func:`decoder_rows`.
    """
    return _top1(decoder_rows(sae_a), decoder_rows(sae_b), block)


def _top1(wa: torch.Tensor, wb: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    if wa.shape[1] != wb.shape[1]:
        raise ValueError(f"decoders have different widths d: {wa.shape[1]} vs {wb.shape[1]}")
    na = wa / wa.norm(dim=1, keepdim=True).clamp_min(1e-12)
    nb = wb / wb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    perm = np.empty(wa.shape[0], dtype=np.int64)
    best = np.empty(wa.shape[0], dtype=np.float64)
    with torch.no_grad():
        for start in range(0, wa.shape[0], block):
            v, j = (na[start : start + block] @ nb.T).max(dim=1)
            perm[start : start + block] = j.numpy()
            best[start : start + block] = v.double().numpy()
    return perm, best


def top1_cosine_matching(
    sae_a: Any, sae_b: Any, *, block: int = 2048, meta: dict[str, Any] | None = None
) -> Matching:
    """:func:`top1_cosine_perm` as a :class:`~featmatch.matching.Matching` (cost = 1 − cos).

    Parameters
    ----------
    sae_a, sae_b : sae_lens.SAE, SAEWeights, torch.Tensor or np.ndarray
    block : int
        Rows of A per matrix product.
    meta : dict, optional
        The matching's ``meta``; default :data:`TOP1_COSINE_META`.

    Returns
    -------
    Matching
        Many-to-one (not injective in general); ``n_b`` is the number of rows of B's decoder.
    """
    wa, wb = decoder_rows(sae_a), decoder_rows(sae_b)
    perm, cos = _top1(wa, wb, block)
    meta = dict(TOP1_COSINE_META if meta is None else meta)
    return Matching(perm=perm, cost=1.0 - cos, n_b=int(wb.shape[0]), meta=meta)


# --------------------------------------------------------------------------------------
# The co-activation baseline (data-driven, Balcells et al. 2024)
# --------------------------------------------------------------------------------------

#: ``meta["method"]`` of :func:`coactivation_matching`.
COACTIVATION_METHOD = "coactivation"


def _pearson_block(
    prod: np.ndarray, sa: np.ndarray, sqa: np.ndarray, sb: np.ndarray, sqb: np.ndarray, n: int
) -> np.ndarray:
    r"""Pearson :math:`r` of a block from sums over ``n`` positions; NaN where a variance is 0."""
    ma, mb = sa / n, sb / n
    va = np.maximum(sqa / n - ma**2, 0.0)
    vb = np.maximum(sqb / n - mb**2, 0.0)
    # a variance below 1e-12 of the mean square is rounding noise of a constant feature
    va = np.where(va > 1e-12 * np.maximum(sqa / n, 1e-300), va, np.nan)
    vb = np.where(vb > 1e-12 * np.maximum(sqb / n, 1e-300), vb, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (prod / n - ma[:, None] * mb[None, :]) / np.sqrt(va[:, None] * vb[None, :])
    return np.clip(r, -1.0, 1.0)


def _moment_sums(stats: Any, layer: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(stats.act_sum[layer], dtype=np.float64),
        np.asarray(stats.act_sq_sum[layer], dtype=np.float64),
    )


def activation_correlation_matrix(stats: Any, la: int, lb: int, rows: np.ndarray | None = None) -> np.ndarray:
    r"""Pearson correlation of every feature pair from the dense streaming sums.

    .. math::

        r_{ij} = \frac{\tfrac1n\sum_t f^A_i f^B_j - \mu^A_i\mu^B_j}{\sigma^A_i\,\sigma^B_j}

    over the ``n`` positions of the pass (zeros included), from ``prod_sum[(la, lb)]``,
    ``act_sum``, ``act_sq_sum`` of :class:`featmatch.lm.activations.ActivationStats`
    (gathered with ``pairs=[(la, lb)]``). The same formula as
    :func:`featmatch.evaluation.metrics.activation_correlation`, for all pairs. NaN where
    either feature is constant (never fires).

    Parameters
    ----------
    stats : ActivationStats
    la, lb : int
    rows : (R,) ints, optional
        Features of A (default all): the result is ``(R, F_B)``.
    """
    _, prod = stats._pair(la, lb)
    sa, sqa = _moment_sums(stats, la)
    sb, sqb = _moment_sums(stats, lb)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        prod, sa, sqa = prod[rows], sa[rows], sqa[rows]
    return _pearson_block(np.asarray(prod, dtype=np.float64), sa, sqa, sb, sqb, int(stats.n_tokens))


def coactivation_topk(
    source: Any, la: int | None = None, lb: int | None = None, k: int = 10, *, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    r"""The ``k`` features of B most correlated with each feature of A, in row blocks.

    Never builds an ``F_A × F_B`` array beyond one ``(block, F_B)`` block.

    Parameters
    ----------
    source : ActivationStats or (scipy.sparse (n, F_A), scipy.sparse (n, F_B))
        Either streaming statistics with the dense pair sums (``pairs=[(la, lb)]``; fine
        at a few thousand features), or the two layers' sparse activation matrices over
        the same ``n`` positions (:func:`featmatch.lm.activations.sparse_activations`),
        from which each block of products :math:`A_{:,I}^\top B` is one sparse product:
        the route for 16k–65k widths.
    la, lb : int
        Layers (with ``ActivationStats``).
    k : int
    block : int
        Features of A per block.

    Returns
    -------
    idx : (F_A, k) int64
        Features of B by decreasing correlation; ``-1`` where fewer than ``k`` have a
        defined correlation (a feature of A that never fires gets a row of ``-1``).
    corr : (F_A, k) float64
        Their correlation (NaN pads).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(source, tuple):
        acts_a, acts_b = (x.tocsc() for x in source)
        if acts_a.shape[0] != acts_b.shape[0]:
            raise ValueError(f"activation matrices cover {acts_a.shape[0]} and {acts_b.shape[0]} positions")
        n = int(acts_a.shape[0])
        sa = np.asarray(acts_a.sum(0), dtype=np.float64).ravel()
        sqa = np.asarray(acts_a.multiply(acts_a).sum(0), dtype=np.float64).ravel()
        sb = np.asarray(acts_b.sum(0), dtype=np.float64).ravel()
        sqb = np.asarray(acts_b.multiply(acts_b).sum(0), dtype=np.float64).ravel()
        at = acts_a.T.tocsr().astype(np.float64)
        bb = acts_b.tocsc().astype(np.float64)
        fa, fb = acts_a.shape[1], acts_b.shape[1]

        def corr_block(r0: int, r1: int) -> np.ndarray:
            prod = (at[r0:r1] @ bb).toarray()
            return _pearson_block(prod, sa[r0:r1], sqa[r0:r1], sb, sqb, n)
    else:
        stats = source
        fa, fb = int(stats.d_sae(la)), int(stats.d_sae(lb))

        def corr_block(r0: int, r1: int) -> np.ndarray:
            return activation_correlation_matrix(stats, la, lb, rows=np.arange(r0, r1))

    kk = min(k, fb)
    idx = np.full((fa, k), -1, dtype=np.int64)
    val = np.full((fa, k), np.nan)
    for r0 in range(0, fa, block):
        r1 = min(fa, r0 + block)
        c = corr_block(r0, r1)
        key = np.where(np.isnan(c), -np.inf, c)
        part = (
            np.argpartition(-key, kk - 1, axis=1)[:, :kk] if kk < fb else np.tile(np.arange(fb), (r1 - r0, 1))
        )
        pv = np.take_along_axis(key, part, 1)
        order = np.lexsort((part, -pv))  # decreasing correlation, ties to the smaller index
        part, pv = np.take_along_axis(part, order, 1), np.take_along_axis(pv, order, 1)
        ok = np.isfinite(pv)
        idx[r0:r1, :kk] = np.where(ok, part, -1)
        val[r0:r1, :kk] = np.where(ok, pv, np.nan)
    return idx, val


#: Above this many ``F_A * F_B`` entries :func:`candidate_assignment` never builds the dense
#: matrix (4096²: its dense route is a float64 matrix plus scipy, as ``match``'s dense solver,
#: whose memory stays modest up to this size; the candidate graph has no certified sparse route).
DENSE_ASSIGN_MAX = 4096**2


def candidate_assignment(idx: np.ndarray, cost: np.ndarray, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching when row ``i`` may only take the columns ``idx[i]``.

    Up to ``4096²`` entries: the dense matrix with a prohibitive cost off the candidate
    graph, solved exactly by :func:`featmatch.matching.assign` (scipy's
    ``linear_sum_assignment``); rows left with only prohibited options end unmatched.
    Beyond: scipy's :func:`~scipy.sparse.csgraph.min_weight_full_bipartite_matching` on the
    graph (costs shifted to be >= 1, a constant every full matching pays equally, so zero
    costs stay edges), which needs a matching covering the smaller side.

    Parameters
    ----------
    idx : (F_A, c) int
        Candidate columns per row (``-1`` skipped).
    cost : (F_A, c) float
        Their costs (finite where ``idx >= 0``).
    n_b : int
        Number of columns.

    Returns
    -------
    (rows, cols) : int64 arrays
        The matched pairs.
    """
    from featmatch.matching._costs import assign

    idx = np.asarray(idx, dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    fa = idx.shape[0]
    ok = idx >= 0
    r = np.repeat(np.arange(fa), ok.sum(1))
    c, v = idx[ok], cost[ok]
    if not np.isfinite(v).all():
        raise ValueError("candidate costs must be finite")
    if v.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if fa * n_b <= DENSE_ASSIGN_MAX:
        D = np.full((fa, n_b), np.inf)
        D[r, c] = v
        finite = np.isfinite(D)
        span = float(v.max() - min(v.min(), 0.0)) + 1.0
        big = float(v.max()) + span * (min(D.shape) + 1)
        col_of_row, _ = assign(np.where(finite, D, big))
        rows = np.flatnonzero(col_of_row >= 0)
        cols = col_of_row[rows]
        keep = finite[rows, cols]
        return rows[keep], cols[keep]
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    graph = csr_matrix((v - v.min() + 1.0, (r, c)), shape=(fa, n_b))
    try:
        rows, cols = min_weight_full_bipartite_matching(graph)  # (row_ind, col_ind), like scipy's LSA
        return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    except ValueError as exc:
        raise ValueError(
            f"no one-to-one matching covers the smaller side within {idx.shape[1]} candidates per row; "
            "give more candidates"
        ) from exc


def coactivation_matching(
    source: Any,
    la: int | None = None,
    lb: int | None = None,
    mode: str = "assignment",
    *,
    candidates: int | None = None,
    block: int = 1024,
) -> Matching:
    r"""The co-activation baseline: match features whose activations correlate most.

    The data-driven comparator of Semantic OT (Balcells et al. 2024 match features of
    adjacent layers by activation correlation): with :math:`r_{ij}` the Pearson correlation
    of feature :math:`i` of A and :math:`j` of B over the positions of ``source`` (the
    **train** split; score on another split),

    * ``mode="top1"``: :math:`\pi(i) = \arg\max_j r_{ij}` (many-to-one, like Feature Flow);
    * ``mode="assignment"``: :math:`\min_\pi \sum_i -r_{i\pi(i)}` over one-to-one maps
      (:func:`candidate_assignment` on the ``candidates`` most correlated features of
      each row; all of B when ``candidates`` is None).

    Features of A that never fire on ``source`` (undefined :math:`r`) stay unmatched
    (``-1``). ``cost`` is :math:`1 - r`.

    Parameters
    ----------
    source : ActivationStats or (sparse (n, F_A), sparse (n, F_B))
        See :func:`coactivation_topk`.
    la, lb : int
    mode : {"assignment", "top1"}
    candidates : int, optional
        Candidate partners per feature for the assignment (use one at large widths).
    block : int
        Rows per block of :func:`coactivation_topk`.

    Returns
    -------
    Matching
        ``meta = {"method": "coactivation", "mode": mode, "many_to_one": mode == "top1"}``.

    References
    ----------
    .. [2] Balcells, D., Lerner, B., Oesterle, M., Ucar, E., Heimersheim, S. (2024).
       Evolution of SAE features across layers in LLMs. arXiv:2410.08869.
    """
    if mode not in ("assignment", "top1"):
        raise ValueError(f"mode must be 'assignment' or 'top1', got {mode!r}")
    if isinstance(source, tuple):
        n_b = int(source[1].shape[1])
    else:
        n_b = int(source.d_sae(lb))
    c = 1 if mode == "top1" else (n_b if candidates is None else int(candidates))
    idx, corr = coactivation_topk(source, la, lb, k=c, block=block)
    fa = idx.shape[0]
    perm = np.full(fa, -1, dtype=np.int64)
    cost = np.full(fa, np.nan)
    if mode == "top1":
        rows = np.flatnonzero(idx[:, 0] >= 0)
        cols = idx[rows, 0]
        vals = corr[rows, 0]
    else:
        live = idx[:, 0] >= 0
        sub_idx = np.where(live[:, None], idx, -1)
        rows, cols = candidate_assignment(sub_idx, np.nan_to_num(-corr, nan=0.0), n_b)
        hit = idx[rows] == cols[:, None]
        vals = corr[rows, hit.argmax(1)]
    perm[rows] = cols
    cost[rows] = 1.0 - vals
    meta = {"method": COACTIVATION_METHOD, "mode": mode, "many_to_one": mode == "top1", "candidates": c}
    return Matching(perm=perm, cost=cost, n_b=n_b, meta=meta)
