"""featmatch.chapters.plots (all chapters): each figure draws the table's numbers on the given Axes."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import plots, semantic_ot
from featmatch.chapters.folding import binned_scores


@pytest.fixture
def ax():
    fig, axis = plt.subplots()
    yield axis
    plt.close(fig)


def _lines(ax):
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_plot_by_layer_draws_one_sorted_line_per_hue_in_order(ax):
    df = pd.DataFrame({"layer_a": [1, 0, 1, 0, 0], "variant": ["folded", "folded", "unfolded", "unfolded", "x"],
                       "matching_score": [0.6, 0.5, 0.4, 0.3, 0.9]})
    out = plots.plot_by_layer(ax, df, "matching_score", order=["unfolded", "folded"], labels={"folded": "F"}, logy=True)
    assert out is ax
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["unfolded", "F"]  # "x" is not in the order
    assert _lines(ax)["F"] == ([0, 1], [0.5, 0.6])
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "layer a" and ax.get_ylabel() == "matching score"


def test_plot_by_layer_without_hue(ax):
    plots.plot_by_layer(ax, pd.DataFrame({"layer": [2, 1], "rho": [0.1, -0.2]}), "rho", x="layer", hue=None, ylabel="ρ")
    assert ax.get_legend() is None and len(ax.get_lines()) == 1
    assert list(ax.get_lines()[0].get_ydata()) == [-0.2, 0.1] and ax.get_ylabel() == "ρ"


def test_plot_threshold_norm_uses_two_axes(ax):
    t = pd.DataFrame({"layer": [0, 1], "theta_mean": [1, 2], "folded_dec_norm_mean": [5, 6], "resid_norm_mean": [3, 4]})
    a1, a2 = plots.plot_threshold_norm(ax, t, left="folded_dec_norm_mean", left_label="dec")
    assert a1 is ax and a2 is not ax
    assert list(a1.get_lines()[0].get_ydata()) == [5, 6] and list(a2.get_lines()[0].get_ydata()) == [3, 4]
    assert a1.get_ylabel() == "dec" and "‖h‖" in a2.get_ylabel()


def test_plot_norm_dynamics_labels_points_with_layer_t(ax):
    dyn = pd.DataFrame({"layer_a": [0, 1], "layer_b": [1, 2], "resid_norm_change": [1.0, 2.0], "matched_dec_norm_change": [0.1, 0.3]})
    plots.plot_norm_dynamics(ax, dyn)
    assert [t.get_text() for t in ax.texts] == ["0", "1"]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[1.0, 0.1], [2.0, 0.3]])


def test_plot_label_distribution_stacks_shares(ax):
    counts = pd.DataFrame({"layer_a": [1, 0], "DIFFERENT": [0, 1], "MAYBE": [0, 1], "SAME": [2, 2]})
    plots.plot_label_distribution(ax, counts, title="labels")
    heights = [p.get_height() for p in ax.patches]  # DIFFERENT (layers 0, 1), MAYBE, SAME
    np.testing.assert_allclose(heights, [0.25, 0.0, 0.25, 0.0, 0.5, 1.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]


def test_plot_cost_vs_score_draws_the_decile_means(ax):
    feats = pd.DataFrame({"cost": np.linspace(0, 1, 20), "matching_score": np.linspace(1, 0, 20), "fires_a": 3})
    plots.plot_cost_vs_score(ax, feats, n_bins=4)
    b = binned_scores(feats, 4)
    assert _lines(ax)["mean per cost decile"] == (b["cost_mid"].tolist(), b["score_mean"].tolist())


def test_plot_cost_by_label_counts_each_label(ax):
    judged = pd.DataFrame({"label": pd.array([1, 3, 3, pd.NA], dtype="Int64"), "cost": [0.3, 0.1, 0.2, 0.9]})
    plots.plot_cost_by_label(ax, judged)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DIFFERENT\n(n=1)", "MAYBE\n(n=0)", "SAME\n(n=2)"]


def test_plot_persistence_and_agreement(ax):
    pt = pd.DataFrame({"start": 0, "target": [2, 1, 1, 2], "method": ["exact"] * 2 + ["composed"] * 2,
                       "matching_score": [0.4, 0.5, 0.5, 0.3]})
    plots.plot_persistence(ax, pt, 0)
    lines = _lines(ax)
    assert set(lines) == {"exact", "composed"} and lines["exact"] == ([1, 2], [0.5, 0.4])
    assert ax.get_title() == "from layer 0"
    fig, ax2 = plt.subplots()
    agree = pd.DataFrame({3: [1.0, 0.5], 7: [1.0, 0.25]}, index=pd.Index([1, 2], name="distance"))
    plots.plot_agreement(ax2, agree)
    assert _lines(ax2) == {"from layer 3": ([1, 2], [1.0, 0.5]), "from layer 7": ([1, 2], [1.0, 0.25])}
    plt.close(fig)


def test_plot_path_costs_one_line_per_path(ax):
    paths = pd.DataFrame({"path": [4, 4, 9, 9], "layer": [2, 3, 2, 3], "step_cost": [np.nan, 0.1, np.nan, 0.7]})
    plots.plot_path_costs(ax, paths, 2)
    lines = _lines(ax)
    assert set(lines) == {"feature 4 of layer 2", "feature 9 of layer 2"}
    assert lines["feature 9 of layer 2"][1][1] == 0.7


def test_plot_min_theta_clips_at_minus_one(ax):
    t = pd.DataFrame({"layer": [0, 4], "ev_folded": [-50.0, 0.5], "ev_folded_min_theta": [0.4, 0.5], "ev_unfolded": [0.3, 0.2]})
    plots.plot_min_theta(ax, t, 1e-2)
    lines = _lines(ax)
    assert lines["folded EPD"][1] == [-1.0, 0.5]
    assert "folded EPD, θ < 0.01 dropped" in lines


def test_plot_hybrid_cost_and_random_orders(ax):
    hy = pd.DataFrame({"layer": [3] * 6 + [5], "q": [0, 0.5, 1, 0, 0.5, 1, 0], "order": ["cost"] * 3 + ["random"] * 4,
                       "ev": [0.1, 0.5, 0.6, 0.1, 0.4, 0.6, 0.9], "delta_ce": 0.0})
    plots.plot_hybrid(ax, hy, 3, "delta_ce")
    lines = _lines(ax)
    assert set(lines) == {"cost-ordered", "random-ordered"} and lines["random-ordered"][0] == [0, 0.5, 1]
    assert ax.get_ylabel() == "ΔCE (nats)" and ax.get_title() == "layer 3 → 4"


def test_plot_l0_study_lines_for_same_l0_crosses_for_mixed(ax):
    study = pd.DataFrame({"method": "m", "same_l0": [True, True, False], "l0_a": [12.0, 5.0, 5.0], "l0_b": [11.0, 6.0, 11.0],
                          "ev": [0.9, 0.8, 0.6]})
    plots.plot_l0_study(ax, study, "ev", "explained variance", labels={"m": "M"})
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["M"].get_xdata()) == [5.5, 11.5] and lines["M"].get_linestyle() == "-"
    assert lines["M (mixed L0)"].get_marker() == "x" and lines["M (mixed L0)"].get_linestyle() == "None"
    assert ax.get_title() == "explained variance against SAE sparsity"


def test_chapter_04_plots_draw_the_table(rng):
    scores = pd.DataFrame(
        [("0→1", m, v) for m, v in zip(semantic_ot.METHODS, (0.5, 0.4, 0.3, 0.6), strict=True)],
        columns=["pair", "method", "matching_score"],
    )
    fig, axes = plt.subplots(2, 2)
    ax = plots.plot_method_scores(axes[0, 0], scores, "matching_score", "score", "T1")
    assert ax.get_title() == "T1" and ax.get_xlabel() and ax.get_ylabel() == "score"
    assert len(ax.patches) == 4
    jt = pd.DataFrame(
        {"pair": ["0→1"], "method": ["x"], "n_judged": [4], "DIFFERENT": [1], "MAYBE": [1], "SAME": [2]}
    )
    ax = plots.plot_judge_labels(axes[0, 1], jt, "proxy")
    assert "proxy" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == pytest.approx([0.25, 0.25, 0.5])
    sample = pd.DataFrame({"exact": rng.random(20) + 1})
    sample["approx"] = sample.exact / 3
    ax = plots.plot_approximation(axes[1, 0], sample, "approx", rho=1.0)
    assert "Spearman 1.000" in ax.get_title() and "exact / 3" in ax.get_legend().get_texts()[0].get_text()
    t = pd.DataFrame({"space": ["a", "b"], "v": [0.1, 0.2]})
    ax = plots.plot_reference_spaces(axes[1, 1], t, "v", "value", "T4")
    assert ax.get_title() == "T4" and ax.get_ylabel() == "reference space" and len(ax.patches) == 2
    plt.close(fig)


def test_chapter_05_plots_draw_the_table():
    acc = pd.DataFrame({"format": ["a", "b"], "n": [4, 4], "n_correct": [1, 3], "accuracy": [0.25, 0.75]})
    fig, ax = plt.subplots()
    plots.plot_accuracy_by_format(ax, acc, chosen=["b"])
    assert ax.get_xlabel() and ax.get_ylabel() and "orange" in ax.get_title()
    assert [p.get_width() for p in ax.patches] == pytest.approx([25.0, 75.0])
    assert [t.get_text() for t in ax.texts] == ["1/4", "3/4"]
    assert ax.patches[0].get_facecolor() != ax.patches[1].get_facecolor()
    curves = pd.DataFrame(
        {
            "method": ["semantic_ot"] * 4,
            "level": ["supernode", "supernode", "node", "node"],
            "k": [0, 1, 0, 1],
            "n_nodes": [0, 3, 0, 3],
            "faithfulness": [0.0, 1.0, 0.0, 1.0],
            "accuracy": [0.0, 1.0, 0.0, 1.0],
        }
    )
    fig2, ax2 = plt.subplots()
    plots.plot_faithfulness_curves(ax2, curves)
    drawn = {ln.get_label(): list(ln.get_ydata()) for ln in ax2.get_lines() if ln.get_label().endswith("s")}
    assert len(drawn) == 2 and all(y == [0.0, 1.0] for y in drawn.values())
    assert ax2.get_xlabel() and ax2.get_ylabel() == "faithfulness F(C)" and ax2.get_title()
    plt.close("all")
