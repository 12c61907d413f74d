r"""Supernodes: agglomerative clustering of attribution-graph nodes, distance builders for the
baselines, and the compression scores.

Any node×node distance plugs in the same way (semantic OT, decoder cosine, SAE Match cost,
layer adjacency): :func:`supernodes` takes a precomputed square matrix over the graph's
*feature* nodes (in the order of ``graph.feature_nodes()``) and cuts scipy's average-linkage
dendrogram into the target number of clusters. Error nodes have no decoder direction and no
explanation, so they are not clustered: each one is its own supernode (named ``"L{layer} error"``)
and counts towards the number of supernodes.

Scores (featmatch's definitions; the Semantic OT paper's "accuracy" is undefined)
----------------------------------------------------------------------------------
With :math:`m(C)` the mean task metric when the nodes of :math:`C` keep their values and every
other node of the graph's layers (all SAE features and the error terms, every position but
BOS) is replaced by its mean over a reference token set,

.. math::

    F(C) = \frac{m(C) - m(\varnothing)}{m(\text{full}) - m(\varnothing)},

with :math:`m(\text{full})` the unmodified model (Marks et al. 2024, Eq. 5). At supernode
level, :math:`C` is the union of the ``k`` supernodes with the largest :math:`|\sum_{u\in S}
\mathrm{attr}(u)|`; the curve over ``k`` and its mean (area under the curve) are reported next
to the node-level curve at equal node counts. Coherence of a supernode :math:`S` compares
ablating it whole with its members' separate effects,

.. math::

    \kappa(S) = \frac{\delta(S)}{\sum_{u\in S}\delta(\{u\})}, \qquad
    \delta(A) = m(\text{full}) - m(\text{all but } A),

(1 = the members act additively), summarised over non-singleton supernodes as the additivity
error :math:`\sum_S |\delta(S) - \sum_u \delta(u)| / \sum_S \sum_u |\delta(u)|`. Task accuracy
kept is the fraction of prompts whose argmax next token is still the answer. Judge agreement is
the mean judge label (1 = different, 2 = maybe, 3 = same) over within-supernode feature pairs.

References
----------
1. Marks et al. *Sparse Feature Circuits*, arXiv:2403.19647, 2024.
2. Balagansky, Maksimov, Gavrilov. *Mechanistic Permutability: Match Features Across
   Layers*, ICLR 2025, arXiv:2410.07656 (SAE Match cost, folding Eq. 4).
3. Laptev et al. *Analyze Feature Flow to Enhance Interpretation and Steering in Language
   Models*, 2025 (decoder cosine).
4. Cao, Do, Thai. *Semantic Optimal Transport for Sparse Autoencoder Feature Matching and
   Circuit Compression*, arXiv:2605.28567, 2026.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from featmatch.judging.judges import Judge

from ._attribution import (
    AttributionGraph,
    _check_saes,
    _clean_metrics,
    _intervened_metrics,
    _keep_masks,
    ablation_means,
)
from ._tasks import TaskTokens

__all__ = [
    "Supernodes",
    "supernodes",
    "node_distance",
    "decoder_cosine_distance",
    "sae_match_distance",
    "layer_distance",
    "CompressionScores",
    "compression_scores",
    "node_ablation_effects",
    "faithfulness",
    "all_nodes",
    "judge_agreement",
    "compare_methods",
    "WithinLayerAdditivity",
    "within_layer_additivity",
]


# ----------------------------------------------------------------------------- distances
def node_distance(
    graph: AttributionGraph,
    pair_distance: Callable[[int, np.ndarray, int, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Assemble a feature-node distance matrix from a per-layer-pair distance function.

    Parameters
    ----------
    graph : AttributionGraph
    pair_distance : callable ``(layer_a, feats_a, layer_b, feats_b) -> (len(feats_a), len(feats_b))``
        Distances between features of two layers (called once per unordered layer pair,
        including ``layer_a == layer_b``). E.g. a semantic-OT block
        ``lambda la, fa, lb, fb: semantic.distance_matrix(d[la].subset(fa), d[lb].subset(fb))``.

    Returns
    -------
    (n_feat, n_feat) ndarray float64
        Symmetric with a zero diagonal, rows in ``graph.feature_nodes()`` order.
    """
    fn = graph.feature_nodes()
    layers = fn["layer"].to_numpy()
    feats = fn["feature"].to_numpy()
    n = len(fn)
    D = np.zeros((n, n))
    uniq = sorted(set(layers.tolist()))
    for i, la in enumerate(uniq):
        ia = np.flatnonzero(layers == la)
        for lb in uniq[i:]:
            ib = np.flatnonzero(layers == lb)
            block = np.asarray(pair_distance(int(la), feats[ia], int(lb), feats[ib]), dtype=np.float64)
            if block.shape != (len(ia), len(ib)):
                raise ValueError(
                    f"pair_distance({la}, ., {lb}, .) returned {block.shape}, expected {(len(ia), len(ib))}"
                )
            D[np.ix_(ia, ib)] = block
            D[np.ix_(ib, ia)] = block.T
    D = 0.5 * (D + D.T)
    np.fill_diagonal(D, 0.0)
    return D


def _decoder_rows(sae, feats: np.ndarray, fold: bool) -> torch.Tensor:
    W = sae.W_dec.detach().float()[torch.as_tensor(feats, dtype=torch.long)]
    theta = getattr(sae, "threshold", None)
    if fold and theta is not None:  # Eq. 4 of SAE Match: W_dec' = diag(theta) W_dec
        W = W * theta.detach().float()[torch.as_tensor(feats, dtype=torch.long)][:, None]
    return W


def decoder_cosine_distance(graph: AttributionGraph, saes: Mapping[int, Any]) -> np.ndarray:
    r"""Decoder-cosine distance between feature nodes, across layers (Feature Flow baseline).

    .. math:: D_{ij} = 1 - \frac{\langle W_{dec}^{(l_i)}[f_i], W_{dec}^{(l_j)}[f_j]\rangle}
              {\|W_{dec}^{(l_i)}[f_i]\|\,\|W_{dec}^{(l_j)}[f_j]\|}

    Returns the ``(n_feat, n_feat)`` matrix in ``graph.feature_nodes()`` order, in [0, 2].
    """

    def pair(la, fa, lb, fb):
        A = torch.nn.functional.normalize(_decoder_rows(saes[la], fa, False), dim=1)
        B = torch.nn.functional.normalize(_decoder_rows(saes[lb], fb, False), dim=1)
        return (1.0 - A @ B.T).clamp_min(0).double().numpy()

    return node_distance(graph, pair)


def sae_match_distance(graph: AttributionGraph, saes: Mapping[int, Any], fold: bool = True) -> np.ndarray:
    r"""SAE Match cost between feature nodes: folded decoder MSE (Balagansky et al. 2025).

    .. math:: D_{ij} = \frac{1}{d}\,\big\| \theta_{f_i} W_{dec}^{(l_i)}[f_i] - \theta_{f_j} W_{dec}^{(l_j)}[f_j] \big\|^2

    with the JumpReLU thresholds :math:`\theta` folded into the decoder (Eq. 4; no folding for
    SAEs without a threshold, or with ``fold=False``).
    """

    def pair(la, fa, lb, fb):
        A = _decoder_rows(saes[la], fa, fold).double()
        B = _decoder_rows(saes[lb], fb, fold).double()
        return (torch.cdist(A, B) ** 2 / A.shape[1]).numpy()

    return node_distance(graph, pair)


def layer_distance(graph: AttributionGraph) -> np.ndarray:
    r"""Layer-adjacency baseline: :math:`D_{ij} = |l_i - l_j|` between feature nodes.

    Average linkage then groups nodes by layer first and merges adjacent layers next. With
    more clusters than layers the split inside a layer is arbitrary (ties at distance 0) but
    deterministic.
    """

    def pair(la, fa, lb, fb):
        return np.full((len(fa), len(fb)), float(abs(la - lb)))

    return node_distance(graph, pair)


# ----------------------------------------------------------------------------- clustering
@dataclass
class Supernodes:
    """A partition of an attribution graph's nodes into supernodes.

    Attributes
    ----------
    labels : (n_nodes,) ndarray int
        Supernode index of every node, aligned with ``graph.nodes`` rows; indices are
        0..K−1 in order of first appearance.
    names : list of str
        Name of each supernode.
    method : str
        Label of the distance used (for tables).
    """

    labels: np.ndarray
    names: list[str]
    method: str = "custom"
    meta: dict = field(default_factory=dict)

    @property
    def n_supernodes(self) -> int:
        """Number of supernodes (error-node singletons included)."""
        return len(self.names)

    def members(self, graph: AttributionGraph, k: int) -> list[str]:
        """Node ids of supernode ``k``."""
        return graph.nodes["node_id"].to_numpy()[self.labels == k].tolist()

    def to_frame(self, graph: AttributionGraph) -> pd.DataFrame:
        """``graph.nodes`` with ``supernode`` (index) and ``supernode_name`` columns added."""
        df = graph.nodes.copy()
        df["supernode"] = self.labels
        df["supernode_name"] = [self.names[k] for k in self.labels]
        return df

    def table(self, graph: AttributionGraph) -> pd.DataFrame:
        """One row per supernode: name, n_members, layer span, summed attribution."""
        df = self.to_frame(graph)
        g = df.groupby("supernode", sort=True)
        out = pd.DataFrame(
            {
                "name": [self.names[k] for k in g.groups],
                "n_members": g.size().to_numpy(),
                "min_layer": g["layer"].min().to_numpy(),
                "max_layer": g["layer"].max().to_numpy(),
                "attribution": g["attribution"].sum().to_numpy(),
                "kind": g["kind"].first().to_numpy(),
            },
            index=pd.Index(list(g.groups), name="supernode"),
        )
        return out


def _check_distance(D: np.ndarray, n: int) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.shape != (n, n):
        raise ValueError(f"distance matrix has shape {D.shape}, expected ({n}, {n})")
    if not np.all(np.isfinite(D)):
        raise ValueError("distance matrix contains NaN or Inf")
    if (D < -1e-9).any():
        raise ValueError("distance matrix has negative entries")
    if not np.allclose(D, D.T, atol=1e-8 * max(1.0, float(np.abs(D).max()))):
        raise ValueError("distance matrix is not symmetric")
    D = 0.5 * (D + D.T)
    np.fill_diagonal(D, 0.0)
    return np.clip(D, 0.0, None)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel so that clusters are numbered 0.. in order of first appearance."""
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(x), len(order)) for x in labels], dtype=np.int64)


def supernodes(
    graph: AttributionGraph,
    distance: np.ndarray,
    n_clusters: int | None = None,
    fraction: float = 0.1,
    method: str = "average",
    name: str = "custom",
) -> Supernodes:
    r"""Group the graph's feature nodes into supernodes by agglomerative clustering.

    Parameters
    ----------
    graph : AttributionGraph
    distance : (n_feat, n_feat) array-like
        Precomputed symmetric distances between ``graph.feature_nodes()`` (any source:
        :func:`decoder_cosine_distance`, :func:`sae_match_distance`, :func:`layer_distance`,
        or a semantic-OT matrix through :func:`node_distance`).
    n_clusters : int, optional
        Target number of feature supernodes. Default ``max(1, round(fraction * n_feat))``.
    fraction : float
        Target size as a fraction of the feature nodes (the paper compresses to ≈10 %).
    method : str
        scipy linkage method (``"average"``: UPGMA).
    name : str
        Method label stored on the result.

    Returns
    -------
    Supernodes
        Exactly ``n_clusters`` feature supernodes (fewer only if there are fewer distinct
        points), plus one singleton per error node. Deterministic for a given matrix.

    Notes
    -----
    The dendrogram is cut with ``fcluster(criterion="maxclust")``; when ties make that
    criterion return fewer clusters than asked, the cut falls back to taking the merge
    order directly (the last ``n_clusters − 1`` merges are undone), which always yields the
    target size.
    """
    fn = graph.feature_nodes()
    n = len(fn)
    D = _check_distance(distance, n)
    if n_clusters is None:
        n_clusters = max(1, int(round(fraction * n)))
    if n_clusters < 1:
        raise ValueError("n_clusters must be >= 1")
    n_clusters = min(n_clusters, n) if n else 0
    if n == 0:
        feat_labels = np.zeros(0, dtype=np.int64)
    elif n == 1 or n_clusters == n:
        feat_labels = np.arange(n)
    else:
        Z = linkage(squareform(D, checks=False), method=method)
        feat_labels = fcluster(Z, t=n_clusters, criterion="maxclust")
        if len(np.unique(feat_labels)) != n_clusters:
            feat_labels = _cut_by_merges(Z, n, n_clusters)
    feat_labels = _canonical(feat_labels)
    labels = np.full(graph.n_nodes, -1, dtype=np.int64)
    is_feat = (graph.nodes["kind"] == "feature").to_numpy()
    labels[is_feat] = feat_labels
    names: list[str] = []
    for k in range(int(feat_labels.max()) + 1 if n else 0):
        lay = fn["layer"].to_numpy()[feat_labels == k]
        span = f"L{lay.min()}" if lay.min() == lay.max() else f"L{lay.min()}-{lay.max()}"
        names.append(f"{name} {span} #{k} ({len(lay)})")
    for i in np.flatnonzero(~is_feat):
        labels[i] = len(names)
        names.append(f"L{int(graph.nodes['layer'].iloc[i])} error")
    return Supernodes(
        labels=labels, names=names, method=name, meta={"n_clusters": int(n_clusters), "linkage": method}
    )


def _cut_by_merges(Z: np.ndarray, n: int, k: int) -> np.ndarray:
    """Flat clusters from the first ``n - k`` merges of a linkage matrix (union–find)."""
    parent = list(range(2 * n - 1))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i in range(n - k):
        a, b = int(Z[i, 0]), int(Z[i, 1])
        parent[find(a)] = n + i
        parent[find(b)] = n + i
    return np.array([find(i) for i in range(n)])


# ----------------------------------------------------------------------------- scores
def _node_set(graph: AttributionGraph, mask: np.ndarray) -> set[tuple[int, int]]:
    sub = graph.nodes[mask]
    return set(zip(sub["layer"].astype(int), sub["feature"].astype(int), strict=False))


@dataclass
class _Ctx:
    model: Any
    sl: dict
    means: Mapping
    batch_size: int
    m_full: np.ndarray
    acc_full: np.ndarray
    m_empty: float
    acc_empty: float

    def run(self, graph, specs):
        return _intervened_metrics(self.model, self.sl, graph.task, specs, self.means, self.batch_size)


def _context(model, saes, graph, means, reference_tokens, batch_size) -> _Ctx:
    sl = _check_saes(saes)
    if tuple(sl) != tuple(graph.layers):
        raise ValueError(f"SAE layers {tuple(sl)} differ from the graph's layers {graph.layers}")
    if means is None:
        means = ablation_means(
            model, saes, graph.task if reference_tokens is None else reference_tokens, batch_size
        )
    m_full, acc_full = _clean_metrics(model, graph.task, batch_size)
    m0, a0 = _intervened_metrics(model, sl, graph.task, [_keep_masks(sl, set(), None)], means, batch_size)
    return _Ctx(model, sl, means, batch_size, m_full, acc_full, float(m0.mean()), float(a0.mean()))


def all_nodes(saes: Mapping[int, Any]) -> set[tuple[int, int]]:
    """Every node of the SAEs' layers: all features and each layer's error node (−1)."""
    out: set[tuple[int, int]] = set()
    for L, sae in saes.items():
        out |= {(int(L), f) for f in range(int(sae.W_dec.shape[0]))}
        out.add((int(L), -1))
    return out


def faithfulness(
    model,
    saes: Mapping[int, Any],
    graph: AttributionGraph,
    circuits: Sequence[set[tuple[int, int]]],
    means: Mapping | None = None,
    reference_tokens: torch.Tensor | None = None,
    batch_size: int = 16,
) -> pd.DataFrame:
    r"""Mean-ablation faithfulness :math:`F(C)` of node sets, with actual forwards.

    Parameters
    ----------
    circuits : sequence of set of (layer, feature)
        Each circuit is the set of kept nodes; feature −1 is the layer's error node. Every
        other feature and error term at ``graph.layers`` is mean-ablated (positions ≥ 1).
    means : dict, optional
        From :func:`ablation_means`; computed over ``reference_tokens`` (default: the task
        prompts) when not given.

    Returns
    -------
    pandas.DataFrame
        ``n_nodes, metric, faithfulness, accuracy, m_full, m_empty`` per circuit.
        :math:`F(\text{all nodes}) = 1` and :math:`F(\varnothing) = 0` by construction;
        ``m_full`` is the unmodified model's metric.
    """
    ctx = _context(model, saes, graph, means, reference_tokens, batch_size)
    specs = [_keep_masks(ctx.sl, set(c), None) for c in circuits]
    m, acc = ctx.run(graph, specs)
    return _faith_frame(ctx, [len(c) for c in circuits], m, acc)


def _faith_frame(ctx: _Ctx, sizes, m: np.ndarray, acc: np.ndarray) -> pd.DataFrame:
    full = float(ctx.m_full.mean())
    denom = full - ctx.m_empty
    mm = m.mean(1)
    return pd.DataFrame(
        {
            "n_nodes": list(sizes),
            "metric": mm,
            "faithfulness": (mm - ctx.m_empty) / denom if abs(denom) > 1e-12 else np.nan,
            "accuracy": acc.mean(1),
            "m_full": full,
            "m_empty": ctx.m_empty,
        }
    )


def node_ablation_effects(
    model,
    saes: Mapping[int, Any],
    graph: AttributionGraph,
    means: Mapping | None = None,
    reference_tokens: torch.Tensor | None = None,
    batch_size: int = 16,
) -> pd.Series:
    r"""Effect :math:`\delta(\{u\}) = m(\text{full}) - m(\text{all but } u)` of mean-ablating each
    graph node alone (one forward per node; compute once and pass to
    :func:`compression_scores` for every method). Indexed by ``node_id``."""
    ctx = _context(model, saes, graph, means, reference_tokens, batch_size)
    specs = [
        _keep_masks(ctx.sl, None, {(int(L), int(f))})
        for L, f in zip(graph.nodes["layer"], graph.nodes["feature"], strict=False)
    ]
    m, _ = ctx.run(graph, specs)
    return pd.Series(
        float(ctx.m_full.mean()) - m.mean(1), index=graph.nodes["node_id"].to_numpy(), name="effect"
    )


def judge_agreement(
    graph: AttributionGraph,
    groups: Supernodes,
    judge: Judge,
    describe: Callable[[int, int], str],
    max_pairs: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Judge labels for within-supernode feature pairs.

    Parameters
    ----------
    judge : object with ``.score(a, b) -> obj.label`` (1 = different, 2 = maybe, 3 = same),
        e.g. the paper's LLM judge or an offline proxy from ``featmatch.judging.judges``.
    describe : callable ``(layer, feature) -> str``
        Text shown to the judge for a feature (explanation or activating examples).
    max_pairs : int
        Pairs sampled per supernode (seeded, without replacement).

    Returns
    -------
    pandas.DataFrame
        ``supernode, a, b, label`` per judged pair (empty when no supernode has two features).
    """
    rng = np.random.default_rng(seed)
    nodes = graph.nodes
    rows = []
    for k in range(groups.n_supernodes):
        idx = np.flatnonzero((groups.labels == k) & (nodes["kind"] == "feature").to_numpy())
        if len(idx) < 2:
            continue
        pairs = [(i, j) for a, i in enumerate(idx) for j in idx[a + 1 :]]
        take = rng.choice(len(pairs), size=min(max_pairs, len(pairs)), replace=False)
        for t in sorted(take):
            i, j = pairs[t]
            li, fi = int(nodes["layer"].iloc[i]), int(nodes["feature"].iloc[i])
            lj, fj = int(nodes["layer"].iloc[j]), int(nodes["feature"].iloc[j])
            label = int(judge.score(describe(li, fi), describe(lj, fj)).label)
            if label not in (1, 2, 3):
                raise ValueError(f"judge returned label {label}; expected 1, 2 or 3")
            rows.append(
                {"supernode": k, "a": nodes["node_id"].iloc[i], "b": nodes["node_id"].iloc[j], "label": label}
            )
    return pd.DataFrame(rows, columns=["supernode", "a", "b", "label"])


@dataclass
class CompressionScores:
    """Scores of one supernode partition.

    Attributes
    ----------
    summary : dict
        ``method, n_nodes, n_supernodes, compression_ratio, faithfulness_graph,
        accuracy_graph, faithfulness_auc_supernodes, faithfulness_auc_nodes,
        accuracy_auc_supernodes, additivity_error, coherence_median, judge_mean,
        judge_same_or_maybe, n_judged``.
    curve : pandas.DataFrame
        ``level`` (supernode/node), ``k`` (supernodes kept), ``n_nodes``, ``metric``,
        ``faithfulness``, ``accuracy``.
    table : pandas.DataFrame
        Per supernode: ``name, n_members, min_layer, max_layer, attribution, effect,
        sum_member_effects, coherence, judge_mean``.
    judgements : pandas.DataFrame
        Raw judged pairs.
    """

    summary: dict
    curve: pd.DataFrame
    table: pd.DataFrame
    judgements: pd.DataFrame


def compression_scores(
    model,
    saes: Mapping[int, Any],
    graph: AttributionGraph,
    groups: Supernodes,
    means: Mapping | None = None,
    reference_tokens: torch.Tensor | None = None,
    node_effects: pd.Series | None = None,
    judge: Judge | None = None,
    describe: Callable[[int, int], str] | None = None,
    max_judge_pairs: int = 3,
    batch_size: int = 16,
) -> CompressionScores:
    """Compression ratio, faithfulness (node and supernode level), coherence, accuracy kept
    and judge agreement of one supernode partition (definitions in the module docstring).

    Parameters
    ----------
    means : dict, optional
        :func:`ablation_means` output; computed from ``reference_tokens`` (default: the task
        prompts) when not given. Pass the same means to every method.
    node_effects : pandas.Series, optional
        :func:`node_ablation_effects` (computed when not given; reuse it across methods).
    judge, describe : optional
        Judge and feature-text source for within-supernode agreement (NaN when missing).

    Returns
    -------
    CompressionScores
    """
    if len(groups.labels) != graph.n_nodes:
        raise ValueError("supernode labels do not match the graph's nodes")
    if means is None:
        means = ablation_means(
            model, saes, graph.task if reference_tokens is None else reference_tokens, batch_size
        )
    ctx = _context(model, saes, graph, means, None, batch_size)
    if node_effects is None:
        node_effects = node_ablation_effects(model, saes, graph, means=means, batch_size=batch_size)
    K = groups.n_supernodes
    tab = groups.table(graph)
    order = np.argsort(-tab["attribution"].abs().to_numpy(), kind="stable")
    sn_order = tab.index.to_numpy()[order]
    node_order = np.argsort(-graph.nodes["abs_attribution"].to_numpy(), kind="stable")

    # faithfulness curves: top-k supernodes, and top-n nodes at the same node counts
    specs, sizes, levels, ks = [], [], [], []
    for k in range(K + 1):
        mask = np.isin(groups.labels, sn_order[:k])
        specs.append(_keep_masks(ctx.sl, _node_set(graph, mask), None))
        sizes.append(int(mask.sum()))
        levels.append("supernode")
        ks.append(k)
    for k in range(K + 1):
        n_k = sizes[k]
        mask = np.zeros(graph.n_nodes, dtype=bool)
        mask[node_order[:n_k]] = True
        specs.append(_keep_masks(ctx.sl, _node_set(graph, mask), None))
        sizes.append(n_k)
        levels.append("node")
        ks.append(k)
    # whole-supernode ablations (coherence)
    specs += [_keep_masks(ctx.sl, None, _node_set(graph, groups.labels == s)) for s in tab.index]
    m, acc = ctx.run(graph, specs)
    n_curve = 2 * (K + 1)
    curve = _faith_frame(ctx, sizes, m[:n_curve], acc[:n_curve])
    curve.insert(0, "k", ks)
    curve.insert(0, "level", levels)

    full = float(ctx.m_full.mean())
    tab["effect"] = full - m[n_curve:].mean(1)
    eff = node_effects.reindex(graph.nodes["node_id"]).to_numpy()
    tab["sum_member_effects"] = [eff[groups.labels == s].sum() for s in tab.index]
    tab["sum_abs_member_effects"] = [np.abs(eff[groups.labels == s]).sum() for s in tab.index]
    with np.errstate(divide="ignore", invalid="ignore"):
        tab["coherence"] = tab["effect"] / tab["sum_member_effects"]
    multi = tab["n_members"] > 1
    denom = tab.loc[multi, "sum_abs_member_effects"].sum()
    add_err = (
        float((tab.loc[multi, "effect"] - tab.loc[multi, "sum_member_effects"]).abs().sum() / denom)
        if multi.any() and denom > 0
        else np.nan
    )

    judgements = pd.DataFrame(columns=["supernode", "a", "b", "label"])
    if judge is not None and describe is not None:
        judgements = judge_agreement(graph, groups, judge, describe, max_pairs=max_judge_pairs)
    jm = judgements.groupby("supernode")["label"].mean() if len(judgements) else pd.Series(dtype=float)
    tab["judge_mean"] = tab.index.map(lambda s: jm.get(s, np.nan))

    sn = curve[curve["level"] == "supernode"]
    nd = curve[curve["level"] == "node"]
    graph_row = sn.iloc[-1]
    labels = judgements["label"].astype(float) if len(judgements) else pd.Series(dtype=float)
    summary = {
        "method": groups.method,
        "n_nodes": graph.n_nodes,
        "n_supernodes": K,
        "compression_ratio": graph.n_nodes / K if K else np.nan,
        "faithfulness_graph": float(graph_row["faithfulness"]),
        "accuracy_graph": float(graph_row["accuracy"]),
        "accuracy_full": float(ctx.acc_full.mean()),
        "faithfulness_auc_supernodes": float(sn["faithfulness"].iloc[1:].mean()),
        "faithfulness_auc_nodes": float(nd["faithfulness"].iloc[1:].mean()),
        "accuracy_auc_supernodes": float(sn["accuracy"].iloc[1:].mean()),
        "additivity_error": add_err,
        "coherence_median": float(tab.loc[multi, "coherence"].median()) if multi.any() else np.nan,
        "judge_mean": float(labels.mean()) if len(labels) else np.nan,
        "judge_same_or_maybe": float((labels >= 2).mean()) if len(labels) else np.nan,
        "n_judged": int(len(labels)),
    }
    return CompressionScores(summary=summary, curve=curve, table=tab.reset_index(), judgements=judgements)


def compare_methods(
    model,
    saes: Mapping[int, Any],
    graph: AttributionGraph,
    methods: Mapping[str, Supernodes],
    reference_tokens: torch.Tensor | None = None,
    judge: Judge | None = None,
    describe: Callable[[int, int], str] | None = None,
    batch_size: int = 16,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score several supernode partitions of one graph with shared means and node effects.

    Returns
    -------
    (summary, curves) : pandas.DataFrame, pandas.DataFrame
        One summary row per method (index ``method``), and the tidy faithfulness curves with
        a ``method`` column.
    """
    means = ablation_means(
        model, saes, graph.task if reference_tokens is None else reference_tokens, batch_size
    )
    eff = node_ablation_effects(model, saes, graph, means=means, batch_size=batch_size)
    rows, curves = [], []
    for name, groups in methods.items():
        sc = compression_scores(
            model,
            saes,
            graph,
            groups,
            means=means,
            node_effects=eff,
            judge=judge,
            describe=describe,
            batch_size=batch_size,
        )
        rows.append({**sc.summary, "method": name})
        curves.append(sc.curve.assign(method=name))
    return pd.DataFrame(rows).set_index("method"), pd.concat(curves, ignore_index=True)


@dataclass
class WithinLayerAdditivity:
    r"""Per-prompt terms of the within-layer additivity error of each grouping.

    Attributes
    ----------
    num, den : dict str -> (n_prompts,) numpy.ndarray
        Per grouping and held-out prompt :math:`p`:
        :math:`\sum_{(S,L)} |\delta_p(S_L) - \sum_{u\in S_L}\delta_p(u)|` and
        :math:`\sum_{(S,L)} \sum_{u\in S_L} |\delta_p(u)|`; the error is
        ``num.sum() / den.sum()`` (``featmatch.circuits.ratio_ci`` gives its CI over prompts).
    groups : dict str -> int
        Within-layer groups :math:`S_L` (two or more feature members) per grouping.
    members : dict str -> int
        Feature nodes in those groups.
    """

    num: dict[str, np.ndarray]
    den: dict[str, np.ndarray]
    groups: dict[str, int]
    members: dict[str, int]


def within_layer_additivity(
    model,
    saes: Mapping[int, Any],
    graph: AttributionGraph,
    groupings: Mapping[str, Supernodes],
    tokens: TaskTokens,
    means: Mapping,
    batch_size: int = 16,
) -> WithinLayerAdditivity:
    r"""How far each supernode acts as one unit *within each layer*, on the prompts ``tokens``.

    The cross-layer coherence :math:`\kappa(S)` of :func:`compression_scores` penalises a
    supernode that spans layers: ablating an upstream member alone lets its downstream partner
    move, ablating both pins it, so a feature persisting from layer :math:`u` to :math:`v`
    scores :math:`\kappa \approx 0.5` however coherent the supernode is. Here every supernode
    :math:`S` is split by layer, :math:`S_L = S \cap \text{layer } L`, and only the parts with
    two or more features count: for each prompt :math:`p`,

    .. math::
        \delta_p(A) = m_p(\text{full}) - m_p(\text{all but } A), \qquad
        E = \frac{\sum_p \sum_{(S,L)} |\delta_p(S_L) - \sum_{u\in S_L}\delta_p(u)|}
                 {\sum_p \sum_{(S,L)} \sum_{u\in S_L} |\delta_p(u)|}.

    Members of one layer are not on a common path, so :math:`E = 0` means they add up exactly
    (they act as one unit, or independently), and a large :math:`E` that they interact
    (redundant members saturate: :math:`\delta(S_L) < \sum \delta(u)`). One forward per node
    and per group, with the same mean ablation as :func:`faithfulness`; the single-node
    effects are shared by all groupings.

    Returns
    -------
    WithinLayerAdditivity
    """
    sl = _check_saes(saes)
    nodes = graph.nodes
    is_feat = (nodes["kind"] == "feature").to_numpy()
    layer = nodes["layer"].to_numpy().astype(int)
    feat = nodes["feature"].to_numpy().astype(int)
    parts: dict[str, list[np.ndarray]] = {}
    for name, g in groupings.items():
        if len(g.labels) != graph.n_nodes:
            raise ValueError(f"grouping {name!r}: labels do not match the graph's nodes")
        out = []
        for s in np.unique(g.labels):
            for L in np.unique(layer[(g.labels == s) & is_feat]):
                idx = np.flatnonzero((g.labels == s) & is_feat & (layer == L))
                if len(idx) >= 2:
                    out.append(idx)
        parts[name] = out
    singles = sorted({int(i) for out in parts.values() for idx in out for i in idx})
    specs = [_keep_masks(sl, None, {(int(layer[i]), int(feat[i]))}) for i in singles]
    group_list = [(name, idx) for name, out in parts.items() for idx in out]
    specs += [_keep_masks(sl, None, {(int(layer[i]), int(feat[i])) for i in idx}) for _, idx in group_list]
    m_full, _ = _clean_metrics(model, tokens, batch_size)
    m, _ = _intervened_metrics(model, sl, tokens, specs, means, batch_size) if specs else (np.zeros((0, len(tokens))), None)
    delta = m_full[None, :] - m  # (n_specs, n_prompts)
    single = {i: delta[k] for k, i in enumerate(singles)}
    num = {name: np.zeros(len(tokens)) for name in groupings}
    den = {name: np.zeros(len(tokens)) for name in groupings}
    for k, (name, idx) in enumerate(group_list):
        joint = delta[len(singles) + k]
        each = np.stack([single[int(i)] for i in idx])
        num[name] += np.abs(joint - each.sum(0))
        den[name] += np.abs(each).sum(0)
    return WithinLayerAdditivity(
        num=num,
        den=den,
        groups={name: len(out) for name, out in parts.items()},
        members={name: int(sum(len(i) for i in out)) for name, out in parts.items()},
    )
