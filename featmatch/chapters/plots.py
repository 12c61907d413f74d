"""The figures of the book: each function draws on a given matplotlib ``Axes`` and returns it.

Every chapter calls these with its tables: 01 (folding), 02 (persistence) and 03 (pruning)
with those of :mod:`featmatch.chapters.folding`, :mod:`featmatch.chapters.persistence` and
:mod:`featmatch.chapters.pruning`; 04 with :mod:`featmatch.chapters.semantic_ot`; 05 with
:mod:`featmatch.chapters.compression`. The Axes always comes first. Nothing here computes a number that a claim uses; the
functions only lay out columns of those tables (the cost-decile curve of
:func:`plot_cost_vs_score` comes from :func:`featmatch.chapters.folding.binned_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from featmatch.chapters import compression, semantic_ot
from featmatch.chapters.folding import binned_scores

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
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


# --------------------------------------------------------------------------------------
# 02 persistence
# --------------------------------------------------------------------------------------


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


def plot_agreement(ax: Axes, agree: pd.DataFrame) -> Axes:
    """Share of features with the same partner under composed and exact matches, one line per start layer.

    ``agree`` is :func:`featmatch.chapters.persistence.agreement_table` (distance × start).
    """
    for s in agree.columns:
        ax.plot(agree.index, agree[s], marker="o", ms=3, label=f"from layer {s}")
    ax.set_xlabel("distance (layers)")
    ax.set_ylabel("share of features with the same partner")
    ax.set_title("agreement of composed and exact matches")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def plot_path_costs(ax: Axes, paths: pd.DataFrame, start: int) -> Axes:
    """The cost of each step along feature paths (App. D), one line per path.

    ``paths`` is :func:`featmatch.chapters.persistence.path_table` from layer ``start``.
    """
    for f, g in paths.groupby("path"):
        ax.plot(g["layer"], g["step_cost"], marker="o", ms=3, label=f"feature {f} of layer {start}")
    ax.set_xlabel("layer")
    ax.set_ylabel("cost of the step into this layer (folded MSE)")
    ax.set_title("cost along feature paths")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------------------
# 03 pruning
# --------------------------------------------------------------------------------------


def plot_min_theta(ax: Axes, theta: pd.DataFrame, min_theta: float) -> Axes:
    """EV of folded EPD with and without the near-zero-θ pairs, and of unfolded EPD, per layer (clipped at −1).

    ``theta`` is :func:`featmatch.chapters.pruning.theta_table`.
    """
    for name, style, label in (("ev_folded", "o-", "folded EPD"), ("ev_folded_min_theta", "s-", f"folded EPD, θ < {min_theta:g} dropped"),
                               ("ev_unfolded", "^--", "unfolded EPD")):
        ax.plot(theta["layer"], theta[name].clip(lower=-1.0), style, label=label)
    ax.set_xlabel("layer t")
    ax.set_ylabel("EV of the predicted h(t+1) (clipped at −1)")
    ax.set_title("encode-permute-decode: folding with and without near-zero thresholds")
    ax.legend()
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
    ax.set_title(f"{ylabel.split(' (')[0]} against SAE sparsity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------------------
# Chapter 04: Semantic OT
# --------------------------------------------------------------------------------------


def plot_method_scores(ax: Axes, table: pd.DataFrame, value: str, ylabel: str, title: str) -> Axes:
    """Grouped bars: one group per pair, one bar per method."""
    wide = table.pivot_table(index="pair", columns="method", values=value, aggfunc="first", sort=False)
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
    ax.legend(fontsize="small")
    return ax


def plot_judge_labels(ax: Axes, jt: pd.DataFrame, judge_name: str) -> Axes:
    """Stacked bars of the label shares (DIFFERENT / MAYBE / SAME) per pair and method."""
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
    ax.set_title(f"Judge labels ({judge_name})")
    ax.legend(fontsize="small", loc="lower right")
    return ax


def plot_approximation(ax: Axes, sample: pd.DataFrame, label: str, rho: float | None = None) -> Axes:
    """Scatter of one approximation against the exact distance, with its fitted scale."""
    x, y = sample["exact"].to_numpy(), sample[label].to_numpy()
    ax.scatter(x, y, s=6, alpha=0.5)
    denom = float(y @ y)
    if denom > 0:
        s = float(y @ x) / denom  # least squares W ≈ s * approx
        grid = np.linspace(0, x.max(), 2)
        ax.plot(grid, grid / s, color="k", lw=1, label=f"exact / {s:.3g}")
        ax.legend(fontsize="small")
    ax.set_xlabel("exact $W_2$")
    ax.set_ylabel(f"{label} distance")
    ax.set_title(f"{label} vs exact" + (f" (Spearman {rho:.3f})" if rho is not None else ""))
    return ax


def plot_reference_spaces(ax: Axes, table: pd.DataFrame, value: str, xlabel: str, title: str) -> Axes:
    """Horizontal bars of one score per reference-space choice (``table`` has ``space``)."""
    ax.barh(np.arange(len(table)), table[value].to_numpy())
    ax.set_yticks(np.arange(len(table)), table["space"].tolist(), fontsize="small")
    ax.invert_yaxis()
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
    labels = dict(compression.METHOD_LABELS if labels is None else labels)
    for i, (method, df) in enumerate(curves.groupby("method", sort=False)):
        color = f"C{i}"
        sn = df[df["level"] == "supernode"].sort_values("k")
        nd = df[df["level"] == "node"].sort_values("k")
        name = labels.get(method, method)
        ax.plot(sn["n_nodes"], sn[y], "-o", color=color, ms=3, label=f"{name}: supernodes")
        ax.plot(nd["n_nodes"], nd[y], "--", color=color, alpha=0.6, label=f"{name}: nodes")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("nodes kept (top-k supernodes, or the same number of top nodes)")
    ax.set_ylabel(y if y != "faithfulness" else "faithfulness F(C)")
    ax.set_title(f"{'Faithfulness' if y == 'faithfulness' else y.capitalize()} as the circuit grows")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return ax
