"""Real, seconds-cheap parts for the chapter tests: planted activation statistics and a tokenizer.

:func:`planted_pair` gives a tiny random TransformerLens model and two JumpReLU SAEs ("layers"
1 and 2) that read the *same* hook, SAE B being SAE A with its features permuted; so the
true matching of A to B is known (feature :data:`DEAD` of A never fires), and :func:`planted_stats` gathers real
:class:`featmatch.lm.activations.ActivationStats` on them with :func:`featmatch.lm.activations.gather`.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from _builders import jumprelu_sae, permuted_sae, tiny_model, tiny_tokens

SEQ_LEN = 16
D_MODEL = 16
D_SAE = 24
HOOK = "blocks.1.hook_resid_post"
DEAD = 0  # feature of SAE A that never fires (its partner in B neither)


@cache
def planted_pair(seed: int = 0):
    """``(model, tokens, {1: sae_a, 2: sae_b}, perm)``, B's feature ``perm[i]`` = A's ``i``."""
    model = tiny_model(n_layers=3, d_model=D_MODEL, n_ctx=SEQ_LEN, seed=seed)
    tokens = tiny_tokens(n_seq=24, seq_len=SEQ_LEN, seed=seed)
    sae_a = jumprelu_sae(d_in=D_MODEL, d_sae=D_SAE, seed=seed, theta_range=(0.05, 0.6), hook_name=HOOK)
    with torch.no_grad():
        sae_a.threshold[DEAD] = 1e6  # a feature that never fires
    perm = np.random.default_rng(seed).permutation(D_SAE)
    return model, tokens, {1: sae_a, 2: permuted_sae(sae_a, perm)}, perm


@cache
def planted_stats(seed: int = 0, n_samples: int = 8):
    """Real activation statistics of :func:`planted_pair` with the pair (1, 2)."""
    from featmatch.lm.activations import gather

    model, tokens, saes, _ = planted_pair(seed)
    return gather(
        model, saes, tokens, pairs=[(1, 2)], n_samples=n_samples, seed=seed, cache=False, progress=False
    )


@cache
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (from the featmatch model cache; a few seconds)."""
    from featmatch.lm.models import load_tokenizer

    return load_tokenizer("smollm2-135m")
