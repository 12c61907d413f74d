"""featmatch.synthetic: seeded planted data with a known ground truth."""

from __future__ import annotations

import numpy as np
import torch

from featmatch.saes import fold, weights
from featmatch.synthetic import (
    permuted_vectors,
    planted_chain,
    planted_pair,
    planted_scale_families,
    planted_vectors,
    planted_weights_chain,
    recovery,
)


def test_planted_pair_is_seeded_and_folds_back():
    p, q = planted_pair(d=16, f_a=40, f_b=44, seed=3), planted_pair(d=16, f_a=40, f_b=44, seed=3)
    assert torch.equal(p.sae_a.W_dec, q.sae_a.W_dec) and np.array_equal(p.truth, q.truth)
    assert not torch.equal(p.sae_a.W_dec, planted_pair(d=16, f_a=40, f_b=44, seed=4).sae_a.W_dec)
    # unfolding is undone by folding (Eq. 4)
    w = weights(fold(p.sae_a))
    np.testing.assert_allclose(w.W_dec.double().numpy(), p.folded_a.D, rtol=1e-5, atol=1e-6)
    assert p.has_partner_a.sum() == round(0.85 * 40)
    assert p.no_partner_b.sum() == 44 - p.has_partner_a.sum()
    assert recovery(p.truth, p.truth) == 1.0


def test_chains_and_vectors_have_the_documented_shapes():
    saes, truths = planted_chain(n_layers=3, d=8, f=20, seed=0)
    assert [s.cfg.metadata.hook_name for s in saes] == [f"blocks.{k}.hook_resid_post" for k in range(3)]
    assert len(truths) == 2 and all((t >= 0).sum() == 18 for t in truths)
    s = planted_scale_families(d=8, n_dirs=5, seed=0)
    assert s.sae_a.cfg.d_sae == 10 and (s.truth >= 0).all()
    a, b, truth = planted_vectors(100, 8, seed=1)
    assert a.shape == b.shape == (100, 8) and a.dtype == torch.float32 and (truth >= 0).sum() == 90
    a2, b2, truth2 = planted_vectors(100, 8, seed=1)
    assert torch.equal(a, a2) and torch.equal(b, b2) and np.array_equal(truth, truth2)
    chain = list(planted_weights_chain(3, 50, 8, seed=0))
    assert [w.hook_name for w in chain] == [f"blocks.{k}.hook_resid_post" for k in range(3)]
    assert torch.equal(chain[0].W_dec, chain[0].W_enc.T)
    x, y = permuted_vectors(30, 4, seed=0, unmatched=0.2)
    assert x.shape == y.shape == (30, 4)
    torch.testing.assert_close(y[:6].norm(dim=1), torch.ones(6))  # the fresh rows are unit vectors


def test_unit_planted_vectors_are_unit_with_noise_of_the_given_norm():
    a, b, truth = planted_vectors(200, 64, seed=3, unmatched=0.4, noise=0.8, unit=True)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(200))
    fresh = np.setdiff1d(np.arange(200), truth[truth >= 0])
    torch.testing.assert_close(b[fresh].norm(dim=1), torch.ones(len(fresh)))
    i = np.flatnonzero(truth >= 0)
    assert len(i) == 120
    torch.testing.assert_close((b[truth[i]] - a[i]).norm(dim=1), torch.full((120,), 0.8))
