"""Tests for featmatch.matching.baselines: the top-1 decoder cosine (Feature Flow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae

from featmatch.evaluation import pruning
from featmatch.matching.baselines import TOP1_COSINE_META, top1_cosine_matching, top1_cosine_perm
from featmatch.saes import fold, weights
from featmatch.semantic import decoder_cosine_match


def test_one_implementation_behind_the_old_names():
    """pruning.top1_cosine_* and semantic.decoder_cosine_match are this module's function:
    the same map and cost; only the meta differs (each chapter's label)."""
    a, b = jumprelu_sae(d_in=16, d_sae=50, seed=1), jumprelu_sae(d_in=16, d_sae=37, seed=2)
    assert pruning.top1_cosine_perm is top1_cosine_perm
    assert pruning.top1_cosine_matching is top1_cosine_matching
    perm, cos = top1_cosine_perm(a, b)
    m, d = pruning.top1_cosine_matching(a, b), decoder_cosine_match(a, b)
    for other in (m, d):
        np.testing.assert_array_equal(other.perm, perm)
        np.testing.assert_array_equal(other.cost, 1.0 - cos)
        assert other.n_b == 37 and other.meta["many_to_one"]
    assert m.meta == TOP1_COSINE_META
    assert d.meta == {"method": "decoder_cosine", "mode": "top1", "many_to_one": True}
    # against a direct float64 computation, and invariant to folding (a positive row scale)
    A, B = (torch.nn.functional.normalize(s.W_dec.detach().double(), dim=1) for s in (a, b))
    np.testing.assert_array_equal(perm, (A @ B.T).argmax(1).numpy())
    np.testing.assert_allclose(cos, (A @ B.T).max(1).values.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(top1_cosine_perm(weights(fold(a)), weights(fold(b)))[0], perm)
    # other row blocks: other float32 products, the same map (no near-ties here)
    np.testing.assert_array_equal(top1_cosine_perm(a, b, block=7)[0], perm)


def test_inputs_ties_and_errors():
    w = np.eye(3, dtype=np.float32)
    perm, cos = top1_cosine_perm(w, np.vstack([w[:1], w[:1], w[1:]]))  # tie: the first wins
    np.testing.assert_array_equal(perm, [0, 2, 3])
    perm, cos = top1_cosine_perm(torch.zeros(2, 3), torch.eye(3))  # zero rows: cosine 0
    assert (cos == 0).all()
    with pytest.raises(ValueError, match="different widths"):
        top1_cosine_perm(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="W_dec"):
        top1_cosine_perm(np.array([[np.nan, 1.0]]), np.ones((2, 2)))
    with pytest.raises(TypeError, match="decoder matrix"):
        top1_cosine_perm("sae", np.ones((2, 2)))
