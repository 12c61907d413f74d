"""SAE Match costs: feature vectors, the pairwise cost matrix, and the dense exact assignment.

The bottom of :mod:`featmatch.matching`: everything here works on one pair of SAEs (or
their ``(F, D)`` feature vectors) and imports nothing else from the package. The
definitions (folding, ``metric``, ``include_b_enc``) are stated in
:mod:`featmatch.matching._matching`; the formulas in :func:`feature_vectors` and
:func:`pairwise_cost`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from featmatch.saes._sae import SAEWeights, check_same_d_in, weights

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = [
    "feature_vectors",
    "pairwise_cost",
    "rounding_bound",
    "cost_matrix",
    "assign",
    "interruptible_lsa",
    "ONS",
    "METRICS",
    "SOLVERS",
]

On = Literal["encoder", "decoder", "both"]
Metric = Literal["mse", "cosine"]
Solver = Literal["auto", "dense", "sparse"]

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64


def gamma(n: int, u: float = U32) -> float:
    """Higham's :math:`\\gamma_n = nu/(1-nu)`: bound on the relative error of an n-term dot product.

    :math:`|fl(a\\cdot b) - a\\cdot b| \\le \\gamma_n \\sum_k |a_k b_k| \\le \\gamma_n \\|a\\|\\|b\\|`
    for any summation order (with or without FMA), so for whatever kernel a BLAS picks.
    """
    return n * u / (1.0 - n * u)


#: Allowed values of the ``on``, ``metric`` and ``solver`` options.
ONS = ("encoder", "decoder", "both")
METRICS = ("mse", "cosine")
SOLVERS = ("auto", "dense", "sparse")

# --------------------------------------------------------------------------------------
# Feature vectors and costs
# --------------------------------------------------------------------------------------


def check_option(name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ``ValueError("<name> must be one of ...; got ...")`` unless ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def feature_vectors(
    sae: SAE | SAEWeights, on: On = "both", fold: bool = True, include_b_enc: bool = False
) -> torch.Tensor:
    """One parameter vector per feature, the rows compared by SAE Match.

    .. math::

        v_i = \\big[\\, W_{enc}[:, i]/\\theta_i \\ \\|\\ \\theta_i W_{dec}[i] \\ \\|\\
              \\ b^{eff}_{enc,i}/\\theta_i \\,\\big]

    with the parts selected by ``on`` and ``include_b_enc``; without folding (or for an SAE
    without thresholds) :math:`\\theta_i = 1`.

    Parameters
    ----------
    sae : sae_lens.SAE or SAEWeights
    on : {"encoder", "decoder", "both"}
        Encoder columns, decoder rows, or both concatenated (encoder first).
    fold : bool
        Apply threshold folding (Eq. 4) first. A no-op for SAEs without a threshold.
    include_b_enc : bool
        Append the effective encoder bias (one coordinate).

    Returns
    -------
    (F, D) torch.Tensor, float32
        D is ``d_in``, ``2 * d_in`` for ``"both"``, plus one with ``include_b_enc``.
    """
    check_option("on", on, ONS)
    w = weights(sae)
    # float32 throughout: one rounding per entry, and no float64 copy of a (F, d) matrix
    theta = w.threshold if (fold and w.threshold is not None) else None
    parts: list[torch.Tensor] = []
    if on in ("encoder", "both"):
        parts.append(w.W_enc.T / theta[:, None] if theta is not None else w.W_enc.T)
    if on in ("decoder", "both"):
        parts.append(w.W_dec * theta[:, None] if theta is not None else w.W_dec)
    if include_b_enc:
        b = w.b_enc_effective
        parts.append((b / theta if theta is not None else b)[:, None])
    return torch.cat(parts, dim=1).to(torch.float32).contiguous()


def mse_from_products_(x: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray, dim: int) -> np.ndarray:
    r"""Overwrite float64 inner products with MSE costs, in place: :math:`\max((|a|^2 + |b|^2 -
    2\,a\cdot b)/D, 0)` (``sq_a``, ``sq_b`` broadcast against ``x``).

    The one definition of these float64 operations and their order, shared by
    :func:`pairwise_cost` and the sparse matcher, so that both give the same numbers from the
    same products. In numpy: its in-place broadcasts were measured ~5x faster than torch's
    single-threaded ones here.
    """
    x *= -2.0
    x += sq_a
    x += sq_b
    x /= dim
    np.maximum(x, 0.0, out=x)
    return x


def pairwise_cost(
    x_a: torch.Tensor, x_b: torch.Tensor, metric: Metric = "mse", block_size: int = 2048
) -> np.ndarray:
    """Cost between every row of ``x_a`` and every row of ``x_b``, computed in row blocks.

    .. math::

        C^{mse}_{ij} = \\frac{\\|a_i\\|^2 + \\|b_j\\|^2 - 2\\, a_i\\!\\cdot b_j}{D},\\qquad
        C^{cos}_{ij} = 1 - \\frac{a_i\\!\\cdot b_j}{\\|a_i\\|\\,\\|b_j\\|}

    The inner products are float32 matrix products (one ``(block_size, F_B)`` block at a
    time); squared norms and the combination are float64. Only the float64 output is
    ``(F_A, F_B)``; no second matrix of that size is ever held.

    Which BLAS kernel computes a product, and so how its float32 sum is rounded, depends on
    the block's shape, the thread count and the CPU's instruction set: another call on the
    same vectors (another ``block_size``, the sparse solver's blocks, another machine) gives
    the same costs up to :func:`rounding_bound`, not necessarily to the bit. The same call
    on the same machine and settings gives the same bits.

    Parameters
    ----------
    x_a : (F_A, D) torch.Tensor
    x_b : (F_B, D) torch.Tensor
    metric : {"mse", "cosine"}
    block_size : int
        Rows of ``x_a`` per block.

    Returns
    -------
    (F_A, F_B) np.ndarray, float64
        MSE costs are clipped at 0, cosine costs to [0, 2].
    """
    check_option("metric", metric, METRICS)
    if x_a.ndim != 2 or x_b.ndim != 2 or x_a.shape[1] != x_b.shape[1]:
        raise ValueError(
            f"feature vectors must be (F_A, D) and (F_B, D); got {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    a32 = x_a.detach().to("cpu", torch.float32)
    b32 = x_b.detach().to("cpu", torch.float32)
    d = a32.shape[1]
    na = (a32.double() ** 2).sum(1)
    nb = (b32.double() ** 2).sum(1)
    out = np.empty((a32.shape[0], b32.shape[0]), dtype=np.float64)
    out_t = torch.from_numpy(out)
    b32_t = b32.T.contiguous()
    if metric == "cosine":
        ra = na.sqrt()
        rb = nb.sqrt()
    gbuf = torch.empty(min(block_size, max(a32.shape[0], 1)), b32.shape[0]) if metric == "mse" else None
    na_np, nb_np = na.numpy(), nb.numpy()
    for i0 in range(0, a32.shape[0], block_size):
        i1 = min(i0 + block_size, a32.shape[0])
        if metric == "mse":
            # in place in the output block, in numpy (float32 -> float64 is exact; the same
            # operations in the same order as before, so the same numbers): no per-block
            # temporaries, and numpy's broadcasts were measured ~5x faster than torch's here
            g32 = gbuf[: i1 - i0]
            torch.mm(a32[i0:i1], b32_t, out=g32)
            o = out[i0:i1]
            o[...] = g32.numpy()
            mse_from_products_(o, na_np[i0:i1, None], nb_np[None, :], d)
            continue
        g = (a32[i0:i1] @ b32_t).double()
        denom = ra[i0:i1, None] * rb[None, :]
        g = torch.where(
            denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(g)
        )
        g.neg_().add_(1.0).clamp_(0.0, 2.0)
        out_t[i0:i1] = g
        del g
    return out


def rounding_bound(x_a: torch.Tensor, x_b: torch.Tensor, metric: Metric = "mse") -> np.ndarray:
    """How far two evaluations of :func:`pairwise_cost`'s formula on the same vectors can differ.

    Each float32 inner product is within :math:`\\gamma_D\\|a_i\\|\\|b_j\\|` of the exact
    one (:func:`gamma`, :math:`u = 2^{-24}`), whatever kernel computed it, so two evaluations
    (other block shapes, threads or CPU; the sparse solver's products) differ by at most
    twice that. The costs scale a product by :math:`2/D` (mse) or
    :math:`1/(\\|a_i\\|\\|b_j\\|)` (cosine), and their float64 arithmetic adds a few
    :math:`u_{64}` of its terms on each side:

    .. math::

        \\delta^{mse}_{ij} = \\frac{4\\gamma_D \\|a_i\\|\\|b_j\\|
            + 2(\\gamma^{(64)}_D + 3u_{64})(\\|a_i\\| + \\|b_j\\|)^2}{D},\\qquad
        \\delta^{cos}_{ij} = 2\\gamma_D + 2(\\gamma^{(64)}_D + 6u_{64}).

    Parameters
    ----------
    x_a : (F_A, D) torch.Tensor
    x_b : (F_B, D) torch.Tensor
    metric : {"mse", "cosine"}

    Returns
    -------
    (F_A, F_B) np.ndarray, float64
        :math:`\\delta_{ij}`: a rigorous bound, typically far above the differences seen
        (most products round alike).
    """
    check_option("metric", metric, METRICS)
    d = int(x_a.shape[1])
    g32, g64 = gamma(d, U32), gamma(d, U64)
    if metric == "cosine":
        return np.full((x_a.shape[0], x_b.shape[0]), 2.0 * g32 + 2.0 * (g64 + 6.0 * U64))
    ra = x_a.detach().to("cpu", torch.float64).norm(dim=1).numpy()[:, None]
    rb = x_b.detach().to("cpu", torch.float64).norm(dim=1).numpy()[None, :]
    return (4.0 * g32 * ra * rb + 2.0 * (g64 + 3.0 * U64) * (ra + rb) ** 2) / d


def cost_matrix(
    sae_a: SAE | SAEWeights,
    sae_b: SAE | SAEWeights,
    on: On = "both",
    metric: Metric = "mse",
    fold: bool = True,
    include_b_enc: bool = False,
    block_size: int = 2048,
) -> np.ndarray:
    """The SAE Match cost between every feature of SAE A and every feature of SAE B.

    :math:`C_{ij}` compares :func:`feature_vectors` row *i* of A with row *j* of B (see
    :func:`pairwise_cost` for the formulas).

    Parameters
    ----------
    sae_a, sae_b : sae_lens.SAE or SAEWeights
        Two SAEs on hidden states of the same width ``d_in``.
    on, metric, fold, include_b_enc
        As in :func:`match`.
    block_size : int
        Rows per block of the blocked computation.

    Returns
    -------
    (F_A, F_B) np.ndarray, float64

    Raises
    ------
    ValueError
        On a ``d_in`` mismatch, bad weights (NaN/Inf, :math:`\\theta \\le 0`) or bad options.
    """
    check_option("on", on, ONS)
    check_option("metric", metric, METRICS)
    wa, wb = weights(sae_a, side="A", fold=fold), weights(sae_b, side="B", fold=fold)
    check_same_d_in(wa, wb)
    xa = feature_vectors(wa, on=on, fold=fold, include_b_enc=include_b_enc)
    xb = feature_vectors(wb, on=on, fold=fold, include_b_enc=include_b_enc)
    return pairwise_cost(xa, xb, metric=metric, block_size=block_size)


def assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum-cost assignment of rows to columns (scipy ``linear_sum_assignment``).

    Interruptible: large matrices are solved in a worker process (:func:`interruptible_lsa`).

    .. math::

        \\min_{\\pi\\ \\text{injective}} \\sum_{i} C_{i, \\pi(i)}

    over the :math:`\\min(F_A, F_B)` rows that can be assigned (all rows when
    :math:`F_A \\le F_B`).

    Parameters
    ----------
    cost : (F_A, F_B) array-like
        Finite costs.

    Returns
    -------
    perm : (F_A,) np.ndarray of int64
        Column assigned to each row, or -1.
    pair_cost : (F_A,) np.ndarray of float64
        ``cost[i, perm[i]]``, NaN where ``perm[i] == -1``.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {cost.shape}")
    if not np.isfinite(cost.sum()) and not np.isfinite(cost).all():  # cheap check first, no (F_A, F_B) mask
        raise ValueError(f"cost matrix contains {int((~np.isfinite(cost)).sum())} non-finite values")
    perm = np.full(cost.shape[0], -1, dtype=np.int64)
    pair_cost = np.full(cost.shape[0], np.nan, dtype=np.float64)
    if cost.size:
        rows, cols = interruptible_lsa(cost)
        perm[rows] = cols
        pair_cost[rows] = cost[rows, cols]
    return perm, pair_cost


#: Cost matrices with at least this many entries are solved in a worker process by
#: :func:`interruptible_lsa` (1024² takes well under a second inline; 8192² random costs
#: take minutes); smaller ones are solved in this process.
WORKER_MIN_ENTRIES = 1 << 20


def interruptible_lsa(
    cost: np.ndarray, *, worker_min_entries: int | None = None, poll_seconds: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """scipy ``linear_sum_assignment(cost)``, stoppable by Ctrl-C (SIGINT) at any moment.

    scipy's solver does not return to Python until it is done (minutes for an 8192²
    matrix), so a ``KeyboardInterrupt`` would wait for it. A large problem is therefore
    solved in a forked worker process that inherits ``cost`` (copy-on-write: no copy and
    no pickling of the matrix) and sends back only ``rows, cols``. The calling thread
    waits on the pipe in slices of ``poll_seconds``, so SIGINT raises ``KeyboardInterrupt``
    here at once; the worker is then killed (it ignores SIGINT itself) and reaped before
    the exception propagates, so nothing keeps running. A worker process, not a thread:
    an abandoned thread would keep a core busy until the solve ends (in a notebook kernel,
    for minutes). Where ``fork`` is unavailable the solve runs inline, and so it does off
    the main thread (SIGINT only ever reaches the main thread, so there is nothing to
    wait for) and in a daemonic process, which may not have children: a Dask worker runs
    its tasks in both (a cancelled task is dropped by Dask, see :mod:`featmatch._dask`).

    Parameters
    ----------
    cost : (F_A, F_B) np.ndarray
        As for ``scipy.optimize.linear_sum_assignment``.
    worker_min_entries : int, optional
        Solve inline below this many entries (default :data:`WORKER_MIN_ENTRIES`).
    poll_seconds : float
        Longest wait between two checks for an interrupt.

    Returns
    -------
    rows, cols : np.ndarray
        As ``linear_sum_assignment`` returns them.

    Raises
    ------
    KeyboardInterrupt
        On SIGINT (the worker is gone when it propagates).
    ValueError
        What scipy raised in the worker (e.g. an infeasible cost matrix).
    RuntimeError
        If the worker died without an answer (e.g. killed by the OOM killer).
    """
    import multiprocessing as mp
    import threading

    from scipy.optimize import linear_sum_assignment

    limit = WORKER_MIN_ENTRIES if worker_min_entries is None else int(worker_min_entries)
    inline = (
        cost.size < limit
        or "fork" not in mp.get_all_start_methods()
        or threading.current_thread() is not threading.main_thread()
        or mp.current_process().daemon
    )
    if inline:
        return linear_sum_assignment(cost)
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_lsa_worker, args=(cost, send), name="featmatch-lsa", daemon=True)
    proc.start()
    send.close()  # the worker holds the only write end: EOF on the pipe means it is gone
    try:
        while not recv.poll(poll_seconds):
            pass
        try:
            status, payload = recv.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(
                f"the assignment worker (pid {proc.pid}) died without a result (exit code {proc.exitcode})"
            ) from None
    finally:
        if proc.is_alive() and proc.exitcode is None:
            proc.kill()
        proc.join()
        recv.close()
    if status != "ok":
        raise ValueError(payload)
    return payload


def _lsa_worker(cost: np.ndarray, conn: Any) -> None:
    """Body of :func:`interruptible_lsa`'s worker: solve, send ``("ok", (rows, cols))`` or the error."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    try:
        from scipy.optimize import linear_sum_assignment

        conn.send(("ok", linear_sum_assignment(cost)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
