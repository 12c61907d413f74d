"""featmatch.chapters.flow on a planted 4-layer stack: paths, Sankey, offline HTML, static figure."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import flow

F = 12


@pytest.fixture
def stack(rng):
    """Three random permutations of 12 features (layers 5..8); feature 3's path breaks at layer 7.

    The planted truth: chain[f] is the list of features the start feature f reaches.
    """
    perms = [rng.permutation(F) for _ in range(3)]
    costs = [rng.uniform(0.1, 2.0, F) for _ in range(3)]
    perms[1][perms[0][3]] = -1  # unmatched at the step 6 → 7
    chain = {}
    for f in (0, 3, 7):
        seq = [f]
        for p in perms:
            seq.append(int(p[seq[-1]]) if seq[-1] >= 0 else -1)
        chain[f] = seq
    return perms, costs, chain


def test_paths_follow_the_planted_chain(stack):
    perms, costs, chain = stack
    paths = flow.paths_from_permutations(perms, [0, 3, 7], layers=[5, 6, 7, 8], costs=costs)
    for f, seq in chain.items():
        g = paths[paths["path"] == f].sort_values("layer")
        assert g["layer"].tolist() == [5, 6, 7, 8] and g["feature"].tolist() == seq
        assert np.isnan(g["step_cost"].iloc[0])
        assert g["step_cost"].iloc[1] == costs[0][f]
    assert chain[3][2:] == [-1, -1]
    with pytest.raises(ValueError, match="3 permutations need 4 layers"):
        flow.paths_from_permutations(perms, [0], layers=[0, 1])


def test_paths_table_agrees_with_featmatch_matching_paths(stack):
    from featmatch.matching._matching import paths as matching_paths

    perms, _, _ = stack

    class _M:  # the two attributes matching.paths reads
        def __init__(self, perm):
            self.perm, self.n_a, self.n_b = perm, F, F

    ref = matching_paths([_M(p) for p in perms], np.array([0, 3, 7]))
    ours = flow.paths_from_permutations(perms, [0, 3, 7]).pivot(index="path", columns="layer", values="feature")
    np.testing.assert_array_equal(ours.loc[[0, 3, 7]].to_numpy(), ref)


def test_sankey_nodes_and_links_trace_every_matched_step(stack):
    perms, costs, chain = stack
    paths = flow.paths_from_permutations(perms, [0, 3, 7], layers=[5, 6, 7, 8], costs=costs)
    paths["text"] = [f"ctx «{f}» <b>" for f in paths["feature"]]
    nodes, links = flow.flow_nodes_links(paths)
    assert len(nodes) == 4 + 2 + 4  # feature 3's path has two matched nodes
    key = list(zip(nodes["layer"], nodes["feature"], strict=True))
    steps = {(key[s], key[t]) for s, t in zip(links["source"], links["target"], strict=True)}
    want = {((5 + k, seq[k]), (6 + k, seq[k + 1])) for seq in chain.values() for k in range(3) if seq[k + 1] >= 0}
    assert steps == want
    assert (np.diff(nodes.sort_values("layer")["x"].to_numpy()) >= 0).all() and nodes["x"].between(0, 1).all()
    hover = nodes.loc[(nodes["layer"] == 6) & (nodes["feature"] == chain[0][1]), "hover"].iloc[0]
    assert f"ctx «{chain[0][1]}» &lt;b&gt;" in hover and "layer 6" in hover  # contexts shown, escaped

    fig = flow.flow_sankey(paths)
    sk = fig.data[0]
    assert list(sk.link.source) == links["source"].tolist() and list(sk.node.customdata) == nodes["hover"].tolist()


def test_html_bundles_plotly_and_loads_nothing_from_the_network(stack):
    perms, _, _ = stack
    fig = flow.flow_sankey(flow.paths_from_permutations(perms, [0, 1]))
    html = flow.flow_html(fig, div_id="flowtest")
    # what the browser loads: the src/href attributes of the fragment's elements
    found = []

    class _Refs(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend((tag, k, v) for k, v in attrs if k in ("src", "href") and v)

    _Refs().feed(html)
    assert [(t, k) for t, k, _ in found] == [("script", "src")]
    uri = found[0][2]
    assert uri.startswith("data:text/javascript;charset=utf-8;base64,")
    code = base64.b64decode(uri.split(",", 1)[1]).decode("utf-8")
    assert len(code) > 1_000_000 and "Plotly" in code  # the bundle itself
    assert 'Plotly.newPlot("flowtest"' in code and '<div id="flowtest"' in html
    spec = json.loads(code[code.rindex("var f=") + 6:code.rindex(";Plotly.newPlot")])
    assert spec["data"][0]["type"] == "sankey" and spec["data"][0]["link"]["source"] == list(fig.data[0].link.source)
    # the visible text of the notebook output has no warning text, progress bar or machine path in it
    assert not re.search(r"Warning|%\||(?<![\w.~-])/(root|tmp|home|work|Users)/", html)
    assert "<script" in flow.interactive(fig)._repr_html_()


def test_static_flow_draws_one_band_per_path_and_marks_breaks(stack):
    perms, costs, chain = stack
    paths = flow.paths_from_permutations(perms, [0, 3, 7], layers=[5, 6, 7, 8], costs=costs)
    fig, ax = plt.subplots()
    flow.plot_flow(ax, paths, label_every=1)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["path of 0", "path of 3", "path of 7"]
    labels = {t.get_text() for t in ax.texts}
    assert {str(f) for seq in chain.values() for f in seq if f >= 0} <= labels
    assert len(ax.get_lines()) == 3 + 1 + 3  # band segments: 3 + 1 (broken after one step) + 3
    markers = [c for c in ax.collections if c.get_offsets().shape[0] == 1]
    assert any(np.allclose(c.get_offsets(), [[7, 1]]) for c in markers)  # × where path 3 breaks
    plt.close(fig)


def test_path_table_of_chapter_02_feeds_the_flow(stack):
    """The table featmatch.chapters.persistence.path_table builds has the columns flow reads."""
    paths = pd.DataFrame({"path": [4, 4, 4], "layer": [0, 1, 2], "feature": [4, 9, -1], "step_cost": [np.nan, 0.3, np.nan],
                          "step_score": np.nan, "fires": [10, 8, None], "text": ["a", "b", None]})
    nodes, links = flow.flow_nodes_links(paths)
    assert len(nodes) == 2 and len(links) == 1 and "fires 10×" in nodes["hover"].iloc[0]
