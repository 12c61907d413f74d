"""featmatch.chapters.plots (all chapters): each figure draws the table's numbers on the given Axes."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import plots


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
    from featmatch.chapters.folding import binned_scores

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


def test_plot_min_theta_never_clips_and_uses_symlog(ax):
    t = pd.DataFrame({"layer": [0, 4], "ev_folded": [-31660.0, 0.5], "ev_folded_min_theta": [0.4, 0.5], "ev_unfolded": [0.3, 0.2]})
    plots.plot_min_theta(ax, t, 1e-2)
    lines = _lines(ax)
    assert lines["folded EPD"][1] == [-31660.0, 0.5]  # the data as they are
    assert "folded EPD, θ < 0.01 dropped" in lines
    assert ax.get_yscale() == "symlog" and ax.get_ylim()[0] <= -31660.0


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
    from featmatch.chapters import semantic_ot

    scores = pd.DataFrame(
        [("0→1", m, 0.3 + 0.1 * k) for k, m in enumerate(semantic_ot.METHODS)],
        columns=["pair", "method", "matching_score"],
    )
    fig, axes = plt.subplots(2, 2)
    ax = plots.plot_method_scores(axes[0, 0], scores, "matching_score", "score", "T1")
    assert ax.get_title() == "T1" and ax.get_xlabel() and ax.get_ylabel() == "score"
    assert len(ax.patches) == len(semantic_ot.METHODS)
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
    assert "Spearman 1.000" in ax.get_title()
    assert any("exact / 3" in t.get_text() for t in ax.get_legend().get_texts())
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



# --------------------------------------------------------------------------------------
# Readability: every figure shows its data (issue 13)
# --------------------------------------------------------------------------------------


def _shows(ax, values, axis="y"):
    """The axis shows ``values``: a log/symlog scale holding all of them, or limits holding
    at least 95 % of them with an annotation naming the ones outside."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    scale = ax.get_yscale() if axis == "y" else ax.get_xscale()
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    inside = (v >= lo) & (v <= hi)
    if scale in ("log", "symlog"):
        return bool(inside.all())
    texts = " ".join(t.get_text() for t in ax.texts)
    return inside.mean() >= 0.95 and (inside.all() or ("beyond" in texts or "above" in texts or "below" in texts))


def _legend_off_the_data(ax):
    fig = ax.figure
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    leg = ax.get_legend()
    assert leg is not None
    lb, ab = leg.get_window_extent(r), ax.get_window_extent(r)
    # the legend box does not overlap the axes box (strictly: they share at most an edge)
    return lb.x0 >= ab.x1 - 1 or lb.x1 <= ab.x0 + 1 or lb.y1 <= ab.y0 + 1 or lb.y0 >= ab.y1 - 1


def _heavy(rng, n=60, outlier=1e4):
    v = rng.normal(0.5, 0.1, n)
    v[3] = -outlier
    return v


def test_robust_limits_match_numpy_quantiles_and_count_outliers(rng):
    v = np.r_[rng.normal(size=200), 50.0, -80.0, np.nan]
    lim = plots.robust_limits(v)
    q1, q3 = np.nanquantile(v, [0.25, 0.75])
    pad = 0.05 * ((q3 + 3 * (q3 - q1)) - (q1 - 3 * (q3 - q1)))
    assert lim.lo == pytest.approx(q1 - 3 * (q3 - q1) - pad) and lim.hi == pytest.approx(q3 + 3 * (q3 - q1) + pad)
    assert (lim.n_below, lim.n_above, lim.n, lim.vmin, lim.vmax) == (1, 1, 202, -80.0, 50.0)
    assert plots.robust_limits([1.0, 2.0, 3.0, 1e6]).n_outside == 0  # would hide 25 %: keep all
    assert plots.pick_scale([1e-3, 1.0, 10.0]) == ("log", 1.0)
    assert plots.pick_scale([0.0, 0.5, 0.6, 500.0])[0] == "symlog"
    assert plots.pick_scale([0.1, 0.5, 0.9]) == ("linear", 1.0)


def test_plot_by_layer_cuts_a_far_outlier_and_says_so(ax, rng):
    y = _heavy(rng)
    df = pd.DataFrame({"layer_a": np.arange(60) % 30, "variant": np.repeat(["a", "b"], 30), "ev": y})
    plots.plot_by_layer(ax, df, "ev")
    assert _shows(ax, y) and ax.get_ylim()[0] > -1e4  # cut, not stretched to the outlier
    assert any("min = -1e+04" in t.get_text() for t in ax.texts)
    assert _legend_off_the_data(ax)


def test_plot_by_layer_with_few_points_uses_symlog_not_a_cut(ax):
    df = pd.DataFrame({"layer": [0, 1, 2, 3], "ev": [0.5, 0.4, -31660.0, 0.3]})
    plots.plot_by_layer(ax, df, "ev", x="layer", hue=None)
    assert ax.get_yscale() == "symlog" and _shows(ax, df["ev"])


def test_plot_cost_vs_score_log_x_for_costs_over_decades(ax, rng):
    cost = np.r_[rng.uniform(0.001, 0.01, 96), [20.0, 25.0, 30.0, 35.0]]
    feats = pd.DataFrame({"cost": cost, "matching_score": rng.uniform(size=100), "fires_a": 3})
    plots.plot_cost_vs_score(ax, feats, n_bins=4)
    assert ax.get_xscale() == "log" and _shows(ax, cost, "x")
    assert _legend_off_the_data(ax)


def test_plot_path_costs_log_y_when_one_step_dominates(ax):
    paths = pd.DataFrame({"path": np.repeat([1, 2, 3], 4), "layer": np.tile([0, 1, 2, 3], 3),
                          "step_cost": [np.nan, 0.1, 0.2, 0.15, np.nan, 0.12, 23.0, 0.1, np.nan, 0.05, 0.08, 0.09]})
    plots.plot_path_costs(ax, paths, 0)
    assert ax.get_yscale() == "log" and _shows(ax, paths["step_cost"])
    assert _legend_off_the_data(ax)


def test_plot_hybrid_and_l0_study_show_their_data(rng):
    q = np.linspace(0, 1, 30)
    ev = np.r_[rng.uniform(0.3, 0.6, 59), -5000.0]
    hy = pd.DataFrame({"layer": 3, "q": np.r_[q, q], "order": ["cost"] * 30 + ["random"] * 30, "ev": ev, "delta_ce": 0.0})
    fig, (a1, a2) = plt.subplots(1, 2)
    plots.plot_hybrid(a1, hy, 3, "ev")
    assert _shows(a1, ev) and a1.texts and _legend_off_the_data(a1)
    study = pd.DataFrame({"method": "m", "same_l0": True, "l0_a": np.arange(40.0), "l0_b": np.arange(40.0) + 1,
                          "ev": np.r_[rng.uniform(0.5, 0.9, 39), -900.0]})
    plots.plot_l0_study(a2, study, "ev", "explained variance")
    assert _shows(a2, study["ev"]) and _legend_off_the_data(a2)
    plt.close(fig)


def test_plot_approximation_log_axes_for_wide_distances(ax, rng):
    exact = np.r_[rng.uniform(10, 2000, 97), [15000.0, 20000.0, 25000.0]]
    sample = pd.DataFrame({"exact": exact, "sliced": exact / 3 * rng.uniform(0.9, 1.1, 100)})
    plots.plot_approximation(ax, sample, "sliced")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert _shows(ax, exact, "x") and _shows(ax, sample["sliced"]) and _legend_off_the_data(ax)


def test_plot_faithfulness_curves_autoscale_to_the_data(ax, rng):
    n = 12
    f = rng.uniform(-0.15, 0.02, 2 * n)
    curves = pd.DataFrame({"method": "m", "level": ["supernode"] * n + ["node"] * n, "k": np.r_[np.arange(n), np.arange(n)],
                           "n_nodes": np.r_[np.arange(n), np.arange(n)] * 3, "faithfulness": f, "accuracy": 0.5})
    plots.plot_faithfulness_curves(ax, curves, labels={"m": "M"})
    lo, hi = ax.get_ylim()
    assert lo <= f.min() and hi >= f.max() and hi - lo < 0.5  # not a −0.2…1 axis for data in −0.15…0.02
    assert _legend_off_the_data(ax)


def test_judge_plots_draw_the_chance_level_and_legends_outside(rng):
    fig, axes = plt.subplots(2, 2)
    counts = pd.DataFrame({"layer_a": [0, 1, 2], "DIFFERENT": [3, 1, 2], "MAYBE": [1, 1, 1], "SAME": [2, 4, 3]})
    plots.plot_label_distribution(axes[0, 0], counts, chance=0.2)
    jt = pd.DataFrame({"pair": ["0→1", "0→1"], "method": ["x", "y"], "n_judged": [4, 4],
                       "DIFFERENT": [1, 2], "MAYBE": [1, 1], "SAME": [2, 1]})
    plots.plot_judge_labels(axes[0, 1], jt, "proxy", chance=0.3)
    pt = pd.DataFrame({"start": 0, "target": [1, 2, 1, 2], "method": ["exact"] * 2 + ["random"] * 2, "mean_label": [2.5, 2.2, 1.4, 1.5]})
    plots.plot_persistence(axes[1, 0], pt, 0, "mean_label", chance=1.5)
    t = pd.DataFrame({"pair": ["0→1", "0→1"], "method": ["a", "b"], "v": [2.1, 2.4]})
    plots.plot_method_scores(axes[1, 1], t, "v", "mean label", "T", chance=2.25)
    for a, level, axis in ((axes[0, 0], 0.2, "y"), (axes[0, 1], 0.3, "x"), (axes[1, 0], 1.5, "y"), (axes[1, 1], 2.25, "y")):
        lines = [ln for ln in a.get_lines() if ln.get_label().startswith("chance")]
        assert len(lines) == 1
        data = lines[0].get_ydata() if axis == "y" else lines[0].get_xdata()
        assert list(data) == [level, level]
        assert _legend_off_the_data(a)
    plt.close(fig)


def test_legends_of_the_other_plots_are_off_the_data():
    fig, axes = plt.subplots(1, 3)
    agree = pd.DataFrame({3: [1.0, 0.5], 7: [1.0, 0.25]}, index=pd.Index([1, 2], name="distance"))
    plots.plot_agreement(axes[0], agree)
    t = pd.DataFrame({"layer": [0, 4], "ev_folded": [0.1, 0.5], "ev_folded_min_theta": [0.4, 0.5], "ev_unfolded": [0.3, 0.2]})
    plots.plot_min_theta(axes[1], t, 1e-2)
    assert axes[1].get_yscale() == "linear"  # nothing below −1: a plain axis
    pt = pd.DataFrame({"start": 0, "target": [2, 1], "method": ["exact"] * 2, "matching_score": [0.4, 0.5]})
    plots.plot_persistence(axes[2], pt, 0)
    assert all(_legend_off_the_data(a) for a in axes)
    plt.close(fig)


def test_plot_compressed_graph_labels_features_and_contrasts_with_the_box():
    import torch
    from matplotlib.patches import FancyBboxPatch

    from featmatch import circuits as C

    rows = [{"node_id": C.node_id(L, f), "layer": L, "feature": f, "kind": "feature"} for L in (0, 1) for f in (5, 7, 9)]
    nodes = pd.DataFrame(rows)
    nodes["activation"] = nodes["frac_active"] = 1.0
    nodes["attribution"] = [9.0, -0.1, 0.2, -9.0, 0.1, 0.0]  # saturated red and blue boxes
    nodes["abs_attribution"] = nodes["attribution"].abs()
    edges = pd.DataFrame(columns=["src", "dst", "weight", "src_layer", "dst_layer"])
    graph = C.AttributionGraph(nodes, edges, 1.0, "logit_diff", (0, 1), C.TaskTokens(tokens=[torch.tensor([0, 1])], answer_ids=[2]),
                               nodes.copy(), {})
    groups = C.Supernodes(labels=np.array([0, 1, 1, 2, 1, 1]), names=["a", "b", "c"])
    fig, ax = plt.subplots()
    plots.plot_compressed_graph(ax, graph, groups)
    texts = {t.get_text().split("\n")[0]: t for t in ax.texts}
    assert "L0/5" in texts["#0 n=1"].get_text() and "L1/5" in texts["#2 n=1"].get_text()
    assert texts["#1 n=4"].get_text().count("\n") == 2 and texts["#1 n=4"].get_text().endswith("…")  # 2 of 4 named
    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    for t in ax.texts:
        x, y = t.get_position()
        box = next((b for b in boxes if b.get_x() <= x <= b.get_x() + b.get_width() and b.get_y() <= y <= b.get_y() + b.get_height()), None)
        if box is None:
            continue
        # WCAG contrast ratio of text on box ≥ 4.5 (AA for normal text)
        lum = [plots._luminance(matplotlib.colors.to_rgba(c)) for c in (t.get_color(), box.get_facecolor())]
        ratio = (max(lum) + 0.05) / (min(lum) + 0.05)
        assert ratio >= 4.5, (t.get_text(), ratio)
    plt.close(fig)


def test_legend_can_be_left_out_or_put_below(rng):
    fig, (a1, a2) = plt.subplots(1, 2)
    pt = pd.DataFrame({"start": 0, "target": [2, 1], "method": ["exact"] * 2, "matching_score": [0.4, 0.5]})
    plots.plot_persistence(a1, pt, 0, legend=False)
    assert a1.get_legend() is None
    df = pd.DataFrame({"layer_a": [0, 1, 0, 1], "variant": ["a", "a", "b", "b"], "v": [1.0, 2.0, 3.0, 4.0]})
    plots.plot_by_layer(a2, df, "v", legend="below")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    assert a2.get_legend().get_window_extent(r).y1 <= a2.get_window_extent(r).y0 + 1  # under the axes
    plt.close(fig)


def test_label_distribution_thins_tick_labels_for_many_layers(ax):
    counts = pd.DataFrame({"layer_a": range(30), "DIFFERENT": 1, "MAYBE": 1, "SAME": 2})
    plots.plot_label_distribution(ax, counts)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) <= 15 and labels[:3] == ["0", "2", "4"]
    assert len(ax.patches) == 90  # every bar is still drawn


def test_reference_spaces_baseline_line_with_its_legend_off_the_bars(ax):
    t = pd.DataFrame({"space": ["a", "b", "c"], "v": [0.6, 0.62, 0.58]})
    plots.plot_reference_spaces(ax, t, "v", "score", "T", reference=0.55, reference_label="best baseline")
    line = [ln for ln in ax.get_lines() if ln.get_label().startswith("best baseline")]
    assert len(line) == 1 and list(line[0].get_xdata()) == [0.55, 0.55]
    assert _legend_off_the_data(ax)
