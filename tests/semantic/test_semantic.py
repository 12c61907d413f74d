"""Tests of featmatch.semantic: the paper's properties, oracles against POT/scipy, bad input."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from featmatch.matching import Matching
from featmatch.semantic import (
    FeatureDistributions,
    ReferenceSpace,
    approximation_report,
    decoder_cosine_match,
    distance_matrix,
    pair_distances,
    quantile_embedding,
    reference_coordinates,
    semantic_match,
    topk_from_distances,
    transport_plan,
)

SEQ_LEN = 20
REG_TINY = 5e-3  # relative to the mean ground cost
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------
# tiny builders
# --------------------------------------------------------------------------------------


def random_space(n_pos: int = 400, k: int = 6, seed: int = 0, name: str = "synthetic") -> ReferenceSpace:
    rng = np.random.default_rng(seed)
    return ReferenceSpace(rng.normal(size=(n_pos, k)).astype(np.float32), SEQ_LEN, name)


def random_samples(
    F: int, N: int, n_pos: int, seed: int = 0, fill: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (non-BOS, −1 padding) and positive activations, as ActivationStats stores them."""
    rng = np.random.default_rng(seed)
    pos = np.full((F, N), -1, dtype=np.int64)
    val = np.zeros((F, N), dtype=np.float32)
    non_bos = np.flatnonzero(np.arange(n_pos) % SEQ_LEN != 0)
    for f in range(F):
        m = max(1, int(rng.integers(1, N + 1) * fill))
        pos[f, :m] = rng.choice(non_bos, m, replace=False)
        val[f, :m] = rng.exponential(size=m).astype(np.float32) + 0.05
    return pos, val


def clustered_pair(F: int = 40, N: int = 32, k: int = 32, seed: int = 0, n_pos: int = 3000):
    """Realistic clustered features: hierarchical token clusters with a PCA-like spectrum.

    Token positions fall into ``4 x 5`` clusters (topics x sub-topics) whose spread decays
    as ``i^-1/2`` over the ``k`` coordinates; each feature fires on 1-3 sub-topics of one
    topic (sometimes plus a stray cluster) with exponential activations.
    """
    rng = np.random.default_rng(seed)
    scale = np.arange(1, k + 1) ** -0.5
    topics = rng.normal(size=(4, k)) * 4 * scale
    centers = (topics[:, None] + rng.normal(size=(4, 5, k)) * 1.5 * scale).reshape(-1, k)
    lab = rng.integers(len(centers), size=n_pos)
    coords = centers[lab] + 0.5 * rng.normal(size=(n_pos, k)) * scale
    ref = ReferenceSpace(coords.astype(np.float32), 50, "clustered")
    pos = np.full((2 * F, N), -1, dtype=np.int64)
    val = np.zeros((2 * F, N), dtype=np.float32)
    for f in range(2 * F):
        cl = int(rng.integers(4)) * 5 + rng.choice(5, int(rng.integers(1, 4)), replace=False)
        if rng.random() < 0.3:
            cl = np.append(cl, rng.integers(len(centers)))
        cand = np.flatnonzero(np.isin(lab, cl) & (np.arange(n_pos) % 50 != 0))
        m = int(rng.integers(N // 2, N + 1))
        pos[f, :m] = rng.choice(cand, m, replace=False)
        val[f, :m] = rng.exponential(size=m) + 0.1
    d = FeatureDistributions.from_samples(pos, val, ref)
    return d.subset(range(F)), d.subset(range(F, 2 * F))


def planted_pair(n_concepts: int = 10, N: int = 24, k: int = 8, noise: float = 0.3, seed: int = 0):
    """Features of A and B fire on the same concepts (well separated clusters); B is permuted.

    Each concept is a cluster of token positions; feature i of A and feature perm[i] of B
    both fire on concept i but on *different* random tokens with different activations.
    """
    rng = np.random.default_rng(seed)
    per = 3 * N
    centers = rng.normal(size=(n_concepts, k)) * 6.0
    n_pos = SEQ_LEN * int(np.ceil(n_concepts * per / (SEQ_LEN - 1)))
    coords = np.zeros((n_pos, k))
    usable = np.flatnonzero(np.arange(n_pos) % SEQ_LEN != 0)[: n_concepts * per]
    concept_pos = usable.reshape(n_concepts, per)
    for c in range(n_concepts):
        coords[concept_pos[c]] = centers[c] + noise * rng.normal(size=(per, k))
    ref = ReferenceSpace(coords.astype(np.float32), SEQ_LEN, "planted")
    perm = rng.permutation(n_concepts)

    def draw(concept_of_row):
        pos = np.stack([rng.choice(concept_pos[c], N, replace=False) for c in concept_of_row])
        val = rng.exponential(size=pos.shape).astype(np.float32) + 0.1
        return pos, val

    pa, va = draw(np.arange(n_concepts))
    inv = np.argsort(perm)  # row j of B fires on concept inv[j]; so A_i <-> B_perm[i]
    pb, vb = draw(inv)
    a = FeatureDistributions.from_samples(pa, va, ref, layer=3)
    b = FeatureDistributions.from_samples(pb, vb, ref, layer=7)
    return a, b, perm


# --------------------------------------------------------------------------------------
# reference space
# --------------------------------------------------------------------------------------


def test_reference_space_pca_excludes_bos_and_is_orthonormal(rng):
    hidden = rng.normal(size=(5, SEQ_LEN, 12))
    hidden[:, 0] *= 100.0  # attention sink
    ref = ReferenceSpace.from_hidden(hidden, name="t", pca_k=4)
    assert ref.coords.shape == (5 * SEQ_LEN, 4) and ref.coords.dtype == np.float32
    np.testing.assert_allclose(ref.mean, hidden[:, 1:].reshape(-1, 12).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.basis.T @ ref.basis, np.eye(4), atol=1e-5)
    # non-BOS coordinates are centred (the fit ignored BOS); BOS still gets coordinates
    assert np.abs(ref.coords.reshape(5, SEQ_LEN, 4)[:, 1:].mean((0, 1))).max() < 1e-4
    np.testing.assert_allclose(ref.project(hidden).reshape(-1, 4), ref.coords, atol=1e-4)
    full = ReferenceSpace.from_hidden(hidden, name="t", pca_k=None)
    assert full.coords.shape == (5 * SEQ_LEN, 12) and full.basis is None
    assert full.space_id != ref.space_id


def test_reference_coordinates_tiny_model_matches_cache():
    from _builders import tiny_model, tiny_tokens

    model = tiny_model(n_layers=2, d_model=16, n_ctx=SEQ_LEN)
    tokens = tiny_tokens(n_seq=6, seq_len=SEQ_LEN)
    ids = set()
    for space, hook in [
        ("layer:0", "blocks.0.hook_resid_post"),
        ("final", "blocks.1.hook_resid_post"),
        ("embed", "hook_embed"),
    ]:
        ref = reference_coordinates(model, tokens, space=space, pca_k=5, batch_size=4)
        assert ref.coords.shape == (6 * SEQ_LEN, 5) and ref.hook_name == hook
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hook)
        np.testing.assert_allclose(ref.project(cache[hook]).reshape(-1, 5), ref.coords, atol=1e-4)
        ids.add(ref.space_id)
    assert len(ids) == 3
    with pytest.raises(ValueError, match="out of range"):
        reference_coordinates(model, tokens, space="layer:7")
    with pytest.raises(ValueError, match="unknown reference space"):
        reference_coordinates(model, tokens, space="middle")


def test_from_stats_end_to_end_with_gather(tmp_cache):
    from _builders import standard_sae, tiny_model, tiny_tokens

    from featmatch.lm.activations import gather

    model = tiny_model(n_layers=2, d_model=16, n_ctx=SEQ_LEN)
    tokens = tiny_tokens(n_seq=6, seq_len=SEQ_LEN)
    saes = {
        0: standard_sae(16, 32, seed=1, hook_name="blocks.0.hook_resid_post"),
        1: standard_sae(16, 32, seed=2, hook_name="blocks.1.hook_resid_post"),
    }
    stats = gather(model, saes, tokens, n_samples=16, cache=False, progress=False)
    ref = reference_coordinates(model, tokens, space="final", pca_k=8)
    da = FeatureDistributions.from_stats(stats, 0, ref)
    db = FeatureDistributions.from_stats(stats, 1, ref)
    assert len(da) + len(da.empty) == 32 and da.layer == 0
    m = semantic_match(da, db, method="exact", progress=False)
    assert isinstance(m, Matching) and m.n_a == 32 and m.n_b == 32 and m.is_injective
    assert (m.perm[da.empty] == -1).all()
    other = reference_coordinates(
        model, tiny_tokens(n_seq=6, seq_len=SEQ_LEN, seed=5), space="final", pca_k=8
    )
    with pytest.raises(ValueError, match="other tokens"):
        FeatureDistributions.from_stats(stats, 0, other)


# --------------------------------------------------------------------------------------
# distributions
# --------------------------------------------------------------------------------------


def test_from_samples_weights_empty_and_subsampling():
    ref = random_space()
    pos, val = random_samples(6, 10, ref.n_positions)
    pos[2] = -1  # never fires
    val[2] = 0.0
    pos[4, 0], val[4, 0] = 3 * SEQ_LEN, 9.0  # a BOS sample: dropped
    d = FeatureDistributions.from_samples(pos, val, ref, layer=1)
    assert d.empty.tolist() == [2] and d.feature_ids.tolist() == [0, 1, 3, 4, 5] and d.n_features == 6
    np.testing.assert_allclose(d.weights.sum(1), 1.0)
    assert np.isfinite(d.coords).all() and np.isfinite(d.weights).all()
    row = 1  # feature 1
    keep = pos[1] >= 0
    np.testing.assert_allclose(
        np.sort(d.weights[row][d.weights[row] > 0]), np.sort(val[1][keep] / val[1][keep].sum()), rtol=1e-6
    )
    assert ((d.positions[3] % SEQ_LEN) != 0)[d.positions[3] >= 0].all()
    sub = FeatureDistributions.from_samples(pos, val, ref, n=3, seed=1)
    assert sub.n_samples == 3 and (sub.support_size <= 3).all()
    again = FeatureDistributions.from_samples(pos, val, ref, n=3, seed=1)
    np.testing.assert_array_equal(sub.positions, again.positions)


def test_save_load_roundtrip(tmp_path):
    ref = random_space()
    pos, val = random_samples(5, 8, ref.n_positions)
    pos[0] = -1
    d = FeatureDistributions.from_samples(pos, val, ref, layer=4)
    path = d.save(tmp_path / "d.npz")
    e = FeatureDistributions.load(path)
    for key in ("coords", "weights", "feature_ids", "empty", "positions"):
        np.testing.assert_array_equal(getattr(d, key), getattr(e, key))
    assert (e.space_id, e.layer, e.n_features) == (d.space_id, 4, 5)
    r2 = ReferenceSpace.load(ref.save(tmp_path / "ref.npz"))
    assert r2.space_id == ref.space_id and np.array_equal(r2.coords, ref.coords)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "ref.npz"]  # no temp files left


# --------------------------------------------------------------------------------------
# paper properties
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-3, 0.37, 25.0, 1e4])
def test_rescaling_invariance(scale):
    ref = random_space()
    pos, val = random_samples(6, 12, ref.n_positions, seed=1)
    d = FeatureDistributions.from_samples(pos, val, ref)
    val2 = val.copy()
    val2[2] *= scale  # rescale feature 2's activations only
    d2 = FeatureDistributions.from_samples(pos, val2, ref)
    np.testing.assert_array_equal(d.positions, d2.positions)
    # activations are float32 (as ActivationStats stores them): rescaling rounds them at 6e-8
    np.testing.assert_allclose(d2.weights, d.weights, rtol=1e-6, atol=1e-12)
    for method, p in [("exact", 1), ("exact", 2), ("sliced", 1), ("sliced", 2)]:
        D = distance_matrix(d, d, method, p=p, progress=False)
        D2 = distance_matrix(d2, d2, method, p=p, progress=False)
        np.testing.assert_allclose(D2, D, rtol=1e-5, atol=1e-7, err_msg=f"{method} p={p}")
    if scale == 25.0:  # Sinkhorn is slow: one scale, the rescaled feature against the others
        pairs = np.array([[2, 0], [2, 1], [2, 3]])
        np.testing.assert_allclose(
            pair_distances(d2, d2, pairs, "sinkhorn"), pair_distances(d, d, pairs, "sinkhorn"), rtol=1e-5
        )


def test_rescaling_invariance_exact_in_float64():
    """With float64 activations and a power-of-two scale the weights are bit-identical."""
    ref = random_space()
    pos, val = random_samples(4, 10, ref.n_positions, seed=2)
    val = val.astype(np.float64)
    d = FeatureDistributions.from_samples(pos, val, ref)
    d2 = FeatureDistributions.from_samples(pos, val * 2.0**-7, ref)
    np.testing.assert_array_equal(d.weights, d2.weights)
    np.testing.assert_array_equal(
        distance_matrix(d, d, progress=False), distance_matrix(d2, d2, progress=False)
    )


@st.composite
def perturbation_case(draw):
    n_a = draw(st.integers(1, 6))
    n_b = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    size = draw(st.floats(1e-3, 3.0))
    one_sided = draw(st.booleans())
    return n_a, n_b, k, seed, size, one_sided


@FAST
@given(perturbation_case())
def test_perturbation_stability(case):
    r"""|W_p(mu^d, nu^d) - W_p(mu, nu)| <= ||delta||_{inf,2} (one side) or 2||delta||_{inf,2}.

    ``||delta||_{inf,2} = max_t ||delta_t||_2`` over the support points; the tighter
    weighted bound (sum_t w_t ||delta_t||^p)^{1/p} per measure is checked too.
    """
    n_a, n_b, k, seed, size, one_sided = case
    rng = np.random.default_rng(seed)
    n_pos = 2 * SEQ_LEN
    base = rng.normal(size=(n_pos, k)) * 2
    ref = ReferenceSpace(base.astype(np.float32), SEQ_LEN, "p")
    non_bos = np.flatnonzero(np.arange(n_pos) % SEQ_LEN != 0)
    chosen = rng.choice(non_bos, n_a + n_b, replace=False)  # disjoint supports
    pa, pb = chosen[:n_a][None], chosen[n_a:][None]
    va = rng.exponential(size=pa.shape) + 0.01
    vb = rng.exponential(size=pb.shape) + 0.01
    delta = rng.normal(size=(n_pos, k))
    delta *= size * rng.random((n_pos, 1)) / np.linalg.norm(delta, axis=1, keepdims=True)
    if one_sided:
        delta[pb.ravel()] = 0.0
    ref2 = ref.with_coords(ref.coords + delta.astype(np.float32))
    norms = np.linalg.norm(ref2.coords.astype(np.float64) - ref.coords, axis=1)  # actual (float32) shift
    sup = norms[np.concatenate([pa.ravel(), pb.ravel()])].max()
    for p in (1, 2):
        w = []
        for r in (ref, ref2):
            a = FeatureDistributions.from_samples(pa, va, r)
            b = FeatureDistributions.from_samples(pb, vb, r)
            w.append(distance_matrix(a, b, "exact", p=p, progress=False)[0, 0])
        ka, kb = a.weights[0] > 0, b.weights[0] > 0  # samples are stored in a shuffled order
        na, nb = norms[a.positions[0][ka]], norms[b.positions[0][kb]]
        weighted = (a.weights[0][ka] @ na**p) ** (1 / p) + (b.weights[0][kb] @ nb**p) ** (1 / p)
        change = abs(w[1] - w[0])
        assert change <= weighted + 1e-5
        assert change <= (1 if one_sided else 2) * sup + 1e-5


def test_perturbing_hidden_states_with_fixed_pca_is_also_bounded(rng):
    hidden = rng.normal(size=(3, SEQ_LEN, 10))
    ref = ReferenceSpace.from_hidden(hidden, name="h", pca_k=3)
    delta = 0.2 * rng.normal(size=hidden.shape)
    ref2 = ref.with_coords(ref.project(hidden + delta).reshape(-1, 3))
    pos, val = random_samples(4, 6, ref.n_positions, seed=3)
    D = [
        distance_matrix(*(FeatureDistributions.from_samples(pos, val, r),) * 2, "exact", progress=False)
        for r in (ref, ref2)
    ]
    sup = np.linalg.norm(delta.reshape(-1, 10), axis=1).max()  # measured in the hidden space
    assert np.abs(D[1] - D[0]).max() <= 2 * sup + 1e-5


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced"])
def test_planted_pairs_are_recovered(method, tmp_path):
    a, b, perm = planted_pair(n_concepts=8, N=16, seed=3)
    D = distance_matrix(a, b, method, progress=False)
    # the margin condition holds: each planted pair beats every other pair in its row/column
    planted = D[np.arange(8), perm]
    off = D.copy()
    off[np.arange(8), perm] = np.inf
    assert (planted < off.min(1)).all() and (planted < off.min(0)[perm]).all()
    m = semantic_match(a, b, method=method, distances=D)
    np.testing.assert_array_equal(m.perm, perm)
    assert m.meta["layer_a"] == 3 and m.meta["layer_b"] == 7 and np.isfinite(m.cost).all()
    top = semantic_match(a, b, mode="topk", k=3, distances=D)
    np.testing.assert_array_equal(top.perm, perm)
    assert np.array(top.meta["topk_ids"]).shape == (len(perm), 3)
    again = Matching.load(top.save(tmp_path / "top.json"))  # meta is JSON-serialisable
    np.testing.assert_array_equal(again.perm, perm)
    assert again.meta["topk_ids"] == top.meta["topk_ids"]
    pruned = semantic_match(a, b, method=method, candidates=2, progress=False)
    np.testing.assert_array_equal(pruned.perm, perm)
    assert pruned.meta["method"] == f"semantic_ot:{method}"


# --------------------------------------------------------------------------------------
# oracles
# --------------------------------------------------------------------------------------


def test_exact_equals_pot_emd2():
    ref = random_space(k=5)
    pos, val = random_samples(5, 9, ref.n_positions, seed=7)
    d = FeatureDistributions.from_samples(pos, val, ref)
    D1 = distance_matrix(d, d, "exact", p=1, progress=False)
    D2 = distance_matrix(d, d, "exact", p=2, progress=False)
    for i in range(len(d)):
        for j in range(len(d)):
            xa, wa = d.support(i)
            xb, wb = d.support(j)
            xa, xb = xa.astype(np.float64), xb.astype(np.float64)
            assert D1[i, j] == pytest.approx(ot.emd2(wa, wb, ot.dist(xa, xb, metric="euclidean")), abs=1e-9)
            assert D2[i, j] == pytest.approx(
                np.sqrt(ot.emd2(wa, wb, ot.dist(xa, xb, metric="sqeuclidean"))), abs=1e-9
            )
    np.testing.assert_allclose(np.diag(D2), 0.0, atol=1e-6)


def test_sliced_equals_pot_sliced_in_one_dimension():
    """k = 1: every direction is +-1, so sliced W2 is the exact 1-D W2 (up to quantile steps)."""
    ref = random_space(k=1)
    pos, val = random_samples(4, 8, ref.n_positions, seed=2)
    d = FeatureDistributions.from_samples(pos, val, ref)
    S = distance_matrix(d, d, "sliced", n_projections=4, n_quantiles=4000, progress=False)
    E = distance_matrix(d, d, "exact", progress=False)
    np.testing.assert_allclose(S, E, atol=5e-3)
    xa, wa = d.support(0)
    xb, wb = d.support(1)
    pot = ot.sliced_wasserstein_distance(
        xa.astype(np.float64), xb.astype(np.float64), wa, wb, projections=np.ones((1, 1))
    )
    assert S[0, 1] == pytest.approx(pot, abs=5e-3)


def test_sliced_quantile_embedding_is_a_euclidean_embedding():
    ref = random_space(k=4)
    pos, val = random_samples(5, 10, ref.n_positions, seed=4)
    d = FeatureDistributions.from_samples(pos, val, ref)
    emb = quantile_embedding(d, n_projections=32, n_quantiles=8, seed=1)
    S = distance_matrix(d, d, "sliced", n_projections=32, n_quantiles=8, seed=1, progress=False)
    np.testing.assert_allclose(np.linalg.norm(emb[:, None] - emb[None], axis=-1), S, atol=1e-5)
    pairs = np.array([[0, 1], [2, 4], [3, 3]])
    np.testing.assert_allclose(
        pair_distances(d, d, pairs, "sliced", n_projections=32, n_quantiles=8, seed=1),
        S[pairs[:, 0], pairs[:, 1]],
        atol=1e-5,
    )


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_tiny_reg_entropic_plan_matches_scipy_assignment(rng):
    """ott-jax style oracle: Sinkhorn at small epsilon = Hungarian permutation."""
    n = 8
    # B's points are A's, shuffled and jittered: the assignment optimum is unique with a gap
    # (on fully random clouds near-ties make any small-epsilon plan legitimately fractional)
    x = rng.normal(size=(n, 3))
    coords = np.zeros((2 * SEQ_LEN, 3))
    coords[1 : n + 1] = x
    coords[n + 1 : 2 * n + 1] = x[rng.permutation(n)] + 0.2 * rng.normal(size=(n, 3))
    ref = ReferenceSpace(coords.astype(np.float32), SEQ_LEN, "o")
    non_bos = np.flatnonzero(np.arange(2 * SEQ_LEN) % SEQ_LEN != 0)
    pa, pb = non_bos[:n][None], non_bos[n : 2 * n][None]
    ones = np.ones((1, n), np.float32)
    a = FeatureDistributions.from_samples(pa, ones, ref)
    b = FeatureDistributions.from_samples(pb, ones, ref)
    plan, ia, ib = transport_plan(a, 0, b, 0, "sinkhorn", reg=REG_TINY, num_iter_max=3000)
    # rows/cols of the plan follow the (shuffled) sample order; map them back to positions
    pos_a, pos_b = a.positions[0][ia], b.positions[0][ib]
    M = ot.dist(ref.coords[pos_a].astype(np.float64), ref.coords[pos_b].astype(np.float64))
    rows, cols = linear_sum_assignment(M)
    np.testing.assert_array_equal(plan.argmax(1)[rows], cols)
    np.testing.assert_allclose(plan * n, np.eye(n)[cols], atol=0.05)
    exact = distance_matrix(a, b, "exact", progress=False)[0, 0]
    entropic = distance_matrix(a, b, "sinkhorn", reg=REG_TINY, num_iter_max=3000, progress=False)[0, 0]
    assert entropic == pytest.approx(exact, rel=1e-3)


def test_point_mass_ot_matching_equals_scipy_assignment(rng):
    """Features that are point masses: OT matching (exact and near-zero-reg Sinkhorn) = LAP."""
    n = 15
    ref = random_space(n_pos=2 * SEQ_LEN, k=3, seed=9)
    non_bos = np.flatnonzero(np.arange(ref.n_positions) % SEQ_LEN != 0)
    pa, pb = non_bos[:n, None], non_bos[n : 2 * n, None]
    v = np.ones((n, 1), np.float32)
    a = FeatureDistributions.from_samples(pa, v, ref)
    b = FeatureDistributions.from_samples(pb, v, ref)
    M = ot.dist(
        ref.coords[pa[:, 0]].astype(np.float64), ref.coords[pb[:, 0]].astype(np.float64), metric="euclidean"
    )
    rows, cols = linear_sum_assignment(M)
    for method in ("exact", "sinkhorn"):
        m = semantic_match(a, b, method=method, p=1, reg=1e-4, progress=False)
        np.testing.assert_array_equal(m.perm[rows], cols)


def test_sliced_and_entropic_track_exact_on_clustered_data():
    a, b = clustered_pair()
    rep = approximation_report(a, b, [("sliced", {"n_projections": 256})], n_pairs=200, n_rows=3, recall_at=5)
    sliced = rep.iloc[0]
    assert sliced["method"] == "sliced" and sliced["n_pairs"] == 200
    assert sliced["spearman"] >= 0.95, rep.to_string()
    assert sliced["scaled_rel_error_mean"] < 0.15 and sliced["recall_at_c"] >= 2 / 3, rep.to_string()
    sink = approximation_report(a, b, [("sinkhorn", {"reg": 0.05})], n_pairs=50).iloc[0]
    assert sink["spearman"] >= 0.99 and sink["rel_error_mean"] < 0.05, sink
    assert sliced["scale"] == pytest.approx(np.sqrt(a.k), rel=0.5)  # SW2 ~ W2 / sqrt(k)


def test_candidate_pruning_is_exact_on_candidates_and_inf_elsewhere():
    a, b = clustered_pair(F=12, N=12, k=8)
    full = distance_matrix(a, b, "exact", progress=False)
    pruned = distance_matrix(a, b, "exact", candidates=3, progress=False)
    kept = np.isfinite(pruned)
    assert (kept.sum(1) == 3).all() and not np.isnan(pruned).any()
    np.testing.assert_allclose(pruned[kept], full[kept])
    assert np.isposinf(pruned[~kept]).all()
    idx, dist = topk_from_distances(pruned, 5)
    assert (idx[:, 3:] == -1).all() and np.isinf(dist[:, 3:]).all()


def test_decoder_cosine_baseline_recovers_permuted_decoder(rng):
    from _builders import standard_sae

    sae = standard_sae(16, 24, seed=4)
    perm = rng.permutation(24)
    W = sae.W_dec.detach().numpy()
    Wb = np.empty_like(W)
    Wb[perm] = 3.0 * W + 0.01 * rng.normal(size=W.shape)  # scaled: cosine ignores norms
    m = decoder_cosine_match(sae, Wb)
    assert isinstance(m, Matching) and m.meta["many_to_one"]
    np.testing.assert_array_equal(m.perm, perm)
    many = decoder_cosine_match(W, np.concatenate([W[:1], W[:1]]))  # many-to-one allowed
    assert set(many.perm.tolist()) <= {0, 1} and many.n_b == 2


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_empty_features_reported_and_never_nan():
    ref = random_space()
    pos, val = random_samples(5, 6, ref.n_positions)
    pos[[1, 3]] = -1
    val[4] = 0.0  # "fires" nowhere: all activations zero
    d = FeatureDistributions.from_samples(pos, val, ref)
    assert d.empty.tolist() == [1, 3, 4] and len(d) == 2
    for method in ("exact", "sinkhorn", "sliced"):
        D = distance_matrix(d, d, method, progress=False)
        assert D.shape == (2, 2) and np.isfinite(D).all()
    m = semantic_match(d, d, progress=False)
    assert m.n_a == 5 and (m.perm[[1, 3, 4]] == -1).all() and m.meta["empty_a"] == [1, 3, 4]
    none = FeatureDistributions.from_samples(np.full((3, 4), -1), np.zeros((3, 4)), ref)
    assert len(none) == 0 and none.empty.tolist() == [0, 1, 2]
    assert distance_matrix(none, d, "sliced", progress=False).shape == (0, 2)


def test_mismatched_reference_spaces_raise():
    r1, r2 = random_space(seed=0, name="layer:5"), random_space(seed=1, name="layer:9")
    pos, val = random_samples(3, 5, r1.n_positions)
    a = FeatureDistributions.from_samples(pos, val, r1)
    b = FeatureDistributions.from_samples(pos, val, r2)
    for method in ("exact", "sinkhorn", "sliced"):
        with pytest.raises(ValueError, match="different reference spaces"):
            distance_matrix(a, b, method, progress=False)
    with pytest.raises(ValueError, match="different reference spaces"):
        semantic_match(a, b, progress=False)


def test_nan_inputs_raise(rng):
    coords = rng.normal(size=(2 * SEQ_LEN, 3)).astype(np.float32)
    coords[5, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ReferenceSpace(coords, SEQ_LEN, "bad")
    hidden = rng.normal(size=(2, SEQ_LEN, 4))
    hidden[1, 3, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        ReferenceSpace.from_hidden(hidden, name="bad", pca_k=2)
    bad = np.zeros((1, 2, 3), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        FeatureDistributions(bad, np.array([[0.5, 0.5]]), [0], "s")
    ref = random_space()
    pos, val = random_samples(2, 4, ref.n_positions)
    val[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FeatureDistributions.from_samples(pos, val, ref)
    pos[0, 0] = ref.n_positions + 3
    with pytest.raises(ValueError, match="other tokens"):
        FeatureDistributions.from_samples(pos, np.abs(np.nan_to_num(val)) + 1, ref)


def test_bad_arguments_raise():
    ref = random_space()
    d = FeatureDistributions.from_samples(*random_samples(3, 4, ref.n_positions), ref)
    with pytest.raises(ValueError, match="method"):
        distance_matrix(d, d, "hungarian")
    with pytest.raises(ValueError, match="p must be"):
        distance_matrix(d, d, p=3)
    with pytest.raises(ValueError, match="mode"):
        semantic_match(d, d, mode="greedy")
    with pytest.raises(ValueError, match="sum to"):
        FeatureDistributions(np.zeros((1, 2, 3)), np.zeros((1, 2)), [0], "s")


def test_sliced_rank_correlates_with_exact_on_random_features():
    """Cheap sanity check on unstructured data (weaker than the clustered test)."""
    ref = random_space(k=4, n_pos=600)
    pos, val = random_samples(20, 16, ref.n_positions, seed=5, fill=1.0)
    d = FeatureDistributions.from_samples(pos, val, ref)
    a, b = d.subset(range(10)), d.subset(range(10, 20))
    E = distance_matrix(a, b, "exact", progress=False).ravel()
    S = distance_matrix(a, b, "sliced", progress=False).ravel()
    assert spearmanr(E, S).statistic > 0.6
