r"""Baselines SAE Match is compared with: the top-1 decoder cosine of Feature Flow.

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

__all__ = ["decoder_rows", "top1_cosine_perm", "top1_cosine_matching", "TOP1_COSINE_META"]

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
