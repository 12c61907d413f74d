"""Tests for featmatch.chapters.compression (support of notebook 05) on planted, tiny inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from featmatch import circuits as C
from featmatch.chapters import compression as R
from featmatch.semantic import ReferenceSpace


def _graph(layers=(0, 1), feats=(0, 1, 2, 3, 4, 5), with_error=True, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for L in layers:
        for f in feats:
            rows.append({"node_id": C.node_id(L, f), "layer": L, "feature": int(f), "kind": "feature"})
        if with_error:
            rows.append({"node_id": C.node_id(L, -1), "layer": L, "feature": -1, "kind": "error"})
    nodes = pd.DataFrame(rows)
    nodes["activation"] = 1.0
    nodes["frac_active"] = 1.0
    nodes["attribution"] = rng.normal(size=len(nodes))
    nodes["abs_attribution"] = nodes["attribution"].abs()
    task = C.TaskTokens(tokens=[torch.tensor([0, 1, 2])], answer_ids=[3])
    edges = pd.DataFrame(columns=["src", "dst", "weight", "src_layer", "dst_layer"])
    meta = {
        "total_attribution": {L: float(nodes.loc[nodes["layer"] == L, "attribution"].sum()) for L in layers}
    }
    return C.AttributionGraph(nodes, edges, 1.0, "logit_diff", tuple(layers), task, nodes.copy(), meta)


def _planted_samples(n_feat=8, seq_len=16, n_seq=8, N=12, seed=0):
    """Two clusters of positions far apart in the reference space; features 0-2 fire on
    cluster A, features 3-5 on cluster B (at both layers), features 6-7 never fire."""
    rng = np.random.default_rng(seed)
    n_pos = n_seq * seq_len
    coords = rng.normal(scale=0.1, size=(n_pos, 3)).astype(np.float32)
    is_b = (np.arange(n_pos) // seq_len) % 2 == 1
    coords[is_b, 0] += 10.0
    ref = ReferenceSpace(coords, seq_len, "planted")
    valid = np.arange(n_pos)[np.arange(n_pos) % seq_len != 0]
    a_pos, b_pos = valid[~is_b[valid]], valid[is_b[valid]]
    samples = {}
    for L in (0, 1):
        pos = np.full((n_feat, N), -1, dtype=np.int64)
        val = np.zeros((n_feat, N), dtype=np.float32)
        for f in range(6):
            pool = a_pos if f < 3 else b_pos
            pos[f] = rng.choice(pool, N, replace=False)
            val[f] = rng.uniform(0.5, 2.0, N)
        samples[L] = (torch.as_tensor(pos), torch.as_tensor(val))
    return samples, ref


def test_semantic_ot_distance_recovers_planted_groups_and_flags_missing():
    g = _graph(feats=(0, 1, 2, 3, 4, 5, 6))
    samples, ref = _planted_samples()
    D, missing = R.semantic_ot_distance(g, samples, ref)
    fn = g.feature_nodes().reset_index(drop=True)
    assert D.shape == (len(fn), len(fn))
    assert np.allclose(D, D.T) and np.all(np.diag(D) == 0) and np.isfinite(D).all()
    assert sorted(missing) == ["0_6", "1_6"]
    group = np.where(fn["feature"] < 3, 0, np.where(fn["feature"] < 6, 1, 2))
    same = (group[:, None] == group[None, :]) & (group[:, None] < 2)
    diff = (group[:, None] != group[None, :]) & (group[:, None] < 2) & (group[None, :] < 2)
    assert D[same].max() < 1.0 < 9.0 < D[diff].min()  # across layers too
    miss = np.flatnonzero(group == 2)
    assert np.allclose(D[miss][:, np.flatnonzero(group < 2)], D[np.isfinite(D)].max())
    # the clustering into two groups finds the planted ones (missing nodes join last)
    g2 = _graph(feats=(0, 1, 2, 3, 4, 5))
    D2, missing2 = R.semantic_ot_distance(g2, samples, ref)
    assert missing2 == []
    sn = C.supernodes(g2, D2, n_clusters=2)
    fn2 = g2.feature_nodes()
    lab = sn.labels[(g2.nodes["kind"] == "feature").to_numpy()]
    assert len(set(lab[fn2["feature"].to_numpy() < 3])) == 1
    assert len(set(lab[fn2["feature"].to_numpy() >= 3])) == 1
    assert lab[0] != lab[-1]


def test_semantic_ot_distance_is_rescaling_invariant_and_checks_layers():
    g = _graph(feats=(0, 1, 3, 4))
    samples, ref = _planted_samples()
    D1, _ = R.semantic_ot_distance(g, samples, ref)
    scaled = {L: (p, v * 7.0) for L, (p, v) in samples.items()}
    D2, _ = R.semantic_ot_distance(g, scaled, ref)
    assert np.allclose(D1, D2)
    with pytest.raises(ValueError, match="no activation samples for layer 1"):
        R.semantic_ot_distance(g, {0: samples[0]}, ref)


class _Source:
    def explain(self, layer, feature):
        return None if feature == 9 else f"L{layer} f{feature}"

    def examples(self, layer, feature):
        return [] if feature == 9 else [f"a{feature}", f"b{feature}"]


def test_describe_feature_never_returns_none():
    d = R.describe_feature(_Source())
    assert d(1, 2) == "a2 ; b2"
    assert d(1, 9) == "(no activating context recorded)"
    assert R.describe_feature(_Source(), mode="explain")(3, 4) == "L3 f4"
    with pytest.raises(ValueError):
        R.describe_feature(_Source(), mode="other")


class _LenJudge:
    class _V:
        def __init__(self, label):
            self.label = label

    def score(self, a, b):
        return self._V(3 if a[-1] == b[-1] else 1)


def test_judge_chance_level_pairs_only_features():
    g = _graph(feats=(0, 1, 2))
    out = R.judge_chance_level(g, _LenJudge(), R.describe_feature(_Source()), n_pairs=5)
    assert len(out) == 5
    assert not out["a"].str.endswith("_err").any() and not out["b"].str.endswith("_err").any()
    assert set(out["label"]) <= {1, 3}


def test_graph_summary_counts_and_totals():
    g = _graph(layers=(0, 1, 2), feats=(0, 1))
    g.nodes = g.nodes[~((g.nodes["layer"] == 2) & (g.nodes["kind"] == "error"))].reset_index(drop=True)
    s = R.graph_summary(g)
    assert list(s["layer"]) == [0, 1, 2]
    assert list(s["n_feature_nodes"]) == [2, 2, 2]
    assert list(s["error_node_kept"]) == [True, True, False]
    c = g.candidates
    for L in (0, 1, 2):
        row = s[s["layer"] == L].iloc[0]
        assert row["attr_layer_total"] == pytest.approx(c.loc[c["layer"] == L, "attribution"].sum())
        err = c.loc[(c["layer"] == L) & (c["kind"] == "error"), "attribution"].iloc[0]
        assert row["attr_error"] == pytest.approx(err)


def test_distance_agreement():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2))
    D = np.linalg.norm(x[:, None] - x[None], axis=-1)
    out = R.distance_agreement({"a": D, "b": 2 * D + 1, "c": -D, "flat": np.zeros((6, 6))})
    assert out.loc["a", "b"] == pytest.approx(1.0)
    assert out.loc["a", "c"] == pytest.approx(-1.0)
    assert np.isnan(out.loc["a", "flat"])
    with pytest.raises(ValueError):
        R.distance_agreement({"a": D, "b": np.zeros((3, 3))})


def _summary():
    return pd.DataFrame(
        {
            "compression_ratio": [5.0, 5.0, 5.0],
            "faithfulness_auc_nodes": [0.5, 0.5, 0.5],
            "faithfulness_auc_supernodes": [0.60, 0.50, 0.61],
            "additivity_error": [0.10, 0.30, 0.05],
            "accuracy_auc_supernodes": [0.50, 0.50, 0.40],
            "judge_mean": [2.0, np.nan, 2.0],
        },
        index=["semantic_ot", "decoder_cosine", "sae_match"],
    )


def test_score_outcomes_and_beats_verdict():
    s = _summary()
    oc = R.score_outcomes(s, "semantic_ot", "decoder_cosine").set_index("score")
    assert oc.loc["faithfulness_auc_supernodes", "outcome"] == "win"
    assert oc.loc["additivity_error", "outcome"] == "win"  # lower is better
    assert oc.loc["additivity_error", "difference"] == pytest.approx(0.2)
    assert oc.loc["accuracy_auc_supernodes", "outcome"] == "tie"
    assert oc.loc["judge_mean", "outcome"] == "n/a"
    assert R.beats_verdict(oc) == "held"
    oc2 = R.score_outcomes(s, "semantic_ot", "sae_match")
    assert list(oc2["outcome"]) == ["tie", "loss", "win", "tie"]
    assert R.beats_verdict(oc2) == "mixed"
    assert R.beats_verdict(["tie", "loss"]) == "failed"
    assert R.beats_verdict(["tie", "tie"]) == "failed"
    assert R.beats_verdict(["n/a"]) == "not tested"
    with pytest.raises(ValueError):
        R.beats_verdict(["won"])


def test_band_verdict():
    assert R.band_verdict(0.9, held=0.8, failed=0.5) == "held"
    assert R.band_verdict(0.6, held=0.8, failed=0.5) == "mixed"
    assert R.band_verdict(0.4, held=0.8, failed=0.5) == "failed"
    assert R.band_verdict(0.05, held=0.1, failed=0.3, higher_is_better=False) == "held"
    assert R.band_verdict(0.5, held=0.1, failed=0.3, higher_is_better=False) == "failed"
    assert R.band_verdict(float("nan"), held=0.8, failed=0.5) == "not tested"
    with pytest.raises(ValueError):
        R.band_verdict(0.5, held=0.3, failed=0.8)


def test_comparison_table_layout():
    t = R.comparison_table(_summary(), "smollm2-135m + zoo")
    assert list(t.index) == ["Semantic OT", "Feature Flow (decoder cosine)", "SAE Match"]
    assert t.columns.nlevels == 2
    gpt2 = t[("paper: GPT-2 small", "accuracy (undefined)")]
    assert list(gpt2) == [68.12, 66.55, 55.55]
    assert list(t[("paper: Gemma-2-2B", "accuracy (undefined)")]) == [61.51, 53.49, 55.63]
    acc = t[("ours: smollm2-135m + zoo", "accuracy kept %")]
    assert list(acc) == pytest.approx([50.0, 50.0, 40.0])
    other = R.comparison_table(_summary().rename(index={"sae_match": "layer"}), "m")
    assert np.isnan(other.loc["layer adjacency", ("paper: GPT-2 small", "accuracy (undefined)")])


def test_resolve_defaults():
    p = R.resolve_defaults("tiny", LAYERS=None, N_PROMPTS=7, NODE_BUDGET=None)
    assert p["LAYERS"] == R.PROFILE_DEFAULTS["tiny"]["LAYERS"] and p["N_PROMPTS"] == 7
    assert (
        R.resolve_defaults("gpt2", NODE_BUDGET=None)["NODE_BUDGET"]
        == R.PROFILE_DEFAULTS["quick"]["NODE_BUDGET"]
    )
    with pytest.raises(ValueError):
        R.resolve_defaults("tiny", UNKNOWN=None)
    for prof in R.PROFILE_DEFAULTS.values():
        assert all(0 <= L < 30 for L in prof["LAYERS"]) and prof["LAYERS"] == sorted(prof["LAYERS"])


def test_supernode_overview():
    g = _graph(layers=(0, 1), feats=(0, 1, 2))
    by_layer = C.supernodes(g, C.layer_distance(g), n_clusters=2, name="layer")
    out = R.supernode_overview(g, {"layer": by_layer})
    col = out["layer adjacency"]
    assert col["feature supernodes"] == 2 and col["supernodes (error singletons included)"] == 4
    assert col["share of feature supernodes spanning >1 layer"] == 0.0


def test_load_circuit_setup_loads_only_requested_layers(monkeypatch):
    import featmatch.lm.corpus
    import featmatch.chapters.setup
    import featmatch.lm.models
    import featmatch.saes

    calls = {"setup": 0, "sae": []}

    class _Tok:
        pass

    class _Model:
        tokenizer = _Tok()

    def fake_sae(set_name, layer):
        calls["sae"].append(layer)
        if layer == 99:
            raise FileNotFoundError("not built")
        return f"sae{layer}"

    monkeypatch.setattr(featmatch.saes, "load_layer_sae", fake_sae)
    monkeypatch.setattr(featmatch.lm.models, "load_model", lambda name: _Model())
    monkeypatch.setattr(featmatch.lm.corpus, "token_batches", lambda tok, **kw: torch.zeros(2, kw["seq_len"]))

    def fake_setup(**kw):
        calls["setup"] += 1
        return "built"

    monkeypatch.setattr(featmatch.chapters.setup, "load_setup", fake_setup)
    s = R.load_circuit_setup(layers=[3, 5], n_tokens=256, seq_len=8, profile="tiny")
    assert s.saes == {3: "sae3", 5: "sae5"} and s.layers == [3, 5] and s.sae_set == "featmatch-smollm2-tiny"
    assert tuple(s.tokens.shape) == (2, 8) and calls["setup"] == 0
    assert R.load_circuit_setup(layers=[3, 99], profile="tiny") == "built"
    assert R.load_circuit_setup(layers=None, profile="tiny") == "built"
    assert R.load_circuit_setup(sae_set="gpt2-small-res-jb", layers=[1]) == "built"
    assert calls["setup"] == 3


def test_plot_helpers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = pd.DataFrame({"format": ["a", "b"], "n": [4, 4], "n_correct": [1, 3], "accuracy": [0.25, 0.75]})
    fig, ax = plt.subplots()
    R.plot_accuracy_by_format(acc, ax, chosen=["b"])
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
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
    R.plot_faithfulness_curves(curves, ax2)
    assert len(ax2.lines) >= 2 and ax2.get_xlabel() and ax2.get_ylabel() and ax2.get_title()
    plt.close("all")


def test_compared_scores_gate_on_graph_faithfulness():
    assert R.compared_scores(0.9) == R.COMPARED_SCORES
    low = R.compared_scores(0.2)
    assert set(low) == {"additivity_error", "judge_mean"} and low["additivity_error"] is False
    assert set(R.compared_scores(float("nan"))) == set(low)
    oc = R.score_outcomes(_summary(), "semantic_ot", "decoder_cosine", scores=low)
    assert list(oc["score"]) == ["additivity_error", "judge_mean"]
