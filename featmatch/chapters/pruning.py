r"""Chapter 03, SAE Match as layer pruning: tables, layer choices and claims.

Encode-permute-decode (SAE Match Eq. 5) predicts :math:`h_{t+1}` from :math:`h_t` by encoding
with SAE :math:`t`, permuting the features and decoding with SAE :math:`t+1`; spliced into the
forward pass it prunes a block, at a cost in cross-entropy (:math:`\Delta CE`, nats) and with
an explained variance :math:`EV = 1 - \mathrm{Var}(\hat h - h) / \mathrm{Var}(h)`. The sweeps
themselves run in :func:`featmatch.evaluation.pruning.pruning_sweep`, the transfer algorithms
(thresholds, transfer scales, hybrid specs) in :mod:`featmatch.evaluation.transfer`. The
functions here turn the sweeps into what notebook ``03_pruning`` shows: the near-zero-θ table,
the quantile-hybrid table (App. B), the second-L0 study (Figs. 14, 15), the early-layer table
(Sec. 5.3), and the ``claim_*`` rows of the chapter's claims table.

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656 (Sec. 5.3, 5.5; Figs. 10, 11, 14-17; App. A, B).
.. [2] D. Laptev, N. Balagansky, Y. Aksenov, D. Gavrilov. "Analyze Feature Flow to Enhance
   Interpretation and Steering in Language Models." 2025 (top-1 decoder cosine).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featmatch.chapters.claims import Claim, claim_fraction, claim_threshold
from featmatch.chapters.common import Pair, early_late_split, layers_at_depth, spearman
from featmatch.evaluation.transfer import transfer_scale

if TYPE_CHECKING:
    from featmatch.lm.activations import ActivationStats
    from featmatch.matching._matching import Matching

__all__ = [
    "METHOD_LABELS",
    "PAPER_HYBRID_FRACTIONS",
    "hybrid_layers",
    "theta_table",
    "hybrid_table",
    "l0_combinations",
    "l0_study",
    "zoo_l0_study",
    "early_layer_table",
    "claim_pruning_cheap_later",
    "claim_early_shortfall",
    "claim_folding_improves_epd",
    "claim_folding_improves_epd_min_theta",
    "claim_top1_beats_permutation",
    "claim_hybrid_cost_order",
    "claim_l0_mismatch",
    "claim_higher_l0",
    "claim_l0_explains_early",
]

#: Readable names of the :func:`featmatch.evaluation.pruning.pruning_sweep` method labels.
METHOD_LABELS: dict[str, str] = {
    "layer_drop": "layer drop",
    "encode_decode_current": "encode-decode current",
    "encode_decode_previous": "encode-decode previous",
    "encode_permute_decode_folded": "encode-permute-decode (folded)",
    "encode_permute_decode_unfolded": "encode-permute-decode (unfolded)",
    "top1_cosine_folded": "top-1 cosine (Feature Flow)",
    "top1_cosine_unfolded": "top-1 cosine, unfolded scale",
}

#: The paper's hybrid layers 3, 10 and 20 of Gemma-2-2B's 26, as fractions of the depth.
PAPER_HYBRID_FRACTIONS: tuple[float, ...] = (3 / 26, 10 / 26, 20 / 26)

_MIN_THETA_LABEL = "encode_permute_decode_folded_min_theta"


def hybrid_layers(layers: Sequence[int], n_layers: int, fractions: Iterable[float] = PAPER_HYBRID_FRACTIONS) -> list[int]:
    """Layers for the quantile hybrid at the paper's relative depths (default: 12%, 38%, 77%).

    :func:`featmatch.chapters.common.layers_at_depth` over the layers ``t`` with ``t + 1``
    also available (the hybrid at ``t`` needs the SAEs at ``t`` and ``t + 1``).

    Examples
    --------
    >>> hybrid_layers(list(range(30)), 30)
    [3, 12, 23]
    """
    candidates = [t for t in layers if t + 1 in layers]
    return layers_at_depth(candidates, n_layers, fractions)


# --------------------------------------------------------------------------------------
# Folding and near-zero thresholds
# --------------------------------------------------------------------------------------


def theta_table(
    folded: Mapping[Pair, Matching],
    guarded: Mapping[int, Matching],
    saes: Mapping[int, Any],
    sweep: pd.DataFrame,
    sweep_guard: pd.DataFrame,
) -> pd.DataFrame:
    r"""Per evaluated layer: the near-zero-θ pairs dropped, the largest transfer scale, and three EVs.

    Parameters
    ----------
    folded : mapping (t, t + 1) -> Matching
        Folded SAE Match at each evaluated layer ``t`` (the rows, in this order).
    guarded : mapping t -> Matching
        The same with small-θ pairs unmatched
        (:func:`featmatch.evaluation.transfer.drop_small_thresholds`).
    saes : mapping layer -> SAE
    sweep : pandas.DataFrame
        The pruning sweep with ``encode_permute_decode_folded`` and ``..._unfolded``.
    sweep_guard : pandas.DataFrame
        The sweep of the guarded matchings, labelled ``encode_permute_decode_folded_min_theta``.

    Returns
    -------
    pandas.DataFrame
        ``layer``, ``pairs_dropped``, ``max_transfer_scale``
        (:math:`\max_i \theta^B_{\pi(i)}/\theta^A_i`, :func:`featmatch.evaluation.transfer.transfer_scale`),
        ``ev_folded``, ``ev_folded_min_theta``, ``ev_unfolded``.
    """
    layers = [t for (t, _) in folded]
    table = pd.DataFrame(
        {
            "layer": layers,
            "pairs_dropped": [guarded[t].meta["n_small_theta_dropped"] for t in layers],
            "max_transfer_scale": [float(np.nanmax(transfer_scale(folded[(t, u)], saes[t], saes[u]))) for (t, u) in folded],
        }
    )
    ev_all = pd.concat([sweep, sweep_guard]).pivot_table(index="layer", columns="method", values="ev")
    for col, name in (("encode_permute_decode_folded", "ev_folded"), (_MIN_THETA_LABEL, "ev_folded_min_theta"),
                      ("encode_permute_decode_unfolded", "ev_unfolded")):
        table[name] = table["layer"].map(ev_all[col])
    return table


# --------------------------------------------------------------------------------------
# The quantile hybrid (Figs. 16, 17) and the L0 study (Fig. 14)
# --------------------------------------------------------------------------------------


def hybrid_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """Tidy the hybrid rows of a pruning sweep: ``layer``, ``q``, ``order`` (cost / random), ``delta_ce``, ``ev``.

    ``q = 0`` and ``q = 1`` do not depend on the order; they are listed under both orders so
    each curve spans [0, 1].
    """
    d = sweep[sweep["kind"] == "quantile_hybrid"].copy()
    d["order"] = np.where(d["method"].str.startswith("random"), "random", "cost")
    ends = d[(d["order"] == "cost") & d["q"].isin([0.0, 1.0])].assign(order="random")
    if (d["order"] == "random").any():
        d = pd.concat([d, ends], ignore_index=True)
    return d[["layer", "q", "order", "delta_ce", "ev"]].sort_values(["layer", "order", "q"]).reset_index(drop=True)


def l0_combinations(layers_l0b: Iterable[int]) -> list[tuple[int, str, str]]:
    """For each ``t`` with second-L0 SAEs at ``t`` and ``t + 1``: the four (variant A, variant B) combinations.

    Returns
    -------
    list of (t, variant_a, variant_b)
        Variants ``"main"`` and ``"l0b"``.
    """
    ls = sorted({int(x) for x in layers_l0b})
    out = []
    for t in ls:
        if t + 1 in ls:
            for va in ("main", "l0b"):
                for vb in ("main", "l0b"):
                    out.append((t, va, vb))
    return out


def l0_study(
    model: Any,
    tokens: Any,
    saes: Mapping[str, Mapping[int, Any]],
    l0: Mapping[tuple[str, int], float],
    combos: Sequence[tuple[int, str, str]],
    methods: Sequence[str | Mapping[str, Any]] = (
        "encode_decode_current",
        "encode_decode_previous",
        {"method": "encode_permute_decode", "fold": True},
    ),
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    r"""Pruning metrics for SAE pairs of different sparsity (Fig. 14, Fig. 15; Sec. 5.3).

    For each ``(t, variant_a, variant_b)``, SAE A is ``saes[variant_a][t]`` and SAE B is
    ``saes[variant_b][t + 1]``, matched with folded SAE Match, and each method of
    :func:`featmatch.evaluation.pruning.pruning_sweep` is run at layer ``t``.

    Parameters
    ----------
    saes : mapping variant -> mapping layer -> SAE
    l0 : mapping (variant, layer) -> float
        Mean L0 of each SAE (e.g. the zoo's held-out quality table).
    combos : sequence of (t, variant_a, variant_b)
        From :func:`l0_combinations`.

    Returns
    -------
    pandas.DataFrame
        The sweep rows plus ``variant_a``, ``variant_b``, ``l0_a``, ``l0_b``,
        ``l0_mismatch`` (:math:`|L0_A - L0_B| / \tfrac12(L0_A + L0_B)`) and ``same_l0``
        (``variant_a == variant_b``).
    """
    from featmatch.evaluation.pruning import pruning_sweep

    frames = []
    for t, va, vb in combos:
        pair_saes = {t: saes[va][t], t + 1: saes[vb][t + 1]}
        df = pruning_sweep(model, tokens, pair_saes, [t], methods, batch_size=batch_size, progress=progress)
        la, lb = float(l0[(va, t)]), float(l0[(vb, t + 1)])
        df = df.assign(
            variant_a=va,
            variant_b=vb,
            l0_a=la,
            l0_b=lb,
            l0_mismatch=abs(la - lb) / max(0.5 * (la + lb), 1e-12),
            same_l0=(va == vb),
        )
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def zoo_l0_study(
    model: Any, tokens: Any, saes: Mapping[int, Any], sae_set: str, profile: str, *, batch_size: int = 8
) -> pd.DataFrame:
    """:func:`l0_study` on the embedded zoo's second-L0 (``-l0b``) SAEs; empty for other SAE sets.

    The L0 of each SAE is the zoo's held-out value (:func:`featmatch.saes.zoo.quality_table`);
    every adjacent pair of ``-l0b`` layers gets the four combinations of
    :func:`l0_combinations`, with ``saes`` as the main set.

    Parameters
    ----------
    model, tokens
        As for :func:`featmatch.evaluation.pruning.pruning_sweep`.
    saes : mapping layer -> SAE
        The main SAEs.
    sae_set : str
        The run's SAE set; only ``featmatch-*`` sets have second-L0 SAEs.
    profile : str
        The zoo profile.

    Returns
    -------
    pandas.DataFrame
        As :func:`l0_study`; empty when the set has no second-L0 pair.
    """
    if not sae_set.startswith("featmatch-"):
        return pd.DataFrame()
    from featmatch.saes.zoo import load_zoo_sae, quality_table

    quality = quality_table(profile)
    l0 = {(r.variant, int(r.layer)): float(r.l0) for r in quality.itertuples()}
    l0b_layers = sorted(layer for (variant, layer) in l0 if variant == "l0b")
    combos = l0_combinations(l0b_layers)
    if not combos:
        return pd.DataFrame()
    saes_by_variant = {"main": saes, "l0b": {t: load_zoo_sae(profile, t, variant="l0b") for t in l0b_layers}}
    return l0_study(model, tokens, saes_by_variant, l0, combos, batch_size=batch_size)


# --------------------------------------------------------------------------------------
# Early layers (Sec. 5.3)
# --------------------------------------------------------------------------------------


def early_layer_table(sweep: pd.DataFrame, l0_stats: ActivationStats) -> pd.DataFrame:
    r"""Per evaluated layer: the EV shortfall of folded EPD and the relative L0 difference of SAEs t, t+1.

    .. math::

        \text{shortfall}_t = EV_t(\text{encode-decode previous}) - EV_t(\text{folded EPD}),\qquad
        \text{gap}_t = \frac{|L0_t - L0_{t+1}|}{\tfrac12 (L0_t + L0_{t+1})}

    Parameters
    ----------
    sweep : pandas.DataFrame
        A pruning sweep with ``encode_decode_previous`` and ``encode_permute_decode_folded``.
    l0_stats : ActivationStats
        Statistics of every layer ``t`` and ``t + 1`` of the sweep (``l0(layer)``).

    Returns
    -------
    pandas.DataFrame
        ``layer``, ``ev_shortfall``, ``l0_t``, ``l0_t1``, ``l0_gap``.
    """
    ev = sweep.pivot_table(index="layer", columns="method", values="ev")
    early = pd.DataFrame(
        {
            "layer": ev.index,
            "ev_shortfall": ev["encode_decode_previous"] - ev["encode_permute_decode_folded"],
            "l0_t": [l0_stats.l0(t) for t in ev.index],
            "l0_t1": [l0_stats.l0(t + 1) for t in ev.index],
        }
    ).reset_index(drop=True)
    early["l0_gap"] = (early["l0_t"] - early["l0_t1"]).abs() / (0.5 * (early["l0_t"] + early["l0_t1"]))
    return early


# --------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------


def claim_pruning_cheap_later(sweep: pd.DataFrame, n_layers: int, extra: float = 0.1, bad: float = 0.5,
                              method: str = "encode_permute_decode_folded") -> Claim:
    """Sec. 5.5 / Fig. 10: pruning with matched features costs little in the later layers.

    The cost of pruning beyond the SAE's own reconstruction error is
    ``ΔCE(method) − ΔCE(encode_decode_current)`` at the same layer. Rule: its median over the
    later layers (see :func:`featmatch.chapters.common.early_late_split`); held if
    ``<= extra`` nats, failed if ``>= bad`` nats.
    """
    p = sweep.pivot_table(index="layer", columns="method", values="delta_ce")
    _, late = early_late_split(p.index, n_layers)
    if method not in p or "encode_decode_current" not in p or not late:
        return Claim("pruning a later layer with matched features costs little", "SAE Match §5.5, Figs. 10, 11", "not run", "not tested")
    x = (p.loc[late, method] - p.loc[late, "encode_decode_current"]).median()
    raw = p.loc[late, method].median()
    c = claim_threshold("pruning a later layer with matched features costs little", "SAE Match §5.5, Figs. 10, 11", float(x),
                        "median over later layers of ΔCE(folded EPD) − ΔCE(encode-decode current), nats",
                        held_at=extra, failed_at=bad, fmt=".3f")
    return Claim(c.claim, c.source, f"{c.ours}; raw median ΔCE {raw:.3f}", c.verdict)


def claim_early_shortfall(early: pd.DataFrame, n_layers: int) -> Claim:
    """Sec. 5.5 / Fig. 11: in the early layers folded EPD explains less than encode-decode previous.

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` of the layers below
    ``n_layers / 3`` whose ``ev_shortfall`` (:func:`early_layer_table`) is positive; a NaN
    shortfall counts as no success.
    """
    return claim_fraction("in early layers matching explains less than encode-decode previous", "SAE Match §5.5, Fig. 11",
                          [float(x > 0) for x in early.loc[early["layer"] < n_layers / 3, "ev_shortfall"]],
                          "early layers with EV(folded EPD) < EV(encode-decode previous)")


def _wins(a: Iterable[float], b: Iterable[float]) -> list[float]:
    """``1.0`` where ``a > b`` else ``0.0`` (NaN on either side is a loss, not a missing case)."""
    return [float(x > y) for x, y in zip(a, b, strict=True)]


def claim_folding_improves_epd(sweep: pd.DataFrame) -> Claim:
    """Fig. 11: folding improves encode-permute-decode (EV).

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` of evaluated layers where
    EV(folded EPD) > EV(unfolded EPD); a NaN EV counts as no success.
    """
    ev = sweep.pivot_table(index="layer", columns="method", values="ev")
    return claim_fraction("folding improves encode-permute-decode (EV)", "SAE Match Fig. 11",
                          _wins(ev["encode_permute_decode_folded"], ev["encode_permute_decode_unfolded"]),
                          "layers with EV(folded EPD) > EV(unfolded EPD)")


def claim_folding_improves_epd_min_theta(theta: pd.DataFrame, min_theta: float) -> Claim:
    """Fig. 11 with the near-zero-θ pairs dropped: folded EPD beats unfolded EPD on EV.

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` of rows of :func:`theta_table`
    with ``ev_folded_min_theta > ev_unfolded``; a NaN EV counts as no success.
    """
    return claim_fraction(f"folding improves encode-permute-decode (EV), pairs with θ < {min_theta:g} dropped", "SAE Match Fig. 11",
                          _wins(theta["ev_folded_min_theta"], theta["ev_unfolded"]),
                          "layers with EV(folded EPD, small θ dropped) > EV(unfolded EPD)")


def claim_top1_beats_permutation(sweep: pd.DataFrame, metric: str = "ev") -> Claim:
    """Feature Flow: many-to-one top-1 decoder cosine gives better EV than the permutation.

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` of evaluated layers where ``ev``
    of the top-1 transfer exceeds that of folded encode-permute-decode.
    """
    p = sweep.pivot_table(index="layer", columns="method", values=metric)
    a, b = "top1_cosine_folded", "encode_permute_decode_folded"
    if a not in p or b not in p:
        return Claim("top-1 cosine beats permutations on EV", "Feature Flow (Laptev et al. 2025)", "not run", "not tested")
    return claim_fraction("top-1 cosine beats permutations on EV", "Feature Flow (Laptev et al. 2025)",
                          (p[a] > p[b]).where(p[[a, b]].notna().all(axis=1)), "layers with EV(top-1 cosine) > EV(folded EPD)")


def claim_hybrid_cost_order(hybrid: pd.DataFrame) -> Claim:
    """App. B: features of low MSE transfer better, so MSE reflects similarity.

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` of (layer, ``0 < q < 1``) cells
    where the hybrid that sends the lowest-cost features through the next decoder has a
    higher EV than the same hybrid with randomly chosen features.
    """
    d = hybrid[(hybrid["q"] > 0) & (hybrid["q"] < 1)]
    p = d.pivot_table(index=["layer", "q"], columns="order", values="ev")
    if "random" not in p or "cost" not in p:
        return Claim("low-MSE matches transfer better (MSE reflects similarity)", "SAE Match App. B, Figs. 16, 17", "not run", "not tested")
    return claim_fraction("low-MSE matches transfer better (MSE reflects similarity)", "SAE Match App. B, Figs. 16, 17",
                          (p["cost"] > p["random"]).where(p[["cost", "random"]].notna().all(axis=1)),
                          "(layer, q) cells with EV(cost-ordered hybrid) > EV(random-ordered)")


def claim_l0_mismatch(study: pd.DataFrame, method: str = "encode_permute_decode_folded", metric: str = "ev") -> Claim:
    """Sec. 5.3 / Fig. 15: matching works better between SAEs of similar L0.

    Rule: for each layer and each SAE A, compare the same-L0 partner (same variant) with the
    other-L0 partner; :func:`~featmatch.chapters.claims.claim_fraction` of comparisons where
    the same-L0 pair has the higher ``metric``.
    """
    d = study[study["method"] == method]
    wins = []
    for (_t, va), g in d.groupby(["layer", "variant_a"]):
        same = g.loc[g["variant_b"] == va, metric]
        other = g.loc[g["variant_b"] != va, metric]
        if len(same) and len(other):
            wins.append(float(same.iloc[0] > other.iloc[0]))
    return claim_fraction("matching works better between SAEs of similar L0", "SAE Match §5.3, Fig. 15", wins,
                          f"comparisons where the same-L0 partner gives higher {metric.upper()} for {METHOD_LABELS.get(method, method)}")


def claim_higher_l0(study: pd.DataFrame) -> Claim:
    """Fig. 14 left: higher-L0 (denser) SAEs give a lower ΔCE for every method.

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` over (layer, method) of same-L0
    pairs where the denser pair has the lower ΔCE.
    """
    d = study[study["same_l0"]]
    wins = []
    for (_t, _m), g in d.groupby(["layer", "method"]):
        if len(g) >= 2:
            g = g.sort_values("l0_a")
            wins.append(float(g["delta_ce"].iloc[-1] < g["delta_ce"].iloc[0]))
    return claim_fraction("denser SAEs (higher L0) give lower ΔCE", "SAE Match App. A, Fig. 14", wins,
                          "(layer, method) cells where the higher-L0 pair has lower ΔCE")


def claim_l0_explains_early(l0_gap: Sequence[float], quality_gap: Sequence[float]) -> Claim:
    """Sec. 5.3: the early-layer drop is explained by L0 differences between adjacent SAEs.

    ``l0_gap`` is the relative L0 difference of each adjacent pair and ``quality_gap`` the
    shortfall of matching there (e.g. EV(encode-decode previous) − EV(folded EPD), both from
    :func:`early_layer_table`). Rule: Spearman correlation across layers; held if ``>= 0.5``,
    failed if ``<= 0``.
    """
    rho = spearman(l0_gap, quality_gap)
    return claim_threshold("the early-layer drop comes from L0 differences between adjacent SAEs", "SAE Match §5.3, Fig. 15",
                           rho, "Spearman ρ(|ΔL0| / L0, EV shortfall of folded EPD vs encode-decode previous) over layers",
                           held_at=0.5, failed_at=0.0, fmt=".2f")
