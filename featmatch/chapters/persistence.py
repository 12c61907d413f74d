r"""Chapter 02, feature persistence: exact against composed matches, and feature paths.

A matching between two layers is a permutation, and matchings between consecutive layers
compose (SAE Match Sec. 3.2): :math:`P^{(s\to t)} \approx P^{(t-1\to t)}\cdots P^{(s\to s+1)}`.
Hypothesis 3 says composition approximates the exact match, less well as the distance grows;
Fig. 8 finds that similarity "remains significant for approximately five layers"; App. D
follows single features along their composed path. The functions here build what notebook
``02_persistence`` shows and the ``claim_*`` rows of its claims table.

Shared helpers (pairs, matchings, judging) are in :mod:`featmatch.chapters.common`, the
figures in :mod:`featmatch.chapters.plots`, the verdict rules in
:mod:`featmatch.chapters.claims`.

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656 (Sec. 3.2, 5.4, Fig. 8, App. D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featmatch.chapters.claims import Claim, chance_mean
from featmatch.chapters.common import MATCH_VARIANTS, Pair, layers_at_depth, permutation_change

if TYPE_CHECKING:
    from featmatch.lm.activations import ActivationStats
    from featmatch.matching._matching import Matching

__all__ = [
    "path_grid",
    "agreement_samples",
    "claim_composed_agrees",
    "PAPER_START_FRACTIONS",
    "start_layers",
    "persistence_pairs",
    "chain",
    "persistence_matchings",
    "persistence_table",
    "agreement_table",
    "label_table",
    "persistence_length",
    "most_active_features",
    "path_table",
    "claim_composition_degrades",
    "claim_persistence",
]

#: The paper's start layers 10, 12 and 20 of Gemma-2-2B's 26, as fractions of the depth.
PAPER_START_FRACTIONS: tuple[float, ...] = (10 / 26, 12 / 26, 20 / 26)


def start_layers(layers: Sequence[int], n_layers: int, fractions: Sequence[float] = PAPER_START_FRACTIONS) -> list[int]:
    """Start layers at the paper's relative depths (default: 38%, 46%, 77%), never the last layer.

    :func:`featmatch.chapters.common.layers_at_depth` over ``layers[:-1]`` (a start needs a
    later layer).

    Examples
    --------
    >>> start_layers(list(range(30)), 30)
    [12, 14, 23]
    """
    return layers_at_depth(list(layers)[:-1], n_layers, fractions)


def persistence_pairs(starts: Sequence[int], layers: Sequence[int], max_distance: int | None = None) -> list[Pair]:
    """Every ``(start, target)`` with ``target`` a later layer within ``max_distance`` layers.

    Returns
    -------
    list of (int, int)

    Examples
    --------
    >>> persistence_pairs([0, 2], range(5), max_distance=2)
    [(0, 1), (0, 2), (2, 3), (2, 4)]
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
    seeded random permutation (``numpy.random.default_rng([random_seed, s, t])``), the
    chance level.

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


def agreement_table(table: pd.DataFrame) -> pd.DataFrame:
    """Agreement of composed and exact matches: distance (rows) × start layer (columns).

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`persistence_table`.
    """
    return table[table["method"] == "exact"].pivot_table(index="distance", columns="start", values="agreement")


def label_table(judged: pd.DataFrame) -> pd.DataFrame:
    """Mean judge label per (start, target, matching method) of a persistence judgement.

    Parameters
    ----------
    judged : pandas.DataFrame
        From :func:`featmatch.chapters.common.judge_matched_pairs` on
        :func:`persistence_matchings`.

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
    r"""Per start layer: for how many layers a match keeps at least ``ratio`` of its one-step quality.

    Quality is the score above chance, :math:`q(d) = m_{method}(d) - m_{baseline}(d)` at the
    same (start, target) when the table has the ``baseline`` method (the random permutation
    of :func:`persistence_matchings`), else the raw score. The length is the largest distance
    :math:`D` such that :math:`q(d) \ge ratio \cdot q(1)` for every :math:`d = 1..D`
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


def most_active_features(stats: ActivationStats, layer: int, n: int, *, min_fires: int = 5) -> list[int]:
    """The ``n`` features of ``layer`` that fire most often, kept if they fire at least ``min_fires`` times.

    The order is by firing count, most first (ties: the higher index first, as a reversed
    ``argsort``); fewer than ``n`` come back when the top ``n`` include rare features.
    """
    fires = np.asarray(stats.fire_count[layer])
    return [int(f) for f in fires.argsort()[::-1][:n] if fires[f] >= min_fires]


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


def path_grid(paths: pd.DataFrame) -> pd.DataFrame:
    """The feature paths of :func:`path_table` as one compact grid: a row per layer, a column
    per path (named by its start feature), each cell ``feature (step cost)``.

    The contexts of each feature are left to the interactive flow view; printing them for every
    layer of every path ran to about 10k characters.
    """
    if paths.empty:
        return pd.DataFrame()
    cell = [
        "—" if f < 0 else (f"{int(f)}" if not np.isfinite(c) else f"{int(f)} ({c:.3g})")
        for f, c in zip(paths["feature"], paths["step_cost"].astype(float), strict=True)
    ]
    grid = paths.assign(cell=cell).pivot_table(index="layer", columns="path", values="cell", aggfunc="first")
    grid.columns = [f"path of {c}" for c in grid.columns]
    return grid.fillna("")


# --------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------


CHAPTER = "02"
SECTION_TABLE = "Exact against composed matches (Fig. 8)"


def agreement_samples(matchings: Mapping[str, Mapping[Pair, Matching]], distance: int = 2) -> np.ndarray:
    """Per feature of every start layer: 1 if the composed and exact matches at ``distance``
    send it to the same feature, 0 if not (features unmatched by either are left out)."""
    out = []
    for (s, t), ex in matchings.get("exact", {}).items():
        if t - s != distance or (s, t) not in matchings.get("composed", {}):
            continue
        pe = np.asarray(ex.perm)
        pc = np.asarray(matchings["composed"][(s, t)].perm)
        ok = (pe >= 0) & (pc >= 0)
        out.append((pe[ok] == pc[ok]).astype(float))
    return np.concatenate(out) if out else np.array([])


def claim_composition_degrades(table: pd.DataFrame, metric: str = "matching_score", *, tolerance: float = 0.01,
                               section: str = SECTION_TABLE) -> list[Claim]:
    r"""Hypothesis 3: composed matches approximate exact ones and degrade with distance.

    Row 1: exact − composed ``metric`` over the (start, distance ≥ 2) cells; effect its mean,
    bootstrap CI over cells, chance 0, tolerance ``tolerance``. Row 2: the gap grows with
    distance: Spearman ρ(distance, gap) over the same cells, bootstrap CI, chance from
    shuffled distances, tolerance 0.2.
    """
    from featmatch.chapters.claims import bootstrap_corr, claim_from_samples, make_claim, null_distribution

    p = table.pivot_table(index=["start", "distance"], columns="method", values=metric).reset_index()
    p = p[p["distance"] >= 2] if "distance" in p else p
    has = {"exact", "composed"} <= set(p.columns)
    gap = (p["exact"] - p["composed"]).to_numpy(float) if has else np.array([])
    dist = p["distance"].to_numpy(float) if has else np.array([])
    name = metric.replace("_", " ")
    rows = [claim_from_samples(
        gap, chance=0.0, chapter=CHAPTER, claim=f"Hypothesis 3: exact matches score above composed ones ({name})",
        source="SAE Match §3.2, §5.4, Fig. 8", paper_value="composition approximates exact matching, with a gap",
        unit="(start, distance ≥ 2) cells", tolerance=tolerance, effect_name="exact − composed",
        preconditions={"≥ 4 cells at distance ≥ 2": len(gap) >= 4}, section=section,
    )]
    rho, lo, hi = bootstrap_corr(dist, gap, method="spearman")
    from scipy.stats import spearmanr

    chance = (chance_mean(null_distribution(lambda rng: spearmanr(rng.permutation(dist), gap).statistic, n=200))
              if len(gap) >= 4 and np.ptp(dist) > 0 else math.nan)
    rows.append(make_claim(
        chapter=CHAPTER, claim=f"Hypothesis 3: the exact − composed gap grows with distance ({name})",
        source="SAE Match §3.2, §5.4, Fig. 8", paper_value="composition degrades as the distance grows",
        our_value=rho, effect=rho - chance, ci=(lo - chance, hi - chance), chance=chance, n=len(gap),
        unit="(start, distance ≥ 2) cells", tolerance=0.2, effect_name="ρ(distance, gap) − chance",
        preconditions={"≥ 2 distinct distances": len(set(dist.tolist())) >= 2}, section=section,
    ))
    return rows


def claim_composed_agrees(matchings: Mapping[str, Mapping[Pair, Matching]], *, distance: int = 2,
                          majority: float = 0.5, section: str = SECTION_TABLE) -> Claim:
    """Composed and exact matches send a feature to the same partner (at ``distance``).

    Samples: one 0/1 per feature of every start layer (:func:`agreement_samples`); effect =
    agreement − ``majority`` (the claim that composition *approximates* exact matching needs
    most partners to agree); chance: ``1 / F_B``, the agreement of a random partner.
    """
    from featmatch.chapters.claims import claim_from_samples

    x = agreement_samples(matchings, distance)
    n_b = next((m.n_b for (s, t), m in matchings.get("exact", {}).items() if t - s == distance), 0)
    c = claim_from_samples(
        x, chance=majority, chapter=CHAPTER,
        claim=f"composed matches reach the exact partner (distance {distance})", source="SAE Match §3.2, Fig. 8",
        paper_value="composition approximates exact matching", unit="features", tolerance=0.05,
        effect_name=f"agreement − {majority:g}", preconditions={"≥ 50 features": x.size >= 50}, section=section,
    )
    # the chance column holds the random-partner agreement, not the majority line the effect is measured from
    from dataclasses import replace

    return replace(c, chance=(1.0 / n_b) if n_b else math.nan)


def claim_persistence(
    table: pd.DataFrame, metric: str = "matching_score", ratio: float = 0.5, around: int = 5, *, method: str = "exact",
    margin: float = 2.0, section: str = SECTION_TABLE,
) -> Claim:
    """Fig. 8: features persist (stay significantly matched) for about five layers.

    Per start layer, the persistence length of :func:`persistence_length` (matches keeping
    at least ``ratio`` of their one-step margin over the random permutation). "About
    ``around``" is an equivalence claim: the mean of (length − ``around``) over start layers
    within ``±margin`` layers (:func:`~featmatch.chapters.claims.claim_equivalent`). A length
    at the largest distance tested is censored (the feature may persist longer); the
    precondition says whether any was.
    """
    from featmatch.chapters.claims import claim_equivalent

    lengths = persistence_length(table, method=method, metric=metric, ratio=ratio)
    maxd = int(table["distance"].max()) if len(table) else 0
    censored = bool((lengths >= maxd).any()) if len(lengths) else False
    return claim_equivalent(
        lengths.to_numpy(float) - around, margin=margin, chapter=CHAPTER,
        claim=f"features persist for about {around} layers ({method} matches, {metric.replace('_', ' ')})",
        source="SAE Match §5.4, Fig. 8", paper_value=f"about {around} layers", unit="start layers", chance=-float(around),
        preconditions={"≥ 3 start layers": len(lengths) >= 3,
                       f"no length censored at the largest distance tested ({maxd})": not censored},
        section=section,
    )
