"""Tests for featmatch.matching: costs, exact assignment, planted recovery, composition, persistence."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae, standard_sae
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from featmatch.matching import (
    Matching,
    MatchingFileError,
    _lap,
    assign,
    compose,
    cost_matrix,
    feature_vectors,
    match,
    pairwise_cost,
    paths,
)
from featmatch.saes import fold
from featmatch.synthetic import planted_chain, planted_pair, planted_scale_families, recovery


def _naive_vectors(sae, on: str, folded: bool, b_enc: bool) -> np.ndarray:
    """Independent float64 numpy construction of the feature vectors."""
    W_enc = sae.W_enc.detach().double().numpy()
    W_dec = sae.W_dec.detach().double().numpy()
    b = sae.b_enc.detach().double().numpy()
    if sae.cfg.apply_b_dec_to_input:
        b = b - sae.b_dec.detach().double().numpy() @ W_enc
    theta = (
        sae.threshold.detach().double().numpy()
        if (folded and hasattr(sae, "threshold"))
        else np.ones(W_dec.shape[0])
    )
    parts = []
    if on in ("encoder", "both"):
        parts.append(W_enc.T / theta[:, None])
    if on in ("decoder", "both"):
        parts.append(W_dec * theta[:, None])
    if b_enc:
        parts.append((b / theta)[:, None])
    return np.concatenate(parts, axis=1)


def _naive_cost(xa: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    if metric == "mse":
        return ((xa[:, None, :] - xb[None, :, :]) ** 2).mean(-1)
    na = np.linalg.norm(xa, axis=1)[:, None]
    nb = np.linalg.norm(xb, axis=1)[None, :]
    return 1.0 - (xa @ xb.T) / (na * nb)


def _brute_force_min(cost: np.ndarray) -> float:
    """Minimum total cost over all injective assignments of the smaller side."""
    n_a, n_b = cost.shape
    if n_a <= n_b:
        return min(
            sum(cost[i, j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(n_b), n_a)
        )
    return min(
        sum(cost[i, j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(n_a), n_b)
    )


# --------------------------------------------------------------------------------------
# Feature vectors and costs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("on,dim", [("encoder", 8), ("decoder", 8), ("both", 16)])
@pytest.mark.parametrize("b_enc", [False, True])
def test_feature_vectors_shapes_and_values(on, dim, b_enc):
    sae = jumprelu_sae(d_in=8, d_sae=20, seed=1)
    x = feature_vectors(sae, on=on, fold=True, include_b_enc=b_enc)
    assert x.shape == (20, dim + int(b_enc)) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), _naive_vectors(sae, on, True, b_enc), rtol=1e-6, atol=1e-7)


def test_folded_feature_vectors_are_those_of_the_folded_sae():
    sae = jumprelu_sae(d_in=8, d_sae=20, seed=2)
    a = feature_vectors(sae, on="both", fold=True, include_b_enc=True)
    b = feature_vectors(fold(sae), on="both", fold=False, include_b_enc=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and folding differs from not folding when theta != 1
    assert not torch.allclose(a, feature_vectors(sae, on="both", fold=False, include_b_enc=True))


@pytest.mark.parametrize("metric", ["mse", "cosine"])
@pytest.mark.parametrize("on", ["encoder", "decoder", "both"])
@pytest.mark.parametrize("shape", [(13, 13), (9, 17), (17, 9)])
def test_cost_matrix_equals_naive_float64(metric, on, shape):
    a = jumprelu_sae(d_in=10, d_sae=shape[0], seed=3)
    b = jumprelu_sae(d_in=10, d_sae=shape[1], seed=4)
    c = cost_matrix(a, b, on=on, metric=metric, fold=True, include_b_enc=True, block_size=4)
    expected = _naive_cost(_naive_vectors(a, on, True, True), _naive_vectors(b, on, True, True), metric)
    assert c.shape == shape and c.dtype == np.float64
    np.testing.assert_allclose(c, expected, rtol=2e-5, atol=2e-6 * float(np.abs(expected).max()))
    # blocking changes nothing beyond float32 rounding of the products
    unblocked = cost_matrix(a, b, on=on, metric=metric, include_b_enc=True, block_size=4096)
    np.testing.assert_allclose(c, unblocked, rtol=1e-6, atol=1e-7 * float(np.abs(expected).max()))


def test_pairwise_cost_edge_cases():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    c = pairwise_cost(x, x, metric="cosine")
    assert c[1, 1] == 1.0 and c[1, 0] == 1.0  # zero vector: cosine 0 with everything
    assert c[0, 0] == pytest.approx(0.0, abs=1e-7)
    m = pairwise_cost(x, x, metric="mse")
    assert (m >= 0).all() and np.allclose(np.diag(m), 0.0, atol=1e-6)
    assert m[0, 2] == pytest.approx(((1 - 3) ** 2 + 16) / 2)
    with pytest.raises(ValueError, match="feature vectors"):
        pairwise_cost(x, torch.zeros(3, 3))


# --------------------------------------------------------------------------------------
# Oracle: exact assignment
# --------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    f_a=st.integers(1, 6),
    f_b=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    on=st.sampled_from(["encoder", "decoder", "both"]),
    metric=st.sampled_from(["mse", "cosine"]),
    folded=st.booleans(),
)
def test_match_total_cost_equals_brute_force_and_scipy(f_a, f_b, seed, on, metric, folded):
    a = jumprelu_sae(d_in=5, d_sae=f_a, seed=seed)
    b = jumprelu_sae(d_in=5, d_sae=f_b, seed=seed + 1)
    m = match(a, b, on=on, metric=metric, fold=folded)
    cost = cost_matrix(a, b, on=on, metric=metric, fold=folded)
    assert m.n_matched == min(f_a, f_b) and m.is_injective
    np.testing.assert_allclose(
        m.cost[m.matched], cost[m.matched.nonzero()[0], m.perm[m.matched]], rtol=0, atol=0
    )
    assert m.total_cost == pytest.approx(_brute_force_min(cost), rel=1e-9, abs=1e-12)
    # an independent float64 cost matrix, solved densely by scipy
    naive = _naive_cost(_naive_vectors(a, on, folded, False), _naive_vectors(b, on, folded, False), metric)
    rows, cols = linear_sum_assignment(naive)
    assert m.total_cost == pytest.approx(naive[rows, cols].sum(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape", [(60, 60), (45, 70), (70, 45)])
def test_match_equals_dense_scipy_on_larger_cases(shape):
    a = jumprelu_sae(d_in=12, d_sae=shape[0], seed=10)
    b = jumprelu_sae(d_in=12, d_sae=shape[1], seed=11)
    naive = _naive_cost(_naive_vectors(a, "both", True, False), _naive_vectors(b, "both", True, False), "mse")
    rows, cols = linear_sum_assignment(naive)
    m = match(a, b)
    assert m.total_cost == pytest.approx(naive[rows, cols].sum(), rel=1e-5)
    assert m.n_matched == min(shape) and m.is_injective
    if shape[0] > shape[1]:
        assert (m.perm == -1).sum() == shape[0] - shape[1] and np.isnan(m.cost[~m.matched]).all()


def test_assign_rejects_non_finite_and_handles_empty():
    with pytest.raises(ValueError, match="non-finite"):
        assign(np.array([[0.0, np.nan]]))
    perm, cost = assign(np.zeros((3, 0)))
    assert (perm == -1).all() and np.isnan(cost).all()


# --------------------------------------------------------------------------------------
# Planted recovery
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("f_a,f_b,n_shared", [(128, 128, 109), (128, 140, 114), (140, 128, 114)])
@pytest.mark.parametrize("on", ["both", "decoder"])
def test_folded_matching_recovers_planted_pairs(seed, f_a, f_b, n_shared, on):
    p = planted_pair(d=32, f_a=f_a, f_b=f_b, n_shared=n_shared, noise=0.02, seed=seed)
    n_no_partner_b = int(p.no_partner_b.sum())
    assert p.has_partner_a.sum() == n_shared
    assert 0.10 * f_a <= (~p.has_partner_a).sum() <= 0.20 * f_a
    assert 0.10 * f_b <= n_no_partner_b <= 0.20 * f_b
    m = match(p.sae_a, p.sae_b, on=on, fold=True)
    assert recovery(m.perm, p.truth) >= 0.99


def test_folding_matters_with_independent_thresholds():
    """Planted pairs with independent per-feature theta (0.5x-2x): the raw weights carry theta."""
    folded, unfolded = [], []
    for seed in range(3):
        p = planted_pair(d=32, f_a=128, f_b=140, n_shared=114, noise=0.2, seed=seed)
        folded.append(recovery(match(p.sae_a, p.sae_b, fold=True).perm, p.truth))
        unfolded.append(recovery(match(p.sae_a, p.sae_b, fold=False).perm, p.truth))
    assert min(folded) >= 0.99
    assert np.mean(unfolded) <= np.mean(folded) - 0.03, (folded, unfolded)


def test_folding_matters_when_scale_tells_features_apart():
    """Unit-norm decoders (the SAELens training gauge) leave the scale in theta only.

    Pairs of features share a direction up to less than the noise and differ 2.5x in
    scale; only the folded decoders can tell them apart.
    """
    folded, unfolded = [], []
    for seed in range(3):
        p = planted_scale_families(d=32, n_dirs=40, jitter=0.01, noise=0.05, seed=seed)
        assert torch.allclose(p.sae_a.W_dec.detach().norm(dim=1), torch.ones(80), atol=1e-5)
        folded.append(recovery(match(p.sae_a, p.sae_b, on="decoder", fold=True).perm, p.truth))
        unfolded.append(recovery(match(p.sae_a, p.sae_b, on="decoder", fold=False).perm, p.truth))
    assert min(folded) >= 0.99
    assert max(unfolded) <= 0.95 and np.mean(unfolded) <= np.mean(folded) - 0.08, (folded, unfolded)


@pytest.mark.parametrize("seed", [0, 1])
def test_unmatched_quantile_flags_no_partner_features(seed):
    p = planted_pair(d=32, f_a=128, f_b=140, n_shared=114, noise=0.2, seed=seed)
    has = p.has_partner_a
    m = match(p.sae_a, p.sae_b, unmatched_quantile=float(has.mean()))
    assert (~m.matched[~has]).mean() >= 0.9  # most no-partner features flagged
    assert (m.perm[has] == p.truth[has]).mean() >= 0.95  # planted pairs kept
    assert np.isnan(m.cost[~m.matched]).all() and np.isfinite(m.cost[m.matched]).all()
    assert np.nanmax(m.cost) <= m.meta["unmatched_threshold"]


def test_unmatched_above_flags_no_partner_features():
    p = planted_pair(d=32, f_a=128, f_b=128, no_partner=0.15, noise=0.2, seed=3)
    has = p.has_partner_a
    threshold = 0.1 * float(np.median(cost_matrix(p.sae_a, p.sae_b)))
    m = match(p.sae_a, p.sae_b, unmatched_above=threshold)
    assert (~m.matched[~has]).mean() >= 0.9
    assert (m.perm[has] == p.truth[has]).mean() >= 0.99
    assert m.meta["unmatched_threshold"] == threshold and np.nanmax(m.cost) <= threshold
    # quantile 1 keeps every assigned pair; quantile 0 keeps only the cheapest
    assert match(p.sae_a, p.sae_b, unmatched_quantile=1.0).n_matched == 128
    assert match(p.sae_a, p.sae_b, unmatched_quantile=0.0).n_matched == 1


# --------------------------------------------------------------------------------------
# Composition and paths
# --------------------------------------------------------------------------------------


def test_composition_is_exact_on_planted_chains():
    saes, truths = planted_chain(n_layers=4, d=32, f=80, no_partner=0.1, noise=0.01, seed=0)
    ms = [match(saes[k], saes[k + 1]) for k in range(3)]
    for m, t in zip(ms, truths, strict=True):
        assert recovery(m.perm, t) == 1.0
    m02 = compose(ms[0], ms[1])
    t02 = np.where(truths[0] >= 0, truths[1][np.maximum(truths[0], 0)], -1)
    chain = t02 >= 0
    assert chain.sum() >= 50
    np.testing.assert_array_equal(m02.perm[chain], t02[chain])
    np.testing.assert_array_equal(m02.perm, ms[1].perm[ms[0].perm])
    # the direct match agrees with the composed one on features that persist
    np.testing.assert_array_equal(match(saes[0], saes[2]).perm[chain], t02[chain])
    # paths follow the same chain
    start = np.arange(80)
    pth = paths(ms, start)
    assert pth.shape == (80, 4)
    np.testing.assert_array_equal(pth[:, 0], start)
    np.testing.assert_array_equal(pth[:, 2], m02.perm)
    np.testing.assert_array_equal(pth[:, 3], compose(m02, ms[2]).perm)
    assert compose(m02, ms[2]).cost == pytest.approx(
        ms[0].cost + ms[1].cost[ms[0].perm] + ms[2].cost[m02.perm]
    )


@pytest.mark.parametrize("shape", [(30, 30), (25, 40), (40, 25)])
def test_compose_with_inverse_is_identity_on_matched(shape):
    a = jumprelu_sae(d_in=8, d_sae=shape[0], seed=20)
    b = jumprelu_sae(d_in=8, d_sae=shape[1], seed=21)
    m = match(a, b, unmatched_quantile=0.8)
    inv = m.inverse()
    assert inv.n_a == shape[1] and inv.n_b == shape[0] and inv.n_matched == m.n_matched
    ident = compose(m, inv)
    idx = np.flatnonzero(m.matched)
    np.testing.assert_array_equal(ident.perm[idx], idx)
    assert (ident.perm[~m.matched] == -1).all()
    np.testing.assert_allclose(ident.cost[idx], 2 * m.cost[idx])
    # and the other way round
    back = compose(inv, m)
    jdx = np.flatnonzero(inv.matched)
    np.testing.assert_array_equal(back.perm[jdx], jdx)


def test_minus_one_propagates_through_compose_and_paths():
    m1 = Matching(perm=np.array([1, -1, 0]), cost=np.array([0.1, 5.0, 0.2]), n_b=2)
    m2 = Matching(perm=np.array([-1, 3]), cost=np.array([np.nan, 0.3]), n_b=4)
    assert np.isnan(m1.cost[1])  # forced NaN where unmatched
    c = compose(m1, m2)
    np.testing.assert_array_equal(c.perm, [3, -1, -1])
    assert c.n_b == 4 and c.cost[0] == pytest.approx(0.4) and np.isnan(c.cost[1:]).all()
    np.testing.assert_array_equal(paths([m1, m2], [0, 1, 2]), [[0, 1, 3], [1, -1, -1], [2, 0, -1]])
    with pytest.raises(ValueError, match="compose"):
        compose(m2, m1)
    with pytest.raises(ValueError, match="do not chain"):
        paths([m2, m1], [0])
    with pytest.raises(ValueError, match="start_features"):
        paths([m1], [3])


def test_matching_validation_views_and_inverse_errors():
    with pytest.raises(ValueError, match="perm values"):
        Matching(perm=np.array([0, 2]), cost=np.zeros(2), n_b=2)
    with pytest.raises(ValueError, match="shape"):
        Matching(perm=np.array([0, 1]), cost=np.zeros(3), n_b=2)
    many_to_one = Matching(perm=np.array([0, 0]), cost=np.zeros(2), n_b=1)
    assert not many_to_one.is_injective
    with pytest.raises(ValueError, match="cannot invert"):
        many_to_one.inverse()
    m = Matching(perm=np.array([2, -1, 0]), cost=np.array([0.5, 0.0, 0.25]), n_b=3)
    df = m.to_frame()
    assert list(df.columns) == ["feature_a", "feature_b", "cost", "matched"]
    assert df["matched"].tolist() == [True, False, True] and m.n_matched == 2 and m.total_cost == 0.75


# --------------------------------------------------------------------------------------
# Options and bad input
# --------------------------------------------------------------------------------------


def test_match_records_settings():
    a, b = jumprelu_sae(d_in=6, d_sae=10, seed=0), standard_sae(d_in=6, d_sae=12, seed=1)
    m = match(a, b, on="decoder", metric="cosine", fold=True, include_b_enc=True)
    assert m.meta["on"] == "decoder" and m.meta["metric"] == "cosine" and m.meta["solver"] == "dense"
    assert m.meta["folded_a"] is True and m.meta["folded_b"] is False  # ReLU SAE: nothing to fold
    assert m.meta["n_a"] == 10 and m.meta["n_b"] == 12 and m.n_b == 12
    json.dumps(m.meta)


def test_bad_inputs_raise_clear_value_errors():
    a = jumprelu_sae(d_in=6, d_sae=10, seed=0)
    with pytest.raises(ValueError, match="d_in mismatch"):
        match(a, jumprelu_sae(d_in=7, d_sae=10))
    with pytest.raises(ValueError, match="d_in mismatch"):
        cost_matrix(a, jumprelu_sae(d_in=7, d_sae=10))
    nan = jumprelu_sae(d_in=6, d_sae=10, seed=1)
    with torch.no_grad():
        nan.W_dec[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W_dec.*non-finite"):
        match(a, nan)
    inf = jumprelu_sae(d_in=6, d_sae=10, seed=1)
    with torch.no_grad():
        inf.W_enc[1, 2] = float("inf")
    with pytest.raises(ValueError, match="W_enc.*non-finite"):
        match(inf, a)
    neg = jumprelu_sae(d_in=6, d_sae=10, seed=1)
    with torch.no_grad():
        neg.threshold[3] = -1.0
    with pytest.raises(ValueError, match="threshold"):
        match(a, neg)
    with pytest.raises(ValueError, match="on must be"):
        match(a, a, on="bias")
    with pytest.raises(ValueError, match="metric must be"):
        match(a, a, metric="l1")
    with pytest.raises(ValueError, match="solver must be"):
        match(a, a, solver="greedy")
    with pytest.raises(ValueError, match="at most one"):
        match(a, a, unmatched_above=1.0, unmatched_quantile=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        match(a, a, unmatched_quantile=1.5)


def test_sparse_solver_is_called_with_feature_vectors(monkeypatch):
    """solver="sparse" hands the (F, D) feature vectors to the real sparse solver, and the
    unmatched rule is applied to its result as to the dense one's."""
    calls = []
    real = _lap.sparse_match

    def spy(x_a, x_b, metric, **kwargs):
        calls.append((tuple(x_a.shape), tuple(x_b.shape), metric, kwargs))
        return real(x_a, x_b, metric=metric, **kwargs)

    monkeypatch.setattr(_lap, "sparse_match", spy)
    a, b = jumprelu_sae(d_in=6, d_sae=10, seed=0), jumprelu_sae(d_in=6, d_sae=14, seed=1)
    m = match(a, b, solver="sparse", unmatched_quantile=0.5, k=3)
    assert calls == [((10, 12), (14, 12), "mse", {"k": 3})]
    np.testing.assert_array_equal(m.perm, match(a, b, solver="dense", unmatched_quantile=0.5).perm)
    assert m.meta["solver"] == "sparse"


# --------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------


def _example_matching() -> Matching:
    a, b = jumprelu_sae(d_in=6, d_sae=12, seed=0), jumprelu_sae(d_in=6, d_sae=9, seed=1)
    return match(a, b, unmatched_quantile=0.7)


def _write_v1(m: Matching, path, arrays_name: str | None = None):
    """A matching in the old two-file format (version 1), written the way featmatch 0.1 did:
    JSON header + sibling ``<stem>.<sha256[:12]>.npz`` named and checksummed by it."""
    import hashlib
    import io

    buf = io.BytesIO()
    np.savez(buf, perm=m.perm, cost=m.cost)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = arrays_name or f"{path.stem}.{sha[:12]}.npz"
    (path.parent / name).write_bytes(data)
    header = {"format": "featmatch.matching", "version": 1, "n_a": m.n_a, "n_b": m.n_b,
              "n_matched": m.n_matched, "arrays": name, "arrays_sha256": sha, "meta": m.meta}  # fmt: skip
    path.write_text(json.dumps(header))
    return path.parent / name


def test_save_load_round_trip_is_one_file(tmp_path):
    m = _example_matching()
    path = m.save(tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    header = json.loads(path.read_text())
    assert (header["format"], header["version"], header["n_a"], header["n_b"]) == ("featmatch.matching", 2, 12, 9)
    assert list(header)[0] == "format" and Matching.arrays_file(path) is None
    back = Matching.load(path)
    np.testing.assert_array_equal(back.perm, m.perm)
    np.testing.assert_array_equal(back.cost, m.cost)  # NaNs included
    assert back.n_b == 9 and back.meta == json.loads(json.dumps(m.meta))
    other = Matching(perm=np.arange(12) % 9, cost=np.zeros(12), n_b=9, meta={"x": 1})
    other.perm[9:] = -1
    other.save(path)  # replacing a matching needs no force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    np.testing.assert_array_equal(Matching.load(path).perm, other.perm)


def test_old_two_file_matchings_still_load_and_are_never_deleted(tmp_path):
    m = _example_matching()
    npz = _write_v1(m, tmp_path / "old.json")
    back = Matching.load(tmp_path / "old.json")
    np.testing.assert_array_equal(back.perm, m.perm)
    np.testing.assert_array_equal(back.cost, m.cost)
    assert Matching.arrays_file(tmp_path / "old.json") == npz
    # saving over an old file replaces the JSON only; its array file is left where it was
    other = Matching(perm=np.zeros(12, dtype=np.int64), cost=np.ones(12), n_b=9)
    other.save(tmp_path / "old.json")
    assert npz.is_file()
    np.testing.assert_array_equal(Matching.load(tmp_path / "old.json").perm, other.perm)


def test_unrelated_file_is_never_overwritten_without_force(tmp_path):
    """Found 1a: any existing file that featmatch did not write was silently replaced."""
    m = _example_matching()
    for name, content in (("cfg.json", '{"x": 1}\n'), ("notes.json", "plain text\n"), ("b.json", "")):
        target = tmp_path / name
        target.write_text(content)
        with pytest.raises(FileExistsError, match=rf"{name}.*not a featmatch matching.*force"):
            m.save(target)
        assert target.read_text() == content
    m.save(tmp_path / "cfg.json", force=True)
    np.testing.assert_array_equal(Matching.load(tmp_path / "cfg.json").perm, m.perm)
    with pytest.raises(IsADirectoryError, match=str(tmp_path / "sub")):
        (tmp_path / "sub").mkdir()
        m.save(tmp_path / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "cfg.json", "notes.json", "sub"]


def test_file_named_in_a_json_is_never_deleted(tmp_path):
    """Found 1b: ``{"arrays": "notes.txt"}`` at the target made save delete notes.txt."""
    m = _example_matching()
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    victim = tmp_path / "victim.json"
    victim.write_text('{"arrays": "notes.txt"}')
    with pytest.raises(FileExistsError):
        m.save(victim)
    m.save(victim, force=True)
    # even a header that claims to be a featmatch matching naming notes.txt
    victim.write_text(json.dumps({"format": "featmatch.matching", "version": 1, "arrays": "notes.txt"}))
    m.save(victim)
    assert notes.read_text() == "precious"
    np.testing.assert_array_equal(Matching.load(victim).perm, m.perm)


@pytest.mark.parametrize("legacy", [False, True])
def test_saving_to_a_copy_leaves_the_original_loadable(tmp_path, legacy):
    """Found 1c: ``cp a.json b.json`` then saving to b.json deleted a.json's arrays."""
    import shutil

    first = _example_matching()
    a = tmp_path / "a.json"
    _write_v1(first, a) if legacy else first.save(a)
    shutil.copy(a, tmp_path / "b.json")
    Matching(perm=np.full(12, -1), cost=np.zeros(12), n_b=9).save(tmp_path / "b.json")
    np.testing.assert_array_equal(Matching.load(a).perm, first.perm)
    assert (Matching.load(tmp_path / "b.json").perm == -1).all()


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Matching.load(tmp_path / "nope.json")
    npz = _write_v1(_example_matching(), tmp_path / "m.json")
    npz.unlink()
    with pytest.raises(FileNotFoundError, match=r"array file .*m\.json"):
        Matching.load(tmp_path / "m.json")
    with pytest.raises(MatchingFileError, match="is a directory"):
        Matching.load(tmp_path)


def _b64_npz(perm, cost) -> tuple[str, str]:
    import base64
    import hashlib
    import io

    buf = io.BytesIO()
    np.savez(buf, perm=perm, cost=cost)
    return base64.b64encode(buf.getvalue()).decode(), hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.mark.parametrize(
    "damage",
    [
        "truncate_json",
        "garbage_json",
        "wrong_format",
        "binary_json",
        "bad_version",
        "flipped_array_byte",
        "bad_base64",
        "truncated_arrays",
        "bad_shape",
        "v1_truncate_npz",
        "v1_swap_npz",
        "v1_bad_name",
    ],
)
def test_corrupt_files_raise_errors_naming_the_file(tmp_path, damage):
    m = _example_matching()
    path = tmp_path / "m.json"
    if damage.startswith("v1_"):
        npz = _write_v1(m, path)
    else:
        m.save(path)
    header = json.loads(path.read_text())
    named = "m.json"
    if damage == "truncate_json":
        path.write_text(path.read_text()[:40])
    elif damage == "garbage_json":
        path.write_text("[1, 2, 3]")
    elif damage == "binary_json":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "wrong_format":
        header["format"] = "something-else"
        path.write_text(json.dumps(header))
    elif damage == "bad_version":
        header["version"] = 99
        path.write_text(json.dumps(header))
    elif damage == "flipped_array_byte":  # still valid base64, checksum differs
        b = header["arrays_npz_base64"]
        header["arrays_npz_base64"] = b[:100] + ("A" if b[100] != "A" else "B") + b[101:]
        path.write_text(json.dumps(header))
    elif damage == "bad_base64":
        header["arrays_npz_base64"] = "not base64 at all!"
        path.write_text(json.dumps(header))
    elif damage == "truncated_arrays":  # checksum recomputed: the archive itself is cut
        import base64
        import hashlib

        cut = base64.b64decode(header["arrays_npz_base64"])[:60]
        header["arrays_npz_base64"], header["arrays_sha256"] = base64.b64encode(cut).decode(), hashlib.sha256(cut).hexdigest()
        path.write_text(json.dumps(header))
    elif damage == "bad_shape":  # consistent checksum, but shapes disagree with the metadata
        header["n_a"] = 13
        path.write_text(json.dumps(header))
    elif damage == "v1_truncate_npz":
        npz.write_bytes(npz.read_bytes()[:50])
        named = npz.name
    elif damage == "v1_swap_npz":  # the array file of another run under the referenced name
        other = tmp_path / "other.json"
        npz.write_bytes(_write_v1(Matching(perm=np.zeros(12, dtype=np.int64), cost=np.zeros(12), n_b=9), other).read_bytes())
        named = npz.name
    else:
        header["arrays"] = "../elsewhere.npz"
        path.write_text(json.dumps(header))
    with pytest.raises(MatchingFileError, match=named.replace(".", r"\.")):
        Matching.load(path)


def test_save_rejects_npz_path_and_unserialisable_meta(tmp_path):
    m = _example_matching()
    with pytest.raises(ValueError, match=r"\.json"):
        m.save(tmp_path / "m.npz")
    m.meta["bad"] = object()
    with pytest.raises(TypeError):
        m.save(tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_keeps_previous_result(tmp_path, monkeypatch):
    import featmatch.matching._matching as fm
    from featmatch._io import atomic_save

    first = _example_matching()
    path = first.save(tmp_path / "m.json")

    def interrupted(path, obj, indent=2, sort_keys=True):  # Ctrl-C half way through the write
        def writer(tmp):
            tmp.write_text(json.dumps(obj)[:100])
            raise KeyboardInterrupt

        return atomic_save(path, writer)

    monkeypatch.setattr(fm, "atomic_write_json", interrupted)
    second = Matching(perm=np.full(12, -1), cost=np.zeros(12), n_b=9)
    with pytest.raises(KeyboardInterrupt):
        second.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    np.testing.assert_array_equal(Matching.load(path).perm, first.perm)


def _hammer_writer(path: str, tag: int, seconds: float) -> None:
    """Save matchings tagged ``tag`` (perm and meta agree) to ``path`` for ``seconds``."""
    import time

    rng = np.random.default_rng(tag)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        perm = rng.permutation(300)
        Matching(perm=perm, cost=np.full(300, float(tag)), n_b=300, meta={"tag": tag, "first": int(perm[0])}).save(path)


def test_concurrent_saves_and_loads_never_see_a_mix_or_leave_orphans(tmp_path):
    """Found 1d: two writers and one reader on one path: every load is a complete matching
    from one writer (its perm, cost and meta agree), and only the one file remains."""
    import multiprocessing as mp
    import time

    path = tmp_path / "m.json"
    Matching(perm=np.arange(300), cost=np.zeros(300), n_b=300, meta={"tag": 0, "first": 0}).save(path)
    ctx = mp.get_context("fork")
    writers = [ctx.Process(target=_hammer_writer, args=(str(path), tag, 3.0)) for tag in (1, 2)]
    for w in writers:
        w.start()
    loads, failures, tags = 0, [], set()
    while any(w.is_alive() for w in writers):
        try:
            m = Matching.load(path)
        except (MatchingFileError, FileNotFoundError) as exc:  # would have to name the file
            failures.append(str(exc))
            continue
        loads += 1
        tags.add(m.meta["tag"])
        assert m.perm[0] == m.meta["first"] and np.all(m.cost == m.meta["tag"])
        assert np.array_equal(np.sort(m.perm), np.arange(300))
        time.sleep(0.001)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert failures == [] and loads > 50 and {1, 2} <= tags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no temporary or array files


def test_sparse_solver_agrees_with_dense_on_a_planted_pair():
    p = planted_pair(d=32, f_a=128, f_b=140, n_shared=114, noise=0.2, seed=5)
    dense = match(p.sae_a, p.sae_b, solver="dense")
    sparse = match(p.sae_a, p.sae_b, solver="sparse")
    assert sparse.meta["solver"] == "sparse"
    assert sparse.total_cost == pytest.approx(dense.total_cost, rel=1e-6)
    assert recovery(sparse.perm, p.truth) >= 0.99


def test_compose_checks_that_the_hooks_chain():
    from featmatch.matching import end_hooks

    def hop(a, b, perm):
        perm = np.asarray(perm)
        return Matching(perm=perm, cost=np.zeros(len(perm)), n_b=3, meta={"hook_a": a, "hook_b": b})

    m01, m12 = hop("h0", "h1", [2, 0, 1]), hop("h1", "h2", [1, 2, 0])
    m02 = compose(m01, m12)
    assert end_hooks(m02) == ("h0", "h2") and end_hooks(m01.inverse()) == ("h1", "h0")
    np.testing.assert_array_equal(m02.perm, [0, 1, 2])
    for first, second in ((m12, m01), (m01, m01), (m02, m02)):
        with pytest.raises(ValueError, match="ends at h[12], the second starts from h[01]"):
            compose(first, second)
    np.testing.assert_array_equal(compose(m12, m01, force=True).perm, [0, 1, 2])  # perm[i] = m01[m12[i]]
    # inverses chain back; raw matchings without hooks are only checked for width
    assert end_hooks(compose(m01, m01.inverse())) == ("h0", "h0")
    raw = Matching(perm=np.array([0, 1, 2]), cost=np.zeros(3), n_b=3)
    assert end_hooks(compose(raw, m12)) == (None, "h2")
