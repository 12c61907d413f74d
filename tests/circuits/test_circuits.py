"""Tests for featmatch.circuits on tiny TransformerLens models with planted structure."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _builders import jumprelu_sae, standard_sae, tiny_model, tiny_tokens

from featmatch import circuits as C

LAYERS = (0, 1, 2)


def _saes(layers=LAYERS, d_in=16, d_sae=32, kind=standard_sae):
    return {
        L: kind(d_in=d_in, d_sae=d_sae, seed=10 + L, hook_name=f"blocks.{L}.hook_resid_post") for L in layers
    }


def _correct_task(model, n_seq=8, seq_len=8, seed=0, counterfactual=True) -> C.TaskTokens:
    """Prompts whose answer is the model's own greedy token (planted: all correct)."""
    toks = tiny_tokens(n_seq=n_seq, seq_len=seq_len, d_vocab=model.cfg.d_vocab, seed=seed)
    with torch.no_grad():
        last = model(toks)[:, -1]
    top2 = last.topk(2, dim=-1).indices
    return C.TaskTokens(
        tokens=list(toks),
        answer_ids=top2[:, 0].tolist(),
        counterfactual_ids=top2[:, 1].tolist() if counterfactual else None,
    )


def _linear_model(n_layers=3, d_model=16, d_vocab=50, seed=0, identity_after=0):
    """No LayerNorm, and every block after ``identity_after`` zeroed (an identity map), so the
    logits are an affine function of the residual stream at ``identity_after``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=4,
        n_heads=d_model // 4,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=32,
        act_fn="gelu",
        normalization_type=None,
        seed=seed,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for blk in model.blocks[identity_after + 1 :]:
            blk.attn.W_O.zero_()
            blk.attn.b_O.zero_()
            blk.mlp.W_out.zero_()
            blk.mlp.b_out.zero_()
    return model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model(n_layers=3)
    saes = _saes()
    task = _correct_task(model)
    graph = C.attribution_graph(model, saes, task, node_budget=30)
    return model, saes, task, graph


# ----------------------------------------------------------------------------- linearisation
def test_attributions_sum_to_metric_change_on_linear_model():
    """Planted near-linear setup: logits affine in the layer-0 residual. Σ attributions of a
    layer's nodes (features + error) equals the true zero-ablation change up to float error."""
    model = _linear_model(identity_after=0)
    saes = _saes(layers=(0, 1))
    task = _correct_task(model)
    df = C.linearisation_check(model, saes, task, scales=(1.0, 0.5))
    print("\nlinear planted model:\n", df.to_string())
    assert (df["rel_error"] < 1e-4).all()
    assert (df["actual"].abs() > 1e-3).all()


def test_linearisation_error_is_second_order_on_layernorm_model(setup):
    model, saes, task, _ = setup
    df = C.linearisation_check(model, saes, task, scales=(1.0, 0.1, 0.01))
    print("\ntiny LN model:\n", df.to_string())
    for _L, d in df.groupby("layer"):
        if d.set_index("scale")["actual"].abs()[0.1] < 1e-4:
            continue  # last layer: ln_final is scale-invariant, both sides are ~0 (float noise)
        e = d.set_index("scale")["abs_error"]
        assert e[0.01] < 0.05 * e[0.1] + 1e-7  # O(s^2): 100x smaller for 10x smaller s
        assert d.set_index("scale")["rel_error"][0.01] < 0.3


def test_edges_match_analytic_values_on_linear_model():
    """With identity blocks between the SAE layers the Jacobian is analytic:
    w(u->d) = mean_n a_u 1[a_d>0] <W_dec0[u], W_enc1[:, d]> <W_dec1[d], w_m> at the last position."""
    model = _linear_model(identity_after=0)
    saes = _saes(layers=(0, 1))
    task = _correct_task(model)
    g = C.attribution_graph(model, saes, task, node_budget=40)
    toks = torch.stack(task.tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
        x = cache["blocks.0.hook_resid_post"][:, -1]
        a0 = saes[0].encode(x)
        a1 = saes[1].encode(x)
    ans = torch.tensor([a[0] for a in task.answer_ids])
    cf = torch.tensor(task.counterfactual_ids)
    w_m = (model.W_U[:, ans] - model.W_U[:, cf]).T.detach()  # (n, d)
    e = g.edges[(g.edges.src_layer == 0) & (g.edges.dst_layer == 1)]
    e = e[~e.src.str.endswith("err") & ~e.dst.str.endswith("err")]
    assert len(e) > 5
    W0, E1, W1 = saes[0].W_dec.detach(), saes[1].W_enc.detach(), saes[1].W_dec.detach()
    for r in e.head(15).itertuples():
        u, d = int(r.src.split("_")[1]), int(r.dst.split("_")[1])
        expect = (a0[:, u] * (a1[:, d] > 0) * (W0[u] @ E1[:, d]) * (w_m @ W1[d])).mean()
        assert r.weight == pytest.approx(float(expect), rel=1e-3, abs=1e-6)


def test_graph_tables(setup):
    _, saes, task, g = setup
    assert g.n_nodes == 30
    assert list(g.nodes.columns[:4]) == ["node_id", "layer", "feature", "kind"]
    assert set(g.nodes["kind"]) <= {"feature", "error"}
    # pruning keeps the largest |attribution|
    cut = g.nodes["abs_attribution"].min()
    assert (g.candidates["abs_attribution"] > cut).sum() <= 30
    assert g.metric == pytest.approx(np.mean(g.meta["metric_per_prompt"]))
    assert g.metric_name == "logit_diff"
    # edges only between consecutive chosen layers, or from the last layer to the metric
    pairs = set(zip(g.edges.src_layer, g.edges.dst_layer, strict=False))
    assert pairs <= {(0, 1), (1, 2), (2, 3)}
    last = g.edges[g.edges.dst == C.LOGIT_NODE]
    assert np.allclose(
        last.set_index("src")["weight"].sort_index(),
        g.nodes[g.nodes.layer == 2].set_index("node_id")["attribution"].sort_index(),
    )


def test_hook_layer_mismatch_is_rejected():
    model = tiny_model()
    sae = standard_sae(hook_name="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="layer 1"):
        C.attribution_graph(model, {1: sae}, _correct_task(model))


# ----------------------------------------------------------------------------- faithfulness
def test_faithfulness_full_is_one_empty_is_zero(setup):
    model, saes, task, g = setup
    ref = tiny_tokens(n_seq=6, seq_len=10, seed=5)
    means = C.ablation_means(model, saes, ref)
    df = C.faithfulness(model, saes, g, [C.all_nodes(saes), set()], means=means)
    print("\nfaithfulness:\n", df.to_string())
    assert df["faithfulness"].iloc[0] == pytest.approx(1.0, abs=1e-4)  # spliced forward == model
    assert df["metric"].iloc[0] == pytest.approx(df["m_full"].iloc[0], abs=1e-4)
    assert df["faithfulness"].iloc[1] == 0.0
    # m(empty) independently: the last SAE layer's stream (positions >= 1) set to its mean
    with torch.no_grad():
        _, cache = model.run_with_cache(ref, names_filter="blocks.2.hook_resid_post")
        mean_x = cache["blocks.2.hook_resid_post"][:, 1:].reshape(-1, 16).mean(0)

        def fn(x, hook):
            x = x.clone()
            x[:, 1:] = mean_x
            return x

        vals = []
        for idx in task.groups():
            toks, ans, cf = task.batch(idx)
            lg = model.run_with_hooks(toks, fwd_hooks=[("blocks.2.hook_resid_post", fn)])[:, -1]
            vals.append((lg.gather(1, ans[:, None]) - lg.gather(1, cf[:, None]))[:, 0])
    assert df["m_empty"].iloc[0] == pytest.approx(float(torch.cat(vals).mean()), abs=1e-4)


def test_compression_scores(setup):
    model, saes, _, g = setup

    class SameLayerJudge:
        def score(self, a, b):
            return type("J", (), {"label": 3 if a.split(":")[0] == b.split(":")[0] else 1})()

    cos = C.supernodes(g, C.decoder_cosine_distance(g, saes), fraction=0.2, name="decoder cosine")
    layer = C.supernodes(g, C.layer_distance(g), n_clusters=3, name="layer")
    summary, curves = C.compare_methods(
        model, saes, g, {"layer": layer}, judge=SameLayerJudge(), describe=lambda L, f: f"{L}:{f}"
    )
    assert summary.loc["layer", "judge_mean"] == 3.0  # layer supernodes hold one layer each
    means = C.ablation_means(model, saes, g.task)
    eff = C.node_ablation_effects(model, saes, g, means=means)
    sc = C.compression_scores(model, saes, g, cos, means=means, node_effects=eff)
    for sn, row, c in [
        (layer, summary.loc["layer"], curves[curves.level == "supernode"]),
        (cos, pd.Series(sc.summary), sc.curve[sc.curve.level == "supernode"]),
    ]:
        assert row["compression_ratio"] == pytest.approx(g.n_nodes / sn.n_supernodes)
        assert c["n_nodes"].iloc[-1] == g.n_nodes and c["faithfulness"].iloc[0] == 0.0
        assert c["faithfulness"].iloc[-1] == pytest.approx(row["faithfulness_graph"])
        assert 0.0 <= row["accuracy_graph"] <= 1.0
    single = sc.table[sc.table.n_members == 1]
    assert np.allclose(single["effect"], single["sum_member_effects"], atol=1e-5)  # singleton coherence
    assert np.isnan(sc.summary["judge_mean"])  # no judge given


# ----------------------------------------------------------------------------- prompts
class _CharTokenizer:
    """Character-level stand-in for a HF tokenizer (BOS id 0, ids < 50)."""

    bos_token_id = 0
    bos_token = "<s>"
    padding_side = "right"

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        out = []
        if text.startswith(self.bos_token):
            out.append(0)
            text = text[len(self.bos_token) :]
        return out + [self.vocab.setdefault(ch, 1 + len(self.vocab) % 49) for ch in text]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv.get(int(i), "?") for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return self.bos_token + "user: " + messages[0]["content"] + "\nassistant: "


def test_digit_prompts_tokenise_and_report_per_format():
    model = tiny_model(n_ctx=96)
    model.tokenizer = _CharTokenizer()
    task = C.digit_addition_prompts(
        formats=["plus_is", "symbolic", "chat_question"], tokenizer=model.tokenizer, n_per_format=10
    )
    assert len(task) == 3 * 10 and set(task.formats) == {"plus_is", "symbolic", "chat_question"}
    tt = C.tokenize_task(model, task)
    assert all(len(a) == 1 for a in tt.answer_ids)  # single-digit answers are one token
    assert all(int(t[0]) == 0 and int((t == 0).sum()) == 1 for t in tt.tokens)  # exactly one BOS
    res = C.answer_accuracy(model, tt)
    acc = C.accuracy_by_format(res)
    assert list(acc["format"]) == ["plus_is", "symbolic", "chat_question"]
    assert (acc["n"] == 10).all() and acc["accuracy"].between(0, 1).all()
    # a whitespace token leading the answer moves into the prompt (metric reads the digit)
    own = C.tokenize_task(model, C.TaskPrompts(["1 plus 2 is"], [" 3"], counterfactuals=[" 4"]))
    assert own.prompts == ["1 plus 2 is "] and len(own.answer_ids[0]) == 1
    assert (
        model.tokenizer.decode(own.answer_ids[0]) == "3"
        and model.tokenizer.decode([own.counterfactual_ids[0]]) == "4"
    )
    with pytest.raises(ValueError, match="tokenizer"):
        C.digit_addition_prompts(formats=["chat_question"])


def test_never_correct_prompt_set_gives_clear_message():
    model = tiny_model()
    toks = tiny_tokens(n_seq=6, seq_len=8)
    with torch.no_grad():
        worst = model(toks)[:, -1].argmin(-1)
    task = C.TaskTokens(tokens=list(toks), answer_ids=worst.tolist(), formats=["bad"] * 6)
    with pytest.raises(ValueError, match=r"answers 0 of 6 prompts correctly.*bad: 0/6"):
        C.keep_correct(model, task)
    # mixed set: exactly the planted-correct prompts survive
    good = _correct_task(model, n_seq=6)
    mixed = C.TaskTokens(
        tokens=list(toks) + good.tokens,
        answer_ids=worst.tolist() + good.answer_ids,
        formats=["bad"] * 6 + ["good"] * 6,
    )
    kept, res = C.keep_correct(model, mixed)
    assert len(kept) == 6 and set(kept.formats) == {"good"}
    assert res["correct"].sum() == 6


# ----------------------------------------------------------------------------- clustering
def _fake_graph(layers, n_per_layer, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for L in layers:
        for f in rng.choice(64, n_per_layer, replace=False):
            rows.append({"node_id": C.node_id(L, f), "layer": L, "feature": int(f), "kind": "feature"})
        rows.append({"node_id": C.node_id(L, -1), "layer": L, "feature": -1, "kind": "error"})
    nodes = pd.DataFrame(rows)
    nodes["activation"] = 1.0
    nodes["frac_active"] = 1.0
    nodes["attribution"] = rng.normal(size=len(nodes))
    nodes["abs_attribution"] = nodes["attribution"].abs()
    task = C.TaskTokens(tokens=[torch.tensor([0, 1, 2])], answer_ids=[3])
    edges = pd.DataFrame(columns=["src", "dst", "weight", "src_layer", "dst_layer"])
    return C.AttributionGraph(nodes, edges, 1.0, "answer_logit", tuple(layers), task, nodes.copy())


def test_clustering_target_size_deterministic_and_planted_blocks():
    g = _fake_graph((0, 1, 2, 3), 10)
    n = len(g.feature_nodes())
    rng = np.random.default_rng(1)
    block = rng.integers(0, 4, n)  # planted groups cutting across layers
    D = np.where(block[:, None] == block[None, :], 0.1, 1.0) + 0.01 * rng.random((n, n))
    D = 0.5 * (D + D.T)
    np.fill_diagonal(D, 0)
    sn = C.supernodes(g, D, n_clusters=4, name="planted")
    feat_labels = sn.labels[(g.nodes.kind == "feature").to_numpy()]
    assert len(np.unique(feat_labels)) == 4
    assert pd.crosstab(feat_labels, block).gt(0).sum(axis=1).eq(1).all()  # recovers the blocks
    assert sn.n_supernodes == 4 + 4  # plus one singleton per error node
    for k in (1, 3, 7, n):
        a = C.supernodes(g, D, n_clusters=k)
        b = C.supernodes(g, D.copy(), n_clusters=k)
        assert np.array_equal(a.labels, b.labels) and len(np.unique(a.labels[: n + 4])) >= 1
        assert a.meta["n_clusters"] == k and a.n_supernodes == k + 4
    assert C.supernodes(g, D, fraction=0.1).meta["n_clusters"] == 4  # round(0.1 * 40)


def test_layer_adjacency_groups_by_layer():
    g = _fake_graph((2, 5, 9), 7)
    D = C.layer_distance(g)
    sn = C.supernodes(g, D, n_clusters=3, name="layer")
    df = sn.to_frame(g)
    feats = df[df.kind == "feature"]
    assert feats.groupby("supernode")["layer"].nunique().eq(1).all()
    assert feats.groupby("layer")["supernode"].nunique().eq(1).all()
    # more clusters than layers still never mixes layers, and hits the target exactly
    sn6 = C.supernodes(g, D, n_clusters=6)
    f6 = sn6.to_frame(g)
    f6 = f6[f6.kind == "feature"]
    assert f6["supernode"].nunique() == 6 and f6.groupby("supernode")["layer"].nunique().eq(1).all()


def test_distance_builders(setup):
    _, saes, _, g = setup
    n = len(g.feature_nodes())
    for D in (C.decoder_cosine_distance(g, saes), C.sae_match_distance(g, saes), C.layer_distance(g)):
        assert D.shape == (n, n) and np.allclose(D, D.T) and np.allclose(np.diag(D), 0)
    with pytest.raises(ValueError, match="shape"):
        C.supernodes(g, np.zeros((n + 1, n + 1)))
    # folded SAE Match cost on JumpReLU SAEs: theta scales the decoder rows (Eq. 4)
    j = {L: jumprelu_sae(seed=L, hook_name=f"blocks.{L}.hook_resid_post") for L in LAYERS}
    fn = g.feature_nodes()
    (i, ri), (k, rk) = list(fn.iloc[[0, -1]].iterrows())
    with torch.no_grad():
        Wi = j[ri.layer].W_dec[ri.feature] * j[ri.layer].threshold[ri.feature]
        Wk = j[rk.layer].W_dec[rk.feature] * j[rk.layer].threshold[rk.feature]
    D = C.sae_match_distance(g, j)
    assert D[0, -1] == pytest.approx(float(((Wi - Wk) ** 2).mean()), rel=1e-5)


# ----------------------------------------------------------------------------- export
def test_export_roundtrip_and_validation(setup, tmp_path):
    _, saes, _, g = setup
    sn = C.supernodes(g, C.decoder_cosine_distance(g, saes), fraction=0.2, name="cos")
    path = C.export_graph_json(tmp_path / "g.json", g, sn, slug="tiny", scan="tiny-model")
    obj = C.load_graph_json(path)
    assert len(obj["nodes"]) == g.n_nodes + 1  # + metric node
    assert len(obj["qParams"]["supernodes"]) == sn.n_supernodes
    assert sum(len(s) - 1 for s in obj["qParams"]["supernodes"]) == g.n_nodes
    assert [s[0] for s in obj["qParams"]["supernodes"]] == sn.names
    # the fields Neuronpedia's frontend requires, with their types
    md = obj["metadata"]
    assert all(isinstance(md[k], str) for k in ("slug", "scan", "prompt"))
    assert md["prompt_tokens"] and all(isinstance(t, str) for t in md["prompt_tokens"])
    for n in obj["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"} <= set(n)
        assert n["feature"] is None or (isinstance(n["feature"], int) and not isinstance(n["feature"], bool))
        assert (n["feature"] is None) == (n["feature_type"] == "mlp reconstruction error")
    ids = {n["node_id"] for n in obj["nodes"]}
    assert all(lk["source"] in ids and lk["target"] in ids for lk in obj["links"])
    assert all(isinstance(lk["weight"], float) for lk in obj["links"])
    # exact round trip: node table, link weights (in order) and supernode membership
    nodes, links, supers = C.graph_from_json(obj)
    back = nodes[nodes.feature_type != "logit"].reset_index(drop=True)
    assert back["layer"].tolist() == g.nodes["layer"].tolist()
    assert back["feature"].tolist() == g.nodes["feature"].tolist()
    assert back["attribution"].tolist() == g.nodes["attribution"].tolist()  # exact floats
    assert links["weight"].tolist() == g.edges["weight"].tolist()
    to_fm = {n["node_id"]: C.node_id(n["featmatch_layer"], n["featmatch_feature"]) for n in obj["nodes"][:-1]}
    to_fm[obj["nodes"][-1]["node_id"]] = C.LOGIT_NODE
    assert [to_fm[s] for s in links["source"]] == g.edges["src"].tolist()
    assert [to_fm[t] for t in links["target"]] == g.edges["dst"].tolist()
    for k, s in enumerate(supers):
        assert [to_fm[x] for x in s[1:]] == sn.members(g, k)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file

    bad = json.loads(json.dumps(obj))
    del bad["nodes"][0]["feature"]
    del bad["nodes"][1]["clerp"]
    del bad["metadata"]["slug"]
    bad["metadata"]["prompt_tokens"] = [1, 2]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"nodes\[0\]: missing required field 'feature'") as exc:
        C.load_graph_json(tmp_path / "bad.json")
    assert "metadata: missing required field 'slug'" in str(exc.value)
    assert "nodes[1]: missing required field 'clerp'" in str(exc.value)
    assert "prompt_tokens: expected a list of strings" in str(exc.value)
    assert str(tmp_path / "bad.json") in str(exc.value)
    bad2 = json.loads(json.dumps(obj))
    del bad2["qParams"]  # optional
    C.validate_graph_json(bad2)
    bad2["links"][0]["target"] = "nope"
    bad2["qParams"] = {"supernodes": [["x", "nope2"]]}
    with pytest.raises(ValueError, match="unknown node 'nope'.*unknown node 'nope2'"):
        C.validate_graph_json(bad2)


def test_plot_compressed_graph(setup):
    import matplotlib.pyplot as plt

    _, saes, _, g = setup
    sn = C.supernodes(g, C.decoder_cosine_distance(g, saes), fraction=0.2, name="cos")
    fig, ax = plt.subplots()
    out = C.plot_compressed_graph(g, sn, ax=ax)
    assert out is ax
    assert len(ax.patches) == sn.n_supernodes + 1  # boxes + metric node
    plt.close(fig)


# ----------------------------------------------------------------------------- within-layer additivity
def test_within_layer_additivity_is_zero_where_the_model_is_linear(setup):
    """Planted truth: with no LayerNorm and the blocks after layer 0 zeroed, the logit difference is
    affine in layer 0's residual, and a mean-ablated feature moves it by a fixed vector: the joint
    effect of any set of layer-0 features is the sum of their single effects (E = 0)."""
    torch.manual_seed(0)
    model = _linear_model(identity_after=0)
    saes = _saes(layers=(0,))
    task = _correct_task(model)
    g = C.attribution_graph(model, saes, task, node_budget=24)
    means = C.ablation_means(model, saes, task)
    groupings = {
        "cos": C.supernodes(g, C.decoder_cosine_distance(g, saes), n_clusters=4, name="cos"),
        "one": C.supernodes(g, C.layer_distance(g), n_clusters=1, name="one"),
    }
    add = C.within_layer_additivity(model, saes, g, groupings, task, means)
    n_feat = len(g.feature_nodes())
    assert add.members["one"] == n_feat and add.groups["one"] == 1  # one group: every feature
    for k in groupings:
        assert add.den[k].sum() > 0
        assert add.num[k].sum() / add.den[k].sum() < 1e-5  # float32 forwards: exact up to rounding

    # the non-linear tiny model (LayerNorm, three SAE layers re-encoding downstream) is not additive
    model, saes, task, g = setup
    means = C.ablation_means(model, saes, task)
    one = C.supernodes(g, C.layer_distance(g), n_clusters=3, name="layer")
    add = C.within_layer_additivity(model, saes, g, {"layer": one}, task, means)
    e, lo, hi = C.ratio_ci(add.num["layer"], add.den["layer"])
    assert e > 1e-3 and lo <= e <= hi


def test_ratio_diff_ci_is_paired_and_exact_on_planted_ratios():
    rng = np.random.default_rng(0)
    den_a, den_b = rng.uniform(1, 2, 40), rng.uniform(1, 2, 40)
    d, lo, hi = C.ratio_diff_ci(0.5 * den_a, den_a, 0.2 * den_b, den_b)
    assert d == pytest.approx(0.3) and lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    num = rng.normal(1, 0.3, 40)
    d, lo, hi = C.ratio_diff_ci(num, den_a, num, den_a)
    assert d == 0 and lo == pytest.approx(0) and hi == pytest.approx(0)  # same prompts resampled jointly
    with pytest.raises(ValueError, match="one value per unit"):
        C.ratio_diff_ci(num, den_a[:3], num, den_a)
