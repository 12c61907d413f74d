r"""Feature transfer between matched SAEs: thresholds, folded transfer scales, hybrid specs.

Encode-permute-decode (SAE Match Eq. 5) carries feature :math:`i` of SAE A to feature
:math:`\pi(i)` of SAE B. In folded form (Eq. 4) each SAE's JumpReLU threshold is moved into
its weights, :math:`W'_{enc}[:, i] = W_{enc}[:, i] / \theta_i` and
:math:`W'_{dec}[i] = \theta_i W_{dec}[i]`, so feature :math:`i`'s activation reaches B's
decoder multiplied by the *transfer scale*

.. math::

    s_i = \frac{\theta^B_{\pi(i)}}{\theta^A_i}.

This module holds the algorithms on matchings and SAEs that the pruning chapter (03) runs
through :func:`featmatch.evaluation.pruning.pruning_sweep`: the thresholds of an SAE
(:func:`thetas`), the transfer scale (:func:`transfer_scale`), the guard that unmatches pairs
with near-zero thresholds (:func:`drop_small_thresholds`), and the quantile-hybrid method
specs with their random-order control (:func:`shuffled_cost`, :func:`hybrid_methods`,
App. B, Eq. 6).

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656 (Eqs. 4-6, Sec. 5.5, App. B).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from featmatch.matching._matching import Matching

__all__ = [
    "thetas",
    "transfer_scale",
    "drop_small_thresholds",
    "drop_small_thresholds_by_layer",
    "shuffled_cost",
    "hybrid_methods",
]


def thetas(sae: Any) -> np.ndarray:
    r"""The JumpReLU thresholds :math:`\theta` of an SAE as float64, ones if it has none.

    SAEs without a threshold (ReLU, e.g. GPT-2 ``res-jb``) have :math:`\theta = 1`: folding is
    the identity for them.

    Parameters
    ----------
    sae : sae_lens.SAE or featmatch.saes.SAEWeights

    Returns
    -------
    numpy.ndarray of float64, shape (F,)
    """
    from featmatch.saes._sae import weights

    w = weights(sae)
    if w.threshold is None:
        return np.ones(w.d_sae)
    return w.threshold.double().numpy()


def _pair_thetas(matching: Matching, sae_a: Any, sae_b: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ok, theta_a, theta_b of the partner)`` per feature of A (the partner's θ is 1 where unmatched)."""
    th_a, th_b = thetas(sae_a), thetas(sae_b)
    perm = matching.perm
    if th_a.shape[0] != perm.shape[0] or th_b.shape[0] != matching.n_b:
        raise ValueError("matching and SAEs disagree on the number of features")
    ok = perm >= 0
    return ok, th_a, np.where(ok, th_b[np.where(ok, perm, 0)], 1.0)


def transfer_scale(matching: Matching, sae_a: Any, sae_b: Any) -> np.ndarray:
    r"""Per feature of A, the folded transfer scale :math:`\theta^B_{\pi(i)}/\theta^A_i` (NaN if unmatched).

    Folded encode-permute-decode multiplies feature i's activation by it (Eq. 4 in Eq. 5).

    Parameters
    ----------
    matching : Matching
        A → B.
    sae_a, sae_b : sae_lens.SAE

    Returns
    -------
    numpy.ndarray of float64, shape (F_A,)

    Raises
    ------
    ValueError
        If the matching and the SAEs disagree on the number of features.
    """
    ok, th_a, th_partner = _pair_thetas(matching, sae_a, sae_b)
    return np.where(ok, th_partner / th_a, np.nan)


def drop_small_thresholds(matching: Matching, sae_a: Any, sae_b: Any, min_theta: float = 1e-2) -> Matching:
    r"""The matching with every pair whose :math:`\theta^A_i` or :math:`\theta^B_{\pi(i)}` is below ``min_theta`` unmatched.

    Folded encode-permute-decode carries feature i with the scale
    :math:`\theta^B_{\pi(i)}/\theta^A_i` (Eq. 4 in Eq. 5). A threshold near zero (the zoo
    floors trained :math:`\theta \le 0` to 1e-3) makes that scale hundreds of times larger
    than any other, so one such feature can dominate the prediction. Dropping those pairs
    (they then contribute nothing, like any unmatched feature) separates that conditioning
    problem from the question whether folding helps. ``meta["n_small_theta_dropped"]`` counts them.

    Parameters
    ----------
    matching : Matching
        A → B.
    sae_a, sae_b : sae_lens.SAE
    min_theta : float
        Must be > 0.

    Returns
    -------
    Matching
        Same ``n_b``; dropped pairs have ``perm = -1`` and ``cost = NaN``; ``meta`` gains
        ``min_theta`` and ``n_small_theta_dropped``.
    """
    from featmatch.matching._matching import Matching

    if min_theta <= 0:
        raise ValueError(f"min_theta must be > 0, got {min_theta}")
    ok, th_a, th_partner = _pair_thetas(matching, sae_a, sae_b)
    small = ok & ((th_a < min_theta) | (th_partner < min_theta))
    return Matching(
        perm=np.where(small, -1, matching.perm),
        cost=np.where(small, np.nan, matching.cost),
        n_b=matching.n_b,
        meta={**matching.meta, "min_theta": float(min_theta), "n_small_theta_dropped": int(small.sum())},
    )


def drop_small_thresholds_by_layer(
    matchings: Mapping[tuple[int, int], Matching], saes: Mapping[int, Any], min_theta: float = 1e-2
) -> dict[int, Matching]:
    """:func:`drop_small_thresholds` for every pair ``(t, t + 1)``, keyed by ``t``.

    The keying by the first layer is what :func:`featmatch.evaluation.pruning.pruning_sweep`
    expects of a ``matching`` entry of a method spec.

    Parameters
    ----------
    matchings : mapping (t, u) -> Matching
    saes : mapping layer -> sae_lens.SAE
    min_theta : float

    Returns
    -------
    dict
        ``t -> Matching`` in the order of ``matchings``.
    """
    return {la: drop_small_thresholds(m, saes[la], saes[lb], min_theta) for (la, lb), m in matchings.items()}


def shuffled_cost(matching: Matching, seed: int = 0) -> Matching:
    """The same permutation with its costs randomly reassigned among the matched features.

    The quantile hybrid (Eq. 6) picks which features go through the next decoder by their
    cost; with shuffled costs the choice is random, the control that tells whether the
    cost ordering carries information.

    Parameters
    ----------
    matching : Matching
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    Matching
        ``meta["cost"] = "shuffled"``.
    """
    from featmatch.matching._matching import Matching

    rng = np.random.default_rng(seed)
    cost = matching.cost.copy()
    ok = matching.perm >= 0
    cost[ok] = rng.permutation(cost[ok])
    return Matching(perm=matching.perm, cost=cost, n_b=matching.n_b, meta={**matching.meta, "cost": "shuffled"})


def hybrid_methods(
    matchings: Mapping[int, Matching],
    qs: Sequence[float],
    *,
    random_control: bool = True,
    seed: int = 0,
    fold: bool = True,
) -> list[dict[str, Any]]:
    """Method specs for :func:`featmatch.evaluation.pruning.pruning_sweep`: the quantile hybrid at each ``q``.

    With ``random_control``, each ``0 < q < 1`` also gets a run whose features are chosen
    by shuffled costs (:func:`shuffled_cost`, seed ``seed + t`` for layer ``t``), labelled
    ``random q=...``.

    Parameters
    ----------
    matchings : mapping layer t -> Matching (t → t+1)
    qs : sequence of float in [0, 1]
    random_control : bool
    seed : int
    fold : bool
        Use the SAEs in folded form (Eq. 4).

    Returns
    -------
    list of dict
        Labels ``cost q=0.50`` and ``random q=0.50``.
    """
    specs: list[dict[str, Any]] = []
    for q in qs:
        q = float(q)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must lie in [0, 1], got {q}")
        specs.append({"method": "quantile_hybrid", "q": q, "fold": fold, "matching": dict(matchings), "label": f"cost q={q:.2f}"})
        if random_control and 0.0 < q < 1.0:
            shuffled = {t: shuffled_cost(m, seed=seed + int(t)) for t, m in matchings.items()}
            specs.append({"method": "quantile_hybrid", "q": q, "fold": fold, "matching": shuffled, "label": f"random q={q:.2f}"})
    return specs
