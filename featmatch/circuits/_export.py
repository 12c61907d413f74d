"""Export of attribution graphs with supernodes in the circuit-tracer / Neuronpedia graph JSON
format, a validating loader, and the compressed-graph figure.

Format
------
The required fields follow circuit-tracer's exporter (``circuit_tracer/frontend/graph_models.py``
``Model``/``Metadata``/``QParams``/``Node``/``Link``), which writes the files Neuronpedia's
graph viewer reads:

* ``metadata`` (required): ``slug`` (str), ``scan`` (str, the model id), ``prompt_tokens``
  (list of str), ``prompt`` (str); featmatch adds ``transcoder_list``, ``node_threshold``,
  ``schema_version`` and its own ``featmatch`` block.
* ``qParams`` (optional): ``pinnedIds`` (list of str), ``supernodes`` (list of
  ``[label, node_id, ...]``), ``linkType``, ``clickedId``, ``sg_pos`` (str).
* ``nodes[]`` (required): ``node_id`` (str), ``feature`` (int or null), ``layer`` (str),
  ``ctx_idx`` (int), ``feature_type`` (str), ``jsNodeId`` (str), ``clerp`` (str); optional
  ``influence``, ``activation``, ``token_prob``, ``is_target_logit``, ``run_idx``,
  ``reverse_ctx_idx``.
* ``links[]`` (required): ``source`` (str), ``target`` (str), ``weight`` (number).

Every link end and every supernode member must name an existing node.

featmatch graphs aggregate over positions and prompts, so every node gets the ``ctx_idx`` of
the last position of the first prompt (where the answer is read), feature nodes use
circuit-tracer's ``feature_type`` ``"cross layer transcoder"`` (the viewer's feature colour;
featmatch's nodes are residual SAE features) with ``feature`` = Cantor pairing of
(layer, index) as circuit-tracer does, error nodes ``"mlp reconstruction error"`` with
``feature = null``, and the metric node ``"logit"``. featmatch's own node fields are kept
under ``featmatch`` keys so :func:`graph_from_json` can rebuild the tables.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featmatch._io import atomic_write_json

from ._attribution import LOGIT_NODE, AttributionGraph
from ._supernodes import Supernodes

__all__ = [
    "REQUIRED_FIELDS",
    "graph_to_json",
    "export_graph_json",
    "validate_graph_json",
    "load_graph_json",
    "graph_from_json",
    "plot_compressed_graph",
]

#: Required fields and their JSON types, per section: what Neuronpedia's graph frontend reads
#: (circuit-tracer's ``Metadata``/``Node``/``Link`` models). ``qParams`` is optional; when
#: present its ``supernodes`` must be ``[label, node_id, ...]`` lists of existing nodes.
REQUIRED_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "metadata": {
        "slug": (str,),
        "scan": (str,),
        "prompt_tokens": (list,),
        "prompt": (str,),
    },
    "node": {
        "node_id": (str,),
        "feature": (int, type(None)),
        "layer": (str,),
        "ctx_idx": (int,),
        "feature_type": (str,),
        "jsNodeId": (str,),
        "clerp": (str,),
    },
    "link": {"source": (str,), "target": (str,), "weight": (int, float)},
}


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def _export_id(row_layer: int, feature: int, ctx: int) -> str:
    return f"{row_layer}_{feature}_{ctx}" if feature >= 0 else f"{row_layer}_-1_{ctx}"


def graph_to_json(
    graph: AttributionGraph,
    groups: Supernodes | None = None,
    slug: str = "featmatch-circuit",
    scan: str = "smollm2-135m",
    sae_ids: list[str] | None = None,
    prompt_tokens: list[str] | None = None,
    clerps: Mapping[str, str] | None = None,
    n_layers: int | None = None,
) -> dict[str, Any]:
    """The graph (and its supernodes) as a circuit-tracer / Neuronpedia graph dict.

    Parameters
    ----------
    groups : Supernodes, optional
        Written to ``qParams.supernodes`` as ``[name, node_id, ...]`` lists (singletons too).
    slug, scan : str
        Graph slug and model id.
    sae_ids : list of str, optional
        Goes to ``metadata.transcoder_list`` (e.g. the zoo sae_ids of the layers).
    prompt_tokens : list of str, optional
        Token strings of the first prompt (default: its token ids as strings).
    clerps : mapping node_id -> str, optional
        Feature labels (explanations) shown by the viewer.
    n_layers : int, optional
        Model depth; the metric node is placed at layer ``n_layers + 1`` as in circuit-tracer
        (default: last graph layer + 2).
    """
    task = graph.task
    ctx = int(task.tokens[0].numel() - 1)
    top = (n_layers if n_layers is not None else max(graph.layers) + 1) + 1
    ids = {}
    nodes = []
    for r in graph.nodes.itertuples(index=False):
        nid = _export_id(int(r.layer), int(r.feature), ctx)
        ids[r.node_id] = nid
        is_f = r.kind == "feature"
        nodes.append(
            {
                "node_id": nid,
                "feature": _cantor(int(r.layer), int(r.feature)) if is_f else None,
                "layer": str(int(r.layer)),
                "ctx_idx": ctx,
                "feature_type": "cross layer transcoder" if is_f else "mlp reconstruction error",
                "jsNodeId": f"{int(r.layer)}_{int(r.feature)}-0" if is_f else f"{int(r.layer)}_-1-{ctx}",
                "clerp": str((clerps or {}).get(r.node_id, "") or ""),
                "influence": float(r.abs_attribution),
                "activation": float(r.activation),
                "token_prob": 0.0,
                "is_target_logit": False,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "featmatch_layer": int(r.layer),
                "featmatch_feature": int(r.feature),
                "featmatch_attribution": float(r.attribution),
                "featmatch_frac_active": float(r.frac_active),
            }
        )
    ans = int(task.answer_ids[0][0])
    logit_id = f"{top}_{ans}_{ctx}"
    ids[LOGIT_NODE] = logit_id
    nodes.append(
        {
            "node_id": logit_id,
            "feature": ans,
            "layer": str(top),
            "ctx_idx": ctx,
            "feature_type": "logit",
            "jsNodeId": f"L_{ans}-{ctx}",
            "clerp": f"metric: {graph.metric_name} (mean {graph.metric:.3f} over {len(task)} prompts)",
            "token_prob": 0.0,
            "is_target_logit": True,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
        }
    )
    links = [
        {"source": ids[s], "target": ids[d], "weight": float(w)}
        for s, d, w in zip(graph.edges["src"], graph.edges["dst"], graph.edges["weight"], strict=False)
        if s in ids and d in ids
    ]
    sn: list[list[str]] = []
    if groups is not None:
        if len(groups.labels) != graph.n_nodes:
            raise ValueError("supernode labels do not match the graph's nodes")
        node_ids = graph.nodes["node_id"].to_numpy()
        for k, name in enumerate(groups.names):
            sn.append([str(name), *[ids[n] for n in node_ids[groups.labels == k]]])
    if prompt_tokens is None:
        prompt_tokens = [str(int(t)) for t in task.tokens[0]]
    prompt_tokens = [str(t) for t in prompt_tokens]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": list(sae_ids or []),
            "prompt_tokens": list(prompt_tokens),
            "prompt": task.prompts[0],
            "node_threshold": None,
            "schema_version": 1,
            "featmatch": {
                "layers": [int(x) for x in graph.layers],
                "metric_name": graph.metric_name,
                "metric": float(graph.metric),
                "prompts": list(task.prompts),
                "n_prompts": len(task),
                "node_budget": graph.meta.get("node_budget"),
                "supernode_method": None if groups is None else groups.method,
                "aggregation": "sum over positions >= 1, mean over prompts",
            },
        },
        "qParams": {
            "pinnedIds": [n["node_id"] for n in nodes],
            "supernodes": sn,
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


def export_graph_json(
    path: str | os.PathLike, graph: AttributionGraph, groups: Supernodes | None = None, **kwargs
) -> Path:
    """Write :func:`graph_to_json` to ``path`` atomically (validated first). Returns the path."""
    obj = graph_to_json(graph, groups, **kwargs)
    validate_graph_json(obj)
    return atomic_write_json(path, obj)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, types)


def validate_graph_json(obj: Any) -> None:
    """Check a graph dict against the required fields of the format (see module docstring).

    Also checks that node ids are unique, links and supernode members name existing nodes,
    and supernodes are ``[name, id, ...]`` lists of strings.

    Raises
    ------
    ValueError
        Listing every problem found (first 20), e.g. ``nodes[3]: missing required field 'feature'``.
    """
    problems: list[str] = []
    if not isinstance(obj, dict):
        raise ValueError(f"graph JSON must be an object, got {type(obj).__name__}")
    for key in ("metadata", "nodes", "links"):
        if key not in obj:
            problems.append(f"missing required top-level field {key!r}")
    if "qParams" in obj and not isinstance(obj["qParams"], dict):
        problems.append("qParams: must be an object")
    md = obj.get("metadata")
    if isinstance(md, dict) and isinstance(md.get("prompt_tokens"), list):
        if not all(isinstance(t, str) for t in md["prompt_tokens"]):
            problems.append("metadata.prompt_tokens: expected a list of strings")
    for sec in ("metadata",):
        d = obj.get(sec)
        if sec in obj and not isinstance(d, dict):
            problems.append(f"{sec}: must be an object")
            continue
        for f, types in REQUIRED_FIELDS[sec].items():
            if isinstance(d, dict):
                if f not in d:
                    problems.append(f"{sec}: missing required field {f!r}")
                elif not _type_ok(d[f], types):
                    problems.append(
                        f"{sec}.{f}: expected {'/'.join(t.__name__ for t in types)}, got {type(d[f]).__name__}"
                    )
    ids: set[str] = set()
    for key, spec in (("nodes", "node"), ("links", "link")):
        items = obj.get(key, [])
        if not isinstance(items, list):
            problems.append(f"{key}: must be a list")
            continue
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                problems.append(f"{key}[{i}]: must be an object")
                continue
            for f, types in REQUIRED_FIELDS[spec].items():
                if f not in it:
                    problems.append(f"{key}[{i}]: missing required field {f!r}")
                elif not _type_ok(it[f], types):
                    problems.append(
                        f"{key}[{i}].{f}: expected {'/'.join(t.__name__ for t in types)}, got {type(it[f]).__name__}"
                    )
            if key == "nodes" and isinstance(it.get("node_id"), str):
                if it["node_id"] in ids:
                    problems.append(f"nodes[{i}]: duplicate node_id {it['node_id']!r}")
                ids.add(it["node_id"])
            if key == "links":
                for end in ("source", "target"):
                    if isinstance(it.get(end), str) and it[end] not in ids:
                        problems.append(f"links[{i}].{end}: unknown node {it[end]!r}")
    q = obj.get("qParams")
    if isinstance(q, dict) and isinstance(q.get("supernodes"), list):
        for i, s in enumerate(q["supernodes"]):
            if not (isinstance(s, list) and len(s) >= 2 and all(isinstance(x, str) for x in s)):
                problems.append(f"qParams.supernodes[{i}]: expected [name, node_id, ...] strings")
                continue
            for x in s[1:]:
                if x not in ids:
                    problems.append(f"qParams.supernodes[{i}]: unknown node {x!r}")
    if problems:
        more = f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""
        raise ValueError("invalid attribution-graph JSON: " + "; ".join(problems[:20]) + more)


def load_graph_json(path: str | os.PathLike, validate: bool = True) -> dict[str, Any]:
    """Read a graph JSON file and (by default) validate it (:func:`validate_graph_json`)."""
    with open(path, encoding="utf-8") as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if validate:
        try:
            validate_graph_json(obj)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return obj


def graph_from_json(obj: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, list[list[str]]]:
    """Tidy tables from a (validated) graph dict: ``(nodes, links, supernodes)``.

    ``nodes`` has ``node_id, layer, feature, feature_type, influence, activation, clerp``
    (featmatch's own layer/feature/attribution when present); ``links`` has
    ``source, target, weight``; supernodes are the ``[name, id, ...]`` lists.
    """
    validate_graph_json(obj)
    rows = []
    for n in obj["nodes"]:
        rows.append(
            {
                "node_id": n["node_id"],
                "layer": n.get("featmatch_layer", n["layer"]),
                "feature": n.get("featmatch_feature", n["feature"]),
                "feature_type": n["feature_type"],
                "attribution": n.get("featmatch_attribution", np.nan),
                "influence": n.get("influence"),
                "activation": n.get("activation"),
                "clerp": n.get("clerp", ""),
            }
        )
    links = pd.DataFrame(obj["links"], columns=["source", "target", "weight"])
    sn = (obj.get("qParams") or {}).get("supernodes") or []
    return pd.DataFrame(rows), links, [list(s) for s in sn]


def plot_compressed_graph(
    graph: AttributionGraph,
    groups: Supernodes,
    ax=None,
    max_edges: int = 40,
    min_abs_weight: float = 0.0,
    show_errors: bool = True,
    label_fn=None,
):
    """Draw the compressed graph: supernodes as boxes spanning their layers, edges by weight.

    Each supernode is a box from its lowest to its highest member layer (y axis), placed in
    the first free column; its face colour encodes the summed attribution (red positive,
    blue negative). Supernode edges are the sums of member edges between different
    supernodes (plus edges to the metric node at the top); line width ∝ |weight|, colour by
    sign; the ``max_edges`` strongest are drawn.

    Parameters
    ----------
    ax : matplotlib.axes.Axes, optional
        Axes to draw on (a new figure when omitted).
    label_fn : callable ``(index, name, n_members) -> str``, optional
        Box label (default: ``#index`` and the member count; ``err`` for error nodes).

    Returns
    -------
    matplotlib.axes.Axes
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 6))
    tab = groups.table(graph)
    if not show_errors:
        tab = tab[tab["kind"] == "feature"]
    # column assignment by interval packing over layer ranks
    layer_rank = {L: i for i, L in enumerate(graph.layers)}
    cols: list[list[tuple[int, int]]] = []
    pos = {}
    for s, r in tab.sort_values(["min_layer", "max_layer"]).iterrows():
        lo, hi = layer_rank[int(r["min_layer"])], layer_rank[int(r["max_layer"])]
        free = [i for i, occ in enumerate(cols) if all(hi < a or lo > b for a, b in occ)]
        if free:
            col = free[0]
        else:
            cols.append([])
            col = len(cols) - 1
        cols[col].append((lo, hi))
        pos[s] = (col, lo, hi)
    amax = max(float(tab["attribution"].abs().max()), 1e-12) if len(tab) else 1.0
    cmap = plt.get_cmap("coolwarm")
    for s, (c, lo, hi) in pos.items():
        a = float(tab.loc[s, "attribution"])
        ax.add_patch(
            FancyBboxPatch(
                (c - 0.4, lo - 0.3),
                0.8,
                hi - lo + 0.6,
                boxstyle="round,pad=0.02",
                fc=cmap(0.5 + 0.5 * a / amax),
                ec="k",
                lw=0.8,
                zorder=2,
            )
        )
        n_mem = int(tab.loc[s, "n_members"])
        if label_fn is not None:
            name = label_fn(s, groups.names[s], n_mem)
        elif tab.loc[s, "kind"] == "error":
            name = "err"
        else:
            name = f"#{s}\nn={n_mem}"
        ax.text(c, (lo + hi) / 2, name, ha="center", va="center", fontsize=7, zorder=3)
    top = len(graph.layers)
    n_cols = max(1, len(cols))
    logit_xy = ((n_cols - 1) / 2, top + 0.2)
    ax.add_patch(
        FancyBboxPatch(
            (logit_xy[0] - 0.5, top), 1.0, 0.4, boxstyle="round,pad=0.02", fc="0.85", ec="k", zorder=2
        )
    )
    ax.text(*logit_xy, graph.metric_name, ha="center", va="center", fontsize=8, zorder=3)
    # supernode edges, kept at the layers of their member edges
    lab = dict(zip(graph.nodes["node_id"], groups.labels, strict=False))
    agg: dict[tuple[int, int, int, int], float] = {}
    for s, d, w, ls, ld in zip(
        graph.edges["src"],
        graph.edges["dst"],
        graph.edges["weight"],
        graph.edges["src_layer"],
        graph.edges["dst_layer"],
        strict=False,
    ):
        a, b = lab.get(s), (-1 if d == LOGIT_NODE else lab.get(d))
        if a is None or b is None or a == b or a not in pos or (b != -1 and b not in pos):
            continue
        ya = layer_rank[int(ls)]
        yb = top if b == -1 else layer_rank[int(ld)]
        key = (int(a), ya, int(b), yb)
        agg[key] = agg.get(key, 0.0) + float(w)
    items = sorted(agg.items(), key=lambda kv: -abs(kv[1]))
    items = [kv for kv in items if abs(kv[1]) >= min_abs_weight][:max_edges]
    wmax = max((abs(w) for _, w in items), default=1.0) or 1.0
    for (a, ya, b, yb), w in items:
        ca = pos[a][0]
        cb = logit_xy[0] if b == -1 else pos[b][0]
        if b == -1:
            x0, y0, x1, y1 = ca, pos[a][2] + 0.3, cb, top
        elif ca == cb:
            x0, y0, x1, y1 = ca, ya + 0.3, cb, yb - 0.3
        else:
            side = 0.4 if cb > ca else -0.4
            x0, y0, x1, y1 = ca + side, ya, cb - side, yb
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={
                "arrowstyle": "-|>",
                "color": "tab:red" if w > 0 else "tab:blue",
                "lw": 0.5 + 3.5 * abs(w) / wmax,
                "alpha": 0.7,
            },
            zorder=1,
        )
    ax.set_xlim(-0.8, n_cols - 0.2)
    ax.set_ylim(-0.8, top + 0.8)
    ax.set_yticks(list(range(len(graph.layers))) + [top])
    ax.set_yticklabels([f"L{L}" for L in graph.layers] + ["metric"])
    ax.set_xticks([])
    ax.set_ylabel("layer")
    ax.set_title(f"{groups.method}: {graph.n_nodes} nodes → {groups.n_supernodes} supernodes")
    return ax
