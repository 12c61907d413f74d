"""Numerical kernels behind :mod:`featmatch.semantic` (private).

Everything here works on plain arrays: per-feature supports ``x (n, k)`` with weights
``w (n,)`` (summing to one), and batched quantile embeddings for the sliced distance.
The public, validated entry points are in :mod:`featmatch.semantic`.

References
----------
.. [1] Flamary, R. et al. (2021). POT: Python Optimal Transport. JMLR 22(78):1-8.
.. [2] Cuturi, M. (2013). Sinkhorn distances: lightspeed computation of optimal
   transport. NeurIPS 26.
.. [3] Bonneel, N., Rabin, J., Peyré, G., Pfister, H. (2015). Sliced and Radon
   Wasserstein barycenters of measures. J. Math. Imaging Vis. 51(1):22-45.
.. [4] Rabin, J., Peyré, G., Delon, J., Bernot, M. (2011). Wasserstein barycenter and
   its application to texture mixing. SSVM.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import ot
import torch

__all__ = [
    "emd2_cost",
    "ground_cost",
    "pair_cost",
    "pair_plan",
    "random_directions",
    "quantile_embedding",
    "sliced_blocks",
    "sliced_topc",
    "sliced_from_embeddings",
]


def ground_cost(xa: np.ndarray, xb: np.ndarray, p: int) -> np.ndarray:
    r"""Ground cost :math:`M_{ij} = \|x_i - y_j\|_2^p` as C-ordered ``float64``.

    The formula of :func:`ot.dist` (``"sqeuclidean"``: :math:`\|x\|^2 + \|y\|^2 - 2x^\top y`
    clipped at 0; ``"euclidean"``: its square root), written out in numpy. Why not
    :func:`ot.dist` itself: its backend dispatch costs about 25 µs per call, more than the
    ``32 × 32`` product it wraps, and :func:`featmatch.semantic.nearest` builds one such
    matrix per exact solve (``tests/semantic/test_ot.py`` checks the two agree).
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    xa = np.asarray(xa, dtype=np.float64)
    xb = np.asarray(xb, dtype=np.float64)
    M = np.einsum("ij,ij->i", xa, xa)[:, None] + np.einsum("ij,ij->i", xb, xb)[None, :]
    M -= 2.0 * (xa @ xb.T)
    np.maximum(M, 0.0, out=M)
    if p == 1:
        np.sqrt(M, out=M)
    return M  # a fresh C-ordered array (the broadcast sum)


try:  # POT's compiled network simplex: the solver inside ot.emd2 (ot/lp/emd_wrap.pyx)
    from ot.lp.emd_wrap import check_result as _check_result
    from ot.lp.emd_wrap import emd_c as _emd_c
except ImportError:  # a POT without it: ot.emd2 does the same, more slowly
    _emd_c = None


def emd2_cost(wa: np.ndarray, wb: np.ndarray, M: np.ndarray, num_iter_max: int = 100_000) -> float:
    r"""Exact optimal transport cost :math:`\min_{\gamma \in \Pi(a, b)} \langle \gamma, M \rangle`.

    The value of :func:`ot.emd2` on numpy inputs, from the same compiled solver (POT's
    network simplex, ``ot.lp.emd_wrap.emd_c``) with the same preparation: ``float64``
    weights, ``b`` rescaled to the mass of ``a`` (``ot.emd2`` first asserts that the masses
    agree to 6 decimals; here they are not checked: the callers' weights sum to one), zero
    weights dropped by the solver, and a ``RuntimeWarning`` when the solver does not report an
    optimum. Why not call
    :func:`ot.emd2`: on the ``32 × 32`` problems of :func:`featmatch.semantic.nearest` its
    backend dispatch, checks and gradient bookkeeping take about 180 µs around a 70 µs
    solve (measured with POT 0.9.7), and the search makes ``F·c`` solves. The solver also
    releases the GIL, so :func:`~featmatch.semantic.nearest` runs it on several threads.
    Falls back to :func:`ot.emd2` if this POT does not expose the solver.
    """
    wa = np.asarray(wa, dtype=np.float64)
    wb = np.asarray(wb, dtype=np.float64)
    M = np.ascontiguousarray(M, dtype=np.float64)
    wb = wb * (wa.sum() / wb.sum())  # as ot.emd2 does after checking the masses agree
    try:
        if _emd_c is None:
            raise TypeError("no compiled solver")
        _, cost, _, _, code = _emd_c(wa, wb, M, int(num_iter_max), 1)
        warning = _check_result(code)
    except TypeError:  # no solver, or a POT whose solver takes other arguments: the public call
        cost, log = ot.emd2(wa, wb, M, numItermax=num_iter_max, log=True)
        warning = log.get("warning")
    if warning:
        warnings.warn(f"ot.emd2: {warning}", RuntimeWarning, stacklevel=3)
    return float(cost)


def _entropic_eps(M: np.ndarray, reg: float) -> float:
    """Absolute entropic regularisation: ``reg`` times the mean ground cost."""
    scale = float(M.mean())
    return reg * scale if scale > 0 else 0.0


def pair_cost(
    xa: np.ndarray,
    wa: np.ndarray,
    xb: np.ndarray,
    wb: np.ndarray,
    *,
    p: int = 2,
    method: str = "exact",
    reg: float = 0.05,
    num_iter_max: int | None = None,
    stop_thr: float = 1e-7,
) -> float:
    r"""Wasserstein distance :math:`W_p` between two weighted point clouds.

    ``method="exact"`` solves the linear program with POT's network simplex, the solver of
    :func:`ot.emd2` (:func:`emd2_cost`);
    ``method="sinkhorn"`` uses log-domain :func:`ot.sinkhorn2` with
    :math:`\varepsilon = \mathrm{reg}\cdot\overline{M}` and returns the *transport part*
    :math:`\langle \gamma_\varepsilon, M\rangle^{1/p}` of the entropic plan (no entropy
    term), which converges to :math:`W_p` as ``reg`` goes to 0 [2]_.
    """
    M = ground_cost(xa, xb, p)
    wa = np.asarray(wa, dtype=np.float64)
    wb = np.asarray(wb, dtype=np.float64)
    if method == "exact":
        cost = emd2_cost(wa, wb, M, num_iter_max or 100_000)
    elif method == "sinkhorn":
        eps = _entropic_eps(M, reg)
        if eps == 0.0:  # both clouds are the same single point
            return 0.0
        cost = ot.sinkhorn2(
            wa, wb, M, eps, method="sinkhorn_log", numItermax=num_iter_max or 2000, stopThr=stop_thr
        )
    else:
        raise ValueError(f"unknown pair method {method!r}")
    return float(max(float(cost), 0.0) ** (1.0 / p))


def pair_plan(
    xa: np.ndarray,
    wa: np.ndarray,
    xb: np.ndarray,
    wb: np.ndarray,
    *,
    p: int = 2,
    method: str = "exact",
    reg: float = 0.05,
    num_iter_max: int | None = None,
    stop_thr: float = 1e-7,
) -> np.ndarray:
    """Optimal (``"exact"``, :func:`ot.emd`) or entropic (``"sinkhorn"``) transport plan."""
    M = ground_cost(xa, xb, p)
    wa = np.asarray(wa, dtype=np.float64)
    wb = np.asarray(wb, dtype=np.float64)
    if method == "exact":
        return ot.emd(wa, wb, M, numItermax=num_iter_max or 100_000)
    if method == "sinkhorn":
        eps = _entropic_eps(M, reg)
        if eps == 0.0:
            return np.outer(wa, wb)
        return ot.sinkhorn(
            wa, wb, M, eps, method="sinkhorn_log", numItermax=num_iter_max or 2000, stopThr=stop_thr
        )
    raise ValueError(f"unknown plan method {method!r}")


def random_directions(n_projections: int, k: int, seed: int) -> np.ndarray:
    """``(L, k)`` directions drawn uniformly on the unit sphere :math:`S^{k-1}` (seeded)."""
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((n_projections, k))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    return theta


def quantile_embedding(
    coords: np.ndarray,
    weights: np.ndarray,
    directions: np.ndarray,
    n_quantiles: int,
    *,
    chunk: int = 256,
) -> torch.Tensor:
    r"""Quantiles of every projected distribution: ``(F, L, Q)`` float32 tensor.

    Entry ``[i, l, q]`` is :math:`F_{\theta_l\#\mu_i}^{-1}(u_q)` with
    :math:`u_q = (q + 1/2)/Q`: the generalised inverse CDF of the projection of feature
    ``i`` onto direction :math:`\theta_l`, i.e. the smallest projected sample whose
    cumulative weight reaches :math:`u_q`. Zero-weight (padding) samples are never
    selected, because a point whose weight is zero never makes the cumulative weight
    cross a level :math:`u_q > 0`.
    """
    F, N, k = coords.shape
    L = directions.shape[0]
    theta = np.ascontiguousarray(directions.T, dtype=np.float32)  # (k, L)
    levels = torch.as_tensor((np.arange(n_quantiles) + 0.5) / n_quantiles, dtype=torch.float64)
    out = torch.empty((F, L, n_quantiles), dtype=torch.float32)
    for start in range(0, F, chunk):
        stop = min(F, start + chunk)
        f = stop - start
        # (f, L, N) contiguous; numpy's introsort on short rows is ~5x faster than torch.sort
        proj = np.ascontiguousarray(np.matmul(coords[start:stop], theta).transpose(0, 2, 1))
        order = np.argsort(proj, axis=-1)
        vals = torch.from_numpy(np.take_along_axis(proj, order, -1))
        w = np.asarray(weights[start:stop], dtype=np.float64)
        cdf = np.cumsum(np.take_along_axis(np.broadcast_to(w[:, None, :], (f, L, N)), order, -1), axis=-1)
        cdf /= cdf[..., -1:]  # exact total mass 1 per row
        u = levels.expand(f, L, n_quantiles).contiguous()
        idx = torch.searchsorted(torch.from_numpy(cdf), u, side="left").clamp_(max=N - 1)
        out[start:stop] = vals.gather(-1, idx)
    return out


def sliced_blocks(
    ea: torch.Tensor,
    eb: torch.Tensor,
    *,
    p: int = 2,
    chunk: int = 2048,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)``: rows ``start:start+len(block)`` of the sliced matrix.

    Same computation as :func:`sliced_from_embeddings`, one row block at a time, so
    callers that only need per-row summaries (top-c candidates) never hold the full
    ``(F_A, F_B)`` matrix.
    """
    FA = ea.shape[0]
    FB = eb.shape[0]
    D = ea.shape[1] * ea.shape[2]
    a = ea.reshape(FA, D)
    b = eb.reshape(FB, D)
    if FA == 0 or FB == 0:
        return
    center = (a.sum(0, dtype=torch.float64) + b.sum(0, dtype=torch.float64)) / (FA + FB)
    if p == 2:
        # float64 product: in float32 the cancellation in |a|^2 + |b|^2 - 2 a.b leaves an
        # absolute error ~ 3e-4 |e| on near-zero distances
        b = (b.double() - center) / np.sqrt(D)
        nb = (b**2).sum(1)
        for start in range(0, FA, chunk):
            blk = (a[start : start + chunk].double() - center) / np.sqrt(D)
            sq = (blk**2).sum(1)[:, None] + nb[None, :] - 2.0 * (blk @ b.T)
            yield start, sq.clamp_(min=0.0).sqrt_().numpy()
    elif p == 1:
        b = b - center.float()
        for start in range(0, FA, chunk):
            blk = a[start : start + chunk] - center.float()
            yield start, (torch.cdist(blk, b, p=1) / D).double().numpy()
    else:
        raise ValueError(f"p must be 1 or 2, got {p!r}")


def sliced_topc(ea: torch.Tensor, eb: torch.Tensor, c: int, *, p: int = 2) -> np.ndarray:
    """``(F_A, c)`` indices of the ``c`` nearest rows of ``eb`` for each row of ``ea`` (unsorted)."""
    out = np.empty((ea.shape[0], c), dtype=np.int64)
    for start, blk in sliced_blocks(ea, eb, p=p):
        out[start : start + len(blk)] = np.argpartition(blk, c - 1, axis=1)[:, :c]
    return out


def sliced_from_embeddings(
    ea: torch.Tensor,
    eb: torch.Tensor,
    *,
    p: int = 2,
    chunk: int = 2048,
) -> np.ndarray:
    r"""All-pairs sliced :math:`SW_p` from two quantile embeddings ``(F, L, Q)``.

    For :math:`p = 2`:
    :math:`SW_2^2 \approx \frac{1}{LQ}\sum_{l,q} (E^a_{lq} - E^b_{lq})^2`, a squared
    Euclidean distance between flattened embeddings, computed as
    :math:`\|e_a\|^2 + \|e_b\|^2 - 2\, e_a^\top e_b` with one matrix product per block
    in float64 (embeddings are centred on their joint mean first, which removes most of
    the floating-point cancellation). For :math:`p = 1` the mean absolute difference is used
    (:func:`torch.cdist` with ``p=1``).
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    out = np.empty((ea.shape[0], eb.shape[0]), dtype=np.float64)
    for start, blk in sliced_blocks(ea, eb, p=p, chunk=chunk):
        out[start : start + len(blk)] = blk
    return out
