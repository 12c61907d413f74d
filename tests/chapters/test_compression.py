"""Tests for featmatch.chapters.compression (support of notebook 05) on planted, tiny inputs.

Real parts throughout: activation statistics gathered on a tiny random model
(``_real_parts``), the SmolLM2 tokenizer, :class:`ContextExplanations`, the offline
:class:`ProxyJudge`, a real attribution graph of the tiny model, and the tiny SAE zoo.
The graphs of ``_graph`` are planted inputs (node tables with chosen attributions).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from featmatch import circuits as C
from featmatch.chapters import compression as R
from featmatch.chapters.claims import verdict_outcomes
from featmatch.semantic import ReferenceSpace

from ._real_parts import DEAD, planted_pair, planted_stats, smollm2_tokenizer


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


@pytest.fixture(scope="module")
def contexts():
    """Real ContextExplanations of real statistics (``_real_parts``), SmolLM2 tokenizer."""
    from featmatch.judging.explanations import ContextExplanations

    return ContextExplanations(planted_stats(), smollm2_tokenizer())


def test_describe_feature_never_returns_none(contexts):
    live = int(np.argmax(planted_stats().fire_count[1]))
    d = R.describe_feature(contexts)
    assert d(1, live) == " ; ".join(contexts.examples(1, live)) and d(1, live)
    assert contexts.explain(1, DEAD) is None and contexts.examples(1, DEAD) == []
    assert d(1, DEAD) == "(no activating context recorded)"
    assert R.describe_feature(contexts, missing="-")(1, DEAD) == "-"
    assert R.describe_feature(contexts, mode="explain")(1, live) == contexts.explain(1, live)
    with pytest.raises(ValueError):
        R.describe_feature(contexts, mode="other")


def test_judge_chance_level_pairs_only_features_real_proxy(contexts):
    from featmatch.judging.judges import ProxyJudge

    perm = planted_pair()[3]
    live = int(np.argmax(planted_stats().fire_count[1]))
    judge = ProxyJudge(variant="examples")
    describe = R.describe_feature(contexts)
    # feature `live` of layer 1 and its planted partner in layer 2 fire on the same positions:
    # the only random pair of this graph has two identical texts, which the proxy calls SAME
    g = _graph(layers=(1, 2), feats=())
    feat_rows = pd.DataFrame(
        [
            {"node_id": C.node_id(1, live), "layer": 1, "feature": live, "kind": "feature"},
            {
                "node_id": C.node_id(2, int(perm[live])),
                "layer": 2,
                "feature": int(perm[live]),
                "kind": "feature",
            },
        ]
    ).assign(activation=1.0, frac_active=1.0, attribution=1.0, abs_attribution=1.0)
    g.nodes = pd.concat([g.nodes, feat_rows], ignore_index=True)
    out = R.judge_chance_level(g, judge, describe, n_pairs=5)
    assert len(out) == 1 and list(out["label"]) == [3]
    # more features: only feature nodes are paired, at most n_pairs of them
    g2 = _graph(layers=(1, 2), feats=(1, 2, 3, 4))
    out2 = R.judge_chance_level(g2, judge, describe, n_pairs=5)
    assert len(out2) == 5
    assert not out2["a"].str.endswith("_err").any() and not out2["b"].str.endswith("_err").any()
    assert set(out2["label"]) <= {1, 2, 3}


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


def test_score_outcomes():
    s = _summary()
    oc = R.score_outcomes(s, "semantic_ot", "decoder_cosine").set_index("score")
    assert oc.loc["faithfulness_auc_supernodes", "outcome"] == "win"
    assert oc.loc["additivity_error", "outcome"] == "win"  # lower is better
    assert oc.loc["additivity_error", "difference"] == pytest.approx(0.2)
    assert oc.loc["accuracy_auc_supernodes", "outcome"] == "tie"
    assert oc.loc["judge_mean", "outcome"] == "n/a"
    oc2 = R.score_outcomes(s, "semantic_ot", "sae_match")
    assert list(oc2["outcome"]) == ["tie", "loss", "win", "tie"]
    oc3 = R.score_outcomes(s, "semantic_ot", "sae_match", tol=0.0)
    assert list(oc3["outcome"]) == ["loss", "loss", "win", "tie"]  # |0.60 - 0.61| > 0


def _claims_inputs(f_graph=0.9, n_supernodes=5, n_nodes=50, lin_err=0.05):
    s = _summary().assign(faithfulness_graph=f_graph, n_supernodes=n_supernodes, n_nodes=n_nodes)
    s.loc["layer"] = s.loc["sae_match"]
    lin = pd.DataFrame(
        {
            "layer": [2, 4, 6, 2, 4, 6],
            "scale": [0.01, 0.01, 0.01, 1.0, 1.0, 1.0],
            "rel_error": [lin_err + 0.02, lin_err, lin_err - 0.01, 0.7, 0.8, 0.9],  # medians: lin_err, 0.8
        }
    )
    return s, lin


def test_compression_claims_verdicts_and_texts():
    s, lin = _claims_inputs()
    claims, details = R.compression_claims(s, lin, n_nodes=50)
    assert [c.claim for c in claims[:3]] == [
        "Semantic OT supernodes beat Feature Flow (decoder cosine)",
        "Semantic OT supernodes beat SAE Match",
        "Semantic OT supernodes beat layer adjacency",
    ]
    assert [c.source for c in claims[:3]] == [
        R.paper_source(b) for b in ("decoder_cosine", "sae_match", "layer")
    ]
    # decoder cosine: win, win, tie, n/a -> held; SAE Match and layer: tie, loss, win, tie -> mixed
    assert [c.verdict for c in claims] == ["held", "mixed", "mixed", "held", "held", "held"]
    assert list(details.columns) == ["Feature Flow (decoder cosine)", "SAE Match", "layer adjacency"]
    assert details.loc["additivity_error", "SAE Match"] == "loss"
    for c, label in zip(claims[:3], details.columns, strict=True):
        assert c.verdict == verdict_outcomes(list(details[label]))
    assert "additivity_error loss (0.1 vs 0.05)" in claims[1].ours
    assert claims[3].ours == "5 supernodes / 50 nodes = 0.10"
    assert claims[4].claim == "Node attributions predict the metric change (s = 0.01)"
    assert claims[4].ours == "median relative error 0.050 (s = 1: 0.800)"
    assert claims[5].claim == "The 50-node graph is faithful" and claims[5].ours == "F(graph) = 0.900"


def test_compression_claims_boundaries_and_gate():
    # exactly on the "failed" thresholds: failed (the one boundary rule of claims.py)
    s, lin = _claims_inputs(
        f_graph=R.FAITHFUL_FAILED, n_supernodes=15, n_nodes=50, lin_err=R.LINEARISATION_FAILED
    )
    claims, details = R.compression_claims(s, lin, n_nodes=50)
    assert 15 / 50 == R.COMPRESSION_FAILED
    assert [c.verdict for c in claims[3:]] == ["failed", "failed", "failed"]
    # at the held thresholds: held; between: mixed
    s, lin = _claims_inputs(f_graph=R.FAITHFUL_HELD, n_supernodes=3, n_nodes=20, lin_err=R.LINEARISATION_HELD)
    assert [c.verdict for c in R.compression_claims(s, lin, n_nodes=20)[0][3:]] == ["held", "held", "held"]
    s, lin = _claims_inputs(f_graph=0.6, n_supernodes=4, n_nodes=20, lin_err=0.2)
    assert [c.verdict for c in R.compression_claims(s, lin, n_nodes=20)[0][3:]] == ["mixed"] * 3
    # an unfaithful graph compares only additivity error and judge agreement
    s, lin = _claims_inputs(f_graph=0.2)
    _, details = R.compression_claims(s, lin, n_nodes=50)
    assert list(details.index) == ["additivity_error", "judge_mean"]
    s, lin = _claims_inputs(f_graph=float("nan"))
    assert R.compression_claims(s, lin, n_nodes=50)[0][5].verdict == "not tested"


def test_paper_source_is_built_from_paper_accuracy():
    acc = R.PAPER_ACCURACY
    for base in ("decoder_cosine", "sae_match"):
        src = R.paper_source(base)
        assert src.startswith("paper §2.6 (")
        for model in ("GPT-2 small", "Gemma-2-2B"):
            assert f"{acc['semantic_ot'][model]:.2f} vs {acc[base][model]:.2f}" in src
    assert R.paper_source("layer") == "featmatch (not in the paper)"


def test_thresholds_put_held_on_the_good_side():
    assert R.COMPRESSION_HELD < R.COMPRESSION_FAILED and R.LINEARISATION_HELD < R.LINEARISATION_FAILED
    assert R.FAITHFUL_HELD > R.FAITHFUL_FAILED >= R.MIN_FAITHFULNESS


def test_comparison_table_layout():
    t = R.comparison_table(_summary(), "smollm2-135m + zoo")
    assert list(t.index) == ["Semantic OT", "Feature Flow (decoder cosine)", "SAE Match"]
    assert t.columns.nlevels == 2
    for model in ("GPT-2 small", "Gemma-2-2B"):
        paper = t[(f"paper: {model}", "accuracy (undefined)")]
        assert list(paper) == [
            R.PAPER_ACCURACY[k][model] for k in ("semantic_ot", "decoder_cosine", "sae_match")
        ]
    acc = t[("ours: smollm2-135m + zoo", "accuracy kept %")]
    assert list(acc) == pytest.approx([50.0, 50.0, 40.0])
    other = R.comparison_table(_summary().rename(index={"sae_match": "layer"}), "m")
    assert np.isnan(other.loc["layer adjacency", ("paper: GPT-2 small", "accuracy (undefined)")])


def test_profile_defaults_name_layers_of_the_zoo():
    from featmatch.chapters.setup import chapter_defaults
    from featmatch.saes import sae_set

    zoo_layers = set(sae_set("featmatch-smollm2-tiny").layers)
    for profile in ("tiny", "quick", "full", "a-hub-run"):
        p = chapter_defaults("compression", profile, LAYERS=None, N_PROMPTS=None, NODE_BUDGET=None)
        assert p["LAYERS"] == sorted(p["LAYERS"]) and set(p["LAYERS"]) <= zoo_layers
        assert p["NODE_BUDGET"] > len(p["LAYERS"]) and p["N_PROMPTS"] >= 1
    assert chapter_defaults("compression", "tiny", N_PROMPTS=7)["N_PROMPTS"] == 7


def test_supernode_overview():
    g = _graph(layers=(0, 1), feats=(0, 1, 2))
    by_layer = C.supernodes(g, C.layer_distance(g), n_clusters=2, name="layer")
    out = R.supernode_overview(g, {"layer": by_layer})
    col = out["layer adjacency"]
    assert col["feature supernodes"] == 2 and col["supernodes (error singletons included)"] == 4
    assert col["share of feature supernodes spanning >1 layer"] == 0.0


def _zoo_built(layers) -> bool:
    from featmatch.saes._sae import load_layer_sae

    try:
        for L in layers:
            load_layer_sae("featmatch-smollm2-tiny", L)
    except FileNotFoundError:
        return False
    return True


class _NoWeights:
    """Stands in for the SmolLM2 HookedTransformer: loading its weights costs 10-30 s and
    ``load_circuit_setup`` only hands the model on and reads its (real) tokenizer."""

    def __init__(self):
        self.tokenizer = smollm2_tokenizer()


def test_load_circuit_setup_loads_only_requested_layers_of_the_real_zoo(monkeypatch):
    import featmatch.chapters.setup
    import featmatch.lm.models
    from featmatch.lm.corpus import token_batches
    from featmatch.saes._sae import load_layer_sae

    if not _zoo_built([2, 4]):
        pytest.skip("the tiny zoo is not built (featmatch zoo build --profile tiny)")

    def no_setup(**kw):  # load_setup would build every layer of the zoo
        raise AssertionError(f"load_setup called with {kw}")

    monkeypatch.setattr(featmatch.lm.models, "load_model", lambda name: _NoWeights())
    monkeypatch.setattr(featmatch.chapters.setup, "load_setup", no_setup)
    s = R.load_circuit_setup(layers=[4, 2], n_tokens=256, seq_len=16, seed=1, profile="tiny")
    assert s.layers == [4, 2] and list(s.saes) == [4, 2] and s.sae_set == "featmatch-smollm2-tiny"
    for L in (2, 4):
        ref = load_layer_sae("featmatch-smollm2-tiny", L)
        assert (
            torch.equal(s.saes[L].W_enc, ref.W_enc)
            and s.saes[L].cfg.metadata.hook_name == ref.cfg.metadata.hook_name
        )
    want = token_batches(s.tokenizer, n_tokens=256, seq_len=16, split="eval", seed=1)
    assert torch.equal(s.tokens, want) and s.profile == "tiny" and s.model_name == "smollm2-135m"


def test_load_circuit_setup_defers_to_load_setup(monkeypatch, tmp_cache):
    import featmatch.chapters.setup

    calls = []

    def record(**kw):  # the real load_setup would train the missing zoo (minutes)
        calls.append(kw)
        return "from load_setup"

    monkeypatch.setattr(featmatch.chapters.setup, "load_setup", record)
    # tmp_cache: an empty featmatch cache, so no zoo layer is built
    assert R.load_circuit_setup(layers=[3, 5], n_tokens=256, seq_len=8, profile="tiny") == "from load_setup"
    assert calls[-1] == dict(
        model="smollm2-135m", sae_set=None, layers=[3, 5], n_tokens=256, seq_len=8, seed=0, profile="tiny"
    )
    assert R.load_circuit_setup(layers=None, profile="tiny") == "from load_setup"
    assert R.load_circuit_setup(sae_set="gpt2-small-res-jb", layers=[1], profile="tiny") == "from load_setup"
    assert calls[-1]["sae_set"] == "gpt2-small-res-jb" and len(calls) == 3


def test_pick_prompts_and_linearisation_layers():
    task = C.TaskTokens(tokens=[torch.tensor([0, i + 1]) for i in range(10)], answer_ids=list(range(10)))
    picked = R.pick_prompts(task, 4, seed=3)
    assert len(picked) == 4 and picked.answer_ids == sorted(picked.answer_ids)
    assert R.pick_prompts(task, 4, seed=3).answer_ids == picked.answer_ids
    assert R.pick_prompts(task, 4, seed=4).answer_ids != picked.answer_ids
    assert len(R.pick_prompts(task, 50)) == 10
    assert R.linearisation_layers([2, 4, 6]) == [2, 6]
    assert R.linearisation_layers([6, 2]) == [2, 6] and R.linearisation_layers([5]) == [5]
    assert R.linearisation_layers([2, 4, 6], [4]) == [4]


def test_stopwatch_records_laps_and_total():
    sw = R.Stopwatch()
    ticks = iter([1.0, 3.5, 4.0, 10.0])
    sw._start = sw._last = 0.0
    sw._clock = lambda: next(ticks)  # a fake clock, to check the arithmetic exactly
    sw.lap("a")
    sw.lap("b")
    assert sw.laps == {"a": 1.0, "b": 2.5}
    sw.lap("c")
    t = sw.table()
    assert list(t.index) == ["a", "b", "c", "total"] and list(t["seconds"]) == [1.0, 2.5, 0.5, 10.0]


# ----------------------------------------------------------------------------- real graph
@pytest.fixture(scope="module")
def real_graph():
    """A real attribution graph of a tiny random model over three layers of ReLU SAEs, with
    real activation statistics and a reference space on other tokens of the same model."""
    from _builders import standard_sae, tiny_model, tiny_tokens

    from featmatch.lm.activations import gather
    from featmatch.semantic import reference_coordinates

    torch.manual_seed(0)
    model = tiny_model(n_layers=3)
    saes = {
        L: standard_sae(d_in=16, d_sae=32, seed=10 + L, hook_name=f"blocks.{L}.hook_resid_post")
        for L in (0, 1, 2)
    }
    toks = tiny_tokens(n_seq=8, seq_len=8, seed=0)
    with torch.no_grad():
        top2 = model(toks)[:, -1].topk(2, dim=-1).indices
    task = C.TaskTokens(
        tokens=list(toks), answer_ids=top2[:, 0].tolist(), counterfactual_ids=top2[:, 1].tolist()
    )
    graph = C.attribution_graph(model, saes, task, node_budget=30)
    corpus = tiny_tokens(n_seq=16, seq_len=16, seed=1)
    stats = gather(model, saes, corpus, n_samples=16, seed=0, cache=False, progress=False)
    ref = reference_coordinates(model, corpus, space="layer:1", pca_k=4)
    return model, saes, task, graph, stats, ref


def test_node_distances_and_groups_on_a_real_graph(real_graph):
    model, saes, _, graph, stats, ref = real_graph
    D, missing = R.node_distances(graph, saes, stats.samples, ref, seed=0)
    n = len(graph.feature_nodes())
    assert list(D) == list(R.METHOD_LABELS)
    for key, d in D.items():
        assert d.shape == (n, n) and np.isfinite(d).all(), key
    sem, _ = R.semantic_ot_distance(graph, stats.samples, ref, seed=0)
    np.testing.assert_array_equal(D["semantic_ot"], sem)
    np.testing.assert_array_equal(D["decoder_cosine"], C.decoder_cosine_distance(graph, saes))
    fn = graph.feature_nodes()
    never = {
        C.node_id(L, f)
        for L, f in zip(fn["layer"], fn["feature"], strict=True)
        if stats.fire_count[L][f] == 0
    }
    assert set(missing) == never
    groups = R.group_by_distance(graph, D, fraction=0.2)
    assert list(groups) == list(D)
    for key, g in groups.items():
        assert g.method == R.METHOD_LABELS[key]
        assert g.n_supernodes == C.supernodes(graph, D[key], fraction=0.2).n_supernodes
    by_layer = groups["layer"].table(graph)
    feat = by_layer[by_layer["kind"] == "feature"]
    assert (feat["max_layer"] - feat["min_layer"] <= 1).all()  # layer adjacency keeps layers together


def test_export_circuit_writes_valid_json_and_a_broken_copy_is_rejected(real_graph, tmp_path):
    # (this check ran inside notebook 05 before; a test is its place)
    import json

    from featmatch.judging.explanations import ContextExplanations

    model, saes, task, graph, stats, ref = real_graph
    D, _ = R.node_distances(graph, saes, stats.samples, ref, seed=0)
    groups = R.group_by_distance(graph, D, fraction=0.2)
    explainer = ContextExplanations(stats, smollm2_tokenizer())
    path, nodes, links, supernodes = R.export_circuit(
        tmp_path / "circuit.json",
        graph,
        groups["semantic_ot"],
        model_name="tiny",
        sae_set="planted",
        tokenizer=smollm2_tokenizer(),
        prompt=task.tokens[0],
        explainer=explainer,
        n_layers=model.cfg.n_layers,
    )
    assert path == tmp_path / "circuit.json" and path.exists()
    assert len(nodes) == graph.n_nodes + 1  # plus the metric node
    assert len(supernodes) == groups["semantic_ot"].n_supernodes
    obj = json.loads(path.read_text())
    assert obj["metadata"]["slug"] == "featmatch-tiny-digit-addition"
    texts = []
    for r in graph.feature_nodes().itertuples():
        row = nodes[(nodes.layer.astype(int) == r.layer) & (nodes.feature.astype(int) == r.feature)]
        assert len(row) == 1
        assert row.clerp.iloc[0] == (explainer.explain(r.layer, r.feature) or "")[:120]
        texts.append(row.clerp.iloc[0])
    assert any(texts)  # some feature nodes carry their contexts
    broken = {**obj, "nodes": [{k: v for k, v in n.items() if k != "feature"} for n in obj["nodes"]]}
    with pytest.raises(ValueError, match="missing required field 'feature'"):
        C.validate_graph_json(broken)
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="feature"):
        C.load_graph_json(path)


def test_compared_scores_gate_on_graph_faithfulness():
    assert R.compared_scores(0.9) == R.COMPARED_SCORES
    low = R.compared_scores(0.2)
    assert set(low) == {"additivity_error", "judge_mean"} and low["additivity_error"] is False
    assert set(R.compared_scores(float("nan"))) == set(low)
    oc = R.score_outcomes(_summary(), "semantic_ot", "decoder_cosine", scores=low)
    assert list(oc["score"]) == ["additivity_error", "judge_mean"]
