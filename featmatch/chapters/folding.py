r"""Chapter 01, folding thresholds into the weights: tables and claims.

SAE Match (Balagansky et al., ICLR 2025) folds each JumpReLU threshold into the weights
before matching (Eq. 4): :math:`W'_{enc}[:, i] = W_{enc}[:, i] / \theta_i`,
:math:`W'_{dec}[i] = \theta_i W_{dec}[i]`. The functions here build what notebook
``01_folding`` shows: thresholds against hidden-state norms (Fig. 1), the parameter MSE of
matched features (Fig. 3), matching scores per variant (Figs. 7, 12), how often folding
changes a match (Feature Flow), match cost against matching score (Figs. 5, 6), and the
``claim_*`` rows of the chapter's claims table.

Shared helpers (pairs, matchings, judging) are in :mod:`featmatch.chapters.common`, the
figures in :mod:`featmatch.chapters.plots`, the verdict rules in
:mod:`featmatch.chapters.claims`.

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656 (Figs. 1, 3-7, 12; Sec. 5.1-5.3).
.. [2] D. Laptev, N. Balagansky, Y. Aksenov, D. Gavrilov. "Analyze Feature Flow to Enhance
   Interpretation and Steering in Language Models." 2025 (folding and the encoder bias).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featmatch.chapters.claims import Claim, claim_fraction, claim_threshold
from featmatch.chapters.common import Pair, pearson, permutation_change
from featmatch.evaluation.transfer import thetas

if TYPE_CHECKING:
    from featmatch.lm.activations import ActivationStats
    from featmatch.matching._matching import Matching

__all__ = [
    "threshold_norm_table",
    "norm_dynamics_table",
    "norm_correlations",
    "parameter_mse_table",
    "score_table",
    "feature_table",
    "folding_change_table",
    "cost_score_correlation",
    "cost_score_correlations",
    "binned_scores",
    "focus_pair",
    "best_worst_pairs",
    "claim_theta_tracks_norm",
    "claim_folding_improves",
    "claim_cost_reflects_similarity",
    "claim_encoder_decoder",
    "claim_folding_barely_matters",
    "claim_judge_folding",
]


# --------------------------------------------------------------------------------------
# Fig. 1: thresholds and hidden-state norms
# --------------------------------------------------------------------------------------


def threshold_norm_table(saes: Mapping[int, Any], stats: ActivationStats | None = None) -> pd.DataFrame:
    r"""Per layer: the thresholds, decoder norms and the hidden-state norm (Fig. 1, left).

    Parameters
    ----------
    saes : mapping int -> sae_lens.SAE
    stats : ActivationStats, optional
        Supplies ``resid_norm_mean`` (mean :math:`\|h\|` of the residual the SAE reads, BOS
        excluded) and the L0 on the same tokens; without it those columns are NaN.

    Returns
    -------
    pandas.DataFrame
        One row per layer: ``layer``, ``theta_mean``, ``theta_median``, ``dec_norm_mean``
        (mean :math:`\|W_{dec}[i]\|`), ``folded_dec_norm_mean`` (mean
        :math:`\|\theta_i W_{dec}[i]\|`), ``resid_norm_mean``, ``l0``.
    """
    from featmatch.saes._sae import weights

    rows = []
    for layer in sorted(saes):
        w = weights(saes[layer])
        th = thetas(w)
        dec = w.W_dec.double().norm(dim=1).numpy()
        has = stats is not None and layer in getattr(stats, "resid_norm_mean", {})
        rows.append(
            {
                "layer": int(layer),
                "theta_mean": float(th.mean()),
                "theta_median": float(np.median(th)),
                "dec_norm_mean": float(dec.mean()),
                "folded_dec_norm_mean": float((dec * th).mean()),
                "resid_norm_mean": float(stats.resid_norm_mean[layer]) if has else math.nan,
                "l0": float(stats.l0(layer)) if has else math.nan,
            }
        )
    return pd.DataFrame(rows)


def norm_dynamics_table(
    saes: Mapping[int, Any], stats: ActivationStats, matchings: Mapping[Pair, Matching]
) -> pd.DataFrame:
    r"""Per pair: change of the hidden-state norm and of the matched folded decoder norms (Fig. 1, right).

    .. math::

        \Delta\|h\| = \overline{\|h_B\|} - \overline{\|h_A\|},\qquad
        \Delta\|W'_{dec}\| = \operatorname{mean}_{i\ \text{matched}}
            \big(\|\theta^B_{\pi(i)} W^B_{dec}[\pi(i)]\| - \|\theta^A_i W^A_{dec}[i]\|\big)

    The paper's argument is that after folding the second tracks the first.

    Returns
    -------
    pandas.DataFrame
        ``layer_a``, ``layer_b``, ``resid_norm_change``, ``matched_dec_norm_change``.
    """
    from featmatch.saes._sae import weights

    def folded_norms(layer: int) -> np.ndarray:
        w = weights(saes[layer])
        return w.W_dec.double().norm(dim=1).numpy() * thetas(w)

    rows = []
    for (la, lb), m in sorted(matchings.items()):
        na, nb = folded_norms(la), folded_norms(lb)
        ok = m.perm >= 0
        change = float(np.mean(nb[m.perm[ok]] - na[ok])) if ok.any() else math.nan
        rows.append(
            {
                "layer_a": la,
                "layer_b": lb,
                "resid_norm_change": float(stats.resid_norm_mean[lb] - stats.resid_norm_mean[la]),
                "matched_dec_norm_change": change,
            }
        )
    return pd.DataFrame(rows)


def norm_correlations(norms: pd.DataFrame, dyn: pd.DataFrame) -> dict[str, float]:
    r"""The three Pearson correlations the notebook prints under Fig. 1.

    * ``theta``: :math:`r(\overline\theta, \overline{\|h\|})` over layers;
    * ``dec``: :math:`r(\overline{\|\theta W_{dec}\|}, \overline{\|h\|})` over layers;
    * ``dyn``: :math:`r(\Delta\|h\|, \Delta\|W'_{dec}\|)` over pairs of layers.

    Plain ``numpy.corrcoef`` (NaN propagates), unlike the claim rule
    :func:`claim_theta_tracks_norm`, which drops non-finite entries.

    Parameters
    ----------
    norms : pandas.DataFrame
        From :func:`threshold_norm_table`.
    dyn : pandas.DataFrame
        From :func:`norm_dynamics_table`.
    """
    return {
        "theta": float(np.corrcoef(norms["theta_mean"], norms["resid_norm_mean"])[0, 1]),
        "dec": float(np.corrcoef(norms["folded_dec_norm_mean"], norms["resid_norm_mean"])[0, 1]),
        "dyn": float(np.corrcoef(dyn["resid_norm_change"], dyn["matched_dec_norm_change"])[0, 1]),
    }


# --------------------------------------------------------------------------------------
# Fig. 3: parameter MSE in the folded scale
# --------------------------------------------------------------------------------------


def parameter_mse_table(
    saes: Mapping[int, Any],
    matchings: Mapping[str, Mapping[Pair, Matching]],
    parts: Sequence[str] = ("encoder", "decoder"),
    variants: Sequence[str] = ("folded", "unfolded"),
) -> pd.DataFrame:
    """MSE of matched parameters in the folded scale, per pair, part and variant (Fig. 3).

    ``"vanilla"`` (the identity, no permutation) is always added; the other variants use
    their matchings from ``matchings[variant]`` and are scored with
    :func:`featmatch.evaluation.metrics.parameter_mse`: the permutation is found in the variant's own
    scale, and the MSE is always taken on folded parameters, as in the paper. The decoder
    bias is not scored (it does not depend on the feature order).

    Parameters
    ----------
    saes : mapping int -> SAE
    matchings : mapping variant -> mapping pair -> Matching
    parts : sequence of {"encoder", "decoder", "both"}
    variants : sequence of str
        Keys of ``matchings`` to score.

    Returns
    -------
    pandas.DataFrame
        ``layer_a``, ``layer_b``, ``part``, ``variant`` (``vanilla`` first), ``mse``.
    """
    from featmatch.evaluation.metrics import parameter_mse

    pairs = sorted(next(iter(matchings.values())).keys()) if matchings else []
    rows = []
    for la, lb in pairs:
        for part in parts:
            van = parameter_mse(saes[la], saes[lb], None, on=part, variant="vanilla")
            rows.append({"layer_a": la, "layer_b": lb, "part": part, "variant": "vanilla", "mse": van.mean})
            for v in variants:
                m = matchings[v][(la, lb)]
                kind = "folded" if m.meta.get("fold", True) else "unfolded"
                s = parameter_mse(saes[la], saes[lb], m, on=part, variant=kind)
                rows.append({"layer_a": la, "layer_b": lb, "part": part, "variant": v, "mse": s.mean})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# Matching score and correlation (Figs. 6, 7, 12)
# --------------------------------------------------------------------------------------


def score_table(
    stats: ActivationStats,
    matchings: Mapping[str, Mapping[Pair, Matching]],
    *,
    min_fires: int = 1,
) -> pd.DataFrame:
    r"""Mean matching score and activation correlation of every variant and pair.

    The matching score of feature :math:`i` is
    :math:`P(f^B_{\pi(i)} > 0 \mid f^A_i > 0)` on the same tokens
    (:func:`featmatch.evaluation.metrics.matching_score`).

    Parameters
    ----------
    stats : ActivationStats
        Must hold the pair statistics of every pair in ``matchings``.
    matchings : mapping variant -> mapping pair -> Matching
    min_fires : int
        Features of A firing fewer times are not scored (see
        :func:`featmatch.evaluation.metrics.matching_score`).

    Returns
    -------
    pandas.DataFrame
        ``layer_a``, ``layer_b``, ``variant``, ``matching_score``, ``correlation``,
        ``n_scored`` (features entering the score).
    """
    from featmatch.evaluation.metrics import activation_correlation, matching_score

    rows = []
    for variant, by_pair in matchings.items():
        for (la, lb), m in sorted(by_pair.items()):
            s = matching_score(stats, la, lb, m, min_fires=min_fires)
            c = activation_correlation(stats, la, lb, m)
            rows.append(
                {
                    "layer_a": la,
                    "layer_b": lb,
                    "variant": variant,
                    "matching_score": s.mean,
                    "correlation": c.mean,
                    "n_scored": s.n,
                }
            )
    return pd.DataFrame(rows)


def feature_table(stats: ActivationStats, la: int, lb: int, matching: Matching) -> pd.DataFrame:
    """One row per feature of layer A: its match, cost, matching score and correlation.

    Returns
    -------
    pandas.DataFrame
        ``layer_a``, ``feature_a``, ``layer_b``, ``feature_b`` (-1 unmatched), ``cost``,
        ``matching_score``, ``correlation`` (NaN where undefined), ``fires_a``, ``fires_b``
        (firing counts on the statistics' tokens).
    """
    from featmatch.evaluation.metrics import activation_correlation, matching_score

    perm = np.asarray(matching.perm)
    fires_b = np.asarray(stats.fire_count[lb])
    return pd.DataFrame(
        {
            "layer_a": la,
            "feature_a": np.arange(perm.size),
            "layer_b": lb,
            "feature_b": perm,
            "cost": matching.cost,
            "matching_score": matching_score(stats, la, lb, matching).per_feature,
            "correlation": activation_correlation(stats, la, lb, matching).per_feature,
            "fires_a": np.asarray(stats.fire_count[la]),
            "fires_b": np.where(perm >= 0, fires_b[np.clip(perm, 0, None)], 0),
        }
    )


def folding_change_table(
    matchings: Mapping[str, Mapping[Pair, Matching]],
    comparisons: Mapping[str, tuple[str, str]] | None = None,
) -> pd.DataFrame:
    """How many matches folding changes, with and without the encoder bias (Feature Flow).

    Parameters
    ----------
    matchings : mapping variant -> mapping pair -> Matching
    comparisons : mapping name -> (variant, variant), optional
        Default: ``"fold, no b_enc"`` = folded vs unfolded; ``"fold, with b_enc"`` =
        folded+b_enc vs unfolded+b_enc; ``"b_enc (folded)"`` = folded+b_enc vs folded.
        Comparisons whose variants are missing are skipped.

    Returns
    -------
    pandas.DataFrame
        ``layer_a``, ``layer_b``, ``comparison``, ``frac_changed``
        (:func:`featmatch.chapters.common.permutation_change`).
    """
    if comparisons is None:
        comparisons = {
            "fold, no b_enc": ("folded", "unfolded"),
            "fold, with b_enc": ("folded+b_enc", "unfolded+b_enc"),
            "b_enc (folded)": ("folded+b_enc", "folded"),
        }
    rows = []
    for name, (v1, v2) in comparisons.items():
        if v1 not in matchings or v2 not in matchings:
            continue
        for pair in sorted(matchings[v1]):
            rows.append(
                {
                    "layer_a": pair[0],
                    "layer_b": pair[1],
                    "comparison": name,
                    "frac_changed": permutation_change(matchings[v1][pair], matchings[v2][pair]),
                }
            )
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "comparison", "frac_changed"])


# --------------------------------------------------------------------------------------
# Figs. 5, 6: cost against matching score
# --------------------------------------------------------------------------------------


def cost_score_correlation(features: pd.DataFrame, *, min_fires: int = 1, score: str = "matching_score") -> float:
    """Spearman rank correlation of match cost and ``score`` over the scored features.

    Hypothesis 1 says low cost means similar features, i.e. a *negative* correlation.

    Parameters
    ----------
    features : pandas.DataFrame
        From :func:`feature_table`.
    min_fires : int
        Only features of A firing at least this often.

    Returns
    -------
    float
        NaN with fewer than 3 features or a constant column.
    """
    from scipy.stats import spearmanr

    d = features[(features["fires_a"] >= min_fires) & features["cost"].notna() & features[score].notna()]
    if len(d) < 3 or d["cost"].nunique() < 2 or d[score].nunique() < 2:
        return math.nan
    return float(spearmanr(d["cost"], d[score]).statistic)


def cost_score_correlations(
    stats: ActivationStats, matchings: Mapping[Pair, Matching], *, min_fires: int = 1
) -> pd.DataFrame:
    """:func:`cost_score_correlation` of every pair's :func:`feature_table`.

    Parameters
    ----------
    stats : ActivationStats
        With the pair statistics of every pair.
    matchings : mapping pair -> Matching
        One variant's matchings (the notebook uses ``"folded"``), in the order of the rows.
    min_fires : int

    Returns
    -------
    pandas.DataFrame
        ``layer_a``, ``layer_b``, ``rho``.
    """
    return pd.DataFrame(
        [
            {"layer_a": la, "layer_b": lb,
             "rho": cost_score_correlation(feature_table(stats, la, lb, m), min_fires=min_fires)}
            for (la, lb), m in matchings.items()
        ]
    )


def binned_scores(features: pd.DataFrame, n_bins: int = 10, *, min_fires: int = 1, score: str = "matching_score") -> pd.DataFrame:
    """Mean ``score`` per cost-quantile bin (the curve of the cost-vs-score figure).

    Returns
    -------
    pandas.DataFrame
        ``bin`` (0 = cheapest), ``cost_mid`` (median cost in the bin), ``score_mean``, ``n``.
    """
    d = features[(features["fires_a"] >= min_fires) & features["cost"].notna() & features[score].notna()]
    if d.empty:
        return pd.DataFrame(columns=["bin", "cost_mid", "score_mean", "n"])
    n_bins = max(1, min(n_bins, len(d)))
    ranks = d["cost"].rank(method="first")
    bins = np.minimum((ranks - 1) * n_bins // len(d), n_bins - 1).astype(int)
    g = d.assign(bin=bins.to_numpy()).groupby("bin")
    return pd.DataFrame(
        {"cost_mid": g["cost"].median(), "score_mean": g[score].mean(), "n": g.size()}
    ).reset_index()


def focus_pair(pairs: Sequence[Pair], fraction: float = 2 / 3) -> Pair:
    """The pair at about ``fraction`` of the list (the paper's layers 19 → 20 of 26 sit at two thirds).

    Index ``min(len(pairs) - 1, round(fraction * len(pairs)))``.

    Examples
    --------
    >>> focus_pair([(0, 1), (1, 2), (2, 3)])
    (2, 3)
    """
    if not pairs:
        raise ValueError("no pairs")
    return pairs[min(len(pairs) - 1, int(round(fraction * len(pairs))))]


def best_worst_pairs(
    features: pd.DataFrame,
    source: Any,
    n: int = 4,
    *,
    min_fires: int = 5,
) -> pd.DataFrame:
    """The ``n`` cheapest and ``n`` most costly matched pairs, with their explanations (Fig. 5).

    Only pairs where both features fire at least ``min_fires`` times on the statistics'
    tokens are eligible, so each side has contexts to show.

    Parameters
    ----------
    features : pandas.DataFrame
        From :func:`feature_table`.
    source : ExplanationSource
        E.g. :class:`featmatch.judging.explanations.ContextExplanations`.
    n : int
    min_fires : int

    Returns
    -------
    pandas.DataFrame
        ``end`` ("best"/"worst"), ``feature_a``, ``feature_b``, ``cost``,
        ``matching_score``, ``text_a``, ``text_b``; sorted by cost.
    """
    d = features[(features["feature_b"] >= 0) & (features["fires_a"] >= min_fires) & (features["fires_b"] >= min_fires)]
    d = d.sort_values("cost", kind="stable")
    best, worst = d.head(n), d.tail(n)
    worst = worst[~worst.index.isin(best.index)]
    out = pd.concat([best.assign(end="best"), worst.assign(end="worst")])
    out["text_a"] = [source.explain(int(r.layer_a), int(r.feature_a)) for r in out.itertuples()]
    out["text_b"] = [source.explain(int(r.layer_b), int(r.feature_b)) for r in out.itertuples()]
    cols = ["end", "layer_a", "feature_a", "layer_b", "feature_b", "cost", "matching_score", "text_a", "text_b"]
    return out[cols].reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------


def claim_theta_tracks_norm(table: pd.DataFrame) -> list[Claim]:
    r"""Fig. 1: :math:`\theta` grows with the hidden-state norm across layers.

    Rule: Pearson correlation across layers of ``theta_mean`` and ``resid_norm_mean``;
    held if :math:`r \ge 0.7`, failed if :math:`r \le 0.3`. A second row reports the same for
    the folded decoder norm, which is where the scale ends up when the SAEs were trained on
    normalised inputs.
    """
    r_theta = pearson(table["theta_mean"], table["resid_norm_mean"])
    r_dec = pearson(table["folded_dec_norm_mean"], table["resid_norm_mean"])
    return [
        claim_threshold("θ tracks the growth of hidden-state norms (Fig. 1)", "SAE Match §3.1", r_theta,
                        "Pearson r(mean θ, mean ‖h‖) over layers", held_at=0.7, failed_at=0.3, fmt=".2f"),
        claim_threshold("after folding, decoder norms track hidden-state norms (Fig. 1 right)", "SAE Match §3.1", r_dec,
                        "Pearson r(mean ‖θ·W_dec‖, mean ‖h‖) over layers", held_at=0.7, failed_at=0.3, fmt=".2f"),
    ]


def _pivot(scores: pd.DataFrame, metric: str) -> pd.DataFrame:
    return scores.pivot_table(index=["layer_a", "layer_b"], columns="variant", values=metric)


def claim_folding_improves(scores: pd.DataFrame, metric: str = "matching_score") -> Claim:
    """Hypothesis 2: folded matching scores higher than unfolded.

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` of pairs where the folded
    ``metric`` exceeds the unfolded one.
    """
    p = _pivot(scores, metric)
    return claim_fraction(
        "Hypothesis 2: folding improves matching", "SAE Match §5.1, Fig. 7",
        (p["folded"] > p["unfolded"]).where(p[["folded", "unfolded"]].notna().all(axis=1)),
        f"pairs with folded > unfolded {metric.replace('_', ' ')}",
    )


def claim_cost_reflects_similarity(rhos: Sequence[float]) -> Claim:
    """Hypothesis 1: a low matching cost means similar features.

    ``rhos`` are per-pair Spearman correlations of cost and matching score
    (:func:`cost_score_correlation`); the rule is
    :func:`~featmatch.chapters.claims.claim_fraction` of pairs with a negative correlation.
    """
    rhos = [float(r) for r in rhos]
    med = float(np.nanmedian(rhos)) if any(np.isfinite(rhos)) else math.nan
    c = claim_fraction(
        "Hypothesis 1: low parameter MSE ⇔ similar features", "SAE Match §5.2, Figs. 5, 6",
        [(r < 0) if np.isfinite(r) else math.nan for r in rhos],
        "pairs with Spearman ρ(cost, matching score) < 0",
    )
    return Claim(c.claim, c.source, f"{c.ours}; median ρ = {med:.2f}", c.verdict)


def claim_encoder_decoder(scores: pd.DataFrame, tol: float = 0.02, metric: str = "matching_score") -> list[Claim]:
    """Fig. 12: decoder-only is on par with encoder + decoder, encoder-only is clearly worse.

    Rules: decoder-only on par = :func:`~featmatch.chapters.claims.claim_fraction` of pairs
    with ``|decoder - folded| <= tol``; encoder-only worse = fraction of pairs with
    ``encoder < folded - tol``.
    """
    p = _pivot(scores, metric)
    ok = p[["folded", "decoder", "encoder"]].notna().all(axis=1)
    par = ((p["decoder"] - p["folded"]).abs() <= tol).where(ok)
    worse = (p["encoder"] < p["folded"] - tol).where(ok)
    return [
        claim_fraction("decoder-only matching is on par with encoder+decoder", "SAE Match Fig. 12", par,
                       f"pairs with |decoder − both| <= {tol} in {metric.replace('_', ' ')}"),
        claim_fraction("encoder-only matching is clearly worse", "SAE Match Fig. 12", worse,
                       f"pairs with encoder < both − {tol}"),
    ]


def claim_folding_barely_matters(changes: pd.DataFrame, barely: float = 0.1) -> Claim:
    """Feature Flow: folding barely changes the permutation unless ``b_enc`` is included.

    Rule: with ``a`` the median fraction of changed matches without ``b_enc`` and ``b`` with
    it: held if ``a <= barely`` and ``b >= max(2a, barely)``; failed if ``a > barely``
    and ``b <= a`` (folding matters either way, or ``b_enc`` adds nothing); mixed otherwise.
    """
    med = changes.groupby("comparison")["frac_changed"].median()
    a = float(med.get("fold, no b_enc", math.nan))
    b = float(med.get("fold, with b_enc", math.nan))
    if math.isnan(a) or math.isnan(b):
        verdict = "not tested"
    elif a <= barely and b >= max(2 * a, barely):
        verdict = "held"
    elif a > barely and b <= a:
        verdict = "failed"
    else:
        verdict = "mixed"
    ours = (f"median share of features whose match changes when folding: {a:.1%} without b_enc, {b:.1%} with b_enc "
            f"(held if <= {barely:.0%} without and >= max(2×, {barely:.0%}) with)")
    return Claim("folding barely changes the permutation unless b_enc is included", "Feature Flow (Laptev et al. 2025)", ours, verdict)


def claim_judge_folding(judged: pd.DataFrame) -> Claim:
    """Fig. 4: folded matches get better judge labels than unfolded ones.

    Rule: :func:`~featmatch.chapters.claims.claim_fraction` of layer pairs where the mean
    label of folded matches exceeds that of unfolded ones (ties are not successes).
    """
    d = judged.dropna(subset=["label"])
    if d.empty or not {"folded", "unfolded"} <= set(d["matching"]):
        return Claim("folded matches get better judge labels (Fig. 4)", "SAE Match §5.1, Fig. 4", "no judged pairs", "not tested")
    m = d.assign(label=d["label"].astype(float)).pivot_table(index="layer_a", columns="matching", values="label", aggfunc="mean")
    judge = ",".join(sorted(set(d["judge"])))
    c = claim_fraction("folded matches get better judge labels (Fig. 4)", "SAE Match §5.1, Fig. 4",
                       (m["folded"] > m["unfolded"]).where(m[["folded", "unfolded"]].notna().all(axis=1)),
                       "layer pairs with mean label folded > unfolded")
    mean_f, mean_u = d[d["matching"] == "folded"]["label"].mean(), d[d["matching"] == "unfolded"]["label"].mean()
    return Claim(c.claim, c.source, f"{c.ours}; mean label {mean_f:.2f} vs {mean_u:.2f}; judge {judge}", c.verdict)
