"""Exact SAE Match at real SAE widths: sparse assignment with an optimality certificate.

The dense route (:func:`featmatch.matching.assign`) builds the full :math:`F_A\\times F_B`
float64 cost matrix and runs scipy's ``linear_sum_assignment``. At Gemma Scope widths
(16k-1M features) that is slow and, from 65k on, does not fit in memory. This module
solves the *same* problem exactly, and proves it did:

1. **One blocked pass** over all pairs computes the float32 inner products
   :math:`G = AB^\\top` block by block (torch; MKL on CPU, CUDA when present), keeps the
   ``k`` cheapest columns of every row (the *candidates* :math:`E`), their exact costs, and a
   rigorous lower bound :math:`\\ell_i` on the cost of every column of row *i* that was
   **not** kept.
2. A **sparse exact assignment** on :math:`E` (scipy ``min_weight_full_bipartite_matching``,
   LAPJVsp), with one private high-cost *dummy* column per row so that a full matching
   always exists, also for rectangular problems.
3. **Duals** :math:`(u, v)` for that matching, computed as shortest-path distances
   (Bellman-Ford from a virtual source, vectorised) in the residual graph of the matching.
4. An **optimality certificate**: every excluded pair must have non-negative reduced cost,
   :math:`c_{ij} - u_i - v_j \\ge -\\tau`. It is checked for all :math:`F_A F_B` pairs at once
   from the bounds of step 1 (:math:`\\ell_i - u_i \\ge \\max_j v_j - \\tau`). Rows the bound
   cannot clear get their full row recomputed exactly; pairs with negative reduced cost are
   added to :math:`E` (this *enlarges k for the violating rows*) and steps 2-4 repeat. If that
   does not converge in ``max_rounds``, the dense solver takes over (when it fits).

**Fast path (default, ``core=True``).** Steps 2-4 above need several rounds of LAPJVsp on
SAE pairs where ~10% of the features have no partner: those rows are nobody's near-neighbour,
their costs to every column look alike, and a top-k candidate list cannot certify them.
The fast path (:func:`_core_solve`) instead

a. fixes the *mutual-best* candidate pairs (row i's cheapest candidate is j and no other row
   lists j more cheaply) and calls everything else the *core*: rows :math:`R`, and all
   columns :math:`C` not taken by a fixed pair (about the unpartnered features: ~10%);
   fixed pairs whose gap to the row's bound is no larger than a typical core row's are
   *weak* (chance pairs of two unpartnered features) and join the core up front;
b. computes the core's costs **densely** (one :math:`|R|\\times|C|` product, ~1% of the
   floor) and solves it exactly: square cores first with LAPMOD (``lap``) on each row's 32
   cheapest entries, proved for the whole core by duals and a dense check
   (:func:`_sparse_core_assign`), else with ``lapjv`` (Jonker-Volgenant, double precision,
   returns column potentials); other cores with scipy ``linear_sum_assignment``;
c. picks duals that make the certificate easy: the largest feasible :math:`v` on the core
   (one dense Dijkstra from lapjv's potentials, else label-correcting sweeps), the
   *smallest* feasible :math:`v` (highest prices) on fixed columns, so a row outside a
   pair is never tempted by a taken column;
d. certifies every pair: known edges directly; an excluded pair (i, j) is cleared by the
   row's bound unless :math:`v_j > \\ell_i - u_i + \\tau`. Sorting the columns by :math:`v`
   makes the columns a row must check exactly a *prefix*; only those products are computed.
   Violations move their rows (and the owners of their columns) into the core and the core
   is re-solved (the block grows in place, :class:`_CoreBlock`: only new rows and columns
   are multiplied). If the core outgrows ``core_max_entries`` or ``max_rounds`` pass, the
   general loop above runs. A core above ``_CORE_ALL_SHARE`` (75%) of the rows becomes the
   whole problem.

**Many unpartnered features (issue 18).** With 40% of the features unpartnered, the core
is the block of unpartnered features against each other: a random assignment problem that
any exact solver of the full permutation must solve. Three things keep its cost down.
A square core is first solved *sparsely*: LAPMOD on each
row's 32 cheapest entries, with duals and a dense check that prove the result for the
whole core (:func:`_sparse_core_assign`; lapjv when the check fails for many rows). When
the core grows by a few rows between rounds it is not solved again from scratch: the
previous optimum and its potentials are kept and only the new rows are inserted, one
shortest augmenting path each (:func:`_warm_assign`). The core's block is built once
and grown in place across rounds (:class:`_CoreBlock`), and its rows' products are not
multiplied a second time: the main pass keeps the rows it predicts to join the core (no
candidate stands out, :class:`_KeptRows`) and the block is gathered from them. ``solver="auto"`` decides before
the main pass, from a sample of rows, whether a rectangular problem goes to the dense
solver instead (:func:`predicted_core_share`).
When the user gives a threshold, :func:`threshold_match` solves the *thresholded* problem
instead (every feature may stay unmatched at cost :math:`\\lambda`): only pairs cheaper than
:math:`\\lambda` can be in its optimum, so that block disappears. ``solver="auto"``
(:data:`AUTO_DENSE_CORE_SHARE`) switches to the dense solver when the first pass predicts a
large rectangular core.

Costs are *effective* costs :math:`e_{ij} = C_{ij} - |b_j|^2/D` for square mse (a full
assignment uses every column once, so the optimum is unchanged) and :math:`C` otherwise; the
candidate key is then a per-row monotone transform of the cost, so a single scalar
:math:`\\ell_i` bounds every excluded pair of row i.

Rounding: which numbers are certified. Every cost the solver uses is
:func:`featmatch.matching.pairwise_cost`'s float64 formula applied to a float32 inner
product of the same two vectors, but the products come from separate BLAS calls: the main
pass's row blocks (candidates, and the bounds :math:`\\ell_i` on the pairs it excludes; the
kept rows, :class:`_KeptRows`, are these same numbers), the dense core block (for rows not
kept), the prefix rechecks and the general loop's row rechecks. A BLAS picks its
kernel, and so the rounding of a float32 sum, by the block's shape, the thread count and
the instruction set, so these products, and ``pairwise_cost``'s own, may differ in the last
bits: by at most :math:`2\\gamma_D\\|a_i\\|\\|b_j\\|` each
(:func:`featmatch.matching._costs.rounding_bound` turns that into a bound
:math:`\\delta_{ij}` on the costs). The candidate costs are therefore *not* float64-exact
copies of ``pairwise_cost``'s numbers; they are the float64 costs of the main pass's own
float32 products, bit-identical to ``pairwise_cost``'s only when both run the same kernel
(e.g. the same row blocks, threads and CPU).

The certificate does not depend on that agreement: it is exact for the cost matrix
:math:`C'` of the numbers it used, one per pair (the core block's for core pairs, a
recheck's for rechecked pairs, the main pass's elsewhere; each bound :math:`\\ell_i` is a
rigorous bound on the main-pass numbers, including the float32 rounding of the selection
key). So the result is optimal for :math:`C'` up to :math:`n\\tau`, and since
:math:`|C' - C| \\le \\delta` entrywise, optimal for ``pairwise_cost``'s :math:`C` up to
:math:`n\\tau + 2\\sum_i \\max_j \\delta_{ij}`. The returned pair costs are :math:`C'`'s;
the benchmark measures the agreement with the dense optimum (``rel. gap``).

Why the certificate proves optimality (LP duality). Let :math:`n = F_A \\le m = F_B` (the
other case is solved transposed). The LAP is the linear program

.. math::

    \\min_{x \\ge 0} \\sum_{ij} c_{ij} x_{ij}\\quad\\text{s.t.}\\quad
    \\sum_j x_{ij} = 1\\ (\\forall i),\\qquad \\sum_i x_{ij} \\le 1\\ (\\forall j),

whose dual is :math:`\\max \\sum_i u_i + \\sum_j v_j` s.t. :math:`u_i + v_j \\le c_{ij}`,
:math:`v_j \\le 0`. Let :math:`\\pi` be the assignment found on :math:`E` and :math:`(u, v)`
satisfy (a) complementary slackness :math:`u_i + v_{\\pi(i)} = c_{i\\pi(i)}`, :math:`v_j = 0`
for every column not used by :math:`\\pi`, and (b) :math:`v \\le 0`,
:math:`\\bar c_{ij} = c_{ij} - u_i - v_j \\ge -\\tau` for **all** pairs. Then for any
assignment :math:`\\sigma`,

.. math::

    \\sum_i c_{i\\sigma(i)} \\ge \\sum_i u_i + \\sum_i v_{\\sigma(i)} - n\\tau
    \\ge \\sum_i u_i + \\sum_j v_j - n\\tau = \\sum_i c_{i\\pi(i)} - n\\tau,

so :math:`\\pi` is optimal up to :math:`n\\tau` (:math:`\\tau` is :math:`10^{-12}` of the
cost scale by default, far below the 1e-6 relative agreement asked of the solver).
Condition (b) holds on :math:`E` by construction of the duals; off :math:`E` it is what the
certificate checks. The duals used, :math:`v_j = \\min(0, \\text{dist}(j))` with
distances along alternating paths :math:`\\pi(i) \\to j` of length
:math:`c_{ij} - c_{i\\pi(i)}`, are the *largest* feasible :math:`v \\le 0`, which keeps
:math:`u_i = c_{i\\pi(i)} - v_{\\pi(i)}` small and the row test easy to pass. They exist
(no negative cycle, :math:`v_j = 0` on free columns) exactly because :math:`\\pi` is optimal
on :math:`E`.

Why duals by shortest paths and not another solver: LAPJVsp (in scipy, compiled) finds the
optimal matching on the candidate graph fastest but returns no duals; given an optimal
matching, the duals are one shortest-path problem whose depth is small on SAE costs
(most features are settled by their row minimum), and its answer is exact in float64,
unlike an auction/epsilon-scaling solver whose prices are only epsilon-optimal.

Costs use the arithmetic of :func:`featmatch.matching.pairwise_cost`: float32 inner
products, float64 norms, :math:`C^{mse}_{ij} = (\\|a_i\\|^2 + \\|b_j\\|^2 - 2a_i\\cdot b_j)/D`
clipped at 0, :math:`C^{cos}_{ij} = 1 - \\cos` clipped to [0, 2]. The main pass computes
:math:`G` with the same layout (row blocks against the contiguous :math:`B^\\top`, 2048-row
blocks up to 16k columns), so on one machine its products usually round as the dense
path's do; where they do not, they differ by float32 rounding only (see *Rounding* above).

References
----------
.. [1] R. Jonker, A. Volgenant. "A shortest augmenting path algorithm for dense and sparse
   linear assignment problems." Computing 38 (1987) 325-340 (LAPJV / LAPJVsp).
.. [2] R. K. Ahuja, T. L. Magnanti, J. B. Orlin. *Network Flows*, Ch. 9 and 12 (LP duality,
   reduced costs, complementary slackness; potentials as shortest-path distances).
.. [3] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656 (Eq. 3).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch

from featmatch.matching._costs import (
    METRICS,
    U32,
    Metric,
    assign,
    check_option,
    gamma,
    mse_from_products_,
    pairwise_cost,
)

__all__ = [
    "sparse_match",
    "threshold_match",
    "threshold_assign",
    "auto_solver",
    "SparseMatchInfo",
    "default_block_size",
]

_BLOCK_BYTES = 128 * 2**20  # one float32 (block_size, F_B) buffer
_WEAK_MAX_FRACTION = 0.02  # weak pairs moved up front: at most this share of the core's size (or 32)
_WEAK_GAP_QUANTILE = 0.9  # ... whose gap is at most this quantile of the core rows' gaps
_CORE_ALL_SHARE = 0.75  # a core with more rows than this share of n becomes the whole problem
_LAPJV_MIN = 256  # square cores from this size go to lapjv (below it both solvers take ~1 ms)
_SPARSE_CORE_K = 32  # entries per row of a square core's sparse graph (LAPMOD first, lapjv if it fails)
_AUGMENT_MAX = 64  # at most this many rows failing the sparse core's check are repaired by augmenting paths
_WARM_MAX = 16  # a grown square core is warm-started when at most this many rows joined (else solved afresh)
_KEEP_RHO = 5.0  # the main pass keeps a row's products when (s1 - s2) <= _KEEP_RHO (s2 - s_k) (_KeptRows)


def default_block_size(n_cols: int, n_rows: int | None = None) -> int:
    """Rows per block so that one float32 ``(block, n_cols)`` buffer is about 128 MB.

    A multiple of 64 between 64 and 2048 (2048 is :func:`pairwise_cost`'s default: up to 16k
    columns both run the same row blocks, so the same BLAS kernel and usually the same
    rounding; no more than that is promised, see the module docstring's *Rounding*).
    """
    bs = _BLOCK_BYTES // (4 * max(int(n_cols), 1))
    bs = int(max(64, min(2048, (bs // 64) * 64)))
    if n_rows is not None:
        bs = max(1, min(bs, int(n_rows)))
    return bs


@dataclass
class SparseMatchInfo:
    """What :func:`sparse_match` did (returned with ``return_info=True``).

    Attributes
    ----------
    k : int
        Candidates per row in the main pass.
    k_max : int
        Largest number of candidate columns any row ended with.
    n_edges : int
        Candidate edges in the final sparse problem (without dummies).
    rounds : int
        Solve/certify rounds (1 = the first candidate set was already certified).
    violations : list of int
        Per round, the number of excluded pairs found with negative reduced cost.
    rows_rechecked : list of int
        Per round, the rows whose full row was recomputed because the bound could not clear them.
    dummies_used : list of int
        Per round, rows the sparse solve had to put on their dummy column.
    certified : bool
        Whether the returned assignment carries a passed optimality certificate.
    fallback : str or None
        ``"dense"`` if the dense solver produced the result after the sparse rounds,
        ``"auto-dense"`` if ``auto_dense_share`` sent a predicted large rectangular core to
        it, else None.
    gap_bound : float
        Certified bound on ``total_cost - optimum`` (:math:`n\\tau`) for the numbers the
        solver used (:math:`C'`, module docstring, *Rounding*); NaN if not certified.
    transposed : bool
        True when ``F_A > F_B`` and the problem was solved with B as rows.
    device : str
    times : dict
        Seconds per phase: ``prepare``, ``candidates`` (main blocked pass), ``core`` (the
        dense core's product), ``solve`` (core LSA or sparse LAP), ``duals`` (with the
        breakdown ``duals_core_dense``, ``duals_fixed`` and the sweep count
        ``sweeps_core_dense``), ``certificate``, ``recheck`` (exact prefix/row rechecks),
        ``fallback``, ``total``.
    path : str
        ``"core"`` if the fast path (fixed mutual-best pairs + dense exact core) certified
        the result, ``"sparse"`` if the general LAPJVsp loop ran, ``"dense"`` after the
        ``auto_dense_share`` switch, ``"threshold"`` for :func:`threshold_match`.
    core_rows : list of int
        Per fast-path round, the rows in the dense core.
    core_solver : str
        Solver of the last core: ``"lapmod"`` (:func:`_sparse_core_assign`), ``"lapjv"``,
        either with ``"+augment"`` (a grown core solved from the previous round's solution by
        augmenting paths, :func:`_warm_assign`), or ``"scipy"`` ("" if no core was solved).
    weak_moved : int
        Mutual-best pairs moved into the core up front as weak (see :func:`_core_solve`).
    products_kept : bool
        Whether the main pass kept all its products (``keep_products=True``).
    rows_kept : int
        Rows whose products the main pass kept for the later phases (all of them with
        ``keep_products=True``; by default those predicted to join the core, :class:`_KeptRows`).
    predicted_core_share : float
        ``auto_dense_share``'s estimate (:func:`predicted_core_share`); NaN when not made.
    """

    k: int
    k_max: int = 0
    n_edges: int = 0
    rounds: int = 0
    violations: list[int] | None = None
    rows_rechecked: list[int] | None = None
    dummies_used: list[int] | None = None
    certified: bool = False
    fallback: str | None = None
    gap_bound: float = float("nan")
    transposed: bool = False
    device: str = "cpu"
    times: dict[str, float] | None = None
    path: str = "core"
    core_rows: list[int] | None = None
    core_solver: str = ""
    weak_moved: int = 0
    products_kept: bool = False
    rows_kept: int = 0
    predicted_core_share: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        return {
            "k": self.k,
            "k_max": self.k_max,
            "n_edges": self.n_edges,
            "rounds": self.rounds,
            "violations": list(self.violations or []),
            "rows_rechecked": list(self.rows_rechecked or []),
            "dummies_used": list(self.dummies_used or []),
            "certified": self.certified,
            "fallback": self.fallback,
            "gap_bound": self.gap_bound,
            "transposed": self.transposed,
            "device": self.device,
            "times": {k: round(v, 4) for k, v in (self.times or {}).items()},
            "path": self.path,
            "core_rows": list(self.core_rows or []),
            "core_solver": self.core_solver,
            "weak_moved": self.weak_moved,
            "products_kept": self.products_kept,
            "rows_kept": self.rows_kept,
            "predicted_core_share": self.predicted_core_share,
        }


# --------------------------------------------------------------------------------------
# Per-SAE prepared data (computed once, reused as rows and as columns)
# --------------------------------------------------------------------------------------


class _Side:
    """Feature vectors of one SAE in the forms the matcher needs (built lazily, cached)."""

    def __init__(self, x: torch.Tensor, device: torch.device) -> None:
        if x.ndim != 2:
            raise ValueError(f"feature vectors must be 2-D (F, D); got shape {tuple(x.shape)}")
        self.x = (
            x.detach().to("cpu", torch.float32).contiguous()
        )  # the vectors whose products define the cost
        # float64 squared norms, as pairwise_cost (each row's sum alike, measured bit-equal), in
        # row chunks of 1,024: no full float64 copy, and the allocator reuses one chunk's pages
        # (8,192-row chunks took 0.20 s at 16,384 x 2,304, 1,024-row ones 0.03-0.04 s)
        self.sq = (
            torch.cat([self.x[i : i + 1024].double().pow_(2).sum(1) for i in range(0, self.x.shape[0], 1024)])
            if self.x.shape[0]
            else torch.zeros(0, dtype=torch.float64)
        )
        # a NaN/Inf entry makes its row's float64 sum of squares NaN/Inf (float32 squares cannot overflow it)
        if not bool(torch.isfinite(self.sq).all()):
            raise ValueError("feature vectors contain NaN or Inf")
        self.norm = self.sq.sqrt()
        self.device = device
        self._dev: torch.Tensor | None = None
        self._dev_t: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def rows(self) -> torch.Tensor:
        """(F, D) float32 on the device (the left factor of the product)."""
        if self._dev is None:
            self._dev = self.x if self.device.type == "cpu" else self.x.to(self.device)
        return self._dev

    def cols_t(self) -> torch.Tensor:
        """(D, F) contiguous float32 on the device: the right factor, laid out as in pairwise_cost."""
        if self._dev_t is None:
            self._dev_t = self.rows().T.contiguous()
        return self._dev_t

    def release(self) -> None:
        self._dev = None
        self._dev_t = None


def _costs_from_g(
    g: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor, metric: str, dim: int, inplace: bool = False
) -> torch.Tensor:
    """Float64 costs from float32 inner products, with exactly pairwise_cost's arithmetic.

    ``g``, ``sq_a``, ``sq_b`` broadcast together (elementwise, not a matrix). With
    ``inplace`` (mse on the CPU), ``g`` is a float64 buffer holding the float32 products
    exactly, and is overwritten with the costs.
    """
    if metric == "mse" and g.device.type == "cpu" and g.dim() == 2:
        # in place on one float64 copy, in numpy: the same correctly rounded operations in the
        # same order (so the same numbers), 1.7x faster than torch's on one thread (measured)
        x = g.numpy() if inplace and g.dtype == torch.float64 else g.numpy().astype(np.float64)
        return torch.from_numpy(mse_from_products_(x, sq_a.numpy(), sq_b.numpy(), dim))
    if metric == "mse":
        g = g.to(torch.float64, copy=True)
        return g.mul_(-2.0).add_(sq_a).add_(sq_b).div_(dim).clamp_(min=0.0)
    g = g.double()
    denom = sq_a.sqrt() * sq_b.sqrt()
    ok = denom > 0
    c = torch.where(ok, g / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g))
    return c.neg_().add_(1.0).clamp_(0.0, 2.0)


# --------------------------------------------------------------------------------------
# Phase 1: the blocked pass (candidates and lower bounds)
# --------------------------------------------------------------------------------------


def _chunking(m: int, k: int) -> tuple[int, int]:
    """Chunk width c and chunk count for the two-level row selection (at least 4k chunks)."""
    c = 64
    while c > 1 and m // c < 4 * k:
        c //= 2
    n_chunks = -(-m // c)
    return c, n_chunks


@dataclass
class _RowBounds:
    """Lower bounds on the excluded costs: :math:`C_{ij} \\ge A_i + \alpha_j - \\sigma_i\beta_j`.

    Square mse: :math:`A_i = |a_i|^2/D`, :math:`\alpha_j = |b_j|^2/D`, :math:`\beta_j = 2|b_j|/D`
    and :math:`\\sigma_i` bounds :math:`a_i\\cdot b_j/|b_j|` over the excluded columns. Otherwise
    :math:`\alpha = \beta = 0` and :math:`A_i` bounds :math:`C_{ij}` directly.
    """

    A: np.ndarray  # (n,)
    sigma: np.ndarray  # (n,)
    alpha: np.ndarray  # (m,)
    beta: np.ndarray  # (m,)


def _lower_envelope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Lower convex hull of the points (x_j, y_j), for :math:`f(s) = \min_j (y_j - s x_j)`.

    Returns the hull vertices (x, y, increasing x) and the slopes of the edges between them.
    """
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    # keep the lowest y per distinct x
    keep = np.ones(xs.size, dtype=bool)
    keep[1:] = xs[1:] != xs[:-1]
    xs, ys = xs[keep], ys[keep]
    hx: list[float] = []
    hy: list[float] = []
    for px, py in zip(xs.tolist(), ys.tolist(), strict=True):
        while len(hx) >= 2 and (hx[-1] - hx[-2]) * (py - hy[-2]) - (hy[-1] - hy[-2]) * (px - hx[-2]) <= 0:
            hx.pop()
            hy.pop()
        hx.append(px)
        hy.append(py)
    hxa, hya = np.asarray(hx), np.asarray(hy)
    slopes = np.diff(hya) / np.diff(hxa) if hxa.size > 1 else np.zeros(0)
    return hxa, hya, slopes


def _envelope_min(bounds: _RowBounds, v: np.ndarray) -> np.ndarray:
    """:math:`\\min_j (\alpha_j - v_j - \\sigma_i \beta_j)` for every row i, exactly, in O((n+m) log m)."""
    hx, hy, slopes = _lower_envelope(bounds.beta, bounds.alpha - v)
    # y - s x is minimised at the vertex whose left edge slope <= s <= right edge slope
    idx = np.searchsorted(slopes, bounds.sigma, side="left")
    x_at = hx[idx]
    # rows with no excluded column left have sigma = -inf: no constraint (and no 0 * inf)
    return hy[idx] - np.where(x_at == 0, 0.0, bounds.sigma * np.where(x_at == 0, 1.0, x_at))


class _KeptRows:
    r"""The main pass's float32 products of some rows (all of them, or the predicted core's).

    The later phases gather these rows' numbers instead of multiplying them again
    (:func:`_eff_block`, :func:`_full_rows`); rows without a slot are multiplied afresh.

    * ``predict=False`` (``keep_products=True``): every row, ``slot[i] = i``.
    * ``predict=True`` (the default on the CPU): the rows likely to join the core of
      :func:`_core_solve`, predicted in the pass from each row's top-k scores
      :math:`s_1 \ge s_2 \ge \dots \ge s_k` (the candidate key, in cost order): the row is
      kept when :math:`s_1 - s_2 \le \rho\,(s_2 - s_k)`, :math:`\rho` = :data:`_KEEP_RHO`.
      A row with a partner stands out from its other candidates (:math:`s_1 - s_2` is many
      times the spread of the next ones); a row without one sits in the tail of a random
      row's maxima, where consecutive spacings are alike (an extreme-value tail:
      :math:`E[s_j - s_{j+1}] \approx \beta/j`, so the means of :math:`s_1-s_2` and
      :math:`s_2-s_{16}` are about :math:`\beta` and :math:`2.3\beta`, and a ratio above 5
      has probability roughly :math:`e^{-11.5}`). The ratio is scale-free, not
      dimension-free: a partner's lead must exceed 5 tail spacings, which shrink as
      :math:`1/\sqrt{D}` for random directions (at :math:`D = 128` a third of the partnered
      rows of the test pair are kept too, at 512 two of 1,229). Measured on the unit-vector
      planted pairs of ``bench_regimes`` at 8,192 x 1,024 (10/40/60 % unpartnered, noise
      0.3/0.8): the kept rows covered every
      core's rows; at most 10 % of them were not in the core (40 %/0.3: 3,277 kept, 2,962 in
      the core, the others unpartnered rows in chance mutual-best pairs); with no unpartnered
      features no row was kept. Rows beyond ``capacity`` are not kept.

    Only speed depends on the prediction: a kept row's numbers are the pass's own products
    (those the candidates and bounds are made of), a row without a slot is multiplied
    again, as without keeping. The store is allocated uninitialised at its capacity, so only
    the rows written to cost memory.
    """

    def __init__(self, n: int, m: int, device: torch.device, capacity: int, predict: bool) -> None:
        self.full = not predict  # every row kept, in row order
        self.store = torch.empty(capacity if predict else n, m, device=device, dtype=torch.float32)
        self.slot = np.full(n, -1, dtype=np.int64) if predict else np.arange(n, dtype=np.int64)
        self.used = 0 if predict else n

    def offer(self, i0: int, g: torch.Tensor, kv: torch.Tensor) -> None:
        """Keep the rows ``i0 + t`` of the block ``g`` whose top-k scores ``kv`` predict the core."""
        room = self.store.shape[0] - self.used
        if room <= 0 or kv.shape[1] < 3:
            return
        s12 = torch.topk(kv, 2, dim=1, largest=True, sorted=True).values
        sk = kv.amin(1)
        sel = torch.nonzero(s12[:, 0] - s12[:, 1] <= _KEEP_RHO * (s12[:, 1] - sk)).flatten()[:room]
        if sel.numel() == 0:
            return
        u0, u1 = self.used, self.used + sel.numel()
        torch.index_select(g, 0, sel, out=self.store[u0:u1])
        self.slot[i0 + sel.cpu().numpy()] = np.arange(u0, u1)
        self.used = u1

    def slots(self, rows: np.ndarray) -> np.ndarray | None:
        """The slots of ``rows``, or None unless every one of them is kept."""
        s = self.slot[rows]
        return s if rows.size and bool((s >= 0).all()) else None


def _candidate_pass(
    ra: _Side,
    sb: _Side,
    metric: str,
    k: int,
    block_size: int,
    square_mse: bool,
    keep: _KeptRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, _RowBounds]:
    r"""The k best columns of every row, their float64 costs, and bounds on all other columns.

    With ``keep`` (:class:`_KeptRows`), every block's products are written into it (all
    rows), or the rows it predicts to join the core are copied into it: the later phases
    then gather their numbers instead of multiplying again (:func:`_keep_products`).

    The candidate costs are :func:`_costs_from_g` (pairwise_cost's float64 arithmetic) of
    *this pass's* float32 products ``G = A_blk @ B^T`` (row blocks of ``block_size``
    against the contiguous :math:`B^\top`, as in pairwise_cost). They equal pairwise_cost's
    numbers when both products run the same BLAS kernel, and are within
    :func:`~featmatch.matching._costs.rounding_bound` of them in any case. The bounds are
    rigorous for this pass's numbers: every excluded pair's cost, computed from the same
    ``G``, is at least :math:`A_i + \alpha_j - \sigma_i\beta_j`.

    Scores maximised (float32):

    * square mse: :math:`G_{ij}` itself. Every full assignment uses every column once, so
      :math:`\\sum_i (|a_i|^2 + |b_{\\pi(i)}|^2)/D` is constant and the LAP only maximises
      :math:`\\sum_i a_i\\cdot b_{\\pi(i)}` (the remark under Eq. 3): the key is the
      effective cost :math:`e_{ij} = C_{ij} - |b_j|^2/D` up to a row constant, so one scalar
      per row bounds all excluded pairs. (An earlier version ranked by
      :math:`G_{ij}/|b_j|` with a per-column envelope bound; the fast path's dense core makes
      the spread of unpartnered rows over columns unnecessary.)
    * rectangular mse: :math:`G_{ij} - |b_j|^2/2`, i.e. the cost (norms matter here).
    * cosine: :math:`G_{ij}/|b_j|`, i.e. the cosine.

    Two-level selection: the maximum of each chunk of c columns, the k chunks with the
    largest maxima, then the top k inside them (exactly the row's k best scores: every
    column outside those chunks is <= the k chunk maxima).
    """
    n, m, dim = ra.n, sb.n, ra.dim
    dev = ra.device
    k = min(k, m)
    c, n_chunks = _chunking(m, k)
    m_pad = c * n_chunks
    a_rows = ra.rows()
    bt = sb.cols_t()
    rb = sb.norm
    inv_b = torch.where(rb > 0, 1.0 / torch.where(rb > 0, rb, torch.ones_like(rb)), torch.zeros_like(rb))
    inv_b32 = inv_b.to(dev, torch.float32)
    half_sq32 = (sb.sq / 2).to(dev, torch.float32)
    bs = max(1, min(block_size, n))
    keep_all = keep is not None and keep.full
    gbuf = None if keep_all else torch.empty(bs, m, device=dev, dtype=torch.float32)
    sbuf = torch.full((bs, m_pad), -float("inf"), device=dev, dtype=torch.float32)
    offs = torch.arange(c, device=dev)
    cols_out = torch.empty(n, k, dtype=torch.int64)
    g_out = torch.empty(n, k, dtype=torch.float32)
    score_k = torch.empty(n, dtype=torch.float64)
    for i0 in range(0, n, bs):
        i1 = min(i0 + bs, n)
        r = i1 - i0
        g = keep.store[i0:i1] if keep_all else gbuf[:r]
        torch.mm(a_rows[i0:i1], bt, out=g)
        score = sbuf[:r]
        if square_mse:
            # the inner product itself (the cost up to row and column constants)
            if m_pad == m:
                score = g
            else:
                score[:, :m].copy_(g)
        elif metric == "mse":
            torch.sub(g, half_sq32, out=score[:, :m])
        else:
            torch.mul(g, inv_b32, out=score[:, :m])
        if n_chunks > k:
            cmax = score.view(r, n_chunks, c).amax(2)
            chunk_idx = torch.topk(cmax, k, dim=1, largest=True, sorted=False).indices
            pool = (chunk_idx[:, :, None] * c + offs).reshape(r, k * c)
            vals = score.gather(1, pool)
            top = torch.topk(vals, k, dim=1, largest=True, sorted=False)
            cols = pool.gather(1, top.indices)
            kv = top.values
        else:
            top = torch.topk(score[:, :m], k, dim=1, largest=True, sorted=False)
            cols, kv = top.indices, top.values
        if keep is not None and not keep_all:
            keep.offer(i0, g, kv)
        cols_out[i0:i1] = cols.cpu()
        g_out[i0:i1] = g.gather(1, cols).cpu()
        score_k[i0:i1] = kv.amin(1).double().cpu()
    del gbuf, sbuf
    costs = _costs_from_g(g_out, ra.sq[:, None], sb.sq[cols_out], metric, dim)
    zeros_m = np.zeros(m)
    sq_a, nrm_a = ra.sq.numpy(), ra.norm.numpy()
    sk = score_k.numpy()
    if k >= m:
        return cols_out, costs, _RowBounds(np.full(n, np.inf), np.zeros(n), zeros_m, zeros_m)
    if square_mse:
        # score = fl(G) itself, the very numbers the costs are made of: every excluded pair has
        # G_ij <= s_i, so C_ij >= (|a_i|^2 + |b_j|^2 - 2 s_i)/D (+ float64 rounding)
        bmax2 = float(sb.sq.max())
        A = (sq_a - 2.0 * sk) / dim - 1e-12 * (sq_a + bmax2 + 2.0 * np.abs(sk)) / dim
        return cols_out, costs, _RowBounds(A, np.zeros(n), sb.sq.numpy() / dim, zeros_m)
    if metric == "mse":
        # score = fl(G - fl(|b|^2/2)): error <= u|b|^2/2 + u(|G| + |b|^2/2) <= u(max|b|^2 + |a| max|b|)
        bmax = float(sb.norm.max())
        slack = U32 * (bmax**2 + nrm_a * bmax) * (1 + 1e-3) + 1e-12 * (sq_a + bmax**2)
        A = np.maximum((sq_a - 2.0 * (sk + slack)) / dim, 0.0)
    else:
        slack = 3.01 * U32 * nrm_a + 1e-12
        safe = np.where(nrm_a > 0, nrm_a, 1.0)
        A = np.where(nrm_a > 0, np.clip(1.0 - (sk + slack) / safe, 0.0, 2.0), 1.0)
    return cols_out, costs, _RowBounds(A, np.zeros(n), zeros_m, zeros_m)


def _full_rows(
    ra: _Side, sb: _Side, rows: torch.Tensor, metric: str, kept: _KeptRows | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 costs ``(r, m)`` and the float32 products of whole rows (for the recheck);
    gathered from the main pass's ``kept`` products when all of these rows were kept."""
    slots = kept.slots(rows.numpy()) if kept is not None else None
    if slots is not None:
        assert kept is not None
        g = kept.store.index_select(0, torch.from_numpy(slots).to(kept.store.device)).cpu()
    else:
        g = (ra.rows()[rows.to(ra.device)] @ sb.cols_t()).cpu()
    return _costs_from_g(g, ra.sq[rows][:, None], sb.sq[None, :], metric, ra.dim), g


# --------------------------------------------------------------------------------------
# Phases 2-3: sparse LAP and its duals
# --------------------------------------------------------------------------------------


def _solve_sparse(
    e_row: np.ndarray, e_col: np.ndarray, e_cost: np.ndarray, n: int, m: int, big: float
) -> np.ndarray:
    """Optimal full matching on the candidate graph plus one dummy column per row.

    Returns ``match_col (n,)``: a real column in [0, m) or the row's dummy ``m + i``.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    # LAPJVsp treats explicit zeros as missing edges; a constant shift (every row is matched
    # exactly once) makes all weights positive without changing the optimum.
    shift = float(np.abs(e_cost).max()) + 1.0 if e_cost.size else 1.0
    rows = np.concatenate([e_row, np.arange(n)])
    cols = np.concatenate([e_col, m + np.arange(n)])
    data = np.concatenate([e_cost + shift, np.full(n, big + shift)])
    graph = csr_matrix((data, (rows, cols)), shape=(n, m + n))
    r, c = min_weight_full_bipartite_matching(graph)
    match_col = np.empty(n, dtype=np.int64)
    match_col[r] = c
    return match_col


def _duals(
    e_row: np.ndarray,
    e_col: np.ndarray,
    e_cost: np.ndarray,
    match_col: np.ndarray,
    match_cost: np.ndarray,
    n: int,
    m: int,
    eps: float,
    h: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Column duals :math:`v \le h - \max h` as large as feasible, and row duals :math:`u`, by Bellman-Ford.

    Difference constraints :math:`v_j \le v_{\pi(i)} + (c_{ij} - c_{i\pi(i)})` for every
    non-matching candidate edge, and :math:`v_j \le h_j - \max h` (a virtual source joined
    to column j at that length; :math:`h = 0` except for square mse, where
    :math:`h_j = |b_j|^2/D`). The shortest distances satisfy them all, and
    :math:`u_i = c_{i\pi(i)} - v_{\pi(i)}` makes every matching edge tight. For
    rectangular problems :math:`h = 0`, so :math:`v \le 0` and an unused column keeps
    :math:`v_j = 0` (a shorter path into it would be a cheaper assignment, contradicting
    optimality on the candidates). Rows left on their dummy column are left out (they get
    no dual; the caller rechecks them). Vectorised label-correcting: each sweep relaxes
    only the edges leaving columns whose label changed in the previous sweep.

    Raises
    ------
    RuntimeError
        If labels keep changing after ``m + 1`` sweeps (a negative cycle: the matching is not
        optimal on the candidate graph, which only floating-point trouble can cause).
    """
    on_real = match_col < m
    src = match_col[e_row]
    keep = on_real[e_row] & (e_col != src)
    src_t = torch.from_numpy(src[keep])
    dst_t = torch.from_numpy(e_col[keep])
    w_t = torch.from_numpy(e_cost[keep] - match_cost[e_row[keep]])
    v = torch.from_numpy(h - h.max()) if h.size else torch.zeros(0, dtype=torch.float64)
    active = torch.ones(m, dtype=torch.bool)
    sweeps = 0
    while True:
        sel = active[src_t]
        if not bool(sel.any()):
            break
        sweeps += 1
        if sweeps > m + 1:
            raise RuntimeError("dual computation did not converge (negative cycle in the residual graph)")
        s, d = src_t[sel], dst_t[sel]
        cand = v[s] + w_t[sel]
        new = v.clone()
        new.scatter_reduce_(0, d, cand, reduce="amin", include_self=True)
        active = new < v - eps
        v = torch.where(active, new, v)
    v_np = v.numpy().copy()
    u = np.full(n, np.nan)
    u[on_real] = match_cost[on_real] - v_np[match_col[on_real]]
    return u, v_np


# --------------------------------------------------------------------------------------
# Fast path: fixed mutual-best pairs + a dense exact core + price-ordered certificate
# --------------------------------------------------------------------------------------


def _empty_f64(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised float64 array from torch's allocator, not numpy's.

    numpy advises the kernel to back arrays >= 4 MB with huge pages, and where it must compact
    memory to find them (transparent huge pages with ``defrag=madvise``, a busy machine) the
    first touch stalls. Measured over 3 x 3 solves at 8,192 x 1,024: the core phase took
    0.78-2.65 s with numpy's blocks at 60 % unpartnered / 0.8, 0.94-1.05 s with torch's (4 kB
    pages), and the same 0.30-0.44 s either way at 40 %.
    """
    return torch.empty(shape, dtype=torch.float64).numpy()


def _row_topk(E: np.ndarray, k: int, shift: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """Columns of each row's ``k`` smallest ``E[i, j] - shift[j]`` (unsorted), in row chunks.

    Chunked through one small buffer: ``E`` may be a strided view (:class:`_CoreBlock`), and
    torch's topk on a whole strided block copies it first. torch's topk returns only the k
    indices (numpy's argpartition builds an index array of E's size).
    """
    n, m = E.shape
    out = np.empty((n, k), dtype=np.int64)
    buf = np.empty((min(chunk, max(n, 1)), m))
    for i0 in range(0, n, chunk):
        b = buf[: min(chunk, n - i0)]
        if shift is None:
            b[...] = E[i0 : i0 + chunk]
        else:
            np.subtract(E[i0 : i0 + chunk], shift[None, :], out=b)
        out[i0 : i0 + chunk] = torch.topk(
            torch.from_numpy(b), k, dim=1, largest=False, sorted=False
        ).indices.numpy()
    return out


def _eff_block(
    ra: _Side,
    cb: _Side,
    rows: np.ndarray,
    cols: np.ndarray,
    metric: str,
    alpha: np.ndarray,
    threads: int = 0,
    kept: _KeptRows | None = None,
    out: np.ndarray | None = None,
) -> torch.Tensor:
    """Effective costs ``C[rows][:, cols] - alpha[cols]`` (float64, CPU) from one float32 product
    (run on ``threads`` intra-op threads when given), or gathered from the main pass's ``kept``
    products (the same numbers as the candidates and the bounds) for the rows kept there.
    Written into ``out`` (a float64 array of that shape, e.g. a view into
    :class:`_CoreBlock`'s buffer) when given."""
    if out is None:
        out = _empty_f64((rows.size, cols.size))
    slots = kept.slots(rows) if kept is not None else None
    if kept is not None and slots is None:
        # some rows kept, some not: each part by its own route, then scattered into ``out``
        have = kept.slot[rows] >= 0
        for part, src in ((have, kept), (~have, None)):
            if part.any():
                idx = np.flatnonzero(part)
                out[idx] = _eff_block(ra, cb, rows[idx], cols, metric, alpha, threads, src).numpy()
        return torch.from_numpy(out)
    dev = ra.device
    r_t = torch.from_numpy(rows)
    c_t = torch.from_numpy(cols)
    neg_alpha = -alpha[cols] if alpha.any() else None
    n0 = torch.get_num_threads()
    if threads and threads != n0:
        torch.set_num_threads(threads)
    try:
        if kept is not None and slots is not None and kept.store.device.type == "cpu":
            # numpy's fancy indexing (2-3x faster than two index_selects, measured at 3,265^2 of
            # 8,192^2), in row chunks straight into the float64 block (float32 -> float64 is
            # exact): no full-size float32 temporary, whose fresh pages cost more than the copy
            kn = kept.store.numpy()
            for i0 in range(0, rows.size, 256):
                out[i0 : i0 + 256] = kn[np.ix_(slots[i0 : i0 + 256], cols)]
            g = torch.from_numpy(out)
        elif kept is not None and slots is not None:
            dv = kept.store.device
            g = kept.store.index_select(0, torch.from_numpy(slots).to(dv)).index_select(1, c_t.to(dv)).cpu()
        elif dev.type == "cpu" and metric == "mse":
            # row chunks of the product straight into the float64 block, each turned into costs
            # while it is in cache, and written into the caller's block: no full-size float32
            # temporary and no second block (measured at 3,277 x 3,277: 0.38 s against 0.49 s
            # on a process's first call, the same 0.35 s once its memory is warm; bit-identical)
            a_r = ra.rows()[r_t]
            b_t = cb.rows()[c_t].T
            ch = max(1, min(rows.size, 2**21 // max(cols.size, 1)))  # <= 8 MB of float32 per chunk
            gbuf = torch.empty(ch, cols.size)
            sq_r, sq_c = ra.sq[r_t][:, None], cb.sq[c_t][None, :]
            for i0 in range(0, rows.size, ch):
                i1 = min(i0 + ch, rows.size)
                g = gbuf[: i1 - i0]
                torch.mm(a_r[i0:i1], b_t, out=g)
                x = out[i0:i1]
                x[...] = g.numpy()
                _costs_from_g(torch.from_numpy(x), sq_r[i0:i1], sq_c, metric, ra.dim, inplace=True)
                if neg_alpha is not None:
                    x += neg_alpha
            return torch.from_numpy(out)
        else:
            g = (ra.rows()[r_t.to(dev)] @ cb.rows()[c_t.to(dev)].T).cpu()
    finally:
        if threads and threads != n0:
            torch.set_num_threads(n0)
    e = _costs_from_g(g, ra.sq[r_t][:, None], cb.sq[c_t][None, :], metric, ra.dim, inplace=True)
    if not np.may_share_memory(e.numpy(), out):
        out[...] = e.numpy()
    if neg_alpha is not None:
        out += neg_alpha
    return torch.from_numpy(out)


class _single_thread:
    """Run torch on one intra-op thread inside the block (restored after).

    The dual sweeps are many small reductions and scatters; on a busy machine their
    multi-threaded versions were measured ~10x slower than single-threaded ones (thread
    hand-offs dominate). The products inside (:func:`_eff_block`) switch back to the
    caller's thread count.
    """

    def __enter__(self) -> int:
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)
        return self.n

    def __exit__(self, *exc: object) -> None:
        if self.n != 1:
            torch.set_num_threads(self.n)


def _label_correct(
    v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, eps: float, mode: str
) -> torch.Tensor | None:
    """Fixpoint of ``v[dst] <- min(v[dst], v[src] + w)`` (mode "min") or
    ``v[dst] <- max(v[dst], v[src] - w)`` (mode "max"), vectorised; each sweep relaxes only the
    edges leaving labels changed in the previous one. None if it does not settle (a cycle of
    negative length: only floating-point trouble can cause one here)."""
    v = v.clone()
    active = torch.ones(v.numel(), dtype=torch.bool)
    for _ in range(v.numel() + 2):
        sel = active[src]
        if not bool(sel.any()):
            return v
        s, d = src[sel], dst[sel]
        new = v.clone()
        if mode == "min":
            new.scatter_reduce_(0, d, v[s] + w[sel], reduce="amin", include_self=True)
            active = new < v - eps
        else:
            new.scatter_reduce_(0, d, v[s] - w[sel], reduce="amax", include_self=True)
            active = new > v + eps
        v = torch.where(active, new, v)
    return None


def _lsa_with_potentials(E: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, str]:
    r"""Optimal assignment of a dense core, and column potentials when the solver gives them.

    Returns ``(pc, p, solver)``: ``pc[i]`` is row i's column; ``p`` (square cores solved by
    ``lapjv``) are Jonker-Volgenant column potentials with
    :math:`E_{ij} - E_{i\,pc(i)} + p_{pc(i)} - p_j \ge 0` up to rounding, else None.

    Why two solvers: on the cores SAE pairs produce (unpartnered features against each other,
    costs that all look alike) the ``lapjv`` package (JV with its column-reduction and
    augmenting-row-reduction start, in double precision) was measured 1.7x faster than scipy's
    ``linear_sum_assignment`` (0.31 s against 0.54 s on a 2,451-square core), and it returns the
    potentials, which turn the dual computation into one Dijkstra instead of label-correcting
    sweeps. Nothing downstream trusts it: the duals are recomputed and every core pair is checked
    by the certificate. scipy solves rectangular cores, small cores, and any core lapjv is
    missing for or returns an invalid permutation on.
    """
    from scipy.optimize import linear_sum_assignment

    r, c = E.shape
    if r == c and r >= _LAPJV_MIN:
        try:
            from lapjv import lapjv  # optional accelerator (a declared dependency)
        except ImportError:  # a declared dependency, but keep working without it (tested)
            lapjv = None
        if lapjv is not None:
            # lapjv's start (column reduction, then augmenting row reduction) stalls on cores whose
            # costs are near-ties shifted by per-row constants: 15.7 s on the 6,535-square core of
            # a 16,384 x 2,304 unit-vector pair (40 % unpartnered), 2.5 s once each row's minimum
            # is subtracted (4.2 s either way on a norm-spread core). Row constants change neither
            # the optimal assignment nor the column potentials' reduced costs E_ij - E_i,pc(i) + p_pc(i) - p_j.
            row_to_col, _, (_, _, p) = lapjv(E - E.min(axis=1, keepdims=True), force_doubles=True)
            pc = np.asarray(row_to_col, dtype=np.int64)
            if pc.shape == (r,) and pc.min() >= 0 and np.bincount(pc, minlength=c).max() == 1:
                return pc, np.asarray(p, dtype=np.float64), "lapjv"
    r_i, c_i = linear_sum_assignment(E)
    pc = np.empty(r, dtype=np.int64)
    pc[r_i] = c_i
    return pc, None, "scipy"


def _negative_reduced(
    E: np.ndarray, u: np.ndarray, v: np.ndarray, tau: float, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(i, j)`` with :math:`E_{ij} - u_i - v_j < -\tau`, in row chunks.

    Chunked into one small reused buffer: a fresh full-size temporary was measured to cost
    more in page faults than the arithmetic (0.16 s for a 3,265-square float64 block).
    """
    n, m = E.shape
    buf = np.empty((min(chunk, max(n, 1)), m))
    neg = np.empty(buf.shape, dtype=bool)
    out_r, out_c = [], []
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        b = buf[: i1 - i0]
        np.subtract(E[i0:i1], u[i0:i1, None], out=b)
        b -= v[None, :]
        x = neg[: i1 - i0]
        np.less(b, -tau, out=x)
        # nonzero only where there is something to find: on a clean chunk it cost 5x the
        # comparison (measured, 0.33 s of 4.9 s at 8,192 x 1,024 with 60 % unpartnered)
        if not x.any():
            continue
        r, c = np.nonzero(x)
        out_r.append(r + i0)
        out_c.append(c)
    if not out_r:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_r), np.concatenate(out_c)


def _sparse_core_assign(
    E: np.ndarray, eps: float, tau: float, k: int = _SPARSE_CORE_K
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    r"""Optimal assignment of a square core from its rows' k cheapest entries, proved on all of it.

    The core of a pair with many unpartnered features is a random-like assignment problem
    whose optimum uses only a few of each row's cheapest entries. LAPMOD (the sparse
    Jonker-Volgenant of the ``lap`` package [1]_) solves the graph of each row's ``k``
    cheapest entries; the largest feasible column duals :math:`v \le 0` on that graph come
    from label-correcting shortest paths (:func:`_label_correct`); and one dense pass checks
    :math:`E_{ij} - u_i - v_j \ge -\tau` for **every** entry of the core, with
    :math:`u_i = E_{i\pi(i)} - v_{\pi(i)}`. When it holds, the assignment is optimal for the
    whole core (LP duality, as in the module docstring) and ``v`` are already the largest
    feasible duals. When it fails for a few rows, those rows are unassigned (the others keep
    feasible, tight duals) and re-inserted by shortest augmenting paths on the dense block
    (:func:`_augment_rows`), which ends optimal with feasible potentials. When it fails for
    many rows (more than 2 % of the core or 32, at most :data:`_AUGMENT_MAX`), None is
    returned and the caller uses lapjv.

    Measured on a random 3,265-square core of unit vectors (d = 1,024): lapjv 1.27 s, scipy
    1.13 s, LAPMOD on 32 entries per row 0.035 s (16 per row missed the optimum). On the
    3,265-row core of the 8,192 x 1,024 planted pair with 40 % unpartnered, 2-6 rows fail the
    check at k = 24-32 and none at 48; the label-correcting duals cost 0.10-0.29 s from k = 24
    to 64, so k = 32 with the repair. On cores with spread column norms the rows' cheapest
    entries miss the optimum (``docs/decisions.md``), and the dense check sends those to lapjv.

    Returns ``(pc, v, largest)`` (``largest``: ``v`` are the largest feasible duals, else
    only feasible potentials) or None (``lap`` missing, too many rows failing the check, no
    perfect matching on the graph).
    """
    try:
        from lap import lapmod  # a declared dependency; keep working without it
    except ImportError:
        return None
    n = E.shape[0]
    if E.shape[1] != n or k >= n:
        return None
    ar = np.arange(n)
    cols = np.sort(_row_topk(E, k), axis=1).reshape(-1)
    rows = np.repeat(ar, k)
    ii = np.arange(0, n * k + 1, k)
    w = E[rows, cols]
    # LAPMOD takes non-negative costs: subtract each row's smallest (the row minimum: the graph
    # holds each row's cheapest entries), which leaves the optimum unchanged
    w0 = w - np.minimum.reduceat(w, ii[:-1])[rows]
    try:
        pc, _ = lapmod(n, w0, ii, cols, return_cost=False)
    except (ValueError, RuntimeError):  # e.g. a graph without a perfect matching
        return None
    pc = np.asarray(pc, dtype=np.int64)
    if pc.shape != (n,) or pc.min() < 0 or np.bincount(pc, minlength=n).max() != 1:
        return None
    e = E[ar, pc]
    src = pc[rows]
    off = cols != src
    v_t = _label_correct(
        torch.zeros(n, dtype=torch.float64),
        torch.from_numpy(src[off]),
        torch.from_numpy(cols[off]),
        torch.from_numpy(w[off] - e[rows[off]]),
        eps,
        "min",
    )
    if v_t is None:
        return None
    v = v_t.numpy().copy()
    br, _ = _negative_reduced(E, e - v[pc], v, tau)
    if br.size == 0:
        return pc, v, True
    bad = np.unique(br)
    if bad.size > min(_AUGMENT_MAX, max(32, n // 50)):
        return None
    # the other rows keep feasible, tight duals: re-insert the failing ones
    y = np.empty(n, dtype=np.int64)
    y[pc] = ar
    y[pc[bad]] = -1
    pc[bad] = -1
    if not _augment_rows(E, pc, y, v):
        return None
    return pc, v, False


def _dense_core_duals(
    E: np.ndarray,
    pc: np.ndarray,
    e: np.ndarray,
    eps: float,
    times: dict[str, float],
    k: int = 16,
    chunk: int = 256,
) -> np.ndarray | None:
    r"""Largest feasible column duals :math:`v \le 0` of a dense core solved without potentials.

    ``pc[i]`` is row i's column, ``e[i] = E[i, pc[i]]``; the answer is the fixpoint of
    :math:`v_j \leftarrow \min(v_j, \min_i E_{ij} - u_i)` with :math:`u_i = e_i - v_{pc(i)}`
    (shortest paths from a virtual source, label correcting: scipy's rectangular solver
    returns no potentials for Dijkstra). Each dense sweep is one pass over ``E`` in row
    chunks through a small reused buffer; every fourth, most remaining hops are settled
    sparsely on each row's ``k`` smallest reduced costs (:func:`_label_correct`), so a few
    dense sweeps suffice instead of hundreds. The torch version this replaces built two
    full-size temporaries per sweep (18-29 % of the solver's time on rectangular pairs with
    25-60 % unpartnered, measured). None if it does not settle.
    """
    nr, nc = E.shape
    tk = min(nc, k)
    v = np.zeros(nc)
    buf = np.empty((min(chunk, nr), nc))
    colmin = np.empty(nc)
    src = np.repeat(pc, tk)
    rows = np.repeat(np.arange(nr), tk)
    for sweep in range(4 * nc + 10):
        times["sweeps_core_dense"] = times.get("sweeps_core_dense", 0) + 1
        u = e - v[pc]
        colmin[:] = np.inf
        for i0 in range(0, nr, chunk):
            b = buf[: min(chunk, nr - i0)]
            np.subtract(E[i0 : i0 + chunk], u[i0 : i0 + chunk, None], out=b)  # v_j may not exceed it
            np.minimum(colmin, b.min(0), out=colmin)
        new = np.minimum(v, colmin)
        if not (new < v - eps).any():
            return v
        v = new
        if sweep % 4 == 0:
            # each row's tk smallest reduced costs E_ij - v_j (row constants do not change the order)
            dst = _row_topk(E, tk, v, chunk).reshape(-1)
            w = E[rows, dst] - e[rows]
            keep = src != dst
            vs = _label_correct(
                torch.from_numpy(v),
                torch.from_numpy(src[keep]),
                torch.from_numpy(dst[keep]),
                torch.from_numpy(w[keep]),
                eps,
                "min",
            )
            if vs is None:
                return None
            v = vs.numpy().copy()
    return None


def _largest_duals_dijkstra(E: np.ndarray, pc: np.ndarray, p: np.ndarray) -> np.ndarray:
    r"""Largest :math:`v \le 0` with :math:`v_j \le v_{pc(i)} + E_{ij} - E_{i\,pc(i)}` on a square core.

    These are shortest-path distances from a virtual source (arcs of length 0 into every
    column; arcs :math:`pc(i) \to j` of length :math:`E_{ij} - E_{i\,pc(i)}`), the same
    numbers the label-correcting sweeps converge to. With feasible potentials ``p`` all reduced
    arc lengths are non-negative, so Dijkstra applies: one pass over the n columns, each
    relaxing one dense row (O(n^2), vectorised per row). Reduced lengths that rounding makes
    slightly negative are harmless: the certificate re-checks every core pair.
    """
    n = E.shape[0]
    owner = np.empty(n, dtype=np.int64)
    owner[pc] = np.arange(n)
    e = E[np.arange(n), pc]
    top = float(p.max())
    d = top - p  # reduced distances via the source arcs
    blocked = np.zeros(n)
    final = np.empty(n)
    cand = np.empty(n)
    for _ in range(n):
        j = int(np.argmin(d))
        dj = float(d[j])
        final[j] = dj
        blocked[j] = math.inf
        i = owner[j]
        # reduced length of j -> l: E_il - e_i + p_j - p_l
        np.subtract(E[i], e[i] - p[j] - dj, out=cand)
        cand -= p
        cand += blocked
        np.minimum(d, cand, out=d)
        d[j] = math.inf
    return np.minimum(final + p - top, 0.0)


def _positions(ids: np.ndarray, sub: np.ndarray) -> np.ndarray | None:
    """Positions of ``sub``'s ids in ``ids`` (both of unique ids, in any order), or None if one
    is missing."""
    order = np.argsort(ids, kind="stable")
    k = np.searchsorted(ids[order], sub)
    if k.size and (k.max() >= ids.size or not np.array_equal(ids[order[np.minimum(k, ids.size - 1)]], sub)):
        return None
    return order[np.minimum(k, max(ids.size - 1, 0))]


def _warm_assign(
    E: np.ndarray, R: np.ndarray, C: np.ndarray, prev: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    r"""Optimal assignment of a grown square core from the previous round's, by augmenting paths.

    ``prev = (R0, C0, pc0, p0)``: the previous core's rows and columns (subsets of ``R`` and
    ``C``; ids in any order, e.g. :class:`_CoreBlock`'s), its optimal assignment (``pc0[i]`` = position in ``C0`` of row ``R0[i]``'s
    column) and Jonker-Volgenant column potentials ``p0`` (:math:`E_{ij} - u_i - p_j \ge 0`,
    equality on the assignment, :math:`u_i = E_{i\,pc(i)} - p_{pc(i)}`). Between rounds
    only a few rows and as many columns join the core, so instead of solving the new core
    from scratch (one lapjv call: 0.7 s at 3,269 rows, measured) the old rows keep their
    columns and potentials, each new column gets the largest potential the old rows allow
    (:math:`p_j = \min_i E_{ij} - u_i`), and every new row is inserted by one shortest
    augmenting path (Dijkstra on the reduced costs, dense rows, vectorised per step) with
    the potential update of JV's augmentation phase [1]_, which keeps the potentials
    feasible and the assignment optimal on the rows placed so far. The result is an optimal
    assignment of the new core with feasible potentials, like lapjv's; nothing downstream
    trusts it (the certificate re-checks every core pair).

    Returns ``(pc, p)`` for the new core, or None when the previous core is not contained in
    the new one or more than :data:`_WARM_MAX` rows joined (the caller then solves from
    scratch).
    """
    R0, C0, pc0, p0 = prev
    n = R.size
    if n != C.size or R0.size == 0 or R0.size > n or n - R0.size > _WARM_MAX:
        # many new rows: one Dijkstra each in numpy (measured ~10 ms per row at 4,145 rows,
        # 4 s for the 414 rows of one round) costs more than a fresh sparse solve (LAPMOD, about
        # 0.3 s at 4,189 rows: measured at 8,192 x 1,024, 60 % unpartnered / 0.3, the 44 rows of
        # the third round took 0.6 s more as augmenting paths than solved afresh)
        return None
    ir = _positions(R, R0)
    ic = _positions(C, C0)
    if ir is None or ic is None:
        return None
    x = np.full(n, -1, dtype=np.int64)  # column of each row
    y = np.full(n, -1, dtype=np.int64)  # row of each column
    x[ir] = ic[pc0]
    y[x[ir]] = ir
    v = np.empty(n)
    v[ic] = p0
    new_c = np.flatnonzero(y < 0)
    if new_c.size:
        u_old = E[ir, x[ir]] - v[x[ir]]
        v[new_c] = (E[np.ix_(ir, new_c)] - u_old[:, None]).min(0)
    if not _augment_rows(E, x, y, v):
        return None
    return x, v


def _augment_rows(E: np.ndarray, x: np.ndarray, y: np.ndarray, v: np.ndarray) -> bool:
    r"""Insert every free row (``x < 0``) of a square block by one shortest augmenting path each.

    ``x``/``y`` (row -> column, column -> row, -1 = free) and the column potentials ``v``
    are updated in place. Precondition: :math:`E_{ij} - u_i - v_j \ge 0` for every assigned
    row i and every column j, with equality on the assignment (:math:`u_i = E_{i x(i)} -
    v_{x(i)}`). Dijkstra on the reduced costs from the free row to the nearest free column,
    then JV's dual update on the scanned columns [1]_ keeps that invariant, so the result is
    an optimal assignment of the block with feasible potentials. O(n) numpy work per scanned
    column. Returns False if a path cannot be found (not on a finite square block).
    """
    n = E.shape[0]
    dm = np.empty(n)  # tentative distances; +inf once scanned
    final = np.empty(n)  # distances of the scanned columns
    blocked = np.empty(n)  # 0, or +inf once scanned (so a scanned column never improves)
    cand = np.empty(n)
    better = np.empty(n, dtype=bool)
    pred = np.empty(n, dtype=np.int64)
    for f in np.flatnonzero(x < 0):
        np.subtract(E[f], v, out=dm)
        pred[:] = f
        blocked[:] = 0.0
        scanned = []
        # each step is a few whole-array operations, no fancy indexing: 1.6x faster than
        # masking with ~scanned (measured on the 4,855-row cores of 8,192 x 1,024, 60 % unpartnered)
        while True:
            j = int(np.argmin(dm))
            dj = float(dm[j])
            if not math.isfinite(dj):
                return False  # cannot happen on a finite square block
            scanned.append(j)
            final[j] = dj
            dm[j] = math.inf
            blocked[j] = math.inf
            i = int(y[j])
            if i < 0:
                break
            # reduced cost of i -> l: E_il - u_i - v_l with u_i = E_ij - v_j (tight)
            np.subtract(E[i], E[i, j] - v[j] - dj, out=cand)
            cand -= v
            cand += blocked
            np.less(cand, dm, out=better)
            np.copyto(pred, i, where=better)
            np.minimum(dm, cand, out=dm)
        # JV's dual update on the scanned columns, then augment along the path
        sc = np.asarray(scanned, dtype=np.int64)
        v[sc] += final[sc] - dj
        while True:
            i = int(pred[j])
            y[j] = i
            j_prev = int(x[i])
            x[i] = j
            if i == f:
                break
            j = j_prev
    return not (x < 0).any() and np.bincount(x, minlength=n).max() == 1


class _CoreBlock:
    """The core's float64 effective costs ``E[R][:, C]``, grown in place between rounds.

    The core only grows between rounds (rows leave the fixed set, their columns join). Rows
    and columns are kept in *arrival order* (the previous round's first, in their order, then
    the new ones, sorted), so a grown block is the old one plus new rows and new columns, and
    with spare capacity (``spare`` of the size, at least ``min_spare``, within ``budget``
    entries) both are written in place: only the new products are computed, nothing is copied
    and no new block is allocated. Before, each round allocated a new block and scattered the
    old one into it: at 8,192 x 1,024 with 60 % unpartnered that was three 4,200-4,900-square
    float64 blocks, 57-60 % of the solver's time (measured; fresh pages cost more than the
    arithmetic on the benchmark machine). A block that outgrows its capacity moves once into a
    larger one; one that does not contain the previous core is computed afresh.

    ``compute(rows, cols, out)`` writes ``E[rows][:, cols]`` into the float64 array ``out``.
    """

    def __init__(
        self,
        compute: Any,
        n_rows: int,
        n_cols: int,
        budget: float = math.inf,
        spare: float = 0.125,
        min_spare: int = 64,
    ) -> None:
        self.compute = compute
        self.n_rows, self.n_cols = n_rows, n_cols
        self.budget, self.spare, self.min_spare = budget, spare, min_spare
        self.buf: np.ndarray | None = None
        self.R = np.zeros(0, dtype=np.int64)
        self.C = np.zeros(0, dtype=np.int64)
        self.reallocations = 0  # blocks allocated (checked by the tests)

    def _alloc(self, r: int, c: int) -> np.ndarray:
        def cap(size: int, limit: int) -> int:
            return min(limit, size + max(self.min_spare, int(self.spare * size)))

        cr, cc = cap(r, self.n_rows), cap(c, self.n_cols)
        if float(cr) * float(cc) > max(self.budget, float(r) * float(c)):
            cr, cc = r, c  # no room for spare capacity
        self.reallocations += 1
        return _empty_f64((cr, cc))

    def update(self, R_set: np.ndarray, C_set: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The block for the core rows ``R_set`` and columns ``C_set`` (sorted ids).

        Returns ``(R, C, E)``: the same ids in the block's order and the float64 view
        ``E[i, j] = e[R[i], C[j]]`` (rows strided by the capacity).
        """
        r, c = R_set.size, C_set.size
        if r == 0:
            return R_set, C_set, np.zeros((0, c))
        old_r, old_c = self.R.size, self.C.size
        grow = (
            self.buf is not None
            and old_r + old_c > 0
            and bool(np.isin(self.R, R_set, assume_unique=True).all())
            and bool(np.isin(self.C, C_set, assume_unique=True).all())
        )
        if not grow:
            self.buf = self._alloc(r, c)
            self.R, self.C = R_set.astype(np.int64, copy=True), C_set.astype(np.int64, copy=True)
            if r and c:
                self.compute(self.R, self.C, self.buf[:r, :c])
            return self.R, self.C, self.buf[:r, :c]
        assert self.buf is not None
        new_r = R_set[~np.isin(R_set, self.R, assume_unique=True)]
        new_c = C_set[~np.isin(C_set, self.C, assume_unique=True)]
        if r > self.buf.shape[0] or c > self.buf.shape[1]:
            bigger = self._alloc(r, c)
            bigger[:old_r, :old_c] = self.buf[:old_r, :old_c]
            self.buf = bigger
        self.R = np.concatenate([self.R, new_r])
        self.C = np.concatenate([self.C, new_c])
        if new_r.size and c:
            self.compute(new_r, self.C, self.buf[old_r:r, :c])
        if new_c.size and old_r:
            self.compute(self.R[:old_r], new_c, self.buf[:old_r, old_c:c])
        return self.R, self.C, self.buf[:r, :c]


def _core_solve(
    ra: _Side,
    cb: _Side,
    metric: str,
    cols: np.ndarray,
    ec: np.ndarray,
    ell: np.ndarray,
    alpha: np.ndarray,
    tau: float,
    max_rounds: int,
    core_max_entries: float,
    info: SparseMatchInfo,
    times: dict[str, float],
    mm_threads: int = 0,
    weak_pairs: bool = True,
    kept: _KeptRows | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    r"""Exact assignment with a certificate, fast when most features have an obvious partner.

    Works on the *effective* costs :math:`e_{ij} = C_{ij} - \alpha_j` (:math:`\alpha_j =
    |b_j|^2/D` for square mse, else 0; a full assignment uses every column once, so the
    optimum is the same). ``cols``/``ec`` are the candidates and their effective costs,
    ``ell[i]`` a lower bound on :math:`e_{ij}` for every column not in ``cols[i]``.

    1. *Fixed pairs*: mutual best candidates (row i's cheapest candidate is j and no other row
       lists j more cheaply), except *weak* ones whose gap :math:`\ell_i - e_{ij}` is at most
       the 90th percentile of the other rows' gaps (the smallest gaps first, at most 2% of the core's size or 32). Everything else is the *core*: rows :math:`R`, and all
       columns :math:`C` not taken by a fixed pair.
    2. The core is solved **exactly and densely**: its :math:`|R|\times|C|` costs are one small
       product, solved by :func:`_lsa_with_potentials` (lapjv for square cores, else scipy
       ``linear_sum_assignment``).
    3. Duals. Core columns: the largest feasible :math:`v \le 0` on the dense core (Dijkstra
       from lapjv's potentials, :func:`_largest_duals_dijkstra`; without potentials, label
       correcting, :math:`v_j \leftarrow \min(v_j, \min_i e_{ij} - u_i)`). Fixed columns: the
       *smallest* feasible values (highest prices), :math:`v_{\pi(r)} = \max(V - g_r,
       \max_{l} v_l - (e_{rl} - e_{r\pi(r)}))` with :math:`g_r = \ell_r - e_{r\pi(r)}` and
       :math:`V = \max v`, so that other rows are least tempted by taken columns.
       :math:`u_i = e_{i\pi(i)} - v_{\pi(i)}` makes every matched edge tight.
    4. Certificate for **every pair**: known edges (candidates, the dense core) directly; an
       excluded pair (i, j) has :math:`e_{ij} - u_i - v_j \ge \ell_i - u_i - v_j`, which is
       :math:`\ge -\tau` unless :math:`v_j > \theta_i = \ell_i - u_i + \tau`. With the columns
       sorted by :math:`v`, the columns a row must check exactly are a prefix; rows with a
       non-empty prefix get exactly that prefix recomputed (one small product).
    5. Violations move their rows (and the owners of their columns) into the core; repeat.

    Returns the matching (column per row) and its effective costs, or None (core too large, or not certified in
    ``max_rounds``; the caller then runs the general sparse loop).
    """
    n, m = ra.n, cb.n
    kk = cols.shape[1]
    ar = np.arange(n)
    best = ec.argmin(1)
    bcol = cols[ar, best]
    bval = ec[ar, best]
    colmin = torch.full((m,), math.inf, dtype=torch.float64)
    colmin.scatter_reduce_(0, torch.from_numpy(cols.reshape(-1)), torch.from_numpy(ec.reshape(-1)), "amin")
    mutual = np.flatnonzero(bval <= colmin.numpy()[bcol])
    _, first = np.unique(bcol[mutual], return_index=True)
    fixed_rows = np.zeros(n, dtype=bool)
    fixed_rows[mutual[first]] = True
    # Weak pairs go to the core up front. A row without a partner is sometimes mutual-best with
    # a column without one by chance; its pair then has a gap g = ell - best as small as a core
    # row's, and its column, priced at V - g, tempts hundreds of core rows: the first certificate
    # fails and the core is solved a second time (measured on planted pairs: 7 such rows at
    # 24,576 x 768, 4 at 16,384 x 2304, all below the core rows' median gap, true pairs >= 1.4x
    # above it). Such pairs are rare, so at most 2% of the core's size (or 32) move, the smallest gaps
    # first, and never past the n/3 limit below: on pairs with less structure (late layers of
    # the planted stack) many true pairs also fall under the median, and moving them all made
    # the core the whole problem (measured: 208 s instead of 5.5 s). The gap limit is the 90th
    # percentile of the core rows' gaps (was the median, which let 2-4 such pairs through on
    # unit-vector pairs at 8,192 x 1,024 with 10 % and 40 % unpartnered: a second round each;
    # measured, the 90th percentile certifies both in one round). Only speed depends on this
    # rule; the certificate decides correctness.
    gap = ell - bval
    n_core = int((~fixed_rows).sum())
    if weak_pairs and n_core >= 16 and fixed_rows.any():
        cand_w = np.flatnonzero(
            fixed_rows & (gap <= float(np.quantile(gap[~fixed_rows], _WEAK_GAP_QUANTILE)))
        )
        cap = min(max(math.ceil(_WEAK_MAX_FRACTION * n_core), 32), max(0, int(_CORE_ALL_SHARE * n) - n_core))
        weak = cand_w[np.argsort(gap[cand_w], kind="stable")[:cap]]
        fixed_rows[weak] = False
        info.weak_moved = int(weak.size)
    owner = np.full(m, -1, dtype=np.int64)  # fixed row owning each column
    owner[bcol[fixed_rows]] = np.flatnonzero(fixed_rows)
    if (~fixed_rows).sum() > _CORE_ALL_SHARE * n:
        # little structure: one core for everything (the dense problem) beats growing rounds
        fixed_rows[:] = False
        owner[:] = -1
    eps = 1e-15 * max(float(np.abs(ec).max()) if ec.size else 1.0, 1e-300) + 1e-300
    info.core_rows = []
    block = _CoreBlock(
        lambda rr, cc, o: _eff_block(ra, cb, rr, cc, metric, alpha, mm_threads, kept, out=o),
        n,
        m,
        budget=core_max_entries,
    )
    prev_sol: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    for rnd in range(1, max_rounds + 1):
        info.rounds = rnd
        R = np.flatnonzero(~fixed_rows)
        C = np.flatnonzero(owner < 0)
        info.core_rows.append(int(R.size))
        info.dummies_used.append(0)
        if float(R.size) * float(C.size) > core_max_entries:
            return None
        # ---- dense exact core ------------------------------------------------------------
        t = time.perf_counter()
        R, C, E_np = block.update(R, C)  # R, C now in the block's order
        E = torch.from_numpy(E_np)
        times["core"] += time.perf_counter() - t
        t = time.perf_counter()
        match_col = np.full(n, -1, dtype=np.int64)
        e_match = np.empty(n)
        F = np.flatnonzero(fixed_rows)
        match_col[F] = bcol[F]
        e_match[F] = bval[F]
        pot = None
        largest = False  # whether pot are already the largest feasible duals <= 0
        if R.size:
            warm = _warm_assign(E_np, R, C, prev_sol) if prev_sol is not None else None
            sp = (
                _sparse_core_assign(E_np, eps, tau)
                if warm is None and R.size == C.size and R.size >= _LAPJV_MIN
                else None
            )
            if warm is not None:
                (pc, pot), lsa_name = warm, info.core_solver.split("+")[0] + "+augment"
            elif sp is not None:
                pc, pot, largest = sp
                lsa_name = "lapmod"
            else:
                pc, pot, lsa_name = _lsa_with_potentials(E_np)
            if pot is not None:
                prev_sol = (R, C, pc, pot)
            info.core_solver = lsa_name
            match_col[R] = C[pc]
            e_match[R] = E_np[np.arange(R.size), pc]
        times["solve"] += time.perf_counter() - t
        # ---- duals ------------------------------------------------------------------------
        t = time.perf_counter()
        v = np.zeros(m)
        if pot is not None:
            t_d = time.perf_counter()
            v[C] = pot if largest else _largest_duals_dijkstra(E_np, pc, pot)
            times["duals_core_dense"] = times.get("duals_core_dense", 0.0) + time.perf_counter() - t_d
        elif R.size:
            t_d = time.perf_counter()
            vC = _dense_core_duals(E_np, pc, e_match[R], eps, times)
            if vC is None:
                times["duals"] += time.perf_counter() - t
                return None
            v[C] = vC
            times["duals_core_dense"] = times.get("duals_core_dense", 0.0) + time.perf_counter() - t_d
        V = float(v.max()) if m else 0.0
        t_f = time.perf_counter()
        if F.size:
            fc = bcol[F]
            # (a row with no excluded column has ell = inf: any finite start below V will do)
            span = 2.0 * (float(np.abs(ec).max()) + float(np.abs(v).max())) + 1.0
            v[fc] = V - np.minimum(ell[F] - bval[F], span)
            # longest-path sweeps over the fixed rows' candidate edges (prices as high as allowed)
            src = cols[F].reshape(-1)
            dst = np.repeat(fc, kk)
            w = (ec[F] - bval[F][:, None]).reshape(-1)
            keep = src != dst
            src_t, dst_t, w_t = (
                torch.from_numpy(src[keep]),
                torch.from_numpy(dst[keep]),
                torch.from_numpy(w[keep]),
            )
            v_t = _label_correct(torch.from_numpy(v), src_t, dst_t, w_t, eps, "max")
            if v_t is None:
                times["duals"] += time.perf_counter() - t
                return None
            v = v_t.numpy().copy()
        times["duals_fixed"] = times.get("duals_fixed", 0.0) + time.perf_counter() - t_f
        if m > n:
            # rectangular: the LP dual needs v <= 0 everywhere and v = 0 on the unused columns
            used = np.zeros(m, dtype=bool)
            used[match_col] = True
            if float(v.max()) > 0.0 or (~used).any() and float(v[~used].min()) < -tau:
                times["duals"] += time.perf_counter() - t
                return None
        u = e_match - v[match_col]
        times["duals"] += time.perf_counter() - t
        # ---- certificate: known edges ------------------------------------------------------
        t = time.perf_counter()
        in_core_col = owner < 0
        rc = ec - u[:, None] - v[cols]
        known_elsewhere = (~fixed_rows)[:, None] & in_core_col[cols]
        bad = (rc < -tau) & ~known_elsewhere
        vr, vc_ = np.nonzero(bad)
        viol_rows = [vr]
        viol_cols = [cols[vr, vc_]]
        if R.size:
            # numpy in chunks: torch's single-threaded broadcast took 5x longer (measured)
            br, bc = _negative_reduced(E.numpy(), u[R], v[C], tau)
            viol_rows.append(R[br])
            viol_cols.append(C[bc])
        times["certificate"] += time.perf_counter() - t
        # ---- certificate: excluded pairs, exactly where the bound cannot clear them ------------
        t = time.perf_counter()
        theta = ell - u + tau
        n_checked = 0
        for rows_grp, col_pool in ((F, np.arange(m)), (R, np.flatnonzero(~in_core_col))):
            if rows_grp.size == 0 or col_pool.size == 0:
                continue
            order = col_pool[np.argsort(-v[col_pool], kind="stable")]
            v_sorted_neg = -v[order]
            p = np.searchsorted(v_sorted_neg, -theta[rows_grp], side="left")  # #cols with v > theta
            need = np.flatnonzero(p > 0)
            if need.size == 0:
                continue
            rows_need = rows_grp[need]
            p_need = p[need]
            srt = np.argsort(-p_need, kind="stable")
            rows_need, p_need = rows_need[srt], p_need[srt]
            n_checked += int(rows_need.size)
            pos = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
            pos[order] = np.arange(order.size)
            s0 = 0
            while s0 < rows_need.size:
                pmax = int(p_need[s0])
                nr = max(1, min(rows_need.size - s0, (1 << 23) // max(pmax, 1)))
                rws = rows_need[s0 : s0 + nr]
                cset = order[:pmax]
                e_blk = _eff_block(ra, cb, rws, cset, metric, alpha, mm_threads, kept)
                rcb = e_blk - torch.from_numpy(u[rws])[:, None] - torch.from_numpy(v[cset])[None, :]
                # only the prefix of each row, and not its candidates (checked above)
                jj = torch.arange(pmax)
                mask = jj[None, :] >= torch.from_numpy(p_need[s0 : s0 + nr])[:, None]
                cp = torch.from_numpy(pos[cols[rws]])
                cp_ok = cp < pmax
                rr = torch.arange(nr)[:, None].expand_as(cp)
                mask[rr[cp_ok], cp[cp_ok]] = True
                rcb[mask] = math.inf
                br, bc = torch.nonzero(rcb < -tau, as_tuple=True)
                viol_rows.append(rws[br.numpy()])
                viol_cols.append(cset[bc.numpy()])
                s0 += nr
        times["recheck"] += time.perf_counter() - t
        info.rows_rechecked.append(n_checked)
        vrows = np.concatenate(viol_rows)
        vcols = np.concatenate(viol_cols)
        info.violations.append(int(vrows.size))
        if vrows.size == 0:
            return match_col, e_match
        # ---- grow the core -----------------------------------------------------------------
        move = np.unique(np.concatenate([vrows, owner[vcols][owner[vcols] >= 0]]))
        move = move[fixed_rows[move]]
        owner[match_col[move]] = -1
        fixed_rows[move] = False
        if (~fixed_rows).sum() > _CORE_ALL_SHARE * n:
            # little structure (e.g. unrelated SAEs): growing the core by a few rows per round
            # would re-solve it many times; solve the whole problem as one core instead
            fixed_rows[:] = False
            owner[:] = -1
    return None


# --------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _core_budget(core_max_entries: float | None) -> float:
    """Largest dense core (entries) the fast path may build: ~10% of available RAM in float64."""
    if core_max_entries is not None:
        return float(core_max_entries)
    return max(1e6, 0.1 * float(psutil.virtual_memory().available) / 8.0)


#: The main pass keeps float32 products (``4 F_B`` bytes per row) of at most this much memory
#: and at most :data:`KEEP_PRODUCTS_RAM_SHARE` of the available RAM.
KEEP_PRODUCTS_MAX_BYTES = 2 * 2**30
KEEP_PRODUCTS_RAM_SHARE = 0.25


def _keep_products(n: int, m: int, device: torch.device, keep: bool | None) -> _KeptRows | None:
    """What the main pass keeps of its products (``keep``: the user's choice).

    * ``True``: every row (CPU or GPU), when all ``4 n m`` bytes fit within
      :data:`KEEP_PRODUCTS_MAX_BYTES` and :data:`KEEP_PRODUCTS_RAM_SHARE` of the available
      RAM; else nothing. Saves every later product: the core block, the prefix and row
      rechecks, and the dense fallback.
    * ``None`` (default): on the CPU, the rows predicted to join the core
      (:class:`_KeptRows`), as many as fit within the same limits; on a GPU nothing.
    * ``False``: nothing; every later number is multiplied again.

    Why the prediction by default: keeping *every* row was not faster. At 8,192 x 1,024 the
    core's 3,277 rows took 0.2-0.3 s to multiply and 0.13 s to gather, while first touching
    the whole kept matrix added 0.35 s to the pass at 8,192 x 8,192 and 1-2 s at
    16,384 x 16,384 (page faults on the benchmark machine). Keeping only the rows that will
    be multiplied again costs their share of that (none when every row has a clear partner)
    and saves the core's product. Measurements: docs/benchmarks.md, section bench_regimes.
    """
    if keep is False or (keep is None and device.type != "cpu"):
        return None
    limit = min(KEEP_PRODUCTS_MAX_BYTES, KEEP_PRODUCTS_RAM_SHARE * psutil.virtual_memory().available)
    if keep:
        return _KeptRows(n, m, device, n, predict=False) if 4.0 * n * m <= limit else None
    capacity = min(n, int(limit // (4.0 * max(m, 1))))
    return _KeptRows(n, m, device, capacity, predict=True) if capacity > 0 else None


#: Rows sampled by :func:`predicted_core_share` (``solver="auto"``'s rectangular switch).
AUTO_SAMPLE_ROWS = 256


def predicted_core_share(
    ra: _Side, cb: _Side, metric: str, sample: int = AUTO_SAMPLE_ROWS, seed: int = 0
) -> float:
    """Share of rows without a mutual-best partner, estimated from a sample of rows.

    ``sample`` random rows get their full cost rows (one ``sample x m`` product), and each
    row's cheapest column its full cost column (one ``n x sample`` product); the row is
    mutual-best when that column's cheapest row is the row itself. The rows that are not
    are the core of :func:`_core_solve` (before weak pairs join it). Costs about
    ``2 sample / n`` of the main pass (6 % at 6,144 x 8,192); the estimate's standard error
    is at most :math:`0.5/\\sqrt{\\text{sample}}` (0.03).
    """
    n = ra.n
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(n, sample), replace=False))
    r_t = torch.from_numpy(rows)
    g = (ra.rows()[r_t.to(ra.device)] @ cb.cols_t()).cpu()
    best = _costs_from_g(g, ra.sq[r_t][:, None], cb.sq[None, :], metric, ra.dim).argmin(1).numpy()
    ucols, inv = np.unique(best, return_inverse=True)
    c_t = torch.from_numpy(ucols)
    gc = (ra.rows() @ cb.rows()[c_t.to(cb.device)].T).cpu()
    col_best = _costs_from_g(gc, ra.sq[:, None], cb.sq[c_t][None, :], metric, ra.dim).argmin(0).numpy()
    return float(np.mean(col_best[inv] != rows))


def _dense_fits(n: int, m: int, limit_bytes: float | None) -> bool:
    need = 8.0 * n * m * 1.5
    if limit_bytes is None:
        limit_bytes = 0.5 * psutil.virtual_memory().available
    return need <= limit_bytes


def sparse_match(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    metric: Metric = "mse",
    k: int = 16,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    max_rounds: int = 8,
    return_info: bool = False,
    *,
    tol: float = 1e-12,
    dense_fallback: bool = True,
    dense_max_bytes: float | None = None,
    core: bool = True,
    core_max_entries: float | None = None,
    weak_pairs: bool = True,
    auto_dense_share: float | None = None,
    keep_products: bool | None = None,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, SparseMatchInfo]:
    """Exact minimum-cost assignment between the rows of two feature matrices, with a certificate.

    Solves

    .. math::

        \\min_{\\pi\\ \\text{injective}} \\sum_i C_{i\\pi(i)},\\qquad
        C^{mse}_{ij} = \\frac{\\|a_i\\|^2 + \\|b_j\\|^2 - 2 a_i\\cdot b_j}{D},\\quad
        C^{cos}_{ij} = 1 - \\frac{a_i\\cdot b_j}{\\|a_i\\|\\|b_j\\|},

    with the costs of :func:`featmatch.matching.pairwise_cost` (its arithmetic on float32
    products computed here, so equal to its numbers up to the rounding of those products,
    :func:`featmatch.matching._costs.rounding_bound`), without ever holding the
    :math:`F_A\\times F_B` matrix: top-k candidates per row from one blocked product, a
    sparse exact assignment (LAPJVsp), duals :math:`(u, v)` by shortest paths, and a check
    that every excluded pair has reduced cost :math:`C_{ij} - u_i - v_j \\ge -\\tau`, which by
    LP duality proves the assignment optimal up to :math:`n\\tau` (see the module docstring).
    Rows the check cannot clear are recomputed in full and their cheap columns added; the
    problem is re-solved until certified (at most ``max_rounds``), else solved dense.

    Parameters
    ----------
    x_a : (F_A, D) torch.Tensor
        Feature vectors of A (e.g. :func:`featmatch.matching.feature_vectors`); cast to float32.
    x_b : (F_B, D) torch.Tensor
    metric : {"mse", "cosine"}
    k : int
        Candidate columns per row in the main pass (default 16: measured faster than 32
        with the fast path, whose dense core does not need long lists; the blocked pass's
        selection pool is half as large).
    block_size : int, optional
        Rows per block of the product (default: :func:`default_block_size`, ~128 MB blocks).
    device : str or torch.device, optional
        Where the blocked product runs; default CUDA when available, else CPU.
    max_rounds : int
        Solve/certify rounds before falling back to the dense solver.
    return_info : bool
        Also return a :class:`SparseMatchInfo`.
    tol : float
        Certificate tolerance :math:`\\tau`, relative to the largest candidate cost.
    dense_fallback : bool
        Allow the dense fallback (else an uncertified result is returned with a warning).
    dense_max_bytes : float, optional
        Memory allowed for the fallback's cost matrix (default: half the available RAM).
    core : bool
        Use the fast path (fixed mutual-best pairs, a dense exact core, price-ordered
        certificate; see :func:`_core_solve`). When it cannot certify within ``max_rounds`` or
        its core would exceed ``core_max_entries``, the general sparse loop (LAPJVsp on the
        candidate graph, shortest-path duals, row rechecks) takes over. ``False`` runs that
        loop directly.
    core_max_entries : float, optional
        Largest dense core (rows x columns) the fast path may build (default: 10% of the
        available RAM in float64).
    weak_pairs : bool
        Move weak mutual-best pairs (gap to the row's bound no larger than the 90th
        percentile of the core rows') into the core before the first solve (default). Affects speed only; ``False``
        is the plain fast path, for ablations.
    auto_dense_share : float, optional
        ``solver="auto"``'s switch (:data:`AUTO_DENSE_CORE_SHARE`): when a sample of
        :data:`AUTO_SAMPLE_ROWS` rows (:func:`predicted_core_share`, before the main pass)
        predicts a *rectangular* core with more than this share of the rows, and the dense
        matrix fits, solve the whole problem densely instead (``info.fallback ==
        "auto-dense"``, ``info.path == "dense"``); None (default) never switches.
    keep_products : bool, optional
        What the main pass keeps of its float32 products, so that later phases (the core, the
        rechecks, a dense solve) gather them instead of multiplying again. ``True``: all of
        them (:math:`4F_AF_B` bytes; every number the certificate uses then comes from one
        product per pair), when they take at most :data:`KEEP_PRODUCTS_MAX_BYTES` (2 GiB) and
        a quarter of the available RAM. Default (None): on the CPU, only the rows predicted
        to join the core (``info.rows_kept``; :class:`_KeptRows`), within the same limits.
        ``False``: none. Only speed depends on this (see :func:`_keep_products`).

    Returns
    -------
    perm : (F_A,) np.ndarray of int64
        Column of B assigned to each row of A; -1 for the ``F_A - F_B`` rows left over when
        ``F_A > F_B``.
    pair_cost : (F_A,) np.ndarray of float64
        ``C'[i, perm[i]]``, the certified numbers (see above); NaN where ``perm[i] == -1``.
    info : SparseMatchInfo
        Only with ``return_info=True``.

    Raises
    ------
    ValueError
        On shape mismatch, non-finite input, or bad options.

    Examples
    --------
    >>> import torch
    >>> from featmatch.matching._lap import sparse_match
    >>> a = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    >>> perm, cost = sparse_match(a, a[torch.arange(299, -1, -1)], k=4)
    >>> bool((perm == torch.arange(299, -1, -1).numpy()).all())
    True
    """
    t_start = time.perf_counter()
    check_option("metric", metric, METRICS)
    if x_a.ndim != 2 or x_b.ndim != 2 or x_a.shape[1] != x_b.shape[1]:
        raise ValueError(
            f"feature vectors must be (F_A, D) and (F_B, D); got {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if int(max_rounds) < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    dev = _resolve_device(device)
    sa, sb = _Side(x_a, dev), _Side(x_b, dev)
    out = _sparse_match_sides(
        sa,
        sb,
        metric,
        int(k),
        block_size,
        int(max_rounds),
        float(tol),
        dense_fallback,
        dense_max_bytes,
        t_start,
        use_core=bool(core),
        core_max_entries=core_max_entries,
        weak_pairs=bool(weak_pairs),
        auto_dense_share=auto_dense_share,
        keep_products=keep_products,
    )
    return out if return_info else out[:2]


def _sparse_match_sides(
    sa: _Side,
    sb: _Side,
    metric: str,
    k: int,
    block_size: int | None,
    max_rounds: int,
    tol: float,
    dense_fallback: bool,
    dense_max_bytes: float | None,
    t_start: float,
    use_core: bool = True,
    core_max_entries: float | None = None,
    weak_pairs: bool = True,
    auto_dense_share: float | None = None,
    keep_products: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, SparseMatchInfo]:
    """:func:`sparse_match` on prepared sides (shared with :func:`match_stack`)."""
    f_a, f_b = sa.n, sb.n
    transposed = f_a > f_b
    ra, cb = (sb, sa) if transposed else (sa, sb)
    n, m = ra.n, cb.n
    info = SparseMatchInfo(k=min(k, max(m, 1)), transposed=transposed, device=str(sa.device))
    times = dict.fromkeys(
        ("prepare", "candidates", "core", "solve", "duals", "certificate", "recheck", "fallback"), 0.0
    )
    info.times = times
    info.violations, info.rows_rechecked, info.dummies_used = [], [], []
    perm_a = np.full(f_a, -1, dtype=np.int64)
    cost_a = np.full(f_a, np.nan, dtype=np.float64)
    if n == 0 or m == 0:
        info.certified, info.gap_bound = True, 0.0
        times["total"] = time.perf_counter() - t_start
        return perm_a, cost_a, info
    bs = block_size or default_block_size(m, n)
    times["prepare"] = time.perf_counter() - t_start

    def _out(perm_r: np.ndarray, cost_r: np.ndarray) -> tuple[np.ndarray, np.ndarray, SparseMatchInfo]:
        if transposed:
            ok = perm_r >= 0
            perm_a[perm_r[ok]] = np.flatnonzero(ok)
            cost_a[perm_r[ok]] = cost_r[ok]
        else:
            perm_a[:] = perm_r
            cost_a[:] = cost_r
            cost_a[perm_a < 0] = np.nan
        times["total"] = time.perf_counter() - t_start
        return perm_a, cost_a, info

    # ---- solver="auto" on a rectangular pair: dense when a sample predicts a large core ----
    if auto_dense_share is not None and n != m and _dense_fits(n, m, dense_max_bytes):
        t = time.perf_counter()
        share = predicted_core_share(ra, cb, metric)
        info.predicted_core_share = share
        times["predict"] = time.perf_counter() - t
        if share > auto_dense_share:
            t = time.perf_counter()
            full = pairwise_cost(ra.x, cb.x, metric=metric, block_size=bs)
            perm_r, cost_r = assign(full)
            del full
            info.fallback, info.path, info.certified, info.gap_bound = "auto-dense", "dense", True, 0.0
            times["fallback"] = time.perf_counter() - t
            return _out(perm_r, cost_r)

    # ---- phase 1: one blocked pass ------------------------------------------------
    t = time.perf_counter()
    square_mse = metric == "mse" and n == m
    kept = _keep_products(n, m, ra.device, keep_products)
    info.products_kept = kept is not None and kept.full
    cols, costs, bounds = _candidate_pass(ra, cb, metric, info.k, bs, square_mse, kept)
    info.rows_kept = kept.used if kept is not None else 0
    kk = cols.shape[1]
    e_row = np.repeat(np.arange(n, dtype=np.int64), kk)
    e_col = cols.numpy().reshape(-1).astype(np.int64)
    e_cost = costs.numpy().reshape(-1).copy()
    times["candidates"] = time.perf_counter() - t

    if metric == "mse":
        c_hi = float((ra.norm.max() + cb.norm.max()) ** 2 / ra.dim)
    else:
        c_hi = 2.0
    scale = max(c_hi, 1e-300)
    big = 4.0 * c_hi + 1.0
    tau = tol * scale
    eps_dual = 1e-15 * scale
    extra = max(kk, 16)
    gam = gamma(ra.dim)
    match_col = np.zeros(n, dtype=np.int64)
    certified = False
    # ---- fast path: fixed mutual-best pairs, dense exact core, price-ordered certificate ----
    alpha = bounds.alpha
    cols_np = cols.numpy()
    core_match = None
    if use_core:
        ec = costs.numpy() - alpha[cols_np] if alpha.any() else costs.numpy()
        with _single_thread() as mm_threads:
            core_match = _core_solve(
                ra,
                cb,
                metric,
                cols_np,
                ec,
                bounds.A.copy(),
                alpha,
                tau,
                max_rounds,
                _core_budget(core_max_entries),
                info,
                times,
                mm_threads,
                weak_pairs,
                kept,
            )
    if core_match is not None:
        info.path = "core"
        perm_r, e_r = core_match
        cost_r = e_r + alpha[perm_r]
        certified = True
        info.n_edges = int(e_row.size)
        info.k_max = kk
    else:
        info.path = "sparse"
    rounds0 = info.rounds
    for rnd in range(1, max_rounds + 1 if core_match is None else 1):
        info.rounds = rounds0 + rnd
        # ---- phase 2: sparse exact assignment ----------------------------------------
        t = time.perf_counter()
        match_col = _solve_sparse(e_row, e_col, e_cost, n, m, big)
        times["solve"] += time.perf_counter() - t
        # ---- phase 3: duals ------------------------------------------------------------
        t = time.perf_counter()
        order = np.lexsort((e_col, e_row))
        e_row, e_col, e_cost = e_row[order], e_col[order], e_cost[order]
        on_real = match_col < m
        n_dummy = int((~on_real).sum())
        info.dummies_used.append(n_dummy)
        match_cost = np.full(n, big, dtype=np.float64)
        key_e = e_row * (m + 1) + e_col
        pos = np.searchsorted(key_e, np.flatnonzero(on_real) * (m + 1) + match_col[on_real])
        match_cost[on_real] = e_cost[pos]
        try:
            with _single_thread():
                u, v = _duals(e_row, e_col, e_cost, match_col, match_cost, n, m, eps_dual, bounds.alpha)
        except RuntimeError:
            times["duals"] += time.perf_counter() - t
            break
        # feasibility on the candidate edges of the rows on real columns (holds by construction)
        real_e = on_real[e_row]
        rc_e = e_cost[real_e] - u[e_row[real_e]] - v[e_col[real_e]]
        feasible = bool(rc_e.min() >= -tau) if rc_e.size else True
        times["duals"] += time.perf_counter() - t
        if not feasible:
            break
        # ---- phase 4: certificate over all pairs, from the bounds --------------------------
        # excluded (i, j): C_ij - u_i - v_j >= A_i - u_i + min_j (alpha_j - v_j - sigma_i beta_j)
        t = time.perf_counter()
        slack_rows = bounds.A - u + _envelope_min(bounds, v)
        suspect = np.flatnonzero((slack_rows < -tau) | ~on_real)
        times["certificate"] += time.perf_counter() - t
        info.rows_rechecked.append(int(suspect.size))
        if suspect.size == 0:
            info.violations.append(0)
            certified = True
            break
        # ---- recheck: whole rows, exact reduced costs; add the most negative ones --------
        t = time.perf_counter()
        n_viol = 0
        new_r, new_c, new_cost = [], [], []
        v_t = torch.from_numpy(v)
        alpha_t = torch.from_numpy(bounds.alpha)
        beta_t = torch.from_numpy(bounds.beta)
        starts = np.searchsorted(e_row, suspect, side="left")
        ends = np.searchsorted(e_row, suspect, side="right")
        rb = max(1, min(bs, (64 * 2**20) // (8 * m)))
        take = max(1, min(extra, m))
        for s0 in range(0, suspect.size, rb):
            rows_np = suspect[s0 : s0 + rb]
            q = rows_np.size
            rows_t = torch.from_numpy(rows_np)
            cost_full, g_full = _full_rows(ra, cb, rows_t, metric, kept)
            # a margin for this product rounding differently from the main pass (by up to
            # 2 gamma_D |a||b| per product); the certificate itself only needs bounds on the
            # numbers it uses (C' of the module docstring), so this is slack, not a requirement
            if metric == "mse":
                err = (
                    2 * gam * ra.norm[rows_t][:, None] * cb.norm[None, :]
                    + 1e-12 * (ra.sq[rows_t][:, None] + cb.sq[None, :])
                ) / ra.dim
            else:
                err = torch.full_like(cost_full, 2 * gam + 1e-12)
            lb = cost_full - err
            u_rows = torch.from_numpy(np.where(on_real[rows_np], u[rows_np], big))
            rc = lb - u_rows[:, None] - v_t[None, :]
            loc_r = torch.from_numpy(np.repeat(np.arange(q), ends[s0 : s0 + q] - starts[s0 : s0 + q]))
            loc_c = torch.from_numpy(
                np.concatenate(
                    [e_col[a:b] for a, b in zip(starts[s0 : s0 + q], ends[s0 : s0 + q], strict=True)]
                )
            )
            rc[loc_r, loc_c] = math.inf
            real_rows = torch.from_numpy(on_real[rows_np])
            n_viol += int(((rc < -tau) & real_rows[:, None]).sum())
            sel = torch.topk(rc, take, dim=1, largest=False, sorted=False).indices
            valid = torch.isfinite(rc.gather(1, sel))
            rr = np.broadcast_to(rows_np[:, None], sel.shape)[valid.numpy()]
            cc = sel[valid].numpy()
            new_r.append(rr)
            new_c.append(cc)
            new_cost.append(
                cost_full[torch.from_numpy(np.searchsorted(rows_np, rr)), torch.from_numpy(cc)].numpy()
            )
            # new bounds for these rows, over the columns still excluded
            excl = torch.ones_like(lb, dtype=torch.bool)
            excl[loc_r, loc_c] = False
            excl.scatter_(1, sel, False)
            if square_mse:
                # lb_ij >= A_i + alpha_j - sigma_i beta_j  <=>  sigma_i >= (A_i + alpha_j - lb_ij) / beta_j
                A_rows = torch.from_numpy(bounds.A[rows_np])
                need = (A_rows[:, None] + alpha_t[None, :] - lb) / torch.where(
                    beta_t > 0, beta_t, torch.ones_like(beta_t)
                )
                need = torch.where(excl & (beta_t > 0)[None, :], need, torch.full_like(need, -math.inf))
                bounds.sigma[rows_np] = need.amax(1).numpy()
                zero_b = excl & (beta_t <= 0)[None, :]
                if bool(zero_b.any()):
                    gap0 = (
                        torch.where(zero_b, lb - alpha_t[None, :], torch.full_like(lb, math.inf))
                        .amin(1)
                        .numpy()
                    )
                    bounds.A[rows_np] = np.minimum(bounds.A[rows_np], gap0)
            else:
                bounds.A[rows_np] = torch.where(excl, lb, torch.full_like(lb, math.inf)).amin(1).numpy()
        info.violations.append(n_viol)
        e_row = np.concatenate([e_row, *new_r])
        e_col = np.concatenate([e_col, *new_c])
        e_cost = np.concatenate([e_cost, *new_cost])
        times["recheck"] += time.perf_counter() - t
        if n_viol == 0 and n_dummy == 0:
            certified = True
            break
        extra = min(2 * extra, 1024)

    if core_match is None:
        info.n_edges = int(e_row.size)
        info.k_max = int(np.bincount(e_row, minlength=n).max()) if e_row.size else 0
    if certified and core_match is not None:
        info.certified = True
        info.gap_bound = float(n * tau)
    elif certified:
        perm_r = match_col.copy()
        # pair costs of the assignment
        order = np.lexsort((e_col, e_row))
        e_row, e_col, e_cost = e_row[order], e_col[order], e_cost[order]
        pos = np.searchsorted(e_row * (m + 1) + e_col, np.arange(n) * (m + 1) + perm_r)
        cost_r = e_cost[pos]
        info.certified = True
        info.gap_bound = float(n * tau)
    elif dense_fallback and _dense_fits(n, m, dense_max_bytes):
        t = time.perf_counter()
        if kept is not None and kept.full:
            # the main pass's products, with pairwise_cost's arithmetic (no second product)
            full = _costs_from_g(kept.store, ra.sq[:, None], cb.sq[None, :], metric, ra.dim).numpy()
            kept = None
        else:
            kept = None  # free the kept rows before the dense matrix
            full = pairwise_cost(ra.x, cb.x, metric=metric, block_size=bs)
        perm_r, cost_r = assign(full)
        del full
        info.fallback = "dense"
        info.certified = True
        info.gap_bound = 0.0
        times["fallback"] = time.perf_counter() - t
    else:
        warnings.warn(
            f"sparse_match: optimality not certified after {info.rounds} rounds and the dense fallback "
            f"({n}x{m}) is disabled or does not fit; returning the best candidate-graph assignment",
            RuntimeWarning,
            stacklevel=3,
        )
        perm_r = np.where(match_col < m, match_col, -1)
        cost_r = np.full(n, np.nan)
        ok = perm_r >= 0
        if ok.any():
            order = np.lexsort((e_col, e_row))
            e_row, e_col, e_cost = e_row[order], e_col[order], e_cost[order]
            pos = np.searchsorted(e_row * (m + 1) + e_col, np.flatnonzero(ok) * (m + 1) + perm_r[ok])
            cost_r[ok] = e_cost[pos]
    return _out(perm_r, cost_r)


# --------------------------------------------------------------------------------------
# The thresholded problem: every feature may stay unmatched at a fixed cost
# --------------------------------------------------------------------------------------


def _threshold_lap(
    e_row: np.ndarray, e_col: np.ndarray, e_cost: np.ndarray, n: int, m: int, lam: float
) -> np.ndarray:
    r"""Optimal partial matching on the edges (all with cost < ``lam``): column per row, -1 = unmatched.

    The problem splits into the connected components of the edge graph (scipy
    ``connected_components``): a component with one row and one column is its pair; every
    other component is solved exactly as the dense assignment of its clipped costs
    :math:`\min(C, \lambda)` (non-edges cost :math:`\lambda`, a pair at :math:`\lambda` is
    worth its row's dummy, so it counts as unmatched) by :func:`featmatch.matching.assign`.
    Why components and not one sparse solve with a dummy column per row (scipy LAPJVsp):
    where many pairs of unpartnered features fall below the threshold, LAPJVsp on the
    whole graph was measured ~16x the floor at 2,048 x 256 (40% unpartnered, noise 0.8).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    perm = np.full(n, -1, dtype=np.int64)
    if e_row.size == 0:
        return perm
    graph = coo_matrix((np.ones(e_row.size), (e_row, n + e_col)), shape=(n + m, n + m))
    _, label = connected_components(graph, directed=False)
    lab_r = label[:n]
    # component sizes (rows, columns) over the nodes that have edges
    deg_r = np.bincount(e_row, minlength=n) > 0
    deg_c = np.bincount(e_col, minlength=m) > 0
    n_lab = int(label.max()) + 1
    rows_in = np.bincount(lab_r[deg_r], minlength=n_lab)
    cols_in = np.bincount(label[n:][deg_c], minlength=n_lab)
    single = (rows_in == 1) & (cols_in == 1)
    one = single[lab_r[e_row]]
    perm[e_row[one]] = e_col[one]  # a lone edge below lam: its pair
    rest = ~one
    if not rest.any():
        return perm
    er, ec, eco = e_row[rest], e_col[rest], e_cost[rest]
    comp = lab_r[er]
    order = np.argsort(comp, kind="stable")
    er, ec, eco, comp = er[order], ec[order], eco[order], comp[order]
    bounds_ = np.flatnonzero(np.diff(comp)) + 1
    for lo, hi in zip(np.r_[0, bounds_], np.r_[bounds_, comp.size], strict=True):
        rr, rinv = np.unique(er[lo:hi], return_inverse=True)
        cc, cinv = np.unique(ec[lo:hi], return_inverse=True)
        if 8.0 * rr.size * cc.size > 0.25 * float(psutil.virtual_memory().available):
            # too large to clip densely: LAPJVsp on the component's edges, one dummy per row
            mc = _solve_sparse(rinv, cinv, eco[lo:hi] - lam, rr.size, cc.size, 0.0)
            ok = mc < cc.size
            perm[rr[ok]] = cc[mc[ok]]
            continue
        block = np.full((rr.size, cc.size), lam)
        block[rinv, cinv] = eco[lo:hi]
        p_blk, c_blk = assign(block)
        ok = (p_blk >= 0) & (c_blk < lam)
        perm[rr[ok]] = cc[p_blk[ok]]
    return perm


def threshold_assign(cost: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    r"""Exact thresholded assignment on a dense cost matrix (the dense reference of :func:`threshold_match`).

    Solves :math:`\min_M \sum_{(i,j)\in M} C_{ij} + \lambda\,(F_A - |M|)` over partial
    matchings :math:`M` (see :func:`threshold_match`) on the entries below :math:`\lambda`
    only, sparsely (entries at or above it are never better than leaving the row unmatched).

    Returns ``(perm, pair_cost)`` with -1 / NaN for unmatched rows.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {cost.shape}")
    n, m = cost.shape
    lam = float(threshold)
    e_row, e_col = np.nonzero(cost < lam)
    perm = _threshold_lap(e_row, e_col, cost[e_row, e_col], n, m, lam)
    pair_cost = np.full(n, np.nan)
    ok = perm >= 0
    pair_cost[ok] = cost[np.flatnonzero(ok), perm[ok]]
    return perm, pair_cost


def threshold_match(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    threshold: float,
    metric: Metric = "mse",
    k: int = 8,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    return_info: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, SparseMatchInfo]:
    r"""Exact assignment in which every feature may stay unmatched at a fixed cost (certified, sparse).

    Solves, over partial matchings :math:`M` (injective, each row and column at most once),

    .. math::

        \min_M\ \sum_{(i,j)\in M} C_{ij} + \lambda\,(F_A - |M|),

    i.e. a rectangular assignment in which row *i* may take a private dummy column at cost
    :math:`\lambda` (``threshold``). An unmatched column of B may be charged
    :math:`\lambda_B` as well: that adds :math:`\lambda_B (F_B - |M|)`, the same problem with
    :math:`\lambda + \lambda_B`, so one threshold covers both sides.

    **Relation to the full permutation's optimum.** Let :math:`\pi^\star` be the optimum of
    the full assignment (:func:`sparse_match`) and :math:`\tilde C = \min(C, \lambda)`.

    * The thresholded optimum :math:`T(\lambda)` equals the full assignment's optimum on
      :math:`\tilde C` (for :math:`F_A \le F_B`; for :math:`F_A > F_B` plus
      :math:`\lambda` per row left over): a pair with :math:`C_{ij} \ge \lambda` is worth
      exactly a dummy, and a partial matching extends to a full one with clipped pairs.
    * :math:`T(\lambda) \le` the cost of *masking* :math:`\pi^\star` (its pairs above
      :math:`\lambda` set unmatched, the old ``match(unmatched_above=...)``), which is
      :math:`\le \sum_i C_{i\pi^\star(i)}`. The two pair sets differ in general: masking
      keeps the pairs of a permutation that was forced to place every feature, the
      thresholded optimum re-assigns features whose full-problem partner was only taken
      to make room for others. Every kept pair has :math:`C_{ij} < \lambda` in both.
    * :math:`T(\lambda)` is non-decreasing and concave in :math:`\lambda`; for
      :math:`\lambda > \max_i C_{i\pi^\star(i)}` (and :math:`F_A \le F_B`) the thresholded
      optimum is the full one (any optimum of the clipped problem then is one of :math:`C`).

    Why it is fast: only pairs cheaper than :math:`\lambda` can be in an optimal :math:`M`
    (replacing a pair with :math:`C_{ij} \ge \lambda` by the dummy never costs more). With
    :math:`\lambda` below the cost of chance pairs, the block of unpartnered features, the
    hard part of the full problem, has no edges at all. So: one blocked pass keeps the
    ``k`` cheapest columns of every row and a rigorous lower bound :math:`\ell_i` on the
    others (:func:`_candidate_pass` with the cost itself as the key); rows with
    :math:`\ell_i < \lambda` (more than ``k`` columns might be below :math:`\lambda`) get their
    full row recomputed; the edges below :math:`\lambda` and one dummy per row go to LAPJVsp.
    The **certificate** is that every excluded pair is proved :math:`\ge \lambda` (by the
    bound, or exactly by the recheck); the result is then optimal for the numbers used
    (:math:`C'` of the module docstring, *Rounding*) with no tolerance. Pairs at exactly
    :math:`\lambda` are left unmatched (the objective does not change).

    Parameters
    ----------
    x_a : (F_A, D) torch.Tensor
    x_b : (F_B, D) torch.Tensor
    threshold : float
        :math:`\lambda`, finite.
    metric : {"mse", "cosine"}
    k : int
        Candidates per row in the blocked pass (default 8: rows with more columns below
        :math:`\lambda` are rechecked exactly).
    block_size, device
        As in :func:`sparse_match`.
    return_info : bool
        Also return a :class:`SparseMatchInfo` (``path="threshold"``; ``rows_rechecked``,
        ``n_edges`` = edges below the threshold).

    Returns
    -------
    perm : (F_A,) np.ndarray of int64
        Column of B per row, -1 if unmatched.
    pair_cost : (F_A,) np.ndarray of float64
        Cost of each kept pair (:math:`C'`), NaN where unmatched.
    info : SparseMatchInfo
        Only with ``return_info=True``.

    Examples
    --------
    >>> import torch
    >>> from featmatch.matching._lap import threshold_match
    >>> a = torch.eye(3)
    >>> perm, cost = threshold_match(a, torch.stack([a[1], a[0], -a[2]]), threshold=0.5)
    >>> perm.tolist()
    [1, 0, -1]
    """
    t_start = time.perf_counter()
    check_option("metric", metric, METRICS)
    if x_a.ndim != 2 or x_b.ndim != 2 or x_a.shape[1] != x_b.shape[1]:
        raise ValueError(
            f"feature vectors must be (F_A, D) and (F_B, D); got {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    lam = float(threshold)
    if not math.isfinite(lam):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dev = _resolve_device(device)
    sa, sb = _Side(x_a, dev), _Side(x_b, dev)
    n, m = sa.n, sb.n
    info = SparseMatchInfo(k=min(int(k), max(m, 1)), device=str(dev), path="threshold")
    times = dict.fromkeys(("prepare", "candidates", "solve", "recheck"), 0.0)
    info.times = times
    info.rows_rechecked, info.violations, info.dummies_used = [], [0], []
    perm = np.full(n, -1, dtype=np.int64)
    pair_cost = np.full(n, np.nan)
    if n == 0 or m == 0:
        info.certified, info.gap_bound, info.rounds = True, 0.0, 1
        times["total"] = time.perf_counter() - t_start
        return (perm, pair_cost, info) if return_info else (perm, pair_cost)
    bs = block_size or default_block_size(m, n)
    times["prepare"] = time.perf_counter() - t_start
    t = time.perf_counter()
    # the cost itself as the selection key (square_mse=False): one scalar bound per row on C_ij
    cols, costs, bounds = _candidate_pass(sa, sb, metric, info.k, bs, square_mse=False)
    times["candidates"] = time.perf_counter() - t
    t = time.perf_counter()
    cols_np, costs_np = cols.numpy(), costs.numpy()
    below = costs_np < lam
    recheck = np.flatnonzero(bounds.A < lam)
    below[recheck] = False
    e_row = [np.nonzero(below)[0]]
    e_col = [cols_np[below]]
    e_cost = [costs_np[below]]
    rb = max(1, min(bs, (64 * 2**20) // (8 * m)))
    for s0 in range(0, recheck.size, rb):
        rows_np = recheck[s0 : s0 + rb]
        full, _ = _full_rows(sa, sb, torch.from_numpy(rows_np), metric)
        rr, cc = torch.nonzero(full < lam, as_tuple=True)
        e_row.append(rows_np[rr.numpy()])
        e_col.append(cc.numpy())
        e_cost.append(full[rr, cc].numpy())
    er, ec, eco = np.concatenate(e_row), np.concatenate(e_col), np.concatenate(e_cost)
    info.rows_rechecked.append(int(recheck.size))
    times["recheck"] = time.perf_counter() - t
    t = time.perf_counter()
    order = np.lexsort((ec, er))
    er, ec, eco = er[order], ec[order], eco[order]
    perm = _threshold_lap(er, ec, eco, n, m, lam)
    ok = perm >= 0
    if ok.any():
        pos = np.searchsorted(er * (m + 1) + ec, np.flatnonzero(ok) * (m + 1) + perm[ok])
        pair_cost[ok] = eco[pos]
    times["solve"] = time.perf_counter() - t
    info.n_edges = int(er.size)
    info.k_max = int(np.bincount(er, minlength=n).max()) if er.size else 0
    info.dummies_used.append(int((~ok).sum()))
    info.rounds = 1
    info.certified, info.gap_bound = True, 0.0
    times["total"] = time.perf_counter() - t_start
    return (perm, pair_cost, info) if return_info else (perm, pair_cost)


#: ``solver="auto"`` picks the sparse solver when ``F_A * F_B`` exceeds this (2,048 x 3,072
#: = 6.3 M cells; 4096^2 until 2026-12-03). Recalibrated after the main pass began keeping
#: the core's rows (:class:`_KeptRows`): medians of 5 interleaved runs of the route ``auto``
#: takes (``sparse_match``, with ``auto_dense_share`` on rectangles) against numpy float64
#: cost + scipy, on random Gaussian pairs and planted pairs (0/10/40 % unpartnered, noise
#: 0.8, unit or norm-spread vectors), d = 128-768:
#:
#: * above this size it was at most 0.77x dense (2,560^2, d = 128 and 768), 0.03-0.37x at
#:   4,096 x 4,096 x 768 (random: 1.22 s against 8.12 s; norm-spread: 1.28 s against 37.6 s);
#: * at 2,048 x 3,072 (40 % unit) 1.12x, at 2,048^2 x 128 up to 1.33x, at 1,024^2 up to 2.1x:
#:   tens of milliseconds on problems dense solves in 0.05-0.3 s, so dense stays there.
#:
#: The earlier limit came from a fast path that multiplied a structureless pair's whole core
#: again (2-6x slower than dense below 4096^2 then; random 2,560^2 x 768 is now 0.27x).
AUTO_SPARSE_ABOVE = 2048 * 3072

#: ``solver="auto"`` on a sparse-sized problem: when a sample of rows predicts a rectangular
#: core (rows without a mutual-best partner, :func:`predicted_core_share`) above this share
#: of the rows, the dense solver runs instead, before the main pass. Rectangular cores go to
#: scipy (LAPMOD and lapjv are square-only), with label-correcting duals, and grow over
#: several rounds. Measured on unit-vector planted 6,144 x 8,192 pairs (benchmarks/
#: bench_regimes.py --unit --repeat 3, since the chunked duals of :func:`_dense_core_duals`),
#: sparse against dense in the same run (two runs), by unpartnered share (predicted core
#: share): 40 % (0.24-0.31) 0.51-0.66x, 60 % (0.30-0.35) 0.59-0.73x, 70 % (0.32-0.35)
#: 0.60-0.73x, 80 % (0.36-0.38) 0.71-0.80x, 90 % (0.40-0.41) 0.92-0.97x. Sparse wins up to
#: about 0.4 and its lead shrinks towards it, so problems predicted above 0.4 go dense. (At
#: 0.2, before those duals, the 40-60 % pairs went dense.) Square cores stay sparse.
AUTO_DENSE_CORE_SHARE = 0.4

#: ... and also whenever the dense float64 cost matrix would exceed this share of the
#: available RAM (psutil), whatever the size.
AUTO_DENSE_RAM_SHARE = 0.25


def auto_solver(n_a: int, n_b: int, available_bytes: float | None = None) -> str:
    """The solver ``solver="auto"`` uses for an ``n_a x n_b`` problem: ``"sparse"`` or ``"dense"``.

    Sparse where it is measured faster (``n_a * n_b > AUTO_SPARSE_ABOVE``), or where the
    dense float64 matrix (``8 n_a n_b`` bytes) would take more than
    ``AUTO_DENSE_RAM_SHARE`` of the available RAM; dense otherwise.
    """
    cells = int(n_a) * int(n_b)
    if cells > AUTO_SPARSE_ABOVE:
        return "sparse"
    if available_bytes is None:
        available_bytes = float(psutil.virtual_memory().available)
    return "sparse" if 8.0 * cells > AUTO_DENSE_RAM_SHARE * available_bytes else "dense"
