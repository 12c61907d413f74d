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

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featmatch.chapters.claims import Claim, chance_mean
from featmatch.chapters.common import Pair, early_late_split, layers_at_depth
from featmatch.evaluation.transfer import transfer_scale

if TYPE_CHECKING:
    from featmatch.lm.activations import ActivationStats
    from featmatch.matching._matching import Matching

__all__ = [
    "METHOD_LABELS",
    "PAPER_HYBRID_FRACTIONS",
    "hybrid_layers",
    "theta_check_table",
    "splice_quality",
    "seed_ceiling_table",
    "hybrid_table",
    "l0_combinations",
    "l0_study",
    "zoo_l0_study",
    "early_layer_table",
    "claim_pruning_cheap_later",
    "claim_early_shortfall",
    "claim_folding_improves_epd",
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
    "epd_unfolded_perm_folded_scale": "EPD: unfolded permutation, folded scale",
}

#: The paper's hybrid layers 3, 10 and 20 of Gemma-2-2B's 26, as fractions of the depth.
PAPER_HYBRID_FRACTIONS: tuple[float, ...] = (3 / 26, 10 / 26, 20 / 26)


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


def theta_check_table(folded: Mapping[Pair, Matching], saes: Mapping[int, Any], rel: float = 0.01) -> pd.DataFrame:
    r"""Per evaluated layer pair: how many thresholds are near zero, and the largest transfer scale.

    Folded transfer scales feature :math:`i` by :math:`\theta^B_{\pi(i)}/\theta^A_i`; a
    near-zero :math:`\theta^A_i` turns that into a huge factor. A θ is *near zero* when it is
    below ``rel`` times its layer's median θ (scale-free, so it applies to any SAE set). The
    folding claims use "no near-zero θ" as a precondition instead of dropping features from
    one method only.

    Returns
    -------
    pandas.DataFrame
        ``layer``, ``near_zero_theta_a``, ``near_zero_theta_b``, ``min_theta_ratio_a``
        (smallest θ over the layer's median), ``max_transfer_scale``
        (:func:`featmatch.evaluation.transfer.transfer_scale`).
    """
    from featmatch.evaluation.transfer import thetas
    from featmatch.saes._sae import weights

    def th(layer: int) -> np.ndarray:
        return np.asarray(thetas(weights(saes[layer])), dtype=float)

    rows = []
    for (t, u), m in folded.items():
        ta, tb = th(t), th(u)
        med_a, med_b = float(np.median(ta)), float(np.median(tb))
        rows.append({
            "layer": t,
            "near_zero_theta_a": int(np.sum(ta < rel * med_a)),
            "near_zero_theta_b": int(np.sum(tb < rel * med_b)),
            "min_theta_ratio_a": float(ta.min() / med_a) if med_a > 0 else math.nan,
            "max_transfer_scale": float(np.nanmax(transfer_scale(m, saes[t], saes[u]))),
        })
    return pd.DataFrame(rows)


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
    cols = ["layer", "q", "order", "delta_ce", "ev"] + (["delta_ce_seq"] if "delta_ce_seq" in d else [])
    return d[cols].sort_values(["layer", "order", "q"]).reset_index(drop=True)


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


def splice_quality(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per evaluated layer: the ΔCE and EV of the SAE alone (encode-decode of the current
    hidden state), beside layer drop and folded EPD — the SAE quality that the pruning
    claims take as their precondition."""
    p = sweep.pivot_table(index="layer", columns="method", values=["delta_ce", "ev"])
    out = pd.DataFrame(index=p.index)
    for col, label in (("encode_decode_current", "sae"), ("layer_drop", "drop"), ("encode_permute_decode_folded", "epd")):
        for metric in ("delta_ce", "ev"):
            if (metric, col) in p:
                out[f"{metric}_{label}"] = p[(metric, col)]
    return out.reset_index()


def seed_ceiling_table(model: Any, tokens: Any, saes: Mapping[int, Any], seeds: Mapping[int, Any],
                       sweep: pd.DataFrame, *, batch_size: int = 8) -> pd.DataFrame:
    """The same-layer ceiling of encode–permute–decode, beside the adjacent-layer numbers.

    For each layer t with a second-seed SAE (:func:`featmatch.chapters.common.seed_saes`):
    ΔCE and EV of folded encode–permute–decode from the main SAE of t to its second seed
    (:func:`featmatch.evaluation.pruning.same_layer_transfer`: nothing is pruned, only the
    features exchanged), and, where the sweep evaluated layer t, the SAE splice alone, layer
    drop and folded EPD to t + 1.
    """
    from featmatch.chapters.common import MATCH_VARIANTS
    from featmatch.evaluation.pruning import same_layer_transfer
    from featmatch.matching._matching import match

    p = sweep.pivot_table(index="layer", columns="method", values="delta_ce") if len(sweep) else pd.DataFrame()
    rows = []
    for t, seed_sae in seeds.items():
        r = same_layer_transfer(model, tokens, saes[t], seed_sae, match(saes[t], seed_sae, **MATCH_VARIANTS["folded"]),
                                batch_size=batch_size)
        row = {"layer": t, "delta_ce_same_layer_epd": r["delta_ce"], "ev_same_layer_epd": r["ev"]}
        for col, name in (("encode_decode_current", "delta_ce_sae"), ("layer_drop", "delta_ce_drop"),
                          ("encode_permute_decode_folded", "delta_ce_adjacent_epd")):
            row[name] = float(p.loc[t, col]) if t in p.index and col in p.columns else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------

CHAPTER = "03"
SECTION_SWEEP = "ΔCE and EV per layer (Figs. 10, 11)"
SECTION_THETA = "Folding and near-zero thresholds"
SECTION_HYBRID = "The MSE-quantile hybrid (App. B, Figs. 16, 17)"
SECTION_L0 = "Sparsity: the second-L0 SAEs (Fig. 14) and similar L0 across layers (Fig. 15)"
SECTION_EARLY = "Early layers (Sec. 5.3)"

#: SAE quality that makes a pruning claim testable: the SAE's own splice costs at most this
#: many nats, and explains at least :data:`MIN_SAE_EV` of the variance, at every layer used.
MAX_SAE_DCE = 0.5
MIN_SAE_EV = 0.6
#: ΔCE tolerance (nats) of the pruning claims.
DCE_TOL = 0.1


def _seq(sweep: pd.DataFrame, method: str, layers: Sequence[int]) -> np.ndarray:
    """Per sequence: the mean over ``layers`` of ``method``'s ΔCE (NaN array if missing)."""
    rows = sweep[(sweep["method"] == method) & sweep["layer"].isin(list(layers))]
    if rows.empty or "delta_ce_seq" not in rows:
        return np.array([])
    return np.mean(np.stack([np.asarray(x, dtype=float) for x in rows["delta_ce_seq"]]), axis=0)


def sae_quality_ok(sweep: pd.DataFrame, layers: Sequence[int]) -> dict[str, bool]:
    """The SAE-quality preconditions of the pruning claims at ``layers``."""
    q = splice_quality(sweep).set_index("layer")
    q = q.loc[[t for t in layers if t in q.index]]
    if q.empty or "delta_ce_sae" not in q:
        return {"SAE splices evaluated": False}
    return {
        f"SAE splice ΔCE ≤ {MAX_SAE_DCE} nats at every layer used (max {q['delta_ce_sae'].max():.2f})":
            bool((q["delta_ce_sae"] <= MAX_SAE_DCE).all()),
        f"SAE EV ≥ {MIN_SAE_EV} at every layer used (min {q['ev_sae'].min():.2f})": bool((q["ev_sae"] >= MIN_SAE_EV).all()),
    }


def claim_pruning_cheap_later(sweep: pd.DataFrame, n_layers: int, *, extra: float = DCE_TOL,
                              method: str = "encode_permute_decode_folded") -> list[Claim]:
    """Sec. 5.5 / Fig. 10: pruning with matched features costs little in the later layers.

    Row 1: the cost beyond the SAE's own error, per sequence the mean over the later layers of
    ΔCE(``method``) − ΔCE(encode-decode current); effect = ``extra`` − that cost (positive:
    cheaper than ``extra`` nats), tolerance 0.02 nats. Row 2: against simply dropping the
    block: ΔCE(layer drop) − ΔCE(``method``) per sequence, tolerance :data:`DCE_TOL`; positive
    means matched pruning beats skipping the block. Both resample sequences; both take SAE
    quality as a precondition (:func:`sae_quality_ok`).
    """
    from featmatch.chapters.claims import claim_from_samples, make_claim

    layers = sorted(set(sweep["layer"]))
    _, late = early_late_split(layers, n_layers)
    pre = sae_quality_ok(sweep, late)
    epd, sae, drop = _seq(sweep, method, late), _seq(sweep, "encode_decode_current", late), _seq(sweep, "layer_drop", late)
    cost = epd - sae if epd.size and sae.size else np.array([])
    from featmatch.chapters.claims import bootstrap_ci

    est, lo, hi = bootstrap_ci(cost)
    rows = [make_claim(
        chapter=CHAPTER, claim="pruning a later layer with matched features costs little beyond the SAE's own error",
        source="SAE Match §5.5, Figs. 10, 11", paper_value="small ΔCE in the later layers",
        our_value=est, effect=extra - est, ci=(extra - hi, extra - lo), chance=math.nan, n=int(cost.size),
        unit="sequences (mean over later layers)", tolerance=0.02, effect_name=f"{extra:g} − extra ΔCE",
        preconditions={**pre, "later layers evaluated": bool(late)}, section=SECTION_SWEEP,
    )]
    rows.append(claim_from_samples(
        drop - epd if drop.size and epd.size else np.array([]), chance=0.0, chapter=CHAPTER,
        claim="matched pruning beats dropping the block (later layers)",
        source="SAE Match §5.5, Fig. 10 (layer drop: featmatch's baseline)",
        paper_value="pruning with matched features is cheap", unit="sequences (mean over later layers)",
        tolerance=DCE_TOL, effect_name="ΔCE(drop) − ΔCE(EPD)", preconditions=pre, section=SECTION_SWEEP,
    ))
    return rows


def claim_early_shortfall(early: pd.DataFrame, n_layers: int, *, tolerance: float = 0.05) -> Claim:
    """Sec. 5.5 / Fig. 11: in the early layers folded EPD explains less than encode-decode previous.

    Effect: mean ``ev_shortfall`` (:func:`early_layer_table`) over the layers below
    ``n_layers / 3``, bootstrap CI over those layers, chance 0, tolerance ``tolerance`` EV.
    """
    from featmatch.chapters.claims import claim_from_samples

    x = early.loc[early["layer"] < n_layers / 3, "ev_shortfall"].to_numpy(float)
    return claim_from_samples(
        x, chance=0.0, chapter=CHAPTER, claim="in early layers matching explains less than encode-decode previous",
        source="SAE Match §5.5, Fig. 11", paper_value="EV(folded EPD) < EV(encode-decode previous) early",
        unit="early layers", tolerance=tolerance, effect_name="EV shortfall",
        preconditions={"≥ 3 early layers": int(np.sum(~np.isnan(x))) >= 3}, section=SECTION_EARLY,
    )


def claim_folding_improves_epd(sweep: pd.DataFrame, theta: pd.DataFrame, *, a: str = "encode_permute_decode_unfolded",
                               b: str = "encode_permute_decode_folded", claim: str = "folding improves encode-permute-decode (ΔCE)",
                               paper_value: str = "folded EPD has lower ΔCE than unfolded") -> Claim:
    """Fig. 11: folding improves encode-permute-decode, on ΔCE per sequence.

    Effect: ΔCE(``a``) − ΔCE(``b``) per sequence, averaged over every evaluated layer
    (positive: ``b`` is better), tolerance :data:`DCE_TOL`. Preconditions: no near-zero θ
    at the evaluated layers (:func:`theta_check_table`) and SAE quality. Identical ΔCE for
    every sequence (ReLU SAEs, where folding is the identity) reads not testable (a tie).
    """
    from featmatch.chapters.claims import claim_from_samples

    layers = sorted(set(sweep["layer"]))
    xa, xb = _seq(sweep, a, layers), _seq(sweep, b, layers)
    d = xa - xb if xa.size and xb.size else np.array([])
    tie = bool(d.size) and bool(np.all(d == 0))
    near = int(theta[["near_zero_theta_a", "near_zero_theta_b"]].to_numpy().sum()) if len(theta) else 0
    return claim_from_samples(
        d, chance=0.0, tie=tie, chapter=CHAPTER, claim=claim, source="SAE Match §5.5, Fig. 11", paper_value=paper_value,
        unit="sequences (mean over evaluated layers)", tolerance=DCE_TOL, effect_name="ΔCE difference",
        preconditions={f"no near-zero θ at the evaluated layers ({near} found)": near == 0, **sae_quality_ok(sweep, layers)},
        section=SECTION_THETA,
    )


def claim_top1_beats_permutation(sweep: pd.DataFrame, *, tolerance: float = DCE_TOL) -> Claim:
    """Feature Flow: the many-to-one top-1 decoder-cosine transfer beats the permutation.

    Effect: ΔCE(folded EPD) − ΔCE(top-1 cosine) per sequence, averaged over the evaluated
    layers, tolerance :data:`DCE_TOL` (ΔCE rather than EV: it has a per-sequence unit).
    """
    from featmatch.chapters.claims import claim_from_samples

    layers = sorted(set(sweep["layer"]))
    a, b = _seq(sweep, "encode_permute_decode_folded", layers), _seq(sweep, "top1_cosine_folded", layers)
    return claim_from_samples(
        a - b if a.size and b.size else np.array([]), chance=0.0, chapter=CHAPTER,
        claim="top-1 cosine transfer beats the permutation (ΔCE)", source="Feature Flow (Laptev et al. 2025) §4",
        paper_value="top-1 transfer explains more than a one-to-one map", unit="sequences (mean over evaluated layers)",
        tolerance=tolerance, effect_name="ΔCE(EPD) − ΔCE(top-1)", preconditions=sae_quality_ok(sweep, layers),
        section=SECTION_SWEEP,
    )


def claim_hybrid_cost_order(hybrid: pd.DataFrame, *, tolerance: float = DCE_TOL) -> Claim:
    """App. B: features of low MSE transfer better, so MSE reflects similarity.

    Per (layer, ``0 < q < 1``) cell and sequence: ΔCE(random-ordered hybrid) − ΔCE(cost-ordered
    hybrid); the unit is the sequence, averaged over cells. Chance 0 (the random order is the
    null). Tolerance :data:`DCE_TOL` nats.
    """
    from featmatch.chapters.claims import claim_from_samples

    d = hybrid[(hybrid["q"] > 0) & (hybrid["q"] < 1)]
    diffs = []
    for (_t, _q), g in d.groupby(["layer", "q"]):
        r, c = g[g["order"] == "random"], g[g["order"] == "cost"]
        if len(r) and len(c) and "delta_ce_seq" in g:
            diffs.append(np.asarray(r["delta_ce_seq"].iloc[0], float) - np.asarray(c["delta_ce_seq"].iloc[0], float))
    x = np.mean(np.stack(diffs), axis=0) if diffs else np.array([])
    return claim_from_samples(
        x, chance=0.0, chapter=CHAPTER, claim="low-MSE matches transfer better than random ones (cost-ordered hybrid)",
        source="SAE Match App. B, Figs. 16, 17", paper_value="cost order beats random order at every q",
        unit="sequences (mean over (layer, q) cells)", tolerance=tolerance, effect_name="ΔCE(random) − ΔCE(cost)",
        preconditions={"≥ 1 (layer, q) cell": bool(diffs)}, section=SECTION_HYBRID,
    )


def claim_l0_mismatch(study: pd.DataFrame, method: str = "encode_permute_decode_folded", *, tolerance: float = DCE_TOL) -> Claim:
    """Sec. 5.3 / Fig. 15: matching works better between SAEs of similar L0.

    Per (layer, SAE A): ΔCE(other-L0 partner) − ΔCE(same-L0 partner) per sequence; the unit is
    the sequence, averaged over the comparisons.
    """
    from featmatch.chapters.claims import claim_from_samples

    d = study[study["method"] == method]
    diffs = []
    for (_t, va), g in d.groupby(["layer", "variant_a"]):
        same, other = g[g["variant_b"] == va], g[g["variant_b"] != va]
        if len(same) and len(other) and "delta_ce_seq" in g:
            diffs.append(np.asarray(other["delta_ce_seq"].iloc[0], float) - np.asarray(same["delta_ce_seq"].iloc[0], float))
    x = np.mean(np.stack(diffs), axis=0) if diffs else np.array([])
    return claim_from_samples(
        x, chance=0.0, chapter=CHAPTER, claim="matching works better between SAEs of similar L0",
        source="SAE Match §5.3, Fig. 15", paper_value="same-L0 pairs prune better", unit="sequences (mean over comparisons)",
        tolerance=tolerance, effect_name="ΔCE(other L0) − ΔCE(same L0)", preconditions={"≥ 1 comparison": bool(diffs)},
        section=SECTION_L0,
    )


def claim_higher_l0(study: pd.DataFrame, *, tolerance: float = DCE_TOL) -> Claim:
    """Fig. 14 left: higher-L0 (denser) SAEs give a lower ΔCE.

    Per (layer, method) among same-L0 pairs: ΔCE(sparser pair) − ΔCE(denser pair) per sequence,
    averaged over the cells.
    """
    from featmatch.chapters.claims import claim_from_samples

    d = study[study["same_l0"]]
    diffs = []
    for (_t, _m), g in d.groupby(["layer", "method"]):
        if len(g) >= 2 and "delta_ce_seq" in g:
            g = g.sort_values("l0_a")
            diffs.append(np.asarray(g["delta_ce_seq"].iloc[0], float) - np.asarray(g["delta_ce_seq"].iloc[-1], float))
    x = np.mean(np.stack(diffs), axis=0) if diffs else np.array([])
    return claim_from_samples(
        x, chance=0.0, chapter=CHAPTER, claim="denser SAEs (higher L0) give lower ΔCE", source="SAE Match App. A, Fig. 14",
        paper_value="ΔCE falls as L0 rises", unit="sequences (mean over (layer, method) cells)", tolerance=tolerance,
        effect_name="ΔCE(sparser) − ΔCE(denser)", preconditions={"≥ 1 cell": bool(diffs)}, section=SECTION_L0,
    )


def claim_l0_explains_early(l0_gap: Sequence[float], quality_gap: Sequence[float], *, tolerance: float = 0.3) -> Claim:
    """Sec. 5.3: the early-layer drop is explained by L0 differences between adjacent SAEs.

    Spearman ρ(relative L0 gap, EV shortfall) over the evaluated layers, bootstrap CI over
    layers, chance from shuffled layers; tolerance ``tolerance``.
    """
    from scipy.stats import spearmanr

    from featmatch.chapters.claims import bootstrap_corr, make_claim, null_distribution

    x, y = np.asarray(l0_gap, float), np.asarray(quality_gap, float)
    rho, lo, hi = bootstrap_corr(x, y, method="spearman")
    ok = ~(np.isnan(x) | np.isnan(y))
    chance = (chance_mean(null_distribution(lambda rng: spearmanr(rng.permutation(x[ok]), y[ok]).statistic, n=200))
              if ok.sum() >= 4 else math.nan)
    return make_claim(
        chapter=CHAPTER, claim="the early-layer drop comes from L0 differences between adjacent SAEs",
        source="SAE Match §5.3, Fig. 15", paper_value="larger L0 gaps, worse matching", our_value=rho,
        effect=rho - chance, ci=(lo - chance, hi - chance), chance=chance, n=int(ok.sum()), unit="layers",
        tolerance=tolerance, effect_name="ρ − chance", preconditions={"≥ 6 layers": int(ok.sum()) >= 6}, section=SECTION_EARLY,
    )
