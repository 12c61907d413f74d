"""The figures of the book: each function draws on a given matplotlib ``Axes`` and returns it.

Every chapter calls these with its tables: 01 (folding), 02 (persistence) and 03 (pruning)
with those of :mod:`featmatch.chapters.folding`, :mod:`featmatch.chapters.persistence` and
:mod:`featmatch.chapters.pruning`; 04 with :mod:`featmatch.chapters.semantic_ot`; 05 with
:mod:`featmatch.chapters.compression`. The Axes always comes first. Nothing here computes a number that a claim uses; the
functions only lay out columns of those tables (the cost-decile curve of
:func:`plot_cost_vs_score` comes from :func:`featmatch.chapters.folding.binned_scores`).

**Every figure shows its data.** Axes whose values span orders of magnitude get a log or
symlog scale (:func:`pick_scale`); otherwise a few far-out values may set robust limits
(:func:`robust_limits`, Tukey's far-out fences), and then the figure says how many points
lie beyond and how far (:func:`annotate_outside`): nothing is clipped silently. Legends sit
outside the axes (:func:`legend_outside`), and judge plots draw the chance level when they are
given one (:func:`chance_line`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

# The chapter modules (folding, semantic_ot, compression) are imported where they are used:
# a figure needs only its own chapter, and this module stays importable on its own.

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "RobustLimits",
    "robust_limits",
    "annotate_outside",
    "set_robust_limits",
    "pick_scale",
    "apply_scale",
    "legend_outside",
    "chance_line",
    "plot_compressed_graph",
    "plot_by_layer",
    "plot_threshold_norm",
    "plot_norm_dynamics",
    "plot_label_distribution",
    "plot_cost_vs_score",
    "plot_cost_by_label",
    "plot_persistence",
    "plot_agreement",
    "plot_path_costs",
    "plot_min_theta",
    "plot_hybrid",
    "plot_l0_study",
    "plot_method_scores",
    "plot_judge_labels",
    "plot_approximation",
    "plot_reference_spaces",
    "plot_accuracy_by_format",
    "plot_faithfulness_curves",
]


# --------------------------------------------------------------------------------------
# Readability helpers: scales and limits that show the data, legends off the data,
# chance lines. Every figure below goes through these.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobustLimits:
    """Axis limits that hold the bulk of the data, and what falls outside them.

    Attributes
    ----------
    lo, hi : float
        The limits (padded).
    n_below, n_above : int
        Finite values below ``lo`` and above ``hi``.
    vmin, vmax : float
        The extreme finite values (NaN when there are none).
    n : int
        Number of finite values.
    """

    lo: float
    hi: float
    n_below: int
    n_above: int
    vmin: float
    vmax: float
    n: int

    @property
    def n_outside(self) -> int:
        """Values outside ``[lo, hi]``."""
        return self.n_below + self.n_above


def _finite(values: object) -> np.ndarray:
    v = np.asarray(pd.to_numeric(pd.Series(np.ravel(np.asarray(values, dtype=object))), errors="coerce"), dtype=float)
    return v[np.isfinite(v)]


def robust_limits(values: object, *, k: float = 3.0, coverage: float = 0.95, pad: float = 0.05) -> RobustLimits:
    r"""Limits that cut off far outliers but always keep at least ``coverage`` of the values.

    The range is Tukey's far-out fences :math:`[Q_1 - k\,\mathrm{IQR},\ Q_3 + k\,\mathrm{IQR}]`
    (Tukey, *Exploratory Data Analysis*, 1977; ``k = 3`` marks "far out" values), never
    wider than the data, padded by ``pad`` of its width on each side. If the fences would
    leave out more than ``1 - coverage`` of the values (few points, or a heavy tail), the
    limits are the whole data range instead and nothing is outside: a log or symlog axis
    (:func:`pick_scale`) is then the way to show the data. Values outside are counted, so that
    the caller can annotate them (:func:`annotate_outside`) instead of clipping silently.

    Parameters
    ----------
    values : array-like
        Numbers; NaN and infinities are ignored.
    k : float
        Fence multiplier of the inter-quartile range.
    coverage : float
        Minimum share of the finite values inside the limits.
    pad : float
        Padding as a share of the range.

    Examples
    --------
    >>> r = robust_limits(list(range(40)) + [1000])
    >>> r.n_above, r.hi < 1000
    (1, True)
    >>> robust_limits([0, 1, 2, 1000]).n_outside   # cutting 1 of 4 would hide 25 %
    0
    """
    v = _finite(values)
    if v.size == 0:
        return RobustLimits(0.0, 1.0, 0, 0, math.nan, math.nan, 0)
    vmin, vmax = float(v.min()), float(v.max())
    q1, q3 = np.quantile(v, [0.25, 0.75])
    iqr = q3 - q1
    lo, hi = max(vmin, q1 - k * iqr), min(vmax, q3 + k * iqr)
    n_below, n_above = int((v < lo).sum()), int((v > hi).sum())
    if n_below + n_above > (1.0 - coverage) * v.size:
        lo, hi, n_below, n_above = vmin, vmax, 0, 0
    width = hi - lo
    if width <= 0:
        width = abs(hi) if hi != 0 else 1.0
    return RobustLimits(float(lo - pad * width), float(hi + pad * width), n_below, n_above, vmin, vmax, int(v.size))


def annotate_outside(ax: Axes, lim: RobustLimits, axis: str = "y", *, what: str = "points") -> object | None:
    """Write "k points beyond, min = … / max = …" in the corner of ``ax``; ``None`` if nothing is outside."""
    if lim.n_outside == 0:
        return None
    parts = []
    one = what[:-1] if what.endswith("s") else what
    if lim.n_below:
        parts.append(f"{lim.n_below} {one if lim.n_below == 1 else what} below, min = {lim.vmin:.3g}")
    if lim.n_above:
        parts.append(f"{lim.n_above} {one if lim.n_above == 1 else what} above, max = {lim.vmax:.3g}")
    text = "; ".join(parts) + f" ({axis} axis cut)"
    top = lim.n_above and not lim.n_below
    return ax.text(
        0.01, 0.99 if top else 0.01, text, transform=ax.transAxes, fontsize=7, ha="left",
        va="top" if top else "bottom", color="0.25",
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7", "alpha": 0.85}, zorder=5,
    )


def set_robust_limits(ax: Axes, values: object, axis: str = "y", *, what: str = "points", k: float = 3.0) -> RobustLimits:
    """Cut the ``axis`` to :func:`robust_limits` when a few values are far out, and annotate them.

    When the fences cannot be used (they would hide more than 5 % of the values), the axis
    scale is set by :func:`apply_scale` instead (log or symlog for values spanning orders of
    magnitude, else unchanged). Returns the limits.
    """
    lim = robust_limits(values, k=k)
    if lim.n_outside:
        (ax.set_ylim if axis == "y" else ax.set_xlim)(lim.lo, lim.hi)
        annotate_outside(ax, lim, axis, what=what)
    else:
        apply_scale(ax, values, axis)
    return lim


def pick_scale(values: object, *, ratio: float = 100.0) -> tuple[str, float]:
    """The axis scale that shows ``values``: ``("linear"|"log"|"symlog", linthresh)``.

    ``log`` when all values are positive and span at least ``ratio``; ``symlog`` when some
    are zero or negative and the largest magnitude is at least ``ratio`` times a robust
    scale (the median absolute value, at least the smallest non-zero magnitude); else
    ``linear``. ``linthresh`` is that robust scale (1 when unused).
    """
    v = _finite(values)
    if v.size == 0:
        return "linear", 1.0
    mags = np.abs(v)
    if v.min() > 0:
        return ("log" if v.max() / v.min() >= ratio else "linear"), 1.0
    nz = mags[mags > 0]
    if nz.size == 0:
        return "linear", 1.0
    scale = float(max(np.median(nz), nz.min()))
    return ("symlog", scale) if mags.max() / scale >= ratio else ("linear", 1.0)


def apply_scale(ax: Axes, values: object, axis: str = "y", *, ratio: float = 100.0) -> str:
    """Set the ``axis`` scale chosen by :func:`pick_scale`; returns the scale's name."""
    scale, linthresh = pick_scale(values, ratio=ratio)
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if scale == "symlog":
        setter("symlog", linthresh=linthresh)
    elif scale == "log":
        setter("log")
    return scale


def legend_outside(ax: Axes, where: str = "right", **kwargs: object) -> object | None:
    """A legend outside the axes: to the ``right`` (default) or ``below``; ``None`` without labelled artists.

    Uses ``bbox_to_anchor`` in axes coordinates, so it never covers data; ``tight_layout``
    and ``bbox_inches="tight"`` make room for it.
    """
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    if where == "below":
        kwargs.setdefault("ncol", min(len(handles), 3))
        return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), borderaxespad=0.0, **kwargs)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def _legend(ax: Axes, legend: bool | str, **kwargs: object) -> object | None:
    """:func:`legend_outside` at ``legend`` (``"right"``/``"below"``; ``True`` = right), or none for ``False``.

    In a grid of panels with the same lines, pass ``legend=False`` to all panels but one.
    """
    if legend is False:
        return None
    return legend_outside(ax, "right" if legend is True else str(legend), **kwargs)


def chance_line(ax: Axes, chance: float | None, axis: str = "y", *, label: str = "chance") -> object | None:
    """A dotted grey line at the chance level (horizontal for ``axis="y"``); ``None`` when no level is given."""
    if chance is None or not np.isfinite(chance):
        return None
    line = (ax.axhline if axis == "y" else ax.axvline)(float(chance), color="0.3", ls=":", lw=1.2, label=f"{label} ({chance:.3g})", zorder=4)
    return line


# --------------------------------------------------------------------------------------
# Shared: one line per group against the layer
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
    robust: bool = True,
    chance: float | None = None,
    legend: bool | str = True,
) -> Axes:
    """One line per value of ``hue`` of ``y`` against ``x``.

    Parameters
    ----------
    labels : mapping, optional
        Legend names for the ``hue`` values.
    order : sequence of str, optional
        Hue values to draw, in this order (default: as they appear).
    robust : bool
        On a linear axis, cut far-out values with :func:`set_robust_limits` (annotated).
    chance : float, optional
        Chance level of ``y``, drawn as a dotted line.
    legend : bool or {"right", "below"}
        Where the legend goes, outside the axes; ``False`` for none (e.g. all panels of a grid but one).
    """
    groups = [(None, df)] if hue is None else [(k, df[df[hue] == k]) for k in (order or list(dict.fromkeys(df[hue])))]
    drawn = []
    for key, g in groups:
        g = g.sort_values(x)
        name = None if key is None else (labels or {}).get(key, str(key))
        ax.plot(g[x], g[y], marker="o", ms=3, label=name)
        drawn.append(g[y].to_numpy())
    values = np.concatenate(drawn) if drawn else np.array([])
    if logy:
        ax.set_yscale("log")
    elif robust:
        set_robust_limits(ax, values, "y")
    chance_line(ax, chance)
    ax.set_xlabel(xlabel or x.replace("_", " "))
    ax.set_ylabel(ylabel or y.replace("_", " "))
    ax.set_title(title)
    if hue is not None or chance is not None:
        _legend(ax, legend)
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------------------
# 01 folding
# --------------------------------------------------------------------------------------


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

    One point per pair of layers (:func:`featmatch.chapters.folding.norm_dynamics_table`),
    labelled with layer t.
    """
    ax.scatter(dyn["resid_norm_change"], dyn["matched_dec_norm_change"], s=14)
    for r in dyn.itertuples():
        ax.annotate(str(r.layer_a), (r.resid_norm_change, r.matched_dec_norm_change), fontsize=6, alpha=0.7)
    ax.set_xlabel("Δ mean hidden-state norm ‖h‖ (t → t+1)")
    ax.set_ylabel("Δ matched folded decoder norm (mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


def plot_label_distribution(
    ax: Axes, counts: pd.DataFrame, *, by: str = "layer_a", title: str = "", chance: float | None = None
) -> Axes:
    """Stacked bars of the share of DIFFERENT / MAYBE / SAME labels per ``by`` (Figs. 4, 7 left).

    ``chance`` (a share, e.g. the SAME share of randomly paired features) is drawn as a line.
    """
    names = ["DIFFERENT", "MAYBE", "SAME"]
    c = counts.sort_values(by)
    tot = c[names].sum(axis=1).replace(0, np.nan)
    bottom = np.zeros(len(c))
    xs = np.arange(len(c))
    for name, color in zip(names, ("C3", "C7", "C2"), strict=True):
        share = (c[name] / tot).fillna(0).to_numpy()
        ax.bar(xs, share, bottom=bottom, color=color, label=name, width=0.8)
        bottom += share
    every = max(1, math.ceil(len(c) / 15))  # about 15 tick labels at most, so that they do not overlap
    ax.set_xticks(xs[::every], [str(v) for v in c[by]][::every], fontsize=7)
    ax.set_xlabel(by.replace("_", " "))
    ax.set_ylabel("share of judged pairs")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    chance_line(ax, chance)
    legend_outside(ax)
    return ax


def plot_cost_vs_score(ax: Axes, features: pd.DataFrame, *, min_fires: int = 1, n_bins: int = 10, title: str = "") -> Axes:
    """Scatter of match cost against matching score, with the binned mean (Fig. 6 analogue)."""
    d = features[(features["fires_a"] >= min_fires) & features["cost"].notna() & features["matching_score"].notna()]
    ax.scatter(d["cost"], d["matching_score"], s=6, alpha=0.3, label="matched feature")
    from featmatch.chapters.folding import binned_scores

    b = binned_scores(features, n_bins, min_fires=min_fires)
    ax.plot(b["cost_mid"], b["score_mean"], color="C3", marker="o", label="mean per cost decile")
    scale = apply_scale(ax, d["cost"], "x", ratio=30.0)
    ax.set_xlabel("match cost (folded MSE)" + ("" if scale == "linear" else f", {scale} scale"))
    ax.set_ylabel("matching score P(f_B > 0 | f_A > 0)")
    ax.set_title(title)
    legend_outside(ax, "below")
    ax.grid(alpha=0.3)
    return ax


def plot_cost_by_label(ax: Axes, judged: pd.DataFrame, *, title: str = "") -> Axes:
    """Box plot of match cost per judge label (Fig. 6)."""
    d = judged.dropna(subset=["label", "cost"])
    data = [d.loc[d["label"].astype(int) == k, "cost"].to_numpy() for k in (1, 2, 3)]
    ax.boxplot([x if len(x) else [np.nan] for x in data], showfliers=False)
    apply_scale(ax, np.concatenate(data) if any(len(x) for x in data) else [], "y")
    ax.set_xticks([1, 2, 3], [f"{n}\n(n={len(x)})" for n, x in zip(("DIFFERENT", "MAYBE", "SAME"), data, strict=True)])
    ax.set_xlabel("judge label")
    ax.set_ylabel("match cost (folded MSE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------------------
# 02 persistence
# --------------------------------------------------------------------------------------


def plot_persistence(
    ax: Axes, table: pd.DataFrame, start: int, metric: str = "matching_score", title: str | None = None,
    *, chance: float | None = None, legend: bool | str = True,
) -> Axes:
    """Exact, composed and random-permutation scores from one start layer to later layers (Fig. 8).

    ``chance`` (e.g. the mean judge label of random pairs) is drawn as a dotted line; ``legend``
    as in :func:`plot_by_layer`.
    """
    d = table[table["start"] == start]
    for method, style in (("exact", "-o"), ("composed", "--s"), ("random", ":")):
        g = d[d["method"] == method].sort_values("target")
        if len(g):
            ax.plot(g["target"], g[metric], style, ms=3, label=method)
    ax.set_xlabel("target layer")
    ax.set_ylabel(metric.replace("_", " "))
    set_robust_limits(ax, d[metric], "y")
    chance_line(ax, chance)
    ax.set_title(title if title is not None else f"from layer {start}")
    _legend(ax, legend)
    ax.grid(alpha=0.3)
    return ax


def plot_agreement(ax: Axes, agree: pd.DataFrame) -> Axes:
    """Share of features with the same partner under composed and exact matches, one line per start layer.

    ``agree`` is :func:`featmatch.chapters.persistence.agreement_table` (distance × start).
    """
    for s in agree.columns:
        ax.plot(agree.index, agree[s], marker="o", ms=3, label=f"from layer {s}")
    ax.set_xlabel("distance (layers)")
    ax.set_ylabel("share of features with the same partner")
    ax.set_title("agreement of composed and exact matches")
    legend_outside(ax)
    ax.grid(alpha=0.3)
    return ax


def plot_path_costs(ax: Axes, paths: pd.DataFrame, start: int) -> Axes:
    """The cost of each step along feature paths (App. D), one line per path.

    ``paths`` is :func:`featmatch.chapters.persistence.path_table` from layer ``start``. The
    y axis is logarithmic when the costs span two orders of magnitude (symlog with zeros).
    """
    for f, g in paths.groupby("path"):
        ax.plot(g["layer"], g["step_cost"], marker="o", ms=3, label=f"feature {f} of layer {start}")
    scale = apply_scale(ax, paths["step_cost"], "y", ratio=30.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("cost of the step into this layer (folded MSE)" + ("" if scale == "linear" else f", {scale}"))
    ax.set_title("cost along feature paths")
    legend_outside(ax)
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------------------
# 03 pruning
# --------------------------------------------------------------------------------------


def plot_min_theta(ax: Axes, theta: pd.DataFrame, min_theta: float) -> Axes:
    """EV of folded EPD with and without the near-zero-θ pairs, and of unfolded EPD, per layer.

    ``theta`` is :func:`featmatch.chapters.pruning.theta_table`. EV can fall far below 0
    (thousands); the y axis is then symlog (linear within ±1), so no value is clipped.
    """
    cols = (("ev_folded", "o-", "folded EPD"), ("ev_folded_min_theta", "s-", f"folded EPD, θ < {min_theta:g} dropped"),
            ("ev_unfolded", "^--", "unfolded EPD"))
    for name, style, label in cols:
        ax.plot(theta["layer"], theta[name], style, label=label)
    values = theta[[c for c, _, _ in cols]].to_numpy(dtype=float)
    symlog = _finite(values).size and _finite(values).min() < -1.0
    if symlog:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("layer t")
    ax.set_ylabel("EV of the predicted h(t+1)" + (" (symlog: linear in ±1)" if symlog else ""))
    ax.set_title("encode-permute-decode: folding with and without near-zero thresholds")
    legend_outside(ax)
    ax.grid(alpha=0.3)
    return ax


def plot_hybrid(
    ax: Axes, hybrid: pd.DataFrame, layer: int, metric: str = "ev", title: str | None = None, *, legend: bool | str = True
) -> Axes:
    """EV (or ΔCE) of the quantile hybrid against q at one layer, cost-ordered vs random (Fig. 17)."""
    d = hybrid[hybrid["layer"] == layer]
    for order, style in (("cost", "-o"), ("random", "--s")):
        g = d[d["order"] == order].sort_values("q")
        if len(g):
            ax.plot(g["q"], g[metric], style, ms=3, label=f"{order}-ordered")
    ax.set_xlabel("quantile q (share of matched features decoded by layer t+1)")
    ax.set_ylabel({"ev": "explained variance", "delta_ce": "ΔCE (nats)"}.get(metric, metric))
    set_robust_limits(ax, d[metric], "y")
    ax.set_title(title if title is not None else f"layer {layer} → {layer + 1}")
    _legend(ax, legend)
    ax.grid(alpha=0.3)
    return ax


def plot_l0_study(ax: Axes, study: pd.DataFrame, metric: str, ylabel: str, labels: Mapping[str, str] | None = None) -> Axes:
    """``metric`` against the mean L0 of the two SAEs (Fig. 14): lines for same-L0 pairs, crosses for mixed ones.

    ``study`` is :func:`featmatch.chapters.pruning.l0_study`; ``labels`` names the methods.
    """
    for (method, same), g in study.groupby(["method", "same_l0"]):
        g = g.assign(l0_pair=0.5 * (g["l0_a"] + g["l0_b"])).sort_values("l0_pair")
        ax.plot(g["l0_pair"], g[metric], "o-" if same else "x", ms=5,
                label=f"{(labels or {}).get(method, method)}{'' if same else ' (mixed L0)'}")
    ax.set_xlabel("mean L0 of the two SAEs")
    ax.set_ylabel(ylabel)
    set_robust_limits(ax, study[metric], "y")
    ax.set_title(f"{ylabel.split(' (')[0]} against SAE sparsity")
    legend_outside(ax, fontsize=7)
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------------------
# Chapter 04: Semantic OT
# --------------------------------------------------------------------------------------


def plot_method_scores(
    ax: Axes, table: pd.DataFrame, value: str, ylabel: str, title: str, *, chance: float | None = None
) -> Axes:
    """Grouped bars: one group per pair, one bar per method; ``chance`` drawn as a dotted line."""
    wide = table.pivot_table(index="pair", columns="method", values=value, aggfunc="first", sort=False)
    from featmatch.chapters import semantic_ot

    order = semantic_ot.METHODS
    methods = [m for m in order if m in wide.columns] + [m for m in wide.columns if m not in order]
    x = np.arange(len(wide.index))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, wide[m].to_numpy(), width, label=m)
    ax.set_xticks(x, [f"layers {p}" for p in wide.index])
    ax.set_xlabel("layer pair (A→B)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    chance_line(ax, chance)
    legend_outside(ax)
    return ax


def plot_judge_labels(ax: Axes, jt: pd.DataFrame, judge_name: str, *, chance: float | None = None) -> Axes:
    """Stacked bars of the label shares (DIFFERENT / MAYBE / SAME) per pair and method.

    ``chance`` (a share) is drawn as a dotted vertical line.
    """
    labels = [f"{r.pair}\n{r.method}" for r in jt.itertuples()]
    n = jt["n_judged"].clip(lower=1).to_numpy()
    bottom = np.zeros(len(jt))
    for name, colour in (("DIFFERENT", "#d62728"), ("MAYBE", "#ffbf00"), ("SAME", "#2ca02c")):
        share = jt[name].to_numpy() / n
        ax.barh(np.arange(len(jt)), share, left=bottom, color=colour, label=name)
        bottom += share
    ax.set_yticks(np.arange(len(jt)), labels, fontsize="x-small")
    ax.invert_yaxis()
    ax.set_xlabel("share of judged pairs")
    ax.set_ylabel("layer pair, method")
    ax.set_xlim(0, 1)
    ax.set_title(f"Judge labels ({judge_name})")
    chance_line(ax, chance, "x")
    legend_outside(ax)
    return ax


def plot_approximation(ax: Axes, sample: pd.DataFrame, label: str, rho: float | None = None) -> Axes:
    """Scatter of one approximation against the exact distance, with its fitted scale.

    Both axes are logarithmic when the distances span two orders of magnitude (symlog with
    zeros), so the bulk of the points is not squeezed into a corner by a few large ones.
    """
    x, y = sample["exact"].to_numpy(dtype=float), sample[label].to_numpy(dtype=float)
    ax.scatter(x, y, s=6, alpha=0.5, label="feature pair")
    ok = np.isfinite(x) & np.isfinite(y)
    denom = float(y[ok] @ y[ok])
    if denom > 0:
        s = float(y[ok] @ x[ok]) / denom  # least squares W ≈ s * approx
        xs = x[ok]
        lo = float(xs[xs > 0].min()) if (xs > 0).any() else 0.0
        grid = np.geomspace(lo, xs.max(), 50) if lo > 0 else np.linspace(0, xs.max(), 2)
        ax.plot(grid, grid / s, color="k", lw=1, label=f"exact / {s:.3g}")
        legend_outside(ax, "below")
    sx, sy = apply_scale(ax, x, "x", ratio=30.0), apply_scale(ax, y, "y", ratio=30.0)
    ax.set_xlabel("exact $W_2$" + ("" if sx == "linear" else f" ({sx})"))
    ax.set_ylabel(f"{label} distance" + ("" if sy == "linear" else f" ({sy})"))
    ax.set_title(f"{label} vs exact" + (f" (Spearman {rho:.3f})" if rho is not None else ""))
    return ax


def plot_reference_spaces(
    ax: Axes, table: pd.DataFrame, value: str, xlabel: str, title: str, *,
    reference: float | None = None, reference_label: str = "baseline",
) -> Axes:
    """Horizontal bars of one score per reference-space choice (``table`` has ``space``).

    ``reference`` (e.g. the best baseline's score) is drawn as a dashed vertical line, named
    in a legend outside the axes.
    """
    ax.barh(np.arange(len(table)), table[value].to_numpy())
    ax.set_yticks(np.arange(len(table)), table["space"].tolist(), fontsize="small")
    ax.invert_yaxis()
    if reference is not None and np.isfinite(reference):
        ax.axvline(float(reference), color="k", ls="--", lw=1, label=f"{reference_label} ({reference:.3g})")
        legend_outside(ax, "below", ncol=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reference space")
    ax.set_title(title)
    return ax


# --------------------------------------------------------------------------------------
# Chapter 05: circuit compression
# --------------------------------------------------------------------------------------


def plot_accuracy_by_format(ax: Axes, acc: pd.DataFrame, chosen: Sequence[str] = ()) -> Axes:
    """Horizontal bars of per-format accuracy (:func:`featmatch.circuits.accuracy_by_format`).

    The formats in ``chosen`` are drawn in a strong colour; each bar is labelled
    ``n_correct/n``. Returns the Axes.
    """
    df = acc.reset_index(drop=True)
    y = np.arange(len(df))
    colors = ["tab:orange" if f in set(chosen) else "tab:gray" for f in df["format"]]
    ax.barh(y, 100 * df["accuracy"].to_numpy(dtype=float), color=colors)
    for yi, r in zip(y, df.itertuples(index=False), strict=True):
        ax.text(100 * r.accuracy + 1, yi, f"{r.n_correct}/{r.n}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(df["format"])
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("greedy accuracy (%)")
    ax.set_ylabel("prompt format")
    ax.set_title("Digit addition: accuracy per prompt format" + (" (orange: used)" if chosen else ""))
    return ax


def plot_faithfulness_curves(
    ax: Axes, curves: pd.DataFrame, labels: Mapping[str, str] | None = None, y: str = "faithfulness"
) -> Axes:
    """Faithfulness (or ``y="accuracy"``) against the number of nodes kept, per method.

    ``curves`` is the tidy frame of :func:`featmatch.circuits.compare_methods` (columns
    ``method, level, k, n_nodes`` and ``y``). Supernode level: solid line with markers;
    node level at the same node counts: dashed line in the same colour. Returns the Axes.
    """
    if labels is None:
        from featmatch.chapters import compression

        labels = compression.METHOD_LABELS
    labels = dict(labels)
    values = curves[y].to_numpy(dtype=float)
    for i, (method, df) in enumerate(curves.groupby("method", sort=False)):
        color = f"C{i}"
        sn = df[df["level"] == "supernode"].sort_values("k")
        nd = df[df["level"] == "node"].sort_values("k")
        name = labels.get(method, method)
        ax.plot(sn["n_nodes"], sn[y], "-o", color=color, ms=3, label=f"{name}: supernodes")
        ax.plot(nd["n_nodes"], nd[y], "--", color=color, alpha=0.6, label=f"{name}: nodes")
    # the reference levels 0 (nothing kept) and 1 (the full graph) are drawn only where the data
    # reaches them; the y axis follows the data (robust limits, outliers annotated)
    lim = set_robust_limits(ax, values, "y")
    if lim.n and not lim.n_outside:
        span = max(lim.vmax - lim.vmin, 1e-9)
        ax.set_ylim(lim.vmin - 0.08 * span, lim.vmax + 0.08 * span)
    lo, hi = ax.get_ylim()
    for level in (0.0, 1.0):
        if lo <= level <= hi:
            ax.axhline(level, color="k", lw=0.5)
    if lim.n and not lo <= 1.0 <= hi and y == "faithfulness":
        ax.text(0.99, 0.99, f"full graph: F = 1 (above; data max {lim.vmax:.3g})", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="0.25")
    ax.set_xlabel("nodes kept (top-k supernodes, or the same number of top nodes)")
    ax.set_ylabel(y if y != "faithfulness" else "faithfulness F(C)")
    ax.set_title(f"{'Faithfulness' if y == 'faithfulness' else y.capitalize()} as the circuit grows")
    legend_outside(ax, fontsize=7)
    return ax


def _luminance(rgba: Sequence[float]) -> float:
    """Relative luminance of an sRGB colour (WCAG 2.x definition)."""
    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(float(c)) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def plot_compressed_graph(
    ax: Axes,
    graph: object,
    groups: object,
    *,
    feature_label: Callable[[int, int], str] | None = None,
    n_features: int = 2,
    **kwargs: object,
) -> Axes:
    """The compressed attribution graph (:func:`featmatch.circuits.plot_compressed_graph`), readable.

    Each supernode box is labelled with its index, member count and its ``n_features``
    members of largest |attribution| (``L{layer}/{feature}``, or ``feature_label(layer,
    feature)`` when given, e.g. an explanation). Box text is black or white, whichever
    contrasts more with the box's face colour (WCAG relative luminance, threshold 0.179 —
    the luminance at which both contrasts are equal). Other keyword arguments go to the
    circuits function.
    """
    from matplotlib.patches import FancyBboxPatch

    from featmatch import circuits as C

    nodes = groups.to_frame(graph)  # type: ignore[attr-defined]

    def label(index: int, name: str, n_members: int) -> str:
        members = nodes[nodes["supernode"] == index]
        if (members["kind"] == "error").all():
            return "err"
        top = members.reindex(members["attribution"].abs().sort_values(ascending=False).index).head(n_features)
        names = [feature_label(int(r.layer), int(r.feature)) if feature_label else f"L{int(r.layer)}/{int(r.feature)}"
                 for r in top.itertuples()]
        more = "" if n_members <= len(names) else " …"
        return f"#{index} n={n_members}\n" + "\n".join(names) + more

    C.plot_compressed_graph(graph, groups, ax=ax, label_fn=label, **kwargs)
    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    for t in ax.texts:
        x, y = t.get_position()
        for b in boxes:
            bx, by, bw, bh = b.get_x(), b.get_y(), b.get_width(), b.get_height()
            if bx <= x <= bx + bw and by <= y <= by + bh:
                t.set_color("white" if _luminance(b.get_facecolor()) < 0.179 else "black")
                break
    return ax


def plot_faithfulness_budget(
    ax: Axes, table: pd.DataFrame, chosen: tuple[str, int] | None = None, target: float = 0.8
) -> Axes:
    """F(n) on held-out prompts against the node budget, one line per ranking, with 95 % CIs.

    ``table`` is :attr:`featmatch.circuits.FaithfulnessCurve.table` (``ranking, n_nodes,
    faithfulness, ci_low, ci_high, linear``). Solid lines with bands: real mean-ablation F;
    dotted lines: the linear (attribution-patching) estimate of the same node sets. The
    target is a horizontal line, the chosen circuit ``(ranking, n)`` a ringed point. Log-2 x
    axis, linear y axis from min(0, data) to max(1, data) under the book's one outlier rule
    (:func:`robust_limits`; values beyond it are counted in a note; F can be negative or above 1).
    """
    styles = [("-", "o"), ("--", "s"), ("-.", "^")]
    for i, (name, df) in enumerate(table.groupby("ranking", sort=False)):
        df = df.sort_values("n_nodes")
        c, (ls, mk) = f"C{i}", styles[i % len(styles)]
        ax.plot(df["n_nodes"], df["faithfulness"], ls, marker=mk, color=c, ms=5 - i, label=f"{name} ranking: F (held-out)")
        ax.fill_between(df["n_nodes"], df["ci_low"], df["ci_high"], color=c, alpha=0.15, lw=0)
        if "linear" in df and df["linear"].notna().any():
            ax.plot(df["n_nodes"], df["linear"], ":", color=c, alpha=0.8, label=f"{name} ranking: linear estimate")
        if chosen is not None and chosen[0] == name:
            r = df[df["n_nodes"] == chosen[1]]
            ax.plot(r["n_nodes"], r["faithfulness"], "o", ms=13, mfc="none", mec="k", mew=1.5, label="chosen circuit")
    ax.axhline(target, color="0.3", ls="--", lw=1, label=f"target F = {target:g}")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log", base=2)
    vals = np.r_[table[["faithfulness", "ci_low", "ci_high"]].to_numpy(float).ravel(), table.get("linear", pd.Series(dtype=float)).to_numpy(float)]
    # the book's one outlier rule (robust_limits: Tukey's far-out fences, annotated), widened to
    # keep the reference levels 0 and 1 in view; no value is clipped without a note
    lim = robust_limits(vals)
    lo, hi = min(0.0, lim.lo) - 0.05, max(1.0, lim.hi) + 0.05
    ax.set_ylim(lo, hi)
    v = vals[np.isfinite(vals)]
    annotate_outside(ax, RobustLimits(lo, hi, int((v < lo).sum()), int((v > hi).sum()), lim.vmin, lim.vmax, lim.n), "y")
    ax.set_xlabel("nodes kept (features and error nodes)")
    ax.set_ylabel("faithfulness F on held-out prompts")
    legend_outside(ax)
    return ax
