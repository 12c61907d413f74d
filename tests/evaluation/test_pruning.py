"""Tests of featmatch.evaluation.pruning on tiny TransformerLens models with planted SAEs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _builders import jumprelu_sae, standard_sae, tiny_model, tiny_tokens
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

from featmatch.evaluation import metrics, pruning
from featmatch.matching import Matching

D = 16
H0, H1, H2 = (f"blocks.{i}.hook_resid_post" for i in range(3))


def _model(identity_block: int | None = None):
    model = tiny_model(n_layers=3, d_model=D, d_vocab=50, n_ctx=16, seed=0)
    if identity_block is not None:  # zero the block's attention and MLP outputs: h_{t+1} = h_t exactly
        blk = model.blocks[identity_block]
        with torch.no_grad():
            for p in (blk.attn.W_O, blk.attn.b_O, blk.mlp.W_out, blk.mlp.b_out):
                p.zero_()
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def id_model():
    return _model(identity_block=1)


@pytest.fixture(scope="module")
def toks():
    return tiny_tokens(n_seq=6, seq_len=12)


def _no_hooks(model):
    for name, hp in model.hook_dict.items():
        assert not hp._forward_hooks, name
        assert not hp.fwd_hooks, name


def perfect_sae(hook: str, seed: int = 0, perm: np.ndarray | None = None, scale: float = 1.0) -> StandardSAE:
    """A ReLU SAE with x̂ = x exactly: features relu(x - b), relu(b - x) (F = 2d), optionally permuted."""
    g = torch.Generator().manual_seed(seed)
    cfg = StandardSAEConfig(d_in=D, d_sae=2 * D)
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    eye = torch.eye(D)
    W_enc = torch.cat([eye, -eye], 1) * scale
    W_dec = torch.cat([eye, -eye], 0) / scale
    b_dec = 0.3 * torch.randn(D, generator=g)
    if perm is not None:
        W_enc, W_dec = W_enc[:, perm], W_dec[perm]
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.copy_(b_dec)
    return sae


def _permuted_copy(sae: JumpReLUSAE, sigma: np.ndarray, hook: str, c: float = 1.0, b_dec=None) -> JumpReLUSAE:
    """B feature j = A feature sigma[j], with activations scaled by c (θ_B = c θ_A)."""
    cfg = JumpReLUSAEConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)
    cfg.metadata.hook_name = hook
    out = JumpReLUSAE(cfg)
    s = torch.as_tensor(sigma)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc[:, s] * c)
        out.b_enc.copy_(sae.b_enc[s] * c)
        out.threshold.copy_(sae.threshold[s] * c)
        out.W_dec.copy_(sae.W_dec[s] / c)
        out.b_dec.copy_(sae.b_dec if b_dec is None else b_dec)
    return out


def _m(perm, cost=None, n_b=None):
    perm = np.asarray(perm, dtype=np.int64)
    cost = np.zeros(len(perm)) if cost is None else cost
    return Matching(perm=perm, cost=cost, n_b=n_b or int(perm.max()) + 1)


# ---------------------------------------------------------------------------------------
# the must-show tests
# ---------------------------------------------------------------------------------------
def test_identity_splice_delta_ce_exactly_zero(model, toks):
    sp = pruning.Splice(H1, lambda prev, true: true.clone(), source_hook=H0, name="identity")
    assert metrics.delta_ce(model, toks, sp.fwd_hooks(), batch_size=4) == 0.0
    assert sp.ev == 1.0 and sp.ev_stats.n == 6 * 11  # position 0 excluded
    with pruning.splice(model, H1, lambda prev, true: true, source_hook=H0) as sp2:
        clean = metrics.token_losses(model, toks)
    assert torch.equal(clean, metrics.token_losses(model, toks))
    assert sp2.ev == 1.0
    _no_hooks(model)


def test_layer_drop_exactly_zero_when_block_is_identity(id_model, toks):
    r = pruning.evaluate_pruning(id_model, toks, {}, 0, "layer_drop", batch_size=4)
    assert r["delta_ce"] == 0.0 and r["ev"] == 1.0
    assert (r["source_hook"], r["target_hook"]) == (H0, H1)
    _no_hooks(id_model)


@pytest.mark.parametrize(
    "ctx",
    [
        lambda m: pruning.layer_drop(m, 0),
        lambda m: pruning.encode_decode_previous(m, perfect_sae(H0)),
        lambda m: pruning.encode_permute_decode(m, perfect_sae(H0), perfect_sae(H1), _m(np.arange(2 * D))),
        lambda m: pruning.splice(m, H1, lambda p, t: t, source_hook=H0),
    ],
)
def test_hooks_removed_after_exception(model, toks, ctx):
    with pytest.raises(ZeroDivisionError):
        with ctx(model):
            assert model.hook_dict[H1]._forward_hooks  # attached inside
            model(toks, return_type="loss")
            1 / 0  # noqa: B018
    _no_hooks(model)


def test_hooks_removed_after_exception_inside_forward(model, toks):
    def bad(prev, true):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with pruning.splice(model, H1, bad, source_hook=H0):
            model(toks)
    _no_hooks(model)


def test_hooks_removed_after_exception_in_sweep(model, toks, monkeypatch):
    calls = {"n": 0}
    real = metrics.token_losses

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pruning, "token_losses", flaky)
    with pytest.raises(KeyboardInterrupt):
        pruning.pruning_sweep(
            model,
            toks,
            {0: perfect_sae(H0), 1: perfect_sae(H1)},
            [0],
            ["layer_drop", "encode_decode_current"],
            progress=False,
        )
    _no_hooks(model)


def test_ev_one_for_perfect_reconstruction(model, toks):
    r = pruning.evaluate_pruning(
        model, toks, {0: perfect_sae(H0), 1: perfect_sae(H1)}, 0, "encode_decode_current"
    )
    assert r["ev"] == pytest.approx(1.0, abs=1e-6)
    assert abs(r["delta_ce"]) < 1e-4


# ---------------------------------------------------------------------------------------
# encode-permute-decode: planted
# ---------------------------------------------------------------------------------------
def test_encode_permute_decode_planted(id_model, toks):
    rng = np.random.default_rng(0)
    sigma = rng.permutation(2 * D)
    sae_a = perfect_sae(H0, seed=1)
    sae_b = perfect_sae(H1, seed=1, perm=sigma)  # B feature j = A feature sigma[j]
    inv = np.argsort(sigma)  # A feature i -> B feature inv[i]
    saes = {0: sae_a, 1: sae_b}
    good = pruning.evaluate_pruning(id_model, toks, saes, 0, "encode_permute_decode", _m(inv))
    assert good["ev"] == pytest.approx(1.0, abs=1e-6)
    assert abs(good["delta_ce"]) < 1e-4
    assert good["n_transferred"] == 2 * D
    wrong = pruning.evaluate_pruning(
        id_model, toks, saes, 0, "encode_permute_decode", _m(rng.permutation(2 * D))
    )
    assert wrong["ev"] < 0.5 and wrong["delta_ce"] > 10 * abs(good["delta_ce"]) + 1e-3
    # unmatched features are dropped: EV falls, but stays above the wrong permutation
    half = inv.copy()
    half[::2] = -1
    part = pruning.evaluate_pruning(id_model, toks, saes, 0, "epd", _m(half, n_b=2 * D))
    assert part["n_transferred"] == D and wrong["ev"] < part["ev"] < good["ev"]
    _no_hooks(id_model)


def test_epd_fold_transfers_theta_ratio(model, toks):
    """B = permuted copy of A with activations scaled by c: folded transfer is exact, unfolded is off by 1/c."""
    c = 3.0
    sae_a = jumprelu_sae(d_in=D, d_sae=24, seed=2, theta_range=(0.05, 0.2), hook_name=H0)
    sigma = np.random.default_rng(1).permutation(24)
    sae_b = _permuted_copy(sae_a, sigma, H1, c=c)
    m = _m(np.argsort(sigma))
    out = {}
    for name, ctx in {
        "prev": pruning.encode_decode_previous(model, sae_a, keep_last=True),
        "fold": pruning.encode_permute_decode(model, sae_a, sae_b, m, fold=True, keep_last=True),
        "raw": pruning.encode_permute_decode(model, sae_a, sae_b, m, fold=False, keep_last=True),
    }.items():
        with ctx as sp:
            model(toks)
        out[name] = sp.last[1]
    b = sae_a.b_dec.detach()
    torch.testing.assert_close(out["fold"], out["prev"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["raw"] - b, (out["prev"] - b) / c, atol=1e-5, rtol=1e-5)


def test_epd_folded_equals_explicit_fold(model, toks):
    from featmatch.saes import fold

    sae_a = jumprelu_sae(d_in=D, d_sae=24, seed=3, theta_range=(0.05, 0.3), hook_name=H0)
    sae_b = jumprelu_sae(d_in=D, d_sae=20, seed=4, theta_range=(0.1, 0.5), hook_name=H1)
    perm = np.random.default_rng(2).permutation(24)
    perm[perm >= 20] = -1
    with pruning.encode_permute_decode(model, sae_a, sae_b, _m(perm, n_b=20), keep_last=True) as sp:
        model(toks)
    h_true, pred = sp.last
    fa, fb = fold(sae_a), fold(sae_b)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[H0])
        f = fa.encode(cache[H0][:, 1:])
        W = torch.zeros(24, D)
        ok = torch.as_tensor(perm >= 0)
        W[ok] = fb.W_dec[torch.as_tensor(perm[perm >= 0])]
        want = f @ W + fb.b_dec
    torch.testing.assert_close(pred, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------
def test_layer_drop_equals_manual(model, toks):
    with pruning.layer_drop(model, 0, keep_last=True) as sp:
        logits = model(toks)
        loss = metrics.token_losses(model, toks)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[H0, H1])
        resid = cache[H0].clone()
        resid[:, 0] = cache[H1][:, 0]  # position 0 is never replaced
        manual = model(resid, start_at_layer=2)
    torch.testing.assert_close(logits, manual)
    lp = torch.log_softmax(manual.double(), -1)
    want = -lp[:, 1:-1].gather(-1, toks[:, 2:, None])[..., 0]
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    assert sp.ev == pytest.approx(metrics.explained_variance(cache[H1][:, 1:], cache[H0][:, 1:]))
    r = pruning.evaluate_pruning(model, toks, {}, 0, "layer_drop", batch_size=4)
    assert r["delta_ce"] == pytest.approx(float(want.mean()) - metrics.cross_entropy(model, toks), abs=1e-5)


def test_encode_decode_current_and_previous_manual(model, toks):
    sae0 = jumprelu_sae(d_in=D, d_sae=32, seed=5, theta_range=(0.02, 0.1), hook_name=H0)
    sae1 = jumprelu_sae(d_in=D, d_sae=32, seed=6, theta_range=(0.02, 0.1), hook_name=H1)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[H0, H1])
        rec1 = sae1.decode(sae1.encode(cache[H1][:, 1:]))
        rec0 = sae0.decode(sae0.encode(cache[H0][:, 1:]))
    saes = {0: sae0, 1: sae1}
    df = pruning.pruning_sweep(
        model,
        toks,
        saes,
        [0],
        ["encode_decode_current", "encode_decode_previous"],
        batch_size=4,
        progress=False,
    )
    ev = dict(zip(df["method"], df["ev"], strict=True))
    assert ev["encode_decode_current"] == pytest.approx(
        metrics.explained_variance(cache[H1][:, 1:], rec1), rel=1e-5
    )
    assert ev["encode_decode_previous"] == pytest.approx(
        metrics.explained_variance(cache[H1][:, 1:], rec0), rel=1e-5
    )


# ---------------------------------------------------------------------------------------
# hybrid (Eq. 6) and top-1 cosine
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    sae_a = jumprelu_sae(d_in=D, d_sae=24, seed=7, theta_range=(0.05, 0.2), hook_name=H0)
    sae_b = jumprelu_sae(d_in=D, d_sae=24, seed=8, theta_range=(0.1, 0.4), hook_name=H1)
    rng = np.random.default_rng(3)
    return sae_a, sae_b, _m(rng.permutation(24), cost=rng.random(24))


def _last(model, toks, ctx):
    with ctx as sp:
        model(toks)
    return sp.last[1]


def test_hybrid_q1_equals_epd_and_q0_equals_previous(model, toks, pair):
    sae_a, sae_b, m = pair
    for fold in (True, False):
        epd = _last(
            model, toks, pruning.encode_permute_decode(model, sae_a, sae_b, m, fold=fold, keep_last=True)
        )
        h1 = _last(
            model, toks, pruning.quantile_hybrid(model, sae_a, sae_b, m, 1.0, fold=fold, keep_last=True)
        )
        torch.testing.assert_close(h1, epd, atol=1e-6, rtol=1e-6)
    prev = _last(model, toks, pruning.encode_decode_previous(model, sae_a, keep_last=True))
    h0 = _last(model, toks, pruning.quantile_hybrid(model, sae_a, sae_b, m, 0.0, keep_last=True))
    torch.testing.assert_close(h0, prev - sae_a.b_dec.detach() + sae_b.b_dec.detach(), atol=1e-5, rtol=1e-5)


def test_hybrid_intermediate_quantile_manual(model, toks, pair):
    sae_a, sae_b, m = pair
    q = 0.5
    sp = pruning.make_splice("quantile_hybrid", sae_a, sae_b, m, q=q, fold=False, keep_last=True)
    assert sp.info["n_transferred"] == 12
    with sp.attach(model):
        model(toks)
    low = np.argsort(m.cost)[:12]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[H0])
        f = sae_a.encode(cache[H0][:, 1:])
        W = sae_a.W_dec.detach().clone()
        W[torch.as_tensor(low)] = sae_b.W_dec.detach()[torch.as_tensor(m.perm[low])]
        want = f @ W + sae_b.b_dec
    torch.testing.assert_close(sp.last[1], want, atol=1e-5, rtol=1e-5)


def test_hybrid_sweep_labels_and_monotone_counts(model, toks, pair):
    sae_a, sae_b, m = pair
    qs = [0.0, 0.25, 0.5, 1.0]
    df = pruning.pruning_sweep(
        model,
        toks,
        {0: sae_a, 1: sae_b},
        [0],
        [{"method": "hybrid", "q": q, "matching": {0: m}} for q in qs],
        progress=False,
    )
    assert list(df["q"]) == qs
    assert list(df["n_transferred"]) == [0, 6, 12, 24]
    assert df["method"].str.startswith("quantile_hybrid_folded_q").all()


def test_top1_cosine_perm_and_splice(model, toks):
    sae_a = jumprelu_sae(d_in=D, d_sae=30, seed=9, hook_name=H0)
    sae_b = jumprelu_sae(d_in=D, d_sae=10, seed=10, hook_name=H1)
    perm, cos = pruning.top1_cosine_perm(sae_a, sae_b, block=7)
    A = torch.nn.functional.normalize(sae_a.W_dec.detach(), dim=1)
    B = torch.nn.functional.normalize(sae_b.W_dec.detach(), dim=1)
    np.testing.assert_array_equal(perm, (A @ B.T).argmax(1).numpy())
    np.testing.assert_allclose(cos, (A @ B.T).max(1).values.numpy(), rtol=1e-6)
    assert len(set(perm.tolist())) < 30  # many-to-one
    m = pruning.top1_cosine_matching(sae_a, sae_b)
    np.testing.assert_array_equal(m.perm, perm)
    # the splice with the computed map equals encode-permute-decode with the same (non-injective) map
    t1 = _last(model, toks, pruning.top1_cosine(model, sae_a, sae_b, keep_last=True))
    epd = _last(model, toks, pruning.encode_permute_decode(model, sae_a, sae_b, m, keep_last=True))
    torch.testing.assert_close(t1, epd)


def test_top1_cosine_recovers_planted_permutation(id_model, toks):
    sigma = np.random.default_rng(4).permutation(2 * D)
    sae_a, sae_b = perfect_sae(H0, seed=2), perfect_sae(H1, seed=2, perm=sigma, scale=2.0)
    perm, cos = pruning.top1_cosine_perm(sae_a, sae_b)
    np.testing.assert_array_equal(perm, np.argsort(sigma))
    # decoder rows of B are A's / 2 and ReLU features carry no threshold: unfolded transfer halves
    r = pruning.evaluate_pruning(id_model, toks, {0: sae_a, 1: sae_b}, 0, "top1_cosine")
    assert r["n_transferred"] == 2 * D and r["ev"] < 0.9


# ---------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------
def test_pruning_sweep_tidy_frame(model, toks):
    saes = {
        t: jumprelu_sae(
            d_in=D, d_sae=24, seed=20 + t, theta_range=(0.05, 0.2), hook_name=f"blocks.{t}.hook_resid_post"
        )
        for t in range(3)
    }
    df = pruning.pruning_sweep(model, toks, saes, batch_size=4, progress=False)
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 2 * len(pruning.DEFAULT_METHODS)
    assert sorted(df["layer"].unique()) == [0, 1]
    for col in ("layer", "method", "kind", "fold", "q", "delta_ce", "ev", "mse", "ce_clean", "n_tokens"):
        assert col in df.columns
    assert not df.duplicated(["layer", "method"]).any()
    assert (df["n_tokens"] == 6 * 10).all() and (df["n_ev_tokens"] == 6 * 11).all()
    assert df["ce_clean"].nunique() == 1
    assert set(df.loc[df["kind"] == "encode_permute_decode", "method"]) == {
        "encode_permute_decode_folded",
        "encode_permute_decode_unfolded",
    }
    # the sweep row equals the single evaluation
    row = df[(df["layer"] == 1) & (df["method"] == "encode_permute_decode_folded")].iloc[0]
    one = pruning.evaluate_pruning(model, toks, saes, 1, "encode_permute_decode", batch_size=3)
    assert one["delta_ce"] == pytest.approx(row["delta_ce"], abs=1e-6)
    assert one["ev"] == pytest.approx(row["ev"], rel=1e-6)
    _no_hooks(model)


def test_errors(model, toks):
    sae0 = standard_sae(d_in=D, d_sae=8, hook_name=H0)
    with pytest.raises(ValueError, match="unknown pruning method"):
        pruning.make_splice("nope", sae0)
    with pytest.raises(ValueError, match="needs matching"):
        pruning.make_splice("quantile_hybrid", sae0, standard_sae(d_in=D, d_sae=8, hook_name=H1), q=0.5)
    with pytest.raises(KeyError, match="no hook point"):
        with pruning.splice(model, "blocks.9.hook_resid_post", lambda p, t: t):
            pass
    # target before source in the forward: a clear error, hooks removed
    with pytest.raises(RuntimeError, match="source hook must come first"):
        with pruning.splice(model, H0, lambda p, t: p, source_hook=H1):
            model(toks)
    _no_hooks(model)


def test_same_layer_transfer_of_a_permuted_copy_equals_the_sae_splice(model, toks):
    # B is A with its features permuted (θ_B = 2 θ_A): the folded transfer through the true
    # permutation reproduces A's reconstruction, so ΔCE equals the SAE splice's (encode-decode current)
    a = jumprelu_sae(D, 24, seed=3, theta_range=(0.05, 0.2), hook_name=H1)
    sigma = np.random.default_rng(0).permutation(24)
    b = _permuted_copy(a, sigma, H1, c=2.0)
    inv = np.argsort(sigma)  # A feature i is B feature inv[i]
    r = pruning.same_layer_transfer(model, toks, a, b, _m(inv), batch_size=4)
    ref = pruning.evaluate_pruning(model, toks, {1: a}, 0, "encode_decode_current", batch_size=4)
    assert r["delta_ce"] == pytest.approx(ref["delta_ce"], abs=1e-5)
    assert r["ev"] == pytest.approx(ref["ev"], abs=1e-5)
    assert r["delta_ce_seq"].shape == (toks.shape[0],) and r["delta_ce_seq"].mean() == pytest.approx(r["delta_ce"], abs=1e-9)
    # a wrong permutation is worse
    bad = pruning.same_layer_transfer(model, toks, a, b, _m(np.roll(inv, 1)), batch_size=4)
    assert bad["ev"] < r["ev"]
    with pytest.raises(ValueError, match="one hook point"):
        pruning.same_layer_transfer(model, toks, a, jumprelu_sae(D, 24, seed=4, hook_name=H0), _m(inv))
    _no_hooks(model)
