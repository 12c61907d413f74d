"""featmatch.chapters.persistence (notebook 02): planted chains, persistence rules, feature paths."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import common
from featmatch.chapters import persistence as P
from featmatch.judging.explanations import ContextExplanations
from featmatch.judging.judges import ProxyJudge
from featmatch.lm.activations import gather
from featmatch.matching import Matching

from ._sae_match import N_LAYERS, F, minilm_tokenizer, model, planted_chain, word_tokens


@pytest.fixture(scope="module")
def chain():
    return planted_chain()


@pytest.fixture(scope="module")
def stats(chain):
    saes, _ = chain
    pairs = common.adjacent_pairs(saes) + [(0, 2), (0, 3), (1, 3)]
    return gather(model(), saes, word_tokens(), pairs=pairs, top_k=4, n_samples=4, cache=False, progress=False)


@pytest.fixture(scope="module")
def adjacent(chain):
    saes, _ = chain
    return common.pair_matchings(saes, common.adjacent_pairs(saes), ["folded"])["folded"]


def test_start_layers_at_the_papers_depths():
    assert P.start_layers(list(range(30)), 30) == [12, 14, 23]  # SmolLM2's 30 layers
    assert P.start_layers(list(range(26)), 26) == [10, 12, 20]  # the paper's own on Gemma-2-2B
    assert P.start_layers([0, 1, 2, 3], 4) == [2]  # never the last layer; duplicates merge


def test_persistence_pairs():
    assert P.persistence_pairs([0, 2], range(5), max_distance=2) == [(0, 1), (0, 2), (2, 3), (2, 4)]
    assert P.persistence_pairs([3], range(5)) == [(3, 4)]
    with pytest.raises(ValueError):
        P.persistence_pairs([7], range(5))


def test_chain_of_adjacent_matchings(adjacent):
    steps = P.chain(adjacent, 0, 3)
    assert steps == [adjacent[(0, 1)], adjacent[(1, 2)], adjacent[(2, 3)]]
    assert P.chain(adjacent, 1, 1) == []
    with pytest.raises(KeyError):
        P.chain(adjacent, 0, 7)


def test_persistence_of_planted_chain(chain, stats, adjacent):
    saes, perms = chain
    pairs = P.persistence_pairs([0, 1], range(N_LAYERS))
    ms = P.persistence_matchings(saes, pairs, adjacent)
    assert set(ms) == {"exact", "composed", "random"}
    np.testing.assert_array_equal(ms["exact"][(0, 2)].perm, perms[1][perms[0]])
    t = P.persistence_table(stats, ms)
    assert len(t) == 3 * len(pairs)
    assert (t["distance"] == t["target"] - t["start"]).all()
    # a planted chain: composing the adjacent matches gives exactly the direct match
    assert (t["agreement"] == 1.0).all()
    p = t.pivot_table(index=["start", "target"], columns="method", values="matching_score")
    np.testing.assert_allclose(p["exact"], p["composed"])
    assert (p["exact"] > p["random"]).all()  # the planted match beats chance
    # the random permutation is seeded
    again = P.persistence_matchings(saes, pairs, adjacent)
    np.testing.assert_array_equal(again["random"][(0, 3)].perm, ms["random"][(0, 3)].perm)
    assert "random" not in P.persistence_matchings(saes, pairs, adjacent, random_seed=None)
    a = P.agreement_table(t)
    assert list(a.columns) == [0, 1] and a.index.tolist() == [1, 2, 3]
    assert np.isnan(a.loc[3, 1])  # no layer 4: start 1 has no distance 3
    assert np.nanmin(a.to_numpy()) == 1.0


def test_label_table_from_the_proxy_judge(chain, stats, adjacent):
    saes, _ = chain
    ms = P.persistence_matchings(saes, P.persistence_pairs([0], range(N_LAYERS)), adjacent)
    source = ContextExplanations(stats, minilm_tokenizer())
    judged = common.judge_matched_pairs(ProxyJudge(variant="examples"), source, stats,
                                        {k: ms[k] for k in ("exact", "composed")}, 3, min_fires=1)
    lt = P.label_table(judged)
    assert list(lt.columns) == ["start", "target", "distance", "method", "mean_label", "n_scored"]
    assert set(lt["method"]) == {"exact", "composed"} and (lt["distance"] == lt["target"] - lt["start"]).all()
    assert lt["mean_label"].between(1, 3).all()
    # exact and composed are the same matching here: the same pairs, texts and labels
    pl = lt.pivot_table(index="target", columns="method", values="mean_label")
    np.testing.assert_allclose(pl["exact"], pl["composed"])
    want = judged[(judged["matching"] == "exact") & (judged["layer_b"] == 1)]["label"].astype(float).mean()
    assert lt[(lt["method"] == "exact") & (lt["target"] == 1)]["mean_label"].iloc[0] == pytest.approx(want)


def test_label_table_skips_unlabelled_rows():
    judged = pd.DataFrame({"layer_a": 0, "layer_b": [1, 1, 2], "matching": "exact",
                           "label": pd.array([3, pd.NA, 1], dtype="Int64")})
    lt = P.label_table(judged)
    assert lt["mean_label"].tolist() == [3.0, 1.0] and lt["n_scored"].tolist() == [1, 1]


def test_persistence_length_rule():
    t = pd.DataFrame(
        {
            "start": 0, "distance": [1, 2, 3, 4, 5], "method": "exact",
            "matching_score": [0.8, 0.6, 0.45, 0.3, 0.5],
        }
    )
    assert P.persistence_length(t).loc[0] == 3  # 0.3 < 0.4 stops the run; the later 0.5 does not count
    assert P.persistence_length(t, ratio=0.3).loc[0] == 5
    assert P.persistence_length(t[t["distance"] != 2]).loc[0] == 1  # a gap in distances stops the run
    assert P.persistence_length(t[t["distance"] > 1]).loc[0] == 0  # no one-step value
    assert P.persistence_length(t, method="composed").empty
    c = P.claim_persistence(t)
    assert c.verdict == "not testable" and "≥ 3 start layers ✗" in c.precondition  # one start layer


def _starts(lengths, max_d=8):
    """A table with one start per entry whose exact score keeps half its margin for exactly that many layers."""
    rows = []
    for s, n in enumerate(lengths):
        for d in range(1, max_d + 1):
            rows.append({"start": s, "distance": d, "method": "exact", "matching_score": 0.9 if d <= n else 0.1})
            rows.append({"start": s, "distance": d, "method": "random", "matching_score": 0.05})
    return pd.DataFrame(rows)


def test_claim_persistence_about_five_layers():
    assert P.claim_persistence(_starts([5, 5, 5, 5, 5])).verdict == "held"
    assert P.claim_persistence(_starts([1, 1, 1, 1, 1])).verdict == "failed"  # 4 layers short, outside ±2
    censored = P.claim_persistence(_starts([8, 5, 5, 5, 5]))
    assert censored.verdict == "not testable" and "censored" in censored.precondition


def test_persistence_length_above_chance():
    exact = [0.8, 0.7, 0.6, 0.5]
    rand = [0.2, 0.3, 0.5, 0.5]  # margins 0.6, 0.4, 0.1, 0.0 -> half of 0.6 is kept for 2 layers
    t = pd.DataFrame(
        {"start": 3, "distance": [1, 2, 3, 4] * 2, "method": ["exact"] * 4 + ["random"] * 4, "matching_score": exact + rand}
    )
    assert P.persistence_length(t).loc[3] == 2
    assert P.persistence_length(t, baseline=None).loc[3] == 4


def test_claim_composition_degrades_rule():
    rows = []
    for start in range(4):
        for d in range(1, 6):
            rows += [
                {"start": start, "distance": d, "method": "exact", "matching_score": 0.8 - 0.05 * d + 0.001 * start},
                {"start": start, "distance": d, "method": "composed", "matching_score": 0.8 - 0.1 * d},
            ]
    t = pd.DataFrame(rows)
    gap, grows = P.claim_composition_degrades(t)
    assert gap.verdict == "held" and gap.n == 16 and grows.verdict == "held"
    swapped = t.assign(method=t["method"].map({"exact": "composed", "composed": "exact"}))
    assert P.claim_composition_degrades(swapped)[0].verdict == "failed"
    equal = t.assign(matching_score=0.5)
    assert P.claim_composition_degrades(equal)[0].verdict == "failed"  # composition never falls behind
    assert [c.verdict for c in P.claim_composition_degrades(t[t["distance"] == 1])] == ["not testable"] * 2


def test_claim_composed_agrees_counts_partners():
    n = 200
    same = Matching(perm=np.arange(n), cost=np.zeros(n), n_b=n)
    other = Matching(perm=np.roll(np.arange(n), 1), cost=np.zeros(n), n_b=n)
    agree = P.claim_composed_agrees({"exact": {(0, 2): same}, "composed": {(0, 2): same}})
    assert agree.verdict == "held" and agree.our_value == 1.0 and agree.chance == pytest.approx(1 / n)
    assert P.claim_composed_agrees({"exact": {(0, 2): same}, "composed": {(0, 2): other}}).verdict == "failed"


def test_path_grid_is_compact():
    paths = pd.DataFrame({"path": [7, 7, 9, 9], "layer": [0, 1, 0, 1], "feature": [7, 3, 9, -1],
                          "step_cost": [np.nan, 0.25, np.nan, np.nan], "text": ["a\nb"] * 4})
    g = P.path_grid(paths)
    assert g.loc[1, "path of 7"] == "3 (0.25)" and g.loc[1, "path of 9"] == "—" and g.shape == (2, 2)


def test_most_active_features(stats):
    fires = stats.fire_count[0]
    top = P.most_active_features(stats, 0, 3, min_fires=1)
    assert top == [int(f) for f in np.argsort(fires)[::-1][:3]]
    assert all(fires[top[i]] >= fires[top[i + 1]] for i in range(len(top) - 1))
    assert P.most_active_features(stats, 0, F, min_fires=int(fires.max()) + 1) == []


def test_path_table_follows_planted_chain(stats, chain, adjacent):
    _, perms = chain
    source = ContextExplanations(stats, minilm_tokenizer())
    feats = P.most_active_features(stats, 0, 2, min_fires=1)
    t = P.path_table(adjacent, 0, feats, stats=stats, source=source)
    assert len(t) == 2 * N_LAYERS
    p = t[t["path"] == feats[0]].sort_values("layer")
    want = [feats[0]]
    for layer in range(N_LAYERS - 1):
        want.append(int(perms[layer][want[-1]]))
    assert p["feature"].tolist() == want
    assert p["text"].iloc[0] == source.explain(0, feats[0]) and p["text"].iloc[0].startswith("top tokens: ")
    assert p["fires"].tolist() == [int(stats.fire_count[x][f]) for x, f in zip(range(N_LAYERS), want, strict=True)]
    assert math.isnan(p["step_cost"].iloc[0]) and p["step_cost"].iloc[1] == pytest.approx(0, abs=1e-5)
    assert 0 <= p["step_score"].iloc[1] <= 1  # the start feature fires, so its first step has a score
    short = P.path_table(adjacent, 1, [0], end=2)
    assert short["layer"].tolist() == [1, 2] and short["text"].isna().all()
