"""Tests of featmatch.evaluation.metrics: brute-force checks on small arrays and tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _builders import tiny_model, tiny_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from featmatch.evaluation import metrics
from featmatch.matching import Matching
from featmatch.synthetic import planted_pair


# ---------------------------------------------------------------------------------------
# a stand-in ActivationStats built from explicit activations (the contract's fields)
# ---------------------------------------------------------------------------------------
def _acts(rng, n, f, p_fire):
    a = rng.exponential(1.0, size=(n, f)) * (rng.random((n, f)) < p_fire)
    return a


def _stats(fa, fb, la=3, lb=4, sparse=False, reversed_pair=False):
    coact = (fa > 0).astype(np.int64).T @ (fb > 0).astype(np.int64)
    prod = fa.T @ fb
    if sparse:
        import scipy.sparse as sp

        coact, prod = sp.csr_matrix(coact), sp.csr_matrix(prod)
    key = (la, lb)
    if reversed_pair:
        coact, prod, key = coact.T, prod.T, (lb, la)
    return SimpleNamespace(
        layers=[la, lb],
        n_tokens=fa.shape[0],
        fire_count={la: (fa > 0).sum(0), lb: (fb > 0).sum(0)},
        act_sum={la: fa.sum(0), lb: fb.sum(0)},
        act_sq_sum={la: (fa**2).sum(0), lb: (fb**2).sum(0)},
        coact={key: coact},
        prod_sum={key: prod},
    )


@pytest.fixture
def acts():
    rng = np.random.default_rng(1)
    n, f_a, f_b = 400, 12, 15
    fa = _acts(rng, n, f_a, 0.2)
    fa[:, 5] = 0.0  # a dead feature of A
    fb = _acts(rng, n, f_b, 0.3)
    fb[:, 7] = np.where(fa[:, 2] > 0, 2 * fa[:, 2], 0.0)  # B7 copies A2
    perm = rng.permutation(f_b)[:f_a].astype(np.int64)
    perm[2] = 7
    perm[[0, 9]] = -1  # unmatched
    return fa, fb, perm


@pytest.mark.parametrize("layout", ["dense", "sparse", "reversed"])
def test_matching_score_brute_force(acts, layout):
    fa, fb, perm = acts
    stats = _stats(fa, fb, sparse=layout == "sparse", reversed_pair=layout == "reversed")
    got = metrics.matching_score(stats, 3, 4, Matching(perm=perm, cost=np.zeros(len(perm)), n_b=fb.shape[1]))
    want = np.full(len(perm), np.nan)
    for i, j in enumerate(perm):
        fire = fa[:, i] > 0
        if j >= 0 and fire.any():
            want[i] = np.mean(fb[fire, j] > 0)
    np.testing.assert_allclose(got.per_feature, want, equal_nan=True)
    assert got.per_feature[2] == 1.0
    assert np.isnan(got.per_feature[[0, 5, 9]]).all()  # unmatched, dead, unmatched
    assert got.n == int(np.isfinite(want).sum())
    assert got.mean == pytest.approx(np.nanmean(want))


@pytest.mark.parametrize("layout", ["dense", "sparse", "reversed"])
def test_activation_correlation_brute_force(acts, layout):
    fa, fb, perm = acts
    stats = _stats(fa, fb, sparse=layout == "sparse", reversed_pair=layout == "reversed")
    got = metrics.activation_correlation(stats, 3, 4, perm)
    want = np.full(len(perm), np.nan)
    for i, j in enumerate(perm):
        if j >= 0 and fa[:, i].std() > 0 and fb[:, j].std() > 0:
            want[i] = np.corrcoef(fa[:, i], fb[:, j])[0, 1]
    np.testing.assert_allclose(got.per_feature, want, atol=1e-10, equal_nan=True)
    assert got.per_feature[2] == pytest.approx(1.0)
    assert got.mean == pytest.approx(np.nanmean(want))


def test_matching_score_missing_pair_is_clear(acts):
    fa, fb, perm = acts
    stats = _stats(fa, fb)
    with pytest.raises(KeyError, match="pairs"):
        metrics.matching_score(stats, 3, 5, perm)


# ---------------------------------------------------------------------------------------
# explained variance
# ---------------------------------------------------------------------------------------
def test_ev_perfect_and_mean():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.standard_normal((5, 7, 6)) * np.arange(1, 7))
    assert metrics.explained_variance(x, x) == 1.0
    mean = x.reshape(-1, 6).mean(0).expand_as(x)
    assert metrics.explained_variance(x, mean) == pytest.approx(0.0, abs=1e-12)
    # a constant offset is not penalised; a zero prediction is worse than the mean
    assert metrics.explained_variance(x, x + 3.0) == pytest.approx(1.0)
    assert metrics.explained_variance(x.numpy(), 0.5 * x.numpy()) == pytest.approx(0.75)


def test_ev_definition_sums_variance_over_dims():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 4)) * np.array([1.0, 10.0, 0.1, 3.0])
    x_hat = x + rng.standard_normal((200, 4)) * 0.5
    want = 1 - (x_hat - x).var(0).sum() / x.var(0).sum()
    assert metrics.explained_variance(x, x_hat) == pytest.approx(want, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000))
def test_ev_streaming_equals_batch(n_chunks, seed):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.standard_normal((40, 3)))
    x_hat = x + torch.as_tensor(rng.standard_normal((40, 3)))
    acc = metrics.EVAccumulator()
    for cx, ch in zip(torch.tensor_split(x, n_chunks), torch.tensor_split(x_hat, n_chunks), strict=True):
        acc.update(cx, ch)
    assert acc.n == 40
    assert acc.ev == pytest.approx(metrics.explained_variance(x, x_hat), rel=1e-9)
    assert acc.mse == pytest.approx(float(((x_hat - x) ** 2).mean()), rel=1e-9)


# ---------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(n_layers=2, d_model=16, d_vocab=50, n_ctx=16)


def test_token_losses_exclude_position_zero(model):
    toks = tiny_tokens(n_seq=3, seq_len=10)
    lt = metrics.token_losses(model, toks)
    assert lt.shape == (3, 8)
    with torch.no_grad():
        logits = model(toks, return_type="logits")
    lp = torch.log_softmax(logits.double(), -1)
    want = -lp[:, 1:-1].gather(-1, toks[:, 2:, None])[..., 0]
    torch.testing.assert_close(lt.double(), want, atol=1e-5, rtol=1e-5)
    assert metrics.cross_entropy(model, toks, batch_size=2) == pytest.approx(float(want.mean()), abs=1e-5)


def test_delta_ce_identity_hook_is_exactly_zero(model):
    toks = tiny_tokens(n_seq=5, seq_len=12)
    hooks = [("blocks.0.hook_resid_post", lambda act, hook: act.clone())]
    assert metrics.delta_ce(model, toks, hooks, batch_size=2) == 0.0


def test_delta_ce_positive_for_damage(model):
    toks = tiny_tokens(n_seq=4, seq_len=12)
    hooks = [("blocks.0.hook_resid_post", lambda act, hook: torch.zeros_like(act))]
    d = metrics.delta_ce(model, toks, hooks)
    assert d == pytest.approx(metrics.cross_entropy(model, toks, hooks) - metrics.cross_entropy(model, toks))
    assert not model.hook_dict["blocks.0.hook_resid_post"]._forward_hooks


# ---------------------------------------------------------------------------------------
# parameter MSE (Fig. 3)
# ---------------------------------------------------------------------------------------
def test_parameter_mse_planted_vanilla_vs_folded():
    p = planted_pair(d=16, f_a=60, no_partner=0.0, noise=0.0, seed=3)
    truth = Matching(perm=p.truth, cost=np.zeros(60), n_b=60)
    folded = metrics.parameter_mse(p.sae_a, p.sae_b, truth, variant="folded")
    vanilla = metrics.parameter_mse(p.sae_a, p.sae_b, variant="vanilla")
    assert folded.mean == pytest.approx(0.0, abs=1e-10)  # planted copies agree in the folded scale
    assert vanilla.mean > 1e-3
    assert folded.n == vanilla.n == 60
    # the computed folded matching recovers the plant; its per-feature score is its cost
    auto = metrics.parameter_mse(p.sae_a, p.sae_b, variant="folded")
    assert auto.mean == pytest.approx(0.0, abs=1e-10)
    m = __import__("featmatch.matching", fromlist=["match"]).match(p.sae_a, p.sae_b, fold=True)
    np.testing.assert_allclose(metrics.parameter_mse(p.sae_a, p.sae_b, m).per_feature, m.cost, atol=1e-6)


def test_parameter_mse_scored_in_folded_scale_for_unfolded_matching():
    p = planted_pair(d=16, f_a=40, no_partner=0.0, noise=0.05, seed=4, theta_base=(1.0, 3.0))
    unf = metrics.parameter_mse(p.sae_a, p.sae_b, variant="unfolded", on="decoder")
    fol = metrics.parameter_mse(p.sae_a, p.sae_b, variant="folded", on="decoder")
    # folded matching minimises exactly this objective, so it can only be lower
    assert fol.mean <= unf.mean + 1e-9
    assert unf.meta["variant"] == "unfolded" and fol.meta["on"] == "decoder"


def test_parameter_mse_partial_and_errors():
    p = planted_pair(d=8, f_a=20, f_b=24, seed=5)
    perm = p.truth.copy()
    m = Matching(perm=perm, cost=np.zeros(20), n_b=24)
    s = metrics.parameter_mse(p.sae_a, p.sae_b, m, on="encoder")
    assert np.isnan(s.per_feature[perm < 0]).all() and s.n == int((perm >= 0).sum())
    with pytest.raises(ValueError, match="F_A == F_B"):
        metrics.parameter_mse(p.sae_a, p.sae_b, variant="vanilla")
    with pytest.raises(ValueError, match="identity"):
        metrics.parameter_mse(p.sae_a, p.sae_a, m, variant="vanilla")
