"""featmatch.lm.activations: every streamed statistic against a brute-force computation.

The model and SAEs are tiny random ones (``_builders``), on purpose: the brute force
materialises every activation, and hand-set thresholds keep firing rates in a range where
the exact comparisons are not vacuous (``test_firing_rates_are_not_degenerate``). The real
SmolLM2 and tiny zoo go through the same ``gather`` in tests/chapters/test_setup.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae, standard_sae, tiny_model, tiny_tokens

from featmatch.evaluation.metrics import activation_correlation, matching_score
from featmatch.lm import activations as act
from featmatch.lm.activations import ActivationStats, ActivationStatsError, gather

N_LAYERS = 3


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens(n_seq=10, seq_len=16)


@pytest.fixture(scope="module")
def saes():
    return {
        0: jumprelu_sae(seed=0, hook_name="blocks.0.hook_resid_post"),
        1: standard_sae(seed=1, hook_name="blocks.1.hook_resid_post"),
        2: jumprelu_sae(seed=2, theta_range=(0.2, 1.0), hook_name="blocks.2.hook_resid_post"),
    }


PAIRS = [(0, 1), (1, 2), (2, 0)]


def brute_force(model, saes, tokens):
    """All activations materialised: {layer: (acts (N, F) float32, gpos (N,), resid (N, d))}."""
    n_seq, seq_len = tokens.shape
    hooks = {L: act.resolve_hook_name(s, L) for L, s in saes.items()}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=list(hooks.values()))
        out = {}
        for L, sae in saes.items():
            resid = cache[hooks[L]][:, 1:]
            a = sae.encode(resid).reshape(-1, sae.cfg.d_sae).numpy()
            out[L] = (a, resid.reshape(-1, resid.shape[-1]).numpy())
    gpos = (np.arange(n_seq)[:, None] * seq_len + np.arange(1, seq_len)[None, :]).reshape(-1)
    return out, gpos


def brute_topk(a, gpos, k):
    vals, poss = np.zeros((a.shape[1], k), np.float32), np.full((a.shape[1], k), -1)
    for f in range(a.shape[1]):
        idx = np.flatnonzero(a[:, f] > 0)
        order = np.lexsort((gpos[idx], -a[idx, f]))[:k]
        vals[f, : order.size] = a[idx[order], f]
        poss[f, : order.size] = gpos[idx[order]]
    return vals, poss


@pytest.fixture(scope="module")
def stats(model, saes, tokens):
    return gather(
        model,
        saes,
        tokens,
        pairs=PAIRS,
        top_k=5,
        n_samples=6,
        seed=3,
        batch_size=3,
        cache=False,
        progress=False,
    )


@pytest.fixture(scope="module")
def brute(model, saes, tokens):
    return brute_force(model, saes, tokens)


def test_firing_rates_are_not_degenerate(brute):
    acts, _ = brute
    for a, _ in acts.values():
        rate = (a > 0).mean()
        assert 0.02 < rate < 0.8  # the tests below would be vacuous otherwise


def test_per_layer_sums_match_brute_force(stats, brute, tokens):
    acts, _ = brute
    n_seq, seq_len = tokens.shape
    assert stats.n_tokens == n_seq * (seq_len - 1)
    assert stats.layers == [0, 1, 2]
    for L, (a, resid) in acts.items():
        a64 = a.astype(np.float64)
        np.testing.assert_array_equal(stats.fire_count[L], (a > 0).sum(0))
        assert stats.fire_count[L].dtype == np.int64
        np.testing.assert_allclose(stats.act_sum[L], a64.sum(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.act_sq_sum[L], (a64**2).sum(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.resid_norm_mean[L], np.linalg.norm(resid, axis=1).mean(), rtol=1e-5)
        assert stats.l0(L) == pytest.approx((a > 0).sum(1).mean())


def test_pair_matrices_match_brute_force(stats, brute):
    acts, _ = brute
    assert stats.pairs == PAIRS
    for la, lb in PAIRS:
        a, b = acts[la][0].astype(np.float64), acts[lb][0].astype(np.float64)
        coact = (a > 0).astype(np.int64).T @ (b > 0).astype(np.int64)
        np.testing.assert_array_equal(stats.coact[(la, lb)], coact)
        assert stats.coact[(la, lb)].dtype == np.int64
        np.testing.assert_allclose(stats.prod_sum[(la, lb)], a.T @ b, rtol=1e-5, atol=1e-6)
        assert stats.prod_sum[(la, lb)].dtype == np.float64


def test_top_k_exact(stats, brute):
    acts, gpos = brute
    for L, (a, _) in acts.items():
        vals, poss = brute_topk(a, gpos, 5)
        np.testing.assert_array_equal(stats.top_positions[L], poss)
        np.testing.assert_array_equal(stats.top_values[L], vals)


def test_samples_exact_subset_and_values(stats, brute, tokens):
    acts, gpos = brute
    n_total = tokens.numel()
    prio = np.random.default_rng(3).permutation(n_total)
    for L, (a, _) in acts.items():
        pos, val = stats.samples[L]
        assert pos.shape == val.shape == (a.shape[1], 6)
        lookup = {int(g): i for i, g in enumerate(gpos)}
        for f in range(a.shape[1]):
            firing = gpos[a[:, f] > 0]
            got = pos[f][pos[f] >= 0]
            assert got.size == min(6, firing.size)
            assert np.all(pos[f][got.size :] == -1)
            assert len(set(got.tolist())) == got.size  # no duplicates
            assert set(got.tolist()) <= set(firing.tolist())  # only firing positions
            assert np.all(got % tokens.shape[1] != 0)  # never BOS
            np.testing.assert_array_equal(val[f][: got.size], a[[lookup[int(g)] for g in got], f])
            # the documented scheme: the firing positions of smallest seeded priority
            expected = firing[np.argsort(prio[firing])][:6]
            np.testing.assert_array_equal(got, expected)


def test_position_zero_excluded(stats, model, saes, tokens):
    assert stats.n_tokens == tokens.shape[0] * (tokens.shape[1] - 1)
    for L in stats.layers:
        top = stats.top_positions[L]
        assert np.all(top[top >= 0] % tokens.shape[1] != 0)
    # including position 0 would have changed the counts: the check above is not vacuous
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        bos = saes[0].encode(cache["blocks.0.hook_resid_post"][:, 0])
    assert (bos > 0).sum() > 0


def test_streaming_equals_single_batch(model, saes, tokens, stats, monkeypatch):
    monkeypatch.setattr(act._BestK, "merge_min", 1)  # merge every batch
    many = gather(
        model,
        saes,
        tokens,
        pairs=PAIRS,
        top_k=5,
        n_samples=6,
        seed=3,
        batch_size=2,
        cache=False,
        progress=False,
    )
    one = gather(
        model,
        saes,
        tokens,
        pairs=PAIRS,
        top_k=5,
        n_samples=6,
        seed=3,
        batch_size=100,
        cache=False,
        progress=False,
    )
    for L in stats.layers:
        for name in ("top_positions", "top_values"):
            np.testing.assert_array_equal(getattr(many, name)[L], getattr(stats, name)[L])
        np.testing.assert_array_equal(many.samples[L][0], stats.samples[L][0])
        np.testing.assert_array_equal(one.fire_count[L], stats.fire_count[L])
        np.testing.assert_allclose(one.act_sum[L], stats.act_sum[L], rtol=1e-6)
        np.testing.assert_array_equal(one.top_positions[L], stats.top_positions[L])
        np.testing.assert_array_equal(one.top_values[L], stats.top_values[L])
        np.testing.assert_array_equal(one.samples[L][0], stats.samples[L][0])
        np.testing.assert_array_equal(one.samples[L][1], stats.samples[L][1])
    for p in PAIRS:
        np.testing.assert_array_equal(one.coact[p], stats.coact[p])
        np.testing.assert_allclose(one.prod_sum[p], stats.prod_sum[p], rtol=1e-5, atol=1e-6)


def test_sampling_deterministic_and_seeded(model, saes, tokens, stats):
    kw = dict(top_k=5, n_samples=6, batch_size=4, cache=False, progress=False)
    again = gather(model, saes, tokens, seed=3, **kw)
    other = gather(model, saes, tokens, seed=4, **kw)
    for L in stats.layers:
        np.testing.assert_array_equal(again.samples[L][0], stats.samples[L][0])
    assert any(not np.array_equal(other.samples[L][0], stats.samples[L][0]) for L in stats.layers)


def test_sampling_roughly_uniform(monkeypatch):
    """Over seeds, each firing position of a feature is sampled with probability N/M.

    Drives the streaming accumulator directly (gather's samples are tied exactly to this
    scheme by ``test_samples_exact_subset_and_values``), over several batches.
    """
    from scipy import stats as st

    monkeypatch.setattr(act._BestK, "merge_min", 1)  # merge after every batch
    n_total, n, seeds, batch = 240, 5, 400, 40
    firing = np.arange(0, n_total, 6)  # feature 0 fires on every 6th position (M = 40)
    counts = np.zeros(n_total, dtype=np.int64)
    for seed in range(seeds):
        prio = np.random.default_rng(seed).permutation(n_total).astype(np.int64)
        acc = act._LayerAccumulator(2, top_k=0, n_samples=n, prio_bits=8)
        for start in range(0, n_total, batch):
            gpos = np.arange(start, start + batch)
            rows = np.flatnonzero(np.isin(gpos, firing))
            cols = np.zeros(rows.size, dtype=np.int64)
            acc.update(rows, cols, np.ones(rows.size, np.float32), gpos, prio[gpos])
        acc.finish()
        got = acc.res.pos[0]
        assert len(set(got.tolist())) == n and set(got.tolist()) <= set(firing.tolist())
        counts[got] += 1
    obs = counts[firing]
    assert obs.sum() == n * seeds
    # sampling without replacement has less variance than the multinomial: conservative
    assert st.chisquare(obs).pvalue > 1e-3


def test_stop_at_layer_and_hook_names(model, saes, tokens, monkeypatch):
    seen = {}
    orig = model.run_with_hooks

    def spy(*args, **kwargs):
        seen.setdefault("stop", set()).add(kwargs.get("stop_at_layer"))
        seen.setdefault("hooks", set()).update(name for name, _ in kwargs["fwd_hooks"])
        return orig(*args, **kwargs)

    monkeypatch.setattr(model, "run_with_hooks", spy)
    pre = jumprelu_sae(seed=5, hook_name="blocks.1.hook_resid_pre")
    gather(model, {0: saes[0], 1: pre}, tokens, cache=False, progress=False)
    assert seen["stop"] == {2}
    assert seen["hooks"] == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"}


def test_default_hook_name_when_metadata_missing(model, tokens, brute, saes):
    sae = jumprelu_sae(seed=0)
    sae.cfg.metadata.hook_name = None
    assert act.resolve_hook_name(sae, 2) == "blocks.2.hook_resid_post"


def test_wrong_hook_name_is_a_clear_error(model, tokens):
    sae = jumprelu_sae(seed=0, hook_name="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=r"blocks\.7\.hook_resid_post.*does not have"):
        gather(model, {7: sae}, tokens, cache=False, progress=False)


def test_bad_pairs_and_tokens(model, saes, tokens):
    with pytest.raises(ValueError, match="no SAE"):
        gather(model, {0: saes[0]}, tokens, pairs=[(0, 1)], cache=False, progress=False)
    with pytest.raises(ValueError, match="2-D"):
        gather(model, {0: saes[0]}, tokens[0], cache=False, progress=False)
    with pytest.raises(ValueError, match="d_in"):
        gather(model, {0: jumprelu_sae(d_in=8)}, tokens, cache=False, progress=False)


def test_fast_encoder_matches_sae_encode(brute, model, saes, tokens):
    x = torch.randn(200, 16) * 3
    for sae in [*saes.values(), jumprelu_sae(seed=9)]:
        enc = act._fast_encoder(sae)
        assert enc is not None
        with torch.no_grad():
            ref = sae.encode(x)
            hidden, mask = enc(x.clone())
        assert torch.equal(mask, ref > 0)
        torch.testing.assert_close(act._dense(hidden, mask), ref, rtol=1e-6, atol=1e-6)
    slow = gather(
        model,
        saes,
        tokens,
        pairs=PAIRS,
        top_k=5,
        n_samples=6,
        seed=3,
        cache=False,
        progress=False,
        fast_encode=False,
    )
    fast = gather(model, saes, tokens, pairs=PAIRS, top_k=5, n_samples=6, seed=3, cache=False, progress=False)
    for L in saes:
        np.testing.assert_array_equal(slow.fire_count[L], fast.fire_count[L])
        np.testing.assert_array_equal(slow.top_positions[L], fast.top_positions[L])


def test_pair_sums_give_brute_force_score_and_corr(stats, brute):
    acts, _ = brute
    rng = np.random.default_rng(0)
    a, b = acts[0][0].astype(np.float64), acts[1][0].astype(np.float64)
    perm = rng.permutation(32)
    perm[::4] = -1
    score = matching_score(stats, 0, 1, perm).per_feature
    corr = activation_correlation(stats, 0, 1, perm).per_feature
    for i, j in enumerate(perm):
        fa = a[:, i] > 0
        if j < 0 or not fa.any():
            assert np.isnan(score[i])
        else:
            assert score[i] == pytest.approx((b[fa, j] > 0).mean())
        if j < 0 or a[:, i].std() == 0 or b[:, j].std() == 0:
            assert np.isnan(corr[i])
        else:
            assert corr[i] == pytest.approx(np.corrcoef(a[:, i], b[:, j])[0, 1], abs=1e-6)
    # the reversed pair (2, 0) was gathered; (0, 2) reads its transpose
    perm2 = rng.permutation(32)
    c = acts[2][0]
    expect = np.array(
        [((c[a[:, i] > 0, perm2[i]] > 0).mean() if (a[:, i] > 0).any() else np.nan) for i in range(32)]
    )
    np.testing.assert_allclose(matching_score(stats, 0, 2, perm2).per_feature, expect)
    with pytest.raises(KeyError, match="pairs"):
        matching_score(stats, 0, 0, perm2)
    with pytest.raises(ValueError, match="features"):
        matching_score(stats, 0, 1, perm2[:5])
    with pytest.raises(ValueError, match="unmatched"):
        matching_score(stats, 0, 1, np.full(32, 32))


def test_contexts(stats, tokens):
    L = 0
    f = int(np.argmax(stats.fire_count[L]))
    ctx = stats.contexts(L, f, window=3)
    assert len(ctx) == 5
    assert [c["value"] for c in ctx] == sorted((c["value"] for c in ctx), reverse=True)
    for c in ctx:
        tok = int(tokens[c["seq"], c["pos"]])
        assert c["token_id"] == tok and c["token"] == f"<{tok}>"
        assert f"«<{tok}>»" in c["text"]
        assert c["position"] == c["seq"] * tokens.shape[1] + c["pos"]

    class Tok:
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    ctx = stats.contexts(L, f, Tok(), window=2, which="samples")
    assert len(ctx) == 6
    assert all(c["text"].count("«") == 1 and c["token"] == f"w{c['token_id']}" for c in ctx)


def test_save_load_roundtrip(stats, tmp_path):
    path = stats.save(tmp_path / "s.npz")
    back = ActivationStats.load(path)
    assert back.layers == stats.layers and back.pairs == stats.pairs and back.n_tokens == stats.n_tokens
    assert back.hook_names == stats.hook_names and back.resid_norm_mean == stats.resid_norm_mean
    assert torch.equal(back.tokens, stats.tokens)
    for L in stats.layers:
        for name in ("fire_count", "act_sum", "act_sq_sum", "top_values", "top_positions"):
            np.testing.assert_array_equal(getattr(back, name)[L], getattr(stats, name)[L])
        for i in range(2):
            np.testing.assert_array_equal(back.samples[L][i], stats.samples[L][i])
    for p in stats.pairs:
        np.testing.assert_array_equal(back.coact[p], stats.coact[p])
        np.testing.assert_array_equal(back.prod_sum[p], stats.prod_sum[p])


def test_load_corrupt_file_is_a_clear_error(stats, tmp_path):
    path = stats.save(tmp_path / "s.npz")
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ActivationStatsError, match="corrupt"):
        ActivationStats.load(tmp_path / "trunc.npz")
    flipped = bytearray(data)
    mid = len(flipped) // 2
    flipped[mid : mid + 64] = bytes(64)
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(ActivationStatsError):
        ActivationStats.load(tmp_path / "flip.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ActivationStatsError):
        ActivationStats.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        ActivationStats.load(tmp_path / "missing.npz")


def test_cache_hit_skips_forward(model, saes, tokens, tmp_cache, monkeypatch):
    kw = dict(pairs=[(0, 1)], top_k=4, n_samples=3, progress=False)
    first = gather(model, saes, tokens, **kw)
    files = list((tmp_cache / "activations").glob("*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("forward ran on a cache hit")

    monkeypatch.setattr(model, "run_with_hooks", boom)
    monkeypatch.setattr(act, "_run", boom)
    second = gather(model, saes, tokens, batch_size=5, **kw)  # batch size is not in the key
    for L in saes:
        np.testing.assert_array_equal(second.fire_count[L], first.fire_count[L])
        np.testing.assert_array_equal(second.act_sum[L], first.act_sum[L])
        np.testing.assert_array_equal(second.samples[L][0], first.samples[L][0])
    np.testing.assert_array_equal(second.coact[(0, 1)], first.coact[(0, 1)])
    assert second.meta["cache_key"] == first.meta["cache_key"]
    # anything that changes the result changes the key
    k0, _ = act.cache_key(model, saes, tokens, pairs=[(0, 1)], top_k=4, n_samples=3)
    assert k0 == first.meta["cache_key"]
    assert act.cache_key(model, saes, tokens, pairs=[(0, 1)], top_k=4, n_samples=3, seed=1)[0] != k0
    assert act.cache_key(model, saes, tokens[:5], pairs=[(0, 1)], top_k=4, n_samples=3)[0] != k0
    other = dict(saes)
    other[2] = jumprelu_sae(seed=77, hook_name="blocks.2.hook_resid_post")
    assert act.cache_key(model, other, tokens, pairs=[(0, 1)], top_k=4, n_samples=3)[0] != k0
    assert (
        act.cache_key(
            tiny_model(n_layers=N_LAYERS, seed=1), saes, tokens, pairs=[(0, 1)], top_k=4, n_samples=3
        )[0]
        != k0
    )


def test_corrupt_cache_is_recomputed(model, saes, tokens, tmp_cache):
    kw = dict(top_k=4, n_samples=3, progress=False)
    first = gather(model, saes, tokens, **kw)
    (path,) = (tmp_cache / "activations").glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="recomputing"):
        second = gather(model, saes, tokens, **kw)
    for L in saes:
        np.testing.assert_array_equal(second.fire_count[L], first.fire_count[L])
    ActivationStats.load(path)  # rewritten, readable again


# --------------------------------------------------------------------------------------
# evaluated feature pairs (the sparse path: no F_a x F_b array)
# --------------------------------------------------------------------------------------


def test_evaluated_edges_match_brute_force_and_the_dense_metrics(model, saes, tokens, stats, brute, tmp_path):
    acts, _ = brute
    rng = np.random.default_rng(7)
    f0, f1 = saes[0].cfg.d_sae, saes[1].cfg.d_sae
    perm = rng.permutation(f1)[:f0] if f1 >= f0 else rng.integers(0, f1, f0)
    perm[::5] = -1  # some unmatched
    topk = rng.integers(0, f1, size=(f0, 3))
    many = rng.integers(0, saes[0].cfg.d_sae, size=saes[2].cfg.d_sae)  # a reversed-direction pair
    sparse = gather(
        model,
        saes,
        tokens,
        evaluate=[(0, 1, perm), (0, 1, topk), (2, 0, many)],
        top_k=0,
        n_samples=0,
        batch_size=3,
        cache=False,
        progress=False,
    )
    assert sparse.coact == {} and set(sparse.pair_edges) == {(0, 1), (2, 0)}
    rows, cols, co, pr = sparse.pair_edges[(0, 1)]
    a, b = acts[0][0].astype(np.float64), acts[1][0].astype(np.float64)
    np.testing.assert_array_equal(co, ((a[:, rows] > 0) & (b[:, cols] > 0)).sum(0))
    np.testing.assert_allclose(pr, (a[:, rows] * b[:, cols]).sum(0), rtol=1e-5, atol=1e-6)
    # every edge is there once: the union of the perm and the top-k
    want = {(i, j) for i, j in enumerate(perm) if j >= 0} | {(i, int(j)) for i in range(f0) for j in topk[i]}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == want
    # the metrics read the sparse edges and agree with the dense matrices of `stats`: counts
    # exactly; correlations to 1e-6 absolute, since the dense path rounds each batch's product
    # sum to float32 (relative 6e-8) before the float64 accumulation, and r is a ratio of O(1)
    for la, lb, m in ((0, 1, perm), (0, 1, topk[:, 1]), (2, 0, many)):
        np.testing.assert_array_equal(
            matching_score(sparse, la, lb, m).per_feature, matching_score(stats, la, lb, m).per_feature
        )
        np.testing.assert_allclose(
            activation_correlation(sparse, la, lb, m).per_feature,
            activation_correlation(stats, la, lb, m).per_feature,
            rtol=0,
            atol=1e-6,
        )
    with pytest.raises(KeyError, match="was not evaluated"):
        matching_score(sparse, 0, 1, np.where(perm >= 0, (perm + 1) % f1, -1))
    with pytest.raises(KeyError, match="evaluate="):
        matching_score(sparse, 1, 2, np.zeros(f1, dtype=np.int64))
    back = ActivationStats.load(sparse.save(tmp_path / "edges.npz"))
    for p in sparse.pair_edges:
        for x, y in zip(back.pair_edges[p], sparse.pair_edges[p], strict=True):
            np.testing.assert_array_equal(x, y)


def test_evaluate_rejects_bad_matchings(model, saes, tokens):
    f0 = saes[0].cfg.d_sae
    with pytest.raises(ValueError, match="rows"):
        gather(
            model, saes, tokens, evaluate=[(0, 1, np.zeros(f0 + 1, dtype=int))], cache=False, progress=False
        )
    with pytest.raises(ValueError, match="-1 or in"):
        gather(model, saes, tokens, evaluate=[(0, 1, np.full(f0, 10**6))], cache=False, progress=False)
    with pytest.raises(ValueError, match="no SAE"):
        gather(model, saes, tokens, evaluate=[(0, 7, np.zeros(f0, dtype=int))], cache=False, progress=False)


def test_sparse_activations_equal_the_brute_force(model, saes, tokens, brute):
    from featmatch.lm.activations import sparse_activations

    acts, _ = brute
    got = sparse_activations(model, saes, tokens, batch_size=3)
    for L, (a, _) in acts.items():
        np.testing.assert_allclose(got[L].toarray(), a, rtol=1e-6, atol=1e-6)
        assert got[L].nnz == int((a > 0).sum())
