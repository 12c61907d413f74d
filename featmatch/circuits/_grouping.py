r"""Automatic supernodes for circuit-tracer / Neuronpedia attribution graphs, and the
edge-profile and co-activation distances.

Edge profile
------------
Node :math:`u` of a graph with weighted links :math:`w(s \to t)` gets the profile
:math:`p_u = [\,w(\cdot \to u)\,;\; w(u \to \cdot)\,] \in \mathbb{R}^{2N}` (its in-weights
from every node, then its out-weights to every node), and

.. math:: D_{uv} = 1 - \frac{\langle p_u, p_v\rangle}{\|p_u\|\,\|p_v\|}

(1 for a node without links). Two nodes that read from the same nodes and write to the same
nodes, with proportional weights, are at distance 0: the grouping that circuit-tracer and
Neuronpedia users do by hand when they merge features that play the same role.

Circuit-tracer graphs
---------------------
:func:`propose_supernodes` reads a graph dict in circuit-tracer's JSON format (the files
Neuronpedia's graph viewer loads; see :mod:`featmatch.circuits._export`), clusters its
feature nodes (every ``feature_type`` except ``embedding``, ``logit`` and the error types)
by average linkage on a distance (edge profile by default, or any precomputed matrix such as
a Semantic OT distance when the model and its SAEs are at hand), and writes the groups with
at least two members to ``qParams.supernodes`` as ``[label, node_id, ...]``.

References
----------
1. Ameisen et al. *Circuit Tracing: Revealing Computational Graphs in Language Models*,
   Transformer Circuits, 2025 (attribution graphs, supernodes grouped by hand).
2. circuit-tracer (safety-research), ``circuit_tracer/frontend/graph_models.py``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from featmatch._io import atomic_write_json

from ._attribution import AttributionGraph, _check_saes

__all__ = [
    "NON_FEATURE_TYPES",
    "profile_distance",
    "edge_profile_distance",
    "coactivation_distance",
    "cluster_labels",
    "propose_supernodes",
    "group_graph_file",
]

#: circuit-tracer node types that are never grouped (inputs, outputs and error terms).
NON_FEATURE_TYPES = ("embedding", "logit", "mlp reconstruction error", "mlp error", "error")


def profile_distance(
    ids: Sequence[str], links: Sequence[tuple[str, str, float]], members: Sequence[str]
) -> np.ndarray:
    r"""Edge-profile cosine distance (module docstring) between ``members``.

    Parameters
    ----------
    ids : sequence of str
        Every node id of the graph (the profile coordinates).
    links : sequence of (source, target, weight)
    members : sequence of str
        The nodes to compare (a subset of ``ids``).

    Returns
    -------
    (len(members), len(members)) ndarray float64, symmetric, zero diagonal, in [0, 2].
    """
    pos = {n: i for i, n in enumerate(ids)}
    row = {n: i for i, n in enumerate(members)}
    N = len(ids)
    P = np.zeros((len(members), 2 * N))
    for s, t, w in links:
        if t in row and s in pos:
            P[row[t], pos[s]] += float(w)
        if s in row and t in pos:
            P[row[s], N + pos[t]] += float(w)
    if len(members) < 2:
        return np.zeros((len(members), len(members)))
    norms = np.linalg.norm(P, axis=1)
    D = np.ones((len(members), len(members)))
    ok = norms > 0
    if ok.sum() >= 2:
        D[np.ix_(ok, ok)] = squareform(pdist(P[ok], metric="cosine"))
    D = np.clip(0.5 * (D + D.T), 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    return D


def edge_profile_distance(graph: AttributionGraph) -> np.ndarray:
    """Edge-profile distance between the feature nodes of a featmatch graph.

    Profiles run over all graph nodes plus the metric node; rows in
    ``graph.feature_nodes()`` order.
    """
    ids = [*graph.nodes["node_id"].tolist(), "logit"]
    links = list(zip(graph.edges["src"], graph.edges["dst"], graph.edges["weight"], strict=False))
    return profile_distance(ids, links, graph.feature_nodes()["node_id"].tolist())


@torch.no_grad()
def coactivation_distance(
    model, saes: Mapping[int, Any], graph: AttributionGraph, tokens: torch.Tensor, batch_size: int = 16
) -> np.ndarray:
    r"""Co-activation distance :math:`D_{uv} = 1 - \mathrm{corr}(a_u, a_v)` between feature nodes.

    The Pearson correlation of the two features' activations over every position but BOS of
    ``tokens`` (use the corpus's *train* split, so the distance never sees the prompts or the
    held-out tokens scored later). A feature that never fires there is at distance 1 from
    all. Hand-written single pass (sums of a, a², a·aᵀ over the few graph features);
    ``featmatch.lm.activations`` keeps only pair sums of matched features.
    """
    sl = _check_saes(saes)
    fn = graph.feature_nodes()
    cols = {
        L: torch.tensor(fn.loc[fn["layer"] == L, "feature"].to_numpy().copy(), dtype=torch.long) for L in sl
    }
    order = np.concatenate([np.flatnonzero((fn["layer"] == L).to_numpy()) for L in sl])
    n = len(fn)
    S1, S2, n_pos = torch.zeros(n, dtype=torch.float64), torch.zeros((n, n), dtype=torch.float64), 0
    store: dict[int, torch.Tensor] = {}

    def make(L, sae):
        def fn_(x, hook=None):
            store[L] = sae.encode(x[:, 1:]).reshape(-1, sae.W_dec.shape[0])[:, cols[L]].double()

        return fn_

    hooks = [(h, make(L, sae)) for L, (sae, h) in sl.items()]
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    stop = min(max(sl) + 1, model.cfg.n_layers)
    for s in range(0, len(tokens), batch_size):
        store.clear()
        model.run_with_hooks(tokens[s : s + batch_size], fwd_hooks=hooks, stop_at_layer=stop)
        A = torch.cat([store[L] for L in sl], dim=1)
        S1 += A.sum(0)
        S2 += A.T @ A
        n_pos += A.shape[0]
    mean = S1 / n_pos
    cov = S2 / n_pos - torch.outer(mean, mean)
    sd = cov.diagonal().clamp_min(0).sqrt()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (cov / torch.outer(sd, sd)).numpy()
    corr[~np.isfinite(corr)] = 0.0
    D_sorted = np.clip(1.0 - corr, 0.0, 2.0)
    D = np.empty_like(D_sorted)
    D[np.ix_(order, order)] = D_sorted
    D = 0.5 * (D + D.T)
    np.fill_diagonal(D, 0.0)
    return D


def cluster_labels(D: np.ndarray, n_clusters: int, method: str = "average") -> np.ndarray:
    """Flat clusters ``0..K-1`` (first-appearance order) of scipy's linkage on ``D``."""
    from ._supernodes import _canonical, _check_distance, _cut_by_merges

    n = len(D)
    D = _check_distance(D, n)
    k = max(1, min(int(n_clusters), n))
    if n <= 1 or k == n:
        return np.arange(n)
    Z = linkage(squareform(D, checks=False), method=method)
    lab = fcluster(Z, t=k, criterion="maxclust")
    if len(np.unique(lab)) != k:
        lab = _cut_by_merges(Z, n, k)
    return _canonical(lab)


def _is_feature(node: Mapping[str, Any]) -> bool:
    ft = str(node.get("feature_type", "")).lower()
    return not any(ft == t or ft.endswith(" error") for t in NON_FEATURE_TYPES)


def propose_supernodes(
    obj: Mapping[str, Any],
    n_supernodes: int | None = None,
    fraction: float = 0.1,
    distance: np.ndarray | None = None,
    method: str = "average",
    label_prefix: str = "",
) -> dict[str, Any]:
    """A copy of a circuit-tracer graph dict with proposed ``qParams.supernodes``.

    Parameters
    ----------
    obj : dict
        A graph in circuit-tracer / Neuronpedia JSON format (validated first).
    n_supernodes : int, optional
        Clusters of feature nodes (default ``max(1, round(fraction * n_feature_nodes))``).
    distance : (n_feat, n_feat) array, optional
        A precomputed distance over the feature nodes in file order (e.g. Semantic OT);
        default the edge-profile distance (:func:`profile_distance`).
    label_prefix : str
        Prefix of every supernode label.

    Returns
    -------
    dict
        The graph with ``qParams.supernodes`` replaced by the groups of two or more members
        (``[label, node_id, ...]``, label = the clerp of the member with the largest
        ``influence``, else ``"group k"``, followed by the layer span) and
        ``metadata.featmatch_grouping`` describing the method. Existing supernodes are
        replaced; nothing else changes.
    """
    from ._export import validate_graph_json

    validate_graph_json(obj)
    out = copy.deepcopy(dict(obj))
    ids = [n["node_id"] for n in out["nodes"]]
    feat = [n for n in out["nodes"] if _is_feature(n)]
    members = [n["node_id"] for n in feat]
    if distance is None:
        links = [(l_["source"], l_["target"], l_["weight"]) for l_ in out["links"]]
        D = profile_distance(ids, links, members)
        how = "edge profile (cosine of in- and out-link weights)"
    else:
        D = np.asarray(distance, dtype=np.float64)
        if D.shape != (len(members), len(members)):
            raise ValueError(f"distance has shape {D.shape}; the graph has {len(members)} feature nodes")
        how = "precomputed distance"
    k = n_supernodes if n_supernodes is not None else max(1, int(round(fraction * len(members))))
    lab = cluster_labels(D, k, method=method) if members else np.zeros(0, dtype=int)
    groups = []
    for c in range(int(lab.max()) + 1 if len(lab) else 0):
        idx = np.flatnonzero(lab == c)
        if len(idx) < 2:
            continue
        best = max(idx, key=lambda i: abs(float(feat[i].get("influence") or 0.0)))
        name = str(feat[best].get("clerp") or "").strip() or f"group {len(groups)}"
        layers = [str(feat[i].get("layer")) for i in idx]
        span = (
            layers[0]
            if len(set(layers)) == 1
            else f"{min(layers, key=_layer_key)}-{max(layers, key=_layer_key)}"
        )
        groups.append([f"{label_prefix}{name} (L{span})", *[members[i] for i in idx]])
    out.setdefault("qParams", {})
    out["qParams"] = dict(out["qParams"] or {})
    out["qParams"]["supernodes"] = groups
    out["metadata"] = dict(out["metadata"])
    out["metadata"]["featmatch_grouping"] = {
        "distance": how,
        "linkage": method,
        "n_clusters": int(k),
        "n_feature_nodes": len(members),
        "n_supernodes_written": len(groups),
    }
    validate_graph_json(out)
    return out


def _written_by_us(path: Path) -> bool:
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return "featmatch_grouping" in (json.load(fh).get("metadata") or {})
    except (OSError, ValueError, AttributeError):
        return False


def _layer_key(s: str) -> tuple[int, str]:
    try:
        return (int(s), "")
    except ValueError:
        return (10**9, s)


def group_graph_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    n_supernodes: int | None = None,
    fraction: float = 0.1,
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Read a graph JSON, propose supernodes by edge profile, write the result atomically.

    An existing ``dst`` is replaced only when featmatch wrote it (its metadata has
    ``featmatch_grouping``) or with ``force``; a directory is refused. Returns
    ``(path, grouped dict)``.
    """
    from ._export import load_graph_json

    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise IsADirectoryError(f"{dst}: is a directory; give a file path")
    if dst.exists() and not force and not _written_by_us(dst):
        raise FileExistsError(
            f"{dst}: exists and featmatch did not write it; refusing to overwrite it (--force)"
        )
    obj = load_graph_json(src)
    out = propose_supernodes(obj, n_supernodes=n_supernodes, fraction=fraction)
    return atomic_write_json(dst, out, sort_keys=False), out
