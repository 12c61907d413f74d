r"""Helpers shared by the SAE Match chapters (01 folding, 02 persistence, 03 pruning).

Layer selection, matchings of named SAE Match variants, the judging of matched pairs, the
comparison of two matchings, and the early/later split of Sec. 5.3 with its claim. What only
one chapter needs lives in that chapter's module (:mod:`featmatch.chapters.folding`,
:mod:`featmatch.chapters.persistence`, :mod:`featmatch.chapters.pruning`); the figures are in
:mod:`featmatch.chapters.plots`; the verdict rules in :mod:`featmatch.chapters.claims`.

Conventions
-----------
* A *pair* is ``(layer_a, layer_b)``; "adjacent" pairs are consecutive entries of the list
  of layers analysed (``[(l0, l1), (l1, l2), ...]``), which are consecutive model layers
  unless the notebook skips layers.
* *Variants* of SAE Match are named sets of :func:`featmatch.matching.match` arguments,
  :data:`MATCH_VARIANTS` (``"folded"`` is the paper's method: encoder + decoder, folded).
* SAEs without a JumpReLU threshold (ReLU, e.g. GPT-2 ``res-jb``) have
  :math:`\theta = 1` (:func:`featmatch.evaluation.transfer.thetas`): folding is the identity
  for them, and tables report :math:`\theta = 1`.
* Tables are tidy ``pandas.DataFrame`` (one row per observation).

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656.
.. [2] D. Laptev, N. Balagansky, Y. Aksenov, D. Gavrilov. "Analyze Feature Flow to Enhance
   Interpretation and Steering in Language Models." 2025.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featmatch.chapters.claims import Claim, chance_mean

if TYPE_CHECKING:
    from featmatch.lm.activations import ActivationStats
    from featmatch.matching._matching import Matching

__all__ = [
    "SEED_LABEL",
    "seed_saes",
    "seed_ceiling_scores",
    "ceiling_precondition",
    "random_matchings",
    "label_share",
    "MATCH_VARIANTS",
    "Pair",
    "adjacent_pairs",
    "next_layer_pairs",
    "layers_with_next",
    "every_kth",
    "layers_at_depth",
    "early_late_split",
    "pair_matchings",
    "by_first_layer",
    "permutation_change",
    "sample_features",
    "judge_matched_pairs",
    "judge_names",
    "pearson",
    "spearman",
    "claim_early_layer_drop",
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

    Examples
    --------
    >>> adjacent_pairs([3, 1, 2])
    [(1, 2), (2, 3)]
    """
    ls = sorted({int(x) for x in layers})
    return list(zip(ls[:-1], ls[1:], strict=True))


def next_layer_pairs(layers: Iterable[int]) -> list[Pair]:
    """``[(t, t + 1) for t in layers]``, in the given order: the pairs a pruning splice at ``t`` uses.

    Examples
    --------
    >>> next_layer_pairs([0, 4])
    [(0, 1), (4, 5)]
    """
    return [(t, t + 1) for t in layers]


def layers_with_next(layers: Iterable[int]) -> list[int]:
    """Every ``t`` and ``t + 1`` of ``layers``, sorted and de-duplicated (the SAEs a pruning sweep reads).

    Examples
    --------
    >>> layers_with_next([0, 1, 4])
    [0, 1, 2, 4, 5]
    """
    return sorted({x for t in layers for x in (t, t + 1)})


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

    Examples
    --------
    >>> every_kth(range(10), 3)
    [0, 3, 6, 8]
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


def layers_at_depth(candidates: Sequence[int], n_layers: int, fractions: Iterable[float]) -> list[int]:
    r"""For each fraction :math:`f` of the depth, the candidate layer nearest to :math:`f \cdot n_{layers}`.

    Used to place the paper's Gemma-2-2B layers (e.g. 10, 12, 20 of 26) at the same relative
    depth of another model. Ties go to the earlier candidate; the result is sorted and
    de-duplicated.

    Parameters
    ----------
    candidates : sequence of int
        Eligible layers, in the order ties are broken.
    n_layers : int
        The model's number of layers.
    fractions : iterable of float

    Returns
    -------
    list of int

    Examples
    --------
    >>> layers_at_depth(range(29), 30, (10 / 26, 20 / 26))
    [12, 23]
    """
    cands = list(candidates)
    out = set()
    for f in fractions:
        target = f * n_layers
        out.add(min(cands, key=lambda x: abs(x - target)))
    return sorted(out)


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


def by_first_layer(matchings: Mapping[Pair, Matching]) -> dict[int, Matching]:
    """Re-key ``{(t, u): m}`` as ``{t: m}``, the form a pruning method spec takes.

    Raises
    ------
    ValueError
        If two pairs share a first layer.
    """
    out = {t: m for (t, _), m in matchings.items()}
    if len(out) != len(matchings):
        raise ValueError("two pairs share a first layer")
    return out


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


# --------------------------------------------------------------------------------------
# Judges (Figs. 4, 6, 7 left; Fig. 8)
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
    seed : int
        With ``layer``, the seed of ``numpy.random.default_rng([seed, layer])``.

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


def random_matchings(matchings: Mapping[Pair, Matching], seed: int = 0) -> dict[Pair, Matching]:
    """A seeded random one-to-one matching for every pair of ``matchings`` (the chance level of
    any score or judge label of a matching); ``numpy.random.default_rng([seed, a, b])`` per pair."""
    from featmatch.matching._matching import Matching

    out: dict[Pair, Matching] = {}
    for (a, b), m in matchings.items():
        rng = np.random.default_rng([int(seed), int(a), int(b)])
        n_a, n_b = m.n_a, m.n_b
        perm = rng.permutation(n_b)[:n_a] if n_b >= n_a else np.concatenate([rng.permutation(n_b), -np.ones(n_a - n_b, int)])
        out[(a, b)] = Matching(perm=perm, cost=np.full(n_a, np.nan), n_b=n_b, meta={"method": "random"})
    return out


def label_share(judged: pd.DataFrame, matching: str, label: int = 3) -> float:
    """Share of the judged pairs of ``matching`` with ``label`` (3 = SAME); NaN without any."""
    d = judged[judged["matching"] == matching].dropna(subset=["label"]) if len(judged) else judged
    return float((d["label"].astype(float) == label).mean()) if len(d) else math.nan


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


def judge_names(judged: pd.DataFrame) -> str:
    """The judges of a judged table, comma-separated and sorted (``"none"`` if it is empty)."""
    return ",".join(sorted(set(judged["judge"]))) if len(judged) else "none"


# --------------------------------------------------------------------------------------
# Correlations and the early-layer claim
# --------------------------------------------------------------------------------------


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    r"""Pearson :math:`r` over the entries where both are finite; NaN with fewer than 3 or a constant side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return math.nan
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    r"""Spearman :math:`\rho` over the entries where both are finite; NaN with fewer than 3 or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


#: Label offset of the same-layer control's SAEs in a statistics pass (keys of ``gather``
#: are labels; each SAE reads its own hook), so that layer t's second seed is ``SEED_LABEL + t``.
SEED_LABEL = 1000


def seed_saes(sae_set: str, profile: str) -> dict[int, Any]:
    """The zoo's same-layer control: layer -> the main set's SAE retrained with another seed.

    Empty for SAE sets other than featmatch's zoo, or a zoo built without ``seed2`` layers.
    """
    if not sae_set.startswith("featmatch-"):
        return {}
    from featmatch.saes.zoo import get_profile, load_zoo_sae, manifest

    try:
        built = manifest(get_profile(profile)).get("saes", {}).get("seed2", {})
    except (FileNotFoundError, ValueError):
        return {}
    return {int(t): load_zoo_sae(profile, int(t), variant="seed2") for t in sorted(built, key=int)}


def seed_ceiling_scores(model: Any, tokens: Any, saes: Mapping[int, Any], seeds: Mapping[int, Any],
                        adjacent_scores: pd.DataFrame | None = None, *, min_fires: int = 1) -> pd.DataFrame:
    """Matching score and correlation of each layer's SAE with its second seed (folded SAE
    Match), beside the adjacent pair (t, t + 1) from ``adjacent_scores`` (a
    :func:`featmatch.chapters.folding.score_table` with a ``"folded"`` variant).

    Returns
    -------
    pandas.DataFrame
        ``layer``, ``matching_score_seed``, ``correlation_seed``, ``matching_score_adjacent``,
        ``correlation_adjacent``.
    """
    from featmatch.evaluation.metrics import activation_correlation, matching_score
    from featmatch.lm.activations import gather
    from featmatch.matching._matching import match

    if not seeds:
        return pd.DataFrame(columns=["layer", "matching_score_seed", "correlation_seed",
                                     "matching_score_adjacent", "correlation_adjacent"])
    both = {**{t: saes[t] for t in seeds}, **{SEED_LABEL + t: sae for t, sae in seeds.items()}}
    pairs = [(t, SEED_LABEL + t) for t in seeds]
    stats = gather(model, both, tokens, pairs=pairs, top_k=0, n_samples=0, cache=False, progress=False)
    adj = None
    if adjacent_scores is not None and len(adjacent_scores):
        adj = adjacent_scores[adjacent_scores["variant"] == "folded"].set_index("layer_a")
    rows = []
    for t in seeds:
        m = match(saes[t], seeds[t], **MATCH_VARIANTS["folded"])
        row = {
            "layer": t,
            "matching_score_seed": matching_score(stats, t, SEED_LABEL + t, m, min_fires=min_fires).mean,
            "correlation_seed": activation_correlation(stats, t, SEED_LABEL + t, m).mean,
        }
        for metric in ("matching_score", "correlation"):
            row[f"{metric}_adjacent"] = float(adj.loc[t, metric]) if adj is not None and t in adj.index else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


#: The same-layer control must reach this matching score for cross-layer matching scores to be
#: readable: below it, two seeds of *one* layer share fewer than half their features' firing,
#: and a low cross-layer score says more about the SAEs than about the model.
MIN_SEED_SCORE = 0.5


def ceiling_precondition(ceiling: pd.DataFrame) -> dict[str, bool]:
    """The precondition the same-layer control sets for cross-layer claims; none without a control."""
    if ceiling is None or ceiling.empty:
        return {}
    m = float(ceiling["matching_score_seed"].mean())
    return {f"same-layer ceiling matching score ≥ {MIN_SEED_SCORE} (two seeds of one layer: {m:.2f})": m >= MIN_SEED_SCORE}


def claim_early_layer_drop(
    by_layer: pd.DataFrame, value: str, n_layers: int, *, layer: str = "layer_a", margin: float = 0.05,
    claim: str = "matching quality drops in the early layers", source: str = "SAE Match §5.3, Fig. 7",
    chapter: str = "01", section: str = "", paper_value: str = "lower in the first third of the layers",
    n_null: int = 200, seed: int = 0,
) -> Claim:
    r"""The early-layer drop: ``value`` is lower in the first third of the layers than later.

    Effect: median over later layers − median over early ones (split by
    :func:`early_late_split`; medians because single layers can be extreme), bootstrap CI
    resampling each group of layers; chance: the mean of the same difference with the
    early/later labels shuffled. Tolerance ``margin``.
    """
    from featmatch.chapters.claims import bootstrap_diff, make_claim, null_distribution

    d = by_layer[[layer, value]].dropna()
    early, late = early_late_split(d[layer], n_layers)
    e = d.loc[d[layer].isin(early), value].to_numpy(float)
    lt = d.loc[d[layer].isin(late), value].to_numpy(float)
    est, lo, hi = bootstrap_diff(lt, e, np.median, seed=seed)
    allv = np.concatenate([e, lt])

    def shuffled(rng: np.random.Generator) -> float:
        x = rng.permutation(allv)
        return float(np.median(x[len(e):]) - np.median(x[: len(e)]))

    chance = chance_mean(null_distribution(shuffled, n=n_null, seed=seed)) if len(e) and len(lt) else math.nan
    return make_claim(
        chapter=chapter, claim=claim, source=source, paper_value=paper_value, our_value=est,
        effect=est - chance, ci=(lo - chance, hi - chance), chance=chance, n=len(allv), unit="layers",
        tolerance=margin, effect_name="later − early (median)",
        preconditions={"≥ 3 early and ≥ 3 later layers": len(e) >= 3 and len(lt) >= 3}, section=section,
    )
