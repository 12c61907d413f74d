"""gather over corpus shards: the merged accumulators equal one pass.

Exact: firing and co-activation counts, top-k positions and values, and the membership
of the uniform samples. Float64 sums (activations, squares, products, residual norms) are
the same per-batch terms added in another order (shards are cut at batch boundaries), so
they agree to float64 reassociation: relative 1e-12 is ~4500 ulps, far above the
~n_batches ulps the reordering can cost and far below any real difference.
"""

from __future__ import annotations

import numpy as np
import pytest
from _builders import jumprelu_sae, standard_sae, tiny_model, tiny_tokens

from featmatch.lm import activations as act
from featmatch.lm.activations import gather, shard_ranges
from featmatch.lm.corpus import token_batches
from featmatch.lm.models import load_model
from featmatch.matching import match
from featmatch.saes.zoo import load_zoo_sae

RTOL = 1e-12


def assert_same_stats(a, b):
    assert a.layers == b.layers and a.n_tokens == b.n_tokens and a.hook_names == b.hook_names
    for L in a.layers:
        np.testing.assert_array_equal(a.fire_count[L], b.fire_count[L])
        np.testing.assert_array_equal(a.top_positions[L], b.top_positions[L])
        np.testing.assert_array_equal(a.top_values[L], b.top_values[L])
        np.testing.assert_array_equal(a.samples[L][0], b.samples[L][0])  # sample membership, in order
        np.testing.assert_array_equal(a.samples[L][1], b.samples[L][1])
        np.testing.assert_allclose(a.act_sum[L], b.act_sum[L], rtol=RTOL, atol=0)
        np.testing.assert_allclose(a.act_sq_sum[L], b.act_sq_sum[L], rtol=RTOL, atol=0)
        assert a.resid_norm_mean[L] == pytest.approx(b.resid_norm_mean[L], rel=RTOL)
    assert list(a.coact) == list(b.coact) and list(a.pair_edges) == list(b.pair_edges)
    for p in a.coact:
        np.testing.assert_array_equal(a.coact[p], b.coact[p])
        np.testing.assert_allclose(a.prod_sum[p], b.prod_sum[p], rtol=RTOL, atol=1e-300)
    for p in a.pair_edges:
        for x, y in zip(a.pair_edges[p][:3], b.pair_edges[p][:3], strict=True):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(a.pair_edges[p][3], b.pair_edges[p][3], rtol=RTOL)


def test_shard_ranges_cover_the_sequences_at_batch_boundaries():
    for n_seq, n, bs in [(10, 3, 2), (64, 4, 8), (7, 10, 3), (5, 1, 16)]:
        r = shard_ranges(n_seq, n, bs)
        assert r[0][0] == 0 and r[-1][1] == n_seq
        assert all(a[1] == b[0] for a, b in zip(r[:-1], r[1:], strict=True))
        assert all(a % bs == 0 for a, _ in r) and len(r) == min(n, -(-n_seq // bs))


def test_merged_shards_equal_one_pass_with_tied_activations():
    """Repeated sequences make every top-k value tie across shards: the tie keeps the smaller position."""
    model = tiny_model(n_layers=2)
    saes = {
        0: jumprelu_sae(seed=0, hook_name="blocks.0.hook_resid_post"),
        1: standard_sae(seed=1, hook_name="blocks.1.hook_resid_post"),
    }
    base = tiny_tokens(n_seq=2, seq_len=16)
    tokens = base.repeat(6, 1)  # 12 sequences, each activation value appears 6 times
    kw = dict(pairs=[(0, 1)], top_k=5, n_samples=7, seed=3, batch_size=2, progress=False, cache=False)
    one = gather(model, saes, tokens, **kw)
    plan = act._plan(
        model, saes, tokens, pairs=[(0, 1)], evaluate=(), top_k=5, n_samples=7, seed=3, cache=False
    )
    run = dict(
        layers=plan.layers,
        hook_names=plan.hook_names,
        pairs=plan.pairs,
        edges=plan.edges,
        top_k=5,
        n_samples=7,
        seed=3,
        batch_size=2,
        progress=False,
        fast_encode=True,
    )
    parts = [act._run(model, saes, tokens, seq_range=r, **run) for r in shard_ranges(12, 4, 2)]
    merged = act._merge_partials(
        parts[::-1], n_total=tokens.numel(), seed=3, top_k=5, n_samples=7
    )  # any order
    two = act._finish(
        merged, tokens, layers=plan.layers, hook_names=plan.hook_names, widths=plan.widths, edges=plan.edges
    )
    assert_same_stats(one, two)
    pos, val = one.top_positions[0], one.top_values[0]
    tied = (pos[:, 1:] >= 0) & (val[:, 1:] == val[:, :-1])
    assert tied.sum() > 10, "too few tied top values: the tie rule was not exercised"
    assert (pos[:, 1:][tied] > pos[:, :-1][tied]).all()  # a tie keeps the earlier position first


def test_gather_on_a_cluster_equals_one_pass_real_model_and_zoo(dask_client, tmp_path, monkeypatch):
    """SmolLM2 and two tiny-zoo SAEs, loaded on the workers from their sources; 4 shards."""
    monkeypatch.setattr(act, "cache_path", lambda key: tmp_path / f"{key}.npz")  # the client writes it
    model = load_model("smollm2-135m")
    saes = {L: load_zoo_sae("tiny", L) for L in (4, 9)}
    tokens = token_batches(model.tokenizer, n_tokens=2048, seq_len=64, source="mixed", split="eval", seed=0)
    perm = match(saes[4], saes[9]).perm
    kw = dict(
        pairs=[(4, 9)], evaluate=[(4, 9, perm)], top_k=8, n_samples=16, seed=1, batch_size=4, progress=False
    )
    one = gather(model, saes, tokens, cache=False, **kw)
    dist = gather(model, saes, tokens, cache=True, client=dask_client, n_shards=4, **kw)
    assert len(dist.meta["shards"]) == 4
    assert all(one.fire_count[L].sum() > 0 for L in one.layers)
    assert_same_stats(one, dist)
    again = gather(model, saes, tokens, cache=True, **kw)  # the cluster's run filled the local cache
    assert again.meta["cache_key"] == dist.meta["cache_key"]
    assert_same_stats(one, again)


def test_gather_on_a_cluster_scatters_objects_without_a_source(dask_client):
    model = tiny_model(n_layers=3)
    saes = {
        0: jumprelu_sae(seed=0, hook_name="blocks.0.hook_resid_post"),
        2: standard_sae(seed=1, hook_name="blocks.2.hook_resid_post"),
    }
    tokens = tiny_tokens(n_seq=10, seq_len=16)
    kw = dict(pairs=[(0, 2)], top_k=4, n_samples=6, batch_size=2, progress=False, cache=False)
    assert_same_stats(
        gather(model, saes, tokens, **kw), gather(model, saes, tokens, client=dask_client, n_shards=3, **kw)
    )


def test_gather_on_a_cluster_reports_a_bad_hook_from_the_worker(dask_client):
    model = tiny_model(n_layers=2)
    saes = {7: jumprelu_sae(seed=0, hook_name="blocks.7.hook_resid_post")}
    with pytest.raises(ValueError, match="blocks.7"):
        gather(model, saes, tiny_tokens(), client=dask_client, cache=False, progress=False, retries=0)
