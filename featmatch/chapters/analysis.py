r"""Tables, figures and claim verdicts for the SAE Match notebooks (01 folding, 02 persistence, 03 pruning).

The notebooks of the book set parameters, call the functions here and plot; every number a
notebook prints is computed by a function of this module (or of the modules it calls), so
the tests in ``tests/test_analysis.py`` reach all of it. The functions take SAEs, matchings
(:class:`featmatch.matching.Matching`) and activation statistics
(:class:`featmatch.lm.activations.ActivationStats`) and return tidy ``pandas.DataFrame`` tables
(one row per observation); plotting functions draw on a given matplotlib ``Axes``.

Conventions
-----------
* A *pair* is ``(layer_a, layer_b)``; "adjacent" pairs are consecutive entries of the list
  of layers analysed (``[(l0, l1), (l1, l2), ...]``), which are consecutive model layers
  unless the notebook skips layers.
* *Variants* of SAE Match are named sets of :func:`featmatch.matching.match` arguments,
  :data:`MATCH_VARIANTS` (``"folded"`` is the paper's method: encoder + decoder, folded).
* SAEs without a JumpReLU threshold (ReLU, e.g. GPT-2 ``res-jb``) have
  :math:`\theta = 1`: folding is the identity for them, and tables report
  :math:`\theta = 1`.
* Every claim of the papers that a notebook tests gets a :class:`featmatch.chapters.setup.Claim`
  from one of the ``claim_*`` functions. Each states its rule in
  ``Claim.ours`` next to the number, and the verdict is computed from the number by
  :func:`verdict_fraction` or :func:`verdict_threshold`; none is written by hand.

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656 (Figs. 1, 3-8, 10-12, 14-17; Sec. 5.3).
.. [2] D. Laptev, N. Balagansky, Y. Aksenov, D. Gavrilov. "Analyze Feature Flow to Enhance
   Interpretation and Steering in Language Models." 2025 (top-1 decoder cosine; folding and
   the encoder bias).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featmatch.chapters.claims import Claim, claim_fraction, claim_threshold, verdict_fraction, verdict_threshold

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from featmatch.lm.activations import ActivationStats
    from featmatch.matching._matching import Matching

__all__ = [
    "MATCH_VARIANTS",
    "METHOD_LABELS",
    "Pair",
    "adjacent_pairs",
    "every_kth",
    "early_late_split",
    "pair_matchings",
    "thetas",
    "threshold_norm_table",
    "norm_dynamics_table",
    "parameter_mse_table",
    "score_table",
    "feature_table",
    "permutation_change",
    "folding_change_table",
    "cost_score_correlation",
    "binned_scores",
    "best_worst_pairs",
    "sample_features",
    "judge_matched_pairs",
    "persistence_pairs",
    "persistence_matchings",
    "persistence_table",
    "label_table",
    "persistence_length",
    "chain",
    "path_table",
    "shuffled_cost",
    "hybrid_methods",
    "hybrid_table",
    "l0_combinations",
    "l0_study",
    "verdict_fraction",
    "verdict_threshold",
    "claim_fraction",
    "claim_threshold",
    "claim_theta_tracks_norm",
    "claim_folding_improves",
    "claim_cost_reflects_similarity",
    "claim_encoder_decoder",
    "claim_early_layer_drop",
    "claim_folding_barely_matters",
    "claim_judge_folding",
    "claim_composition_degrades",
    "claim_persistence",
    "claim_pruning_cheap_later",
    "claim_top1_beats_permutation",
    "claim_hybrid_cost_order",
    "claim_l0_mismatch",
    "claim_higher_l0",
    "claim_l0_explains_early",
    "plot_by_layer",
    "plot_threshold_norm",
    "plot_norm_dynamics",
    "plot_label_distribution",
    "plot_cost_vs_score",
    "plot_cost_by_label",
    "plot_persistence",
    "plot_hybrid",
]

Pair = tuple[int, int]

#: Named SAE Match settings (keyword arguments of :func:`featmatch.matching.match`).
#: ``"folded"`` is the paper's method (encoder + decoder, Eq. 3 on folded weights, Eq. 4);
#: ``"unfolded"`` the same on raw weights; ``"encoder"`` / ``"decoder"`` the one-sided
#: variants of Fig. 12 (folded); the ``+b_enc`` variants also compare the encoder bias
#: (Feature Flow's test of folding).
MATCH_VARIANTS: dict[str, dict[str, Any]] = {
    "folded": {"on": "both", "fold": True, "include_b_enc": False},
    "unfolded": {"on": "both", "fold": False, "include_b_enc": False},
    "encoder": {"on": "encoder", "fold": True, "include_b_enc": False},
    "decoder": {"on": "decoder", "fold": True, "include_b_enc": False},
    "folded+b_enc": {"on": "both", "fold": True, "include_b_enc": True},
    "unfolded+b_enc": {"on": "both", "fold": False, "include_b_enc": True},
}

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

VERDICTS = ("held", "failed", "mixed", "not tested")


# --------------------------------------------------------------------------------------
# Layers and pairs
# --------------------------------------------------------------------------------------


def adjacent_pairs(layers: Iterable[int]) -> list[Pair]:
    """Consecutive pairs of the sorted, de-duplicated ``layers``: ``[(l0, l1), (l1, l2), ...]``.

    Parameters
    ----------
    layers : iterable of int

    Returns
    -------
    list of (int, int)
    """
    ls = sorted({int(x) for x in layers})
    return list(zip(ls[:-1], ls[1:], strict=True))


def every_kth(layers: Iterable[int], k: int, *, need_next: bool = True, include_last: bool = True) -> list[int]:
    """Every ``k``-th layer of ``layers`` (sorted), for sweeps that cannot afford all of them.

    Parameters
    ----------
    layers : iterable of int
        Available layers.
    k : int
        Step (``1`` keeps all).
    need_next : bool
        Keep only layers ``t`` with ``t + 1`` also available (pruning block ``t + 1`` needs
        the SAEs at ``t`` and ``t + 1``).
    include_last : bool
        Also keep the last eligible layer, so late layers are always represented.

    Returns
    -------
    list of int
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ls = sorted({int(x) for x in layers})
    avail = set(ls)
    eligible = [t for t in ls if (t + 1 in avail) or not need_next]
    out = eligible[::k]
    if include_last and eligible and eligible[-1] not in out:
        out.append(eligible[-1])
    return out


def early_late_split(layers: Iterable[int], n_layers: int, early_fraction: float = 1 / 3) -> tuple[list[int], list[int]]:
    """Split layers into the early ones (``layer < early_fraction * n_layers``) and the rest.

    The SAE Match paper sees its drop up to layer 10 of Gemma-2-2B's 26 (about the first
    third, Sec. 5.3); featmatch uses the same fraction of depth for any model.

    Returns
    -------
    (list of int, list of int)
        Early and later layers, each sorted.
    """
    if not 0 < early_fraction < 1:
        raise ValueError(f"early_fraction must lie in (0, 1), got {early_fraction}")
    cut = early_fraction * n_layers
    ls = sorted({int(x) for x in layers})
    return [x for x in ls if x < cut], [x for x in ls if x >= cut]


# --------------------------------------------------------------------------------------
# Matchings
# --------------------------------------------------------------------------------------


def pair_matchings(
    saes: Mapping[int, Any],
    pairs: Sequence[Pair],
    variants: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("folded", "unfolded"),
) -> dict[str, dict[Pair, Matching]]:
    """SAE Match matchings of several variants for the given layer pairs.

    Parameters
    ----------
    saes : mapping int -> sae_lens.SAE
    pairs : sequence of (int, int)
    variants : sequence of str or mapping str -> dict
        Names from :data:`MATCH_VARIANTS`, or a mapping from a name to the keyword arguments
        of :func:`featmatch.matching.match`.

    Returns
    -------
    dict
        ``out[variant][(la, lb)]`` is a :class:`~featmatch.matching.Matching` A → B with
        ``meta["variant"]`` set.
    """
    from featmatch.matching._matching import match

    if isinstance(variants, Mapping):
        specs = {str(k): dict(v) for k, v in variants.items()}
    else:
        unknown = [v for v in variants if v not in MATCH_VARIANTS]
        if unknown:
            raise ValueError(f"unknown match variants {unknown}; known: {sorted(MATCH_VARIANTS)}")
        specs = {v: MATCH_VARIANTS[v] for v in variants}
    missing = sorted({x for p in pairs for x in p} - set(saes))
    if missing:
        raise ValueError(f"no SAEs for layers {missing}")
    out: dict[str, dict[Pair, Matching]] = {}
    for name, kw in specs.items():
        out[name] = {}
        for la, lb in pairs:
            m = match(saes[la], saes[lb], **kw)
            m.meta["variant"] = name
            m.meta["layers"] = [int(la), int(lb)]
            out[name][(int(la), int(lb))] = m
    return out


# --------------------------------------------------------------------------------------
# Fig. 1: thresholds and hidden-state norms
# --------------------------------------------------------------------------------------


def thetas(sae: Any) -> np.ndarray:
    r"""The JumpReLU thresholds :math:`\theta` of an SAE as float64, ones if it has none."""
    from featmatch.saes._sae import weights

    w = weights(sae)
    if w.threshold is None:
        return np.ones(w.d_sae)
    return w.threshold.double().numpy()


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
    """Mean matching score and activation correlation of every variant and pair.

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


def permutation_change(m1: Matching | np.ndarray, m2: Matching | np.ndarray) -> float:
    """Fraction of the features of A that the two matchings send to different features of B.

    A feature matched by one and unmatched by the other counts as changed; features
    unmatched by both are left out.

    Returns
    -------
    float
        In [0, 1]; NaN if no feature is matched by either.
    """
    p1 = np.asarray(getattr(m1, "perm", m1), dtype=np.int64)
    p2 = np.asarray(getattr(m2, "perm", m2), dtype=np.int64)
    if p1.shape != p2.shape:
        raise ValueError(f"matchings cover different feature sets: {p1.shape} vs {p2.shape}")
    use = (p1 >= 0) | (p2 >= 0)
    if not use.any():
        return math.nan
    return float(np.mean(p1[use] != p2[use]))


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
        ``layer_a``, ``layer_b``, ``comparison``, ``frac_changed``.
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
# Judges (Figs. 4, 6, 7 left)
# --------------------------------------------------------------------------------------


def sample_features(
    stats: ActivationStats,
    layer: int,
    n: int,
    *,
    min_fires: int = 5,
    among: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A seeded random sample of ``n`` features of ``layer`` that fire at least ``min_fires`` times.

    Parameters
    ----------
    among : (F,) bool array, optional
        Further restrict to these features (e.g. matched by every variant).

    Returns
    -------
    numpy.ndarray of int64, sorted (fewer than ``n`` if fewer are eligible)
    """
    ok = np.asarray(stats.fire_count[layer]) >= min_fires
    if among is not None:
        ok &= np.asarray(among, dtype=bool)
    idx = np.flatnonzero(ok)
    rng = np.random.default_rng([int(seed), int(layer)])
    if idx.size > n:
        idx = rng.choice(idx, size=n, replace=False)
    return np.sort(idx).astype(np.int64)


def judge_matched_pairs(
    judge: Any,
    source: Any,
    stats: ActivationStats,
    matchings: Mapping[str, Mapping[Pair, Matching]],
    n_per_pair: int = 16,
    *,
    min_fires: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Judge a sample of matched feature pairs for every pair of layers and matching variant.

    The same features of layer A are sampled for every variant (among features matched by
    all of them and firing at least ``min_fires`` times), so the variants are compared on
    paired samples. Texts come from ``source`` (:func:`featmatch.judging.explanations.matched_pairs`)
    and all pairs are scored in one ``judge.score_many`` call (an LLM judge caches and
    parallelises; the offline proxy embeds in one batch).

    Parameters
    ----------
    judge : LLMJudge or ProxyJudge
        E.g. from :func:`featmatch.judging.judges.available_judge`.
    source : ExplanationSource
    stats : ActivationStats
        Firing counts for the sample.
    matchings : mapping variant -> mapping pair -> Matching
    n_per_pair : int
        Features of A sampled per pair of layers.

    Returns
    -------
    pandas.DataFrame
        The judge's verdict table plus ``matching`` (the variant; ``variant`` is the judge's
        prompt variant) and ``cost``.
    """
    from featmatch.judging.explanations import matched_pairs

    names = list(matchings)
    if not names:
        raise ValueError("no matchings to judge")
    frames = []
    for pair in sorted(matchings[names[0]]):
        la, lb = pair
        matched_all = np.logical_and.reduce([matchings[v][pair].perm >= 0 for v in names])
        feats = sample_features(stats, la, n_per_pair, min_fires=min_fires, among=matched_all, seed=seed)
        for v in names:
            m = matchings[v][pair]
            df = matched_pairs(source, la, lb, m, features=feats)
            df.insert(0, "matching", v)
            df["cost"] = m.cost[df["feature_a"].to_numpy()] if len(df) else []
            frames.append(df)
    pairs = pd.concat(frames, ignore_index=True)
    if pairs.empty:
        return pairs
    return judge.score_many(pairs, progress=progress)


# --------------------------------------------------------------------------------------
# Persistence (Fig. 8) and paths (App. D)
# --------------------------------------------------------------------------------------


def persistence_pairs(starts: Sequence[int], layers: Sequence[int], max_distance: int | None = None) -> list[Pair]:
    """Every ``(start, target)`` with ``target`` a later layer within ``max_distance`` layers.

    Returns
    -------
    list of (int, int)
    """
    ls = sorted({int(x) for x in layers})
    out = []
    for s in starts:
        if s not in ls:
            raise ValueError(f"start layer {s} is not among the layers {ls}")
        for t in ls:
            if t > s and (max_distance is None or t - s <= max_distance):
                out.append((int(s), t))
    return out


def chain(adjacent: Mapping[Pair, Matching], start: int, target: int) -> list[Matching]:
    """The adjacent matchings leading from ``start`` to ``target`` (in order).

    Raises
    ------
    KeyError
        If a step of the chain is missing.
    """
    nxt = {a: b for a, b in adjacent}
    out, cur = [], start
    while cur != target:
        if cur not in nxt or nxt[cur] > target:
            raise KeyError(f"no chain of adjacent matchings from layer {start} to {target} (stuck at {cur})")
        out.append(adjacent[(cur, nxt[cur])])
        cur = nxt[cur]
    return out


def persistence_matchings(
    saes: Mapping[int, Any],
    pairs: Sequence[Pair],
    adjacent: Mapping[Pair, Matching],
    *,
    match_kwargs: Mapping[str, Any] | None = None,
    random_seed: int | None = 0,
) -> dict[str, dict[Pair, Matching]]:
    r"""Exact, composed and random matchings from start layers to later layers (Fig. 8).

    For each ``(s, t)`` in ``pairs``: *exact* is SAE Match between ``s`` and ``t`` directly;
    *composed* is :math:`P^{(t-1\to t)}\cdots P^{(s\to s+1)}` built from ``adjacent``
    (:func:`featmatch.matching.compose`); *random* (unless ``random_seed`` is None) is a
    seeded random permutation, the chance level.

    Parameters
    ----------
    saes : mapping int -> SAE
    pairs : sequence of (int, int)
        From :func:`persistence_pairs`.
    adjacent : mapping pair -> Matching
        Matchings between consecutive layers, made with the same settings.
    match_kwargs : mapping, optional
        Arguments of :func:`featmatch.matching.match` for the exact matches (default: the
        ``"folded"`` variant).

    Returns
    -------
    dict
        ``out[method][(s, t)]``, methods ``"exact"``, ``"composed"`` and ``"random"``.
    """
    from featmatch.matching._matching import Matching, compose, match

    kw = dict(MATCH_VARIANTS["folded"] if match_kwargs is None else match_kwargs)
    out: dict[str, dict[Pair, Matching]] = {"exact": {}, "composed": {}}
    if random_seed is not None:
        out["random"] = {}
    for s, t in pairs:
        steps = chain(adjacent, s, t)
        composed = steps[0]
        for m in steps[1:]:
            composed = compose(composed, m)
        exact = match(saes[s], saes[t], **kw)
        out["exact"][(s, t)] = exact
        out["composed"][(s, t)] = composed
        if random_seed is not None:
            rng = np.random.default_rng([int(random_seed), int(s), int(t)])
            n_a, n_b = exact.n_a, exact.n_b
            perm = rng.permutation(n_b)[:n_a] if n_b >= n_a else np.concatenate([rng.permutation(n_b), -np.ones(n_a - n_b, int)])
            out["random"][(s, t)] = Matching(perm=perm, cost=np.zeros(n_a), n_b=n_b, meta={"method": "random"})
    return out


def persistence_table(
    stats: ActivationStats, matchings: Mapping[str, Mapping[Pair, Matching]], *, min_fires: int = 1
) -> pd.DataFrame:
    """Score the matchings of :func:`persistence_matchings` (Fig. 8, Hypothesis 3).

    Parameters
    ----------
    stats : ActivationStats
        With pair statistics for every ``(s, t)``.
    matchings : mapping method -> mapping pair -> Matching

    Returns
    -------
    pandas.DataFrame
        ``start``, ``target``, ``distance``, ``method``, ``matching_score``,
        ``correlation``, ``agreement`` (fraction of features that the composed and exact
        matchings send to the same feature; the same on every row of a pair, NaN without
        both).
    """
    from featmatch.evaluation.metrics import activation_correlation, matching_score

    rows = []
    for method, by_pair in matchings.items():
        for (s, t), m in sorted(by_pair.items()):
            agree = math.nan
            if "exact" in matchings and "composed" in matchings:
                agree = 1.0 - permutation_change(matchings["exact"][(s, t)], matchings["composed"][(s, t)])
            rows.append(
                {
                    "start": int(s),
                    "target": int(t),
                    "distance": int(t - s),
                    "method": method,
                    "matching_score": matching_score(stats, s, t, m, min_fires=min_fires).mean,
                    "correlation": activation_correlation(stats, s, t, m).mean,
                    "agreement": agree,
                }
            )
    return pd.DataFrame(rows)


def label_table(judged: pd.DataFrame) -> pd.DataFrame:
    """Mean judge label per (start, target, matching method) of a persistence judgement.

    Parameters
    ----------
    judged : pandas.DataFrame
        From :func:`judge_matched_pairs` on :func:`persistence_matchings`.

    Returns
    -------
    pandas.DataFrame
        ``start``, ``target``, ``distance``, ``method``, ``mean_label``, ``n_scored``
        (valid labels; malformed replies are not labels).
    """
    d = judged.dropna(subset=["label"]).assign(label=lambda x: x["label"].astype(float))
    g = d.groupby(["layer_a", "layer_b", "matching"])["label"]
    out = pd.DataFrame({"mean_label": g.mean(), "n_scored": g.size()}).reset_index()
    out = out.rename(columns={"layer_a": "start", "layer_b": "target", "matching": "method"})
    out.insert(2, "distance", out["target"] - out["start"])
    return out


def persistence_length(
    table: pd.DataFrame,
    *,
    method: str = "exact",
    metric: str = "matching_score",
    ratio: float = 0.5,
    baseline: str | None = "random",
) -> pd.Series:
    """Per start layer: for how many layers a match keeps at least ``ratio`` of its one-step quality.

    Quality is the score above chance: ``metric`` minus that of the ``baseline`` method at the
    same (start, target) when the table has it (the random permutation of
    :func:`persistence_matchings`), else the raw score. The length is the largest distance
    ``d`` such that the quality at every distance ``1..d`` is ``>= ratio * quality(1)``
    (0 if distance 1 is missing or NaN).

    Returns
    -------
    pandas.Series of int
        Indexed by ``start``.
    """
    p = table.pivot_table(index=["start", "distance"], columns="method", values=metric)
    if method not in p:
        return pd.Series(dtype=int, name=f"persistence_{metric}").rename_axis("start")
    q = p[method] - p[baseline] if (baseline is not None and baseline in p) else p[method]
    out = {}
    for s, g in q.groupby(level="start"):
        g = g.droplevel("start").sort_index()
        if 1 not in g.index or not np.isfinite(g.loc[1]):
            out[int(s)] = 0
            continue
        ref = ratio * float(g.loc[1])
        length = 0
        for d, v in g.items():
            if d != length + 1 or not (v >= ref):
                break
            length = int(d)
        out[int(s)] = length
    return pd.Series(out, name=f"persistence_{metric}", dtype=int).rename_axis("start")


def path_table(
    adjacent: Mapping[Pair, Matching],
    start: int,
    features: Sequence[int],
    *,
    end: int | None = None,
    stats: ActivationStats | None = None,
    source: Any = None,
) -> pd.DataFrame:
    """Feature paths from layer ``start`` through the chain of adjacent matchings (App. D).

    Parameters
    ----------
    adjacent : mapping pair -> Matching
    start : int
    features : sequence of int
        Features of ``start`` to follow.
    end : int, optional
        Last layer (default: as far as the chain goes).
    stats : ActivationStats, optional
        Adds the matching score of each step (needs the adjacent pair statistics) and the
        firing count of each feature.
    source : ExplanationSource, optional
        Adds each feature's explanation text.

    Returns
    -------
    pandas.DataFrame
        One row per (path, layer): ``path`` (the start feature), ``layer``, ``feature``
        (-1 once the path is broken), ``step_cost`` (cost of the step into this layer),
        ``step_score`` (the matching score of that step, if ``stats``), ``fires``, ``text``.
    """
    from featmatch.matching._matching import paths

    layers = [start]
    steps: list[Matching] = []
    nxt = {a: b for a, b in adjacent}
    while layers[-1] in nxt and (end is None or nxt[layers[-1]] <= end):
        steps.append(adjacent[(layers[-1], nxt[layers[-1]])])
        layers.append(nxt[layers[-1]])
    p = paths(steps, np.asarray(features, dtype=np.int64))
    step_scores = []
    if stats is not None:
        from featmatch.evaluation.metrics import matching_score

        for k, m in enumerate(steps):
            la, lb = layers[k], layers[k + 1]
            try:
                step_scores.append(matching_score(stats, la, lb, m).per_feature)
            except KeyError:
                step_scores.append(np.full(m.n_a, np.nan))
    rows = []
    for i, f0 in enumerate(p[:, 0]):
        for k, layer in enumerate(layers):
            f = int(p[i, k])
            prev = int(p[i, k - 1]) if k else -1
            cost = float(steps[k - 1].cost[prev]) if k and prev >= 0 else math.nan
            score = float(step_scores[k - 1][prev]) if (k and prev >= 0 and step_scores) else math.nan
            fires = int(stats.fire_count[layer][f]) if (stats is not None and f >= 0 and layer in stats.fire_count) else None
            text = source.explain(layer, f) if (source is not None and f >= 0) else None
            rows.append(
                {
                    "path": int(f0),
                    "layer": int(layer),
                    "feature": f,
                    "step_cost": cost,
                    "step_score": score,
                    "fires": fires,
                    "text": text,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# Pruning: hybrid (Figs. 16, 17) and the L0 study (Fig. 14)
# --------------------------------------------------------------------------------------


def shuffled_cost(matching: Matching, seed: int = 0) -> Matching:
    """The same permutation with its costs randomly reassigned among the matched features.

    The quantile hybrid (Eq. 6) picks which features go through the next decoder by their
    cost; with shuffled costs the choice is random, the control that tells whether the
    cost ordering carries information.
    """
    from featmatch.matching._matching import Matching

    rng = np.random.default_rng(seed)
    cost = matching.cost.copy()
    ok = matching.perm >= 0
    cost[ok] = rng.permutation(cost[ok])
    return Matching(perm=matching.perm, cost=cost, n_b=matching.n_b, meta={**matching.meta, "cost": "shuffled"})


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
    by shuffled costs (:func:`shuffled_cost`), labelled ``random q=...``.

    Parameters
    ----------
    matchings : mapping layer t -> Matching (t → t+1)
    qs : sequence of float in [0, 1]

    Returns
    -------
    list of dict
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
    """Pruning metrics for SAE pairs of different sparsity (Fig. 14, Fig. 15; Sec. 5.3).

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
        ``l0_mismatch`` (:math:`|L0_A - L0_B| / \\tfrac12(L0_A + L0_B)`) and ``same_l0``
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


# --------------------------------------------------------------------------------------
# Verdicts and claims
# --------------------------------------------------------------------------------------


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return math.nan
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def claim_theta_tracks_norm(table: pd.DataFrame) -> list[Claim]:
    r"""Fig. 1: :math:`\theta` grows with the hidden-state norm across layers.

    Rule: Pearson correlation across layers of ``theta_mean`` and ``resid_norm_mean``;
    held if :math:`r \ge 0.7`, failed if :math:`r \le 0.3`. A second row reports the same for
    the folded decoder norm, which is where the scale ends up when the SAEs were trained on
    normalised inputs.
    """
    r_theta = _pearson(table["theta_mean"], table["resid_norm_mean"])
    r_dec = _pearson(table["folded_dec_norm_mean"], table["resid_norm_mean"])
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

    Rule: :func:`claim_fraction` of pairs where the folded ``metric`` exceeds the unfolded one.
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
    (:func:`cost_score_correlation`); the rule is :func:`claim_fraction` of pairs with a
    negative correlation.
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

    Rules: decoder-only on par = :func:`claim_fraction` of pairs with
    ``|decoder - folded| <= tol``; encoder-only worse = fraction of pairs with
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


def claim_early_layer_drop(
    by_layer: pd.DataFrame, value: str, n_layers: int, *, layer: str = "layer_a", margin: float = 0.05,
    claim: str = "matching quality drops in the early layers", source: str = "SAE Match §5.3, Fig. 7",
) -> Claim:
    """The early-layer drop: ``value`` is lower in the first third of the layers than later.

    Rule: ``d = mean(later) - mean(early)``; held if ``d >= margin``, failed if ``d <= 0``.
    """
    early, late = early_late_split(by_layer[layer], n_layers)
    e = by_layer.loc[by_layer[layer].isin(early), value].mean()
    lt = by_layer.loc[by_layer[layer].isin(late), value].mean()
    d = float(lt - e) if len(early) and len(late) else math.nan
    c = claim_threshold(claim, source, d, f"mean later − mean early {value.replace('_', ' ')} (layers < {n_layers / 3:.0f} early)",
                        held_at=margin, failed_at=0.0)
    return Claim(c.claim, c.source, f"{c.ours}; early {e:.3f}, later {lt:.3f}", c.verdict)


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

    Rule: :func:`claim_fraction` of layer pairs where the mean label of folded matches
    exceeds that of unfolded ones (ties are not successes).
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


def claim_composition_degrades(table: pd.DataFrame, metric: str = "matching_score") -> Claim:
    """Hypothesis 3: composed matches approximate exact ones, degrading with distance.

    Rule: over every (start, distance >= 2): ``gap = exact - composed``. Held if the gap is
    ``>= 0`` in at least 75% of the cells *and* its Spearman correlation with distance is
    positive; failed if the gap is ``>= 0`` in at most 25% of the cells, or the correlation is
    ``<= 0`` and the composed score never falls below the exact one; mixed otherwise.
    """
    p = table.pivot_table(index=["start", "distance"], columns="method", values=metric).reset_index()
    p = p[p["distance"] >= 2]
    if p.empty:
        return Claim("Hypothesis 3: composed matches degrade with distance vs exact", "SAE Match §3.2, §5.4, Fig. 8", "no distances >= 2", "not tested")
    gap = p["exact"] - p["composed"]
    frac = float((gap >= 0).mean())
    rho = _spearman(p["distance"], gap)
    if frac >= 0.75 and rho > 0:
        verdict = "held"
    elif frac <= 0.25 or (not rho > 0 and (gap >= 0).all()):
        verdict = "failed"
    else:
        verdict = "mixed"
    ours = (f"exact ≥ composed {metric.replace('_', ' ')} in {frac:.0%} of {len(p)} (start, distance ≥ 2) cells; "
            f"Spearman ρ(distance, exact − composed) = {rho:.2f} (held if ≥ 75% and ρ > 0)")
    return Claim("Hypothesis 3: composed matches degrade with distance vs exact", "SAE Match §3.2, §5.4, Fig. 8", ours, verdict)


def claim_persistence(
    table: pd.DataFrame, metric: str = "matching_score", ratio: float = 0.5, around: int = 5, *, method: str = "exact"
) -> Claim:
    """Fig. 8: features persist (stay significantly matched) for about five layers.

    Rule: the persistence length of :func:`persistence_length` (exact matches keeping at least
    ``ratio`` of their one-step score above chance); held if its median over start layers is at least
    ``around - 2``, failed if at most 1, mixed otherwise. A length far above ``around`` is
    still "held" (features persist *at least* that long) and the number says so.
    """
    lengths = persistence_length(table, method=method, metric=metric, ratio=ratio)
    maxd = int(table["distance"].max()) if len(table) else 0
    med = float(lengths.median()) if len(lengths) else math.nan
    c = claim_threshold(f"features persist for about five layers ({method} matches)", "SAE Match §5.4, Fig. 8", med,
                        f"median layers with {method} {metric.replace('_', ' ')} above chance ≥ {ratio:.0%} of its 1-step value "
                        f"(per start: {({int(k): int(v) for k, v in lengths.items()})}; distances tested up to {maxd})",
                        held_at=around - 2, failed_at=1, fmt=".0f")
    return c


def claim_pruning_cheap_later(sweep: pd.DataFrame, n_layers: int, extra: float = 0.1, bad: float = 0.5,
                              method: str = "encode_permute_decode_folded") -> Claim:
    """Sec. 5.5 / Fig. 10: pruning with matched features costs little in the later layers.

    The cost of pruning beyond the SAE's own reconstruction error is
    ``ΔCE(method) − ΔCE(encode_decode_current)`` at the same layer. Rule: its median over the
    later layers (see :func:`early_late_split`); held if ``<= extra`` nats, failed if
    ``>= bad`` nats.
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


def claim_top1_beats_permutation(sweep: pd.DataFrame, metric: str = "ev") -> Claim:
    """Feature Flow: many-to-one top-1 decoder cosine gives better EV than the permutation.

    Rule: :func:`claim_fraction` of evaluated layers where ``ev`` of the top-1 transfer
    exceeds that of folded encode-permute-decode.
    """
    p = sweep.pivot_table(index="layer", columns="method", values=metric)
    a, b = "top1_cosine_folded", "encode_permute_decode_folded"
    if a not in p or b not in p:
        return Claim("top-1 cosine beats permutations on EV", "Feature Flow (Laptev et al. 2025)", "not run", "not tested")
    return claim_fraction("top-1 cosine beats permutations on EV", "Feature Flow (Laptev et al. 2025)",
                          (p[a] > p[b]).where(p[[a, b]].notna().all(axis=1)), "layers with EV(top-1 cosine) > EV(folded EPD)")


def claim_hybrid_cost_order(hybrid: pd.DataFrame) -> Claim:
    """App. B: features of low MSE transfer better, so MSE reflects similarity.

    Rule: :func:`claim_fraction` of (layer, ``0 < q < 1``) cells where the hybrid that
    sends the lowest-cost features through the next decoder has a higher EV than the same
    hybrid with randomly chosen features.
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
    other-L0 partner; :func:`claim_fraction` of comparisons where the same-L0 pair has the
    higher ``metric``.
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

    Rule: :func:`claim_fraction` over (layer, method) of same-L0 pairs where the denser
    pair has the lower ΔCE.
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
    shortfall of matching there (e.g. EV(encode-decode previous) − EV(folded EPD)). Rule:
    Spearman correlation across layers; held if ``>= 0.5``, failed if ``<= 0``.
    """
    rho = _spearman(l0_gap, quality_gap)
    return claim_threshold("the early-layer drop comes from L0 differences between adjacent SAEs", "SAE Match §5.3, Fig. 15",
                           rho, "Spearman ρ(|ΔL0| / L0, EV shortfall of folded EPD vs encode-decode previous) over layers",
                           held_at=0.5, failed_at=0.0, fmt=".2f")


# --------------------------------------------------------------------------------------
# Plots (each draws on a given Axes)
# --------------------------------------------------------------------------------------


def plot_by_layer(
    ax: Axes,
    df: pd.DataFrame,
    y: str,
    *,
    x: str = "layer_a",
    hue: str | None = "variant",
    labels: Mapping[str, str] | None = None,
    title: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
    logy: bool = False,
    order: Sequence[str] | None = None,
) -> Axes:
    """One line per value of ``hue`` of ``y`` against ``x``.

    Parameters
    ----------
    labels : mapping, optional
        Legend names for the ``hue`` values.
    order : sequence of str, optional
        Hue values to draw, in this order (default: as they appear).
    """
    groups = [(None, df)] if hue is None else [(k, df[df[hue] == k]) for k in (order or list(dict.fromkeys(df[hue])))]
    for key, g in groups:
        g = g.sort_values(x)
        name = None if key is None else (labels or {}).get(key, str(key))
        ax.plot(g[x], g[y], marker="o", ms=3, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x.replace("_", " "))
    ax.set_ylabel(ylabel or y.replace("_", " "))
    ax.set_title(title)
    if hue is not None:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def plot_threshold_norm(
    ax: Axes,
    table: pd.DataFrame,
    title: str = "θ and hidden-state norm per layer",
    *,
    left: str = "theta_mean",
    left_label: str = "mean threshold θ",
) -> tuple[Axes, Axes]:
    """Mean θ (or another ``left`` column; left axis) and mean hidden-state norm (right axis) per layer (Fig. 1)."""
    ax.plot(table["layer"], table[left], marker="o", ms=3, color="C0", label=left_label)
    ax.set_xlabel("layer")
    ax.set_ylabel(left_label, color="C0")
    ax2 = ax.twinx()
    ax2.plot(table["layer"], table["resid_norm_mean"], marker="s", ms=3, color="C1", label="mean ‖h‖")
    ax2.set_ylabel("mean hidden-state norm ‖h‖", color="C1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax, ax2


def plot_norm_dynamics(ax: Axes, dyn: pd.DataFrame, title: str = "norm changes from layer t to t+1") -> Axes:
    """Scatter of the change of ‖h‖ against the change of the matched folded decoder norms (Fig. 1 right).

    One point per pair of layers (:func:`norm_dynamics_table`), labelled with layer t.
    """
    ax.scatter(dyn["resid_norm_change"], dyn["matched_dec_norm_change"], s=14)
    for r in dyn.itertuples():
        ax.annotate(str(r.layer_a), (r.resid_norm_change, r.matched_dec_norm_change), fontsize=6, alpha=0.7)
    ax.set_xlabel("Δ mean hidden-state norm ‖h‖ (t → t+1)")
    ax.set_ylabel("Δ matched folded decoder norm (mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


def plot_label_distribution(ax: Axes, counts: pd.DataFrame, *, by: str = "layer_a", title: str = "") -> Axes:
    """Stacked bars of the share of DIFFERENT / MAYBE / SAME labels per ``by`` (Figs. 4, 7 left)."""
    names = ["DIFFERENT", "MAYBE", "SAME"]
    c = counts.sort_values(by)
    tot = c[names].sum(axis=1).replace(0, np.nan)
    bottom = np.zeros(len(c))
    xs = np.arange(len(c))
    for name, color in zip(names, ("C3", "C7", "C2"), strict=True):
        share = (c[name] / tot).fillna(0).to_numpy()
        ax.bar(xs, share, bottom=bottom, color=color, label=name, width=0.8)
        bottom += share
    ax.set_xticks(xs, [str(v) for v in c[by]], fontsize=7)
    ax.set_xlabel(by.replace("_", " "))
    ax.set_ylabel("share of judged pairs")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    return ax


def plot_cost_vs_score(ax: Axes, features: pd.DataFrame, *, min_fires: int = 1, n_bins: int = 10, title: str = "") -> Axes:
    """Scatter of match cost against matching score, with the binned mean (Fig. 6 analogue)."""
    d = features[(features["fires_a"] >= min_fires) & features["cost"].notna() & features["matching_score"].notna()]
    ax.scatter(d["cost"], d["matching_score"], s=6, alpha=0.3, label="matched feature")
    b = binned_scores(features, n_bins, min_fires=min_fires)
    ax.plot(b["cost_mid"], b["score_mean"], color="C3", marker="o", label="mean per cost decile")
    ax.set_xlabel("match cost (folded MSE)")
    ax.set_ylabel("matching score P(f_B > 0 | f_A > 0)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def plot_cost_by_label(ax: Axes, judged: pd.DataFrame, *, title: str = "") -> Axes:
    """Box plot of match cost per judge label (Fig. 6)."""
    d = judged.dropna(subset=["label", "cost"])
    data = [d.loc[d["label"].astype(int) == k, "cost"].to_numpy() for k in (1, 2, 3)]
    ax.boxplot([x if len(x) else [np.nan] for x in data], showfliers=False)
    ax.set_xticks([1, 2, 3], [f"{n}\n(n={len(x)})" for n, x in zip(("DIFFERENT", "MAYBE", "SAME"), data, strict=True)])
    ax.set_xlabel("judge label")
    ax.set_ylabel("match cost (folded MSE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


def plot_persistence(ax: Axes, table: pd.DataFrame, start: int, metric: str = "matching_score", title: str | None = None) -> Axes:
    """Exact, composed and random-permutation scores from one start layer to later layers (Fig. 8)."""
    d = table[table["start"] == start]
    for method, style in (("exact", "-o"), ("composed", "--s"), ("random", ":")):
        g = d[d["method"] == method].sort_values("target")
        if len(g):
            ax.plot(g["target"], g[metric], style, ms=3, label=method)
    ax.set_xlabel("target layer")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title if title is not None else f"from layer {start}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def plot_hybrid(ax: Axes, hybrid: pd.DataFrame, layer: int, metric: str = "ev", title: str | None = None) -> Axes:
    """EV (or ΔCE) of the quantile hybrid against q at one layer, cost-ordered vs random (Fig. 17)."""
    d = hybrid[hybrid["layer"] == layer]
    for order, style in (("cost", "-o"), ("random", "--s")):
        g = d[d["order"] == order].sort_values("q")
        if len(g):
            ax.plot(g["q"], g[metric], style, ms=3, label=f"{order}-ordered")
    ax.set_xlabel("quantile q (share of matched features decoded by layer t+1)")
    ax.set_ylabel({"ev": "explained variance", "delta_ce": "ΔCE (nats)"}.get(metric, metric))
    ax.set_title(title if title is not None else f"layer {layer} → {layer + 1}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax
