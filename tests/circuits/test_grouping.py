"""Automatic supernodes for circuit-tracer graphs (planted groups), the CLI, and the
faithfulness-curve helpers on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _builders import standard_sae, tiny_model, tiny_tokens

from featmatch import circuits as C
from featmatch.cli import main


def _planted_graph(n_groups=3, per_group=4, n_inputs=6, seed=0, noise=0.05):
    """A graph in circuit-tracer's format: embeddings -> features -> logits.

    Features of group g read from inputs {2g, 2g+1} and write to logit g, with random
    positive scales per feature (so profiles are proportional within a group, not equal),
    plus small dense noise on every possible link."""
    rng = np.random.default_rng(seed)
    ctx = 5
    emb = [f"E_{100 + i}_{i % ctx}" for i in range(n_inputs)]
    logits = [f"27_{900 + g}_{ctx}" for g in range(n_groups)]
    nodes = [
        {
            "node_id": e,
            "feature": 100 + i,
            "layer": "E",
            "ctx_idx": i % ctx,
            "feature_type": "embedding",
            "jsNodeId": f"E_{100 + i}-{i % ctx}",
            "clerp": f"token {i}",
        }
        for i, e in enumerate(emb)
    ]
    feats, truth = [], {}
    order = rng.permutation(n_groups * per_group)  # interleave the groups in file order
    for j in order:
        g, k = divmod(int(j), per_group)
        layer = 2 + 3 * g + k % 2
        nid = f"{layer}_{1000 + j}_{ctx}"
        feats.append(nid)
        truth[nid] = g
        nodes.append(
            {
                "node_id": nid,
                "feature": 1000 + int(j),
                "layer": str(layer),
                "ctx_idx": ctx,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{1000 + j}-0",
                "clerp": f"group {g} feature {k}",
                "influence": float(rng.uniform()),
            }
        )
    nodes.append(
        {
            "node_id": f"10_-1_{ctx}",
            "feature": None,
            "layer": "10",
            "ctx_idx": ctx,
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"10_-1-{ctx}",
            "clerp": "",
        }
    )
    nodes += [
        {
            "node_id": lg,
            "feature": 900 + g,
            "layer": "27",
            "ctx_idx": ctx,
            "feature_type": "logit",
            "jsNodeId": f"L_{900 + g}-{ctx}",
            "clerp": f"answer {g}",
            "is_target_logit": g == 0,
        }
        for g, lg in enumerate(logits)
    ]
    links = []
    for f in feats:
        g, s = truth[f], rng.uniform(0.5, 2.0)
        for i, e in enumerate(emb):
            links.append(
                {"source": e, "target": f, "weight": float(s * (i // 2 == g) + noise * rng.normal())}
            )
        for h, lg in enumerate(logits):
            links.append({"source": f, "target": lg, "weight": float(s * (h == g) + noise * rng.normal())})
    obj = {
        "metadata": {
            "slug": "planted",
            "scan": "gemma-2-2b",
            "prompt": "a b c d e",
            "prompt_tokens": ["<bos>", "a", " b", " c", " d", " e"],
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [["hand", feats[0], feats[1]]],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }
    return obj, truth


def _partition(groups):
    return sorted(sorted(s[1:]) for s in groups)


def test_edge_profile_grouping_recovers_planted_groups():
    obj, truth = _planted_graph()
    out = C.propose_supernodes(obj, n_supernodes=3)
    want = _partition([["", *[n for n, g in truth.items() if g == k]] for k in range(3)])
    assert _partition(out["qParams"]["supernodes"]) == want
    # only features are grouped; the input dict is untouched; labels come from clerps
    assert obj["qParams"]["supernodes"] == [["hand", *obj["qParams"]["supernodes"][0][1:]]]
    assert all(s[0].startswith("group ") for s in out["qParams"]["supernodes"])
    assert out["nodes"] == obj["nodes"] and out["links"] == obj["links"]
    C.validate_graph_json(out)
    # the distance itself: 0-ish within a group, near 1 across (noise 0.05)
    members = [n["node_id"] for n in obj["nodes"] if n["feature_type"] == "cross layer transcoder"]
    D = C.profile_distance(
        [n["node_id"] for n in obj["nodes"]],
        [(lk["source"], lk["target"], lk["weight"]) for lk in obj["links"]],
        members,
    )
    g = np.array([truth[m] for m in members])
    same = (g[:, None] == g[None, :]) & ~np.eye(len(g), dtype=bool)
    assert D[same].max() < 0.05 and D[g[:, None] != g[None, :]].min() > 0.9


def test_grouping_with_a_given_distance_and_bad_shape():
    obj, truth = _planted_graph()
    members = [n["node_id"] for n in obj["nodes"] if n["feature_type"] == "cross layer transcoder"]
    lab = np.array([truth[m] for m in members])
    D = (lab[:, None] != lab[None, :]).astype(float)
    out = C.propose_supernodes(obj, n_supernodes=3, distance=D)
    assert len(out["qParams"]["supernodes"]) == 3
    with pytest.raises(ValueError, match="12 feature nodes"):
        C.propose_supernodes(obj, distance=np.zeros((3, 3)))


def test_cli_supernodes_writes_and_refuses_foreign_files(tmp_path, capsys):
    obj, truth = _planted_graph()
    src, dst = tmp_path / "graph.json", tmp_path / "grouped.json"
    src.write_text(json.dumps(obj))
    assert main(["supernodes", str(src), "--out", str(dst), "--n", "3"]) == 0
    got = json.loads(dst.read_text())
    assert len(got["qParams"]["supernodes"]) == 3
    assert "3 supernodes of 2+ members" in capsys.readouterr().out
    assert main(["supernodes", str(src), "--out", str(dst), "--n", "2"]) == 0  # ours: replaced
    foreign = tmp_path / "mine.json"
    foreign.write_text("{}")
    assert main(["supernodes", str(src), "--out", str(foreign)]) != 0
    assert "did not write it" in capsys.readouterr().err
    assert foreign.read_text() == "{}"
    assert main(["supernodes", str(src), "--out", str(foreign), "--force"]) == 0
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"nodes": [], "links": []}))
    assert main(["supernodes", str(broken), "--out", str(tmp_path / "x.json")]) != 0
    err = capsys.readouterr().err
    assert "broken.json" in err and "metadata" in err


# ----------------------------------------------------------------------------- faithfulness
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = tiny_model(n_layers=3)
    saes = {
        L: standard_sae(d_in=16, d_sae=32, seed=10 + L, hook_name=f"blocks.{L}.hook_resid_post")
        for L in (0, 1)
    }
    toks = tiny_tokens(n_seq=8, seq_len=6, d_vocab=model.cfg.d_vocab, seed=0)
    with torch.no_grad():
        top2 = model(toks)[:, -1].topk(2, dim=-1).indices
    task = C.TaskTokens(
        tokens=list(toks), answer_ids=top2[:, 0].tolist(), counterfactual_ids=top2[:, 1].tolist()
    )
    return model, saes, task


def test_faithfulness_curve_on_held_out_prompts(tiny):
    model, saes, task = tiny
    sel, ho = C.split_prompts(task, 0.5, seed=0)
    assert len(sel) + len(ho) == len(task) and not set(map(tuple, map(list, sel.tokens))) & set(
        map(tuple, map(list, ho.tokens))
    )
    means = C.position_means(model, saes, sel)
    assert means[0][0].shape == (6, 32)
    nodes, per = C.linear_node_scores(model, saes, sel, means)
    assert per.shape == (len(sel), 2 * 33)
    order = nodes.sort_values("abs_score", ascending=False)
    order = list(zip(order["layer"], order["feature"], strict=False))
    cur = C.faithfulness_curve(
        model,
        saes,
        ho,
        {"linear": order},
        [0, 3, len(order)],
        means,
        linear=C.linear_node_scores(model, saes, ho, means),
    )
    t = cur.table.set_index("n_nodes")
    assert t.loc[len(order), "faithfulness"] == pytest.approx(1.0, abs=1e-5)  # keep everything: F = 1
    assert t.loc[0, "faithfulness"] == pytest.approx(0.0, abs=1e-9)
    assert t.loc[len(order), "linear"] == pytest.approx(1.0)
    lo, hi = t.loc[3, "ci_low"], t.loc[3, "ci_high"]
    assert lo <= t.loc[3, "faithfulness"] <= hi
    best = C.smallest_faithful(cur, target=0.999)
    assert best["reached"] and best["n_nodes"] == t.index[t["faithfulness"] >= 0.999].min()
    assert not C.smallest_faithful(cur, target=2.0)["reached"]
    # exact single-node effects: the metric drop when one node alone is mean-ablated
    ex = C.exact_node_effects(model, saes, sel, order[:2], means)
    assert ex.shape == (len(sel), 2)
    # the all-nodes-but-none check: ablating the error node of layer 1 alone is a real forward
    assert np.isfinite(ex).all()


def test_ratio_ci_matches_direct_bootstrap():
    from scipy import stats

    rng = np.random.default_rng(0)
    num, den = rng.normal(1, 0.3, 20), rng.normal(2, 0.3, 20)
    est, lo, hi = C.ratio_ci(num, den, seed=3)
    assert est == pytest.approx(num.sum() / den.sum())
    ref = stats.bootstrap(
        (num, den),
        lambda a, b, axis=-1: a.sum(axis) / b.sum(axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=2000,
        random_state=np.random.default_rng(3),
    ).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high))
