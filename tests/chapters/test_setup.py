"""featmatch.chapters.setup: what every notebook calls first, on the real tiny profile.

``load_setup`` runs for real: SmolLM2 (from the featmatch cache), the tiny SAE zoo (built
by ``make test`` before pytest; a complete zoo is only verified, never retrained) and the
offline corpus. The model is loaded once for the module.
"""

from __future__ import annotations

import pytest
import torch

from featmatch.chapters.setup import Setup, chapter_defaults, default_profile, load_setup
from featmatch.lm import corpus

N_TOKENS, SEQ_LEN = 512, 64


@pytest.fixture(scope="module")
def setup() -> Setup:
    return load_setup(layers=[3, 4], n_tokens=N_TOKENS, seq_len=SEQ_LEN, profile="tiny")


def test_model_and_saes_at_the_chosen_layers(setup):
    assert (setup.model_name, setup.sae_set, setup.profile) == ("smollm2-135m", "featmatch-smollm2-tiny", "tiny")
    assert setup.layers == [3, 4] and sorted(setup.saes) == [3, 4]
    assert (setup.model.cfg.n_layers, setup.model.cfg.d_model) == (30, 576)
    for layer, sae in setup.saes.items():
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.metadata.featmatch["release"] == "featmatch-smollm2-tiny"
        assert sae.cfg.d_in == setup.model.cfg.d_model
    assert setup.tokenizer is setup.model.tokenizer


def test_tokens_are_the_eval_split_with_bos_in_column_0(setup):
    tokens = setup.tokens
    assert tokens.dtype == torch.long and tokens.shape == (N_TOKENS // SEQ_LEN, SEQ_LEN)
    bos = setup.tokenizer.bos_token_id
    assert (tokens[:, 0] == bos).all() and not (tokens[:, 1:] == bos).any()
    kw = dict(n_tokens=N_TOKENS, seq_len=SEQ_LEN, source="mixed", seed=0)
    assert torch.equal(tokens, corpus.token_batches(setup.tokenizer, split="eval", **kw))
    assert not torch.equal(tokens, corpus.token_batches(setup.tokenizer, split="train", **kw))


def test_stats_stream_through_the_setups_saes(setup):
    stats = setup.stats(pairs=[(3, 4)], top_k=2, n_samples=2, cache=False, progress=False)
    assert stats.layers == [3, 4] and stats.n_tokens == setup.tokens.shape[0] * (SEQ_LEN - 1)
    assert stats.coact[(3, 4)].shape == (128, 128)
    assert 0 < stats.l0(3) < 128  # the SAEs fire, sparsely, on SmolLM2's residual stream


def test_missing_layers_are_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"'featmatch-smollm2-tiny' has no SAEs for layers \[30, 31\]"):
        load_setup(layers=[3, 30, 31], profile="tiny")
    with pytest.raises(ValueError, match=r"no SAEs for layers \[3\]; it covers \[14, 15\]"):
        load_setup(sae_set="featmatch-smollm2-tiny-l0b", layers=[3], profile="tiny")
    with pytest.raises(ValueError, match="unknown SAE set 'nope'"):
        load_setup(sae_set="nope", profile="tiny")
    monkeypatch.setenv("FEATMATCH_PROFILE", "tiny")  # the default profile comes from the environment
    with pytest.raises(ValueError, match="'featmatch-smollm2-tiny' has no SAEs for layers \\[30\\]"):
        load_setup(layers=[30])


def test_default_profile(monkeypatch):
    monkeypatch.delenv("FEATMATCH_PROFILE", raising=False)
    assert default_profile() == "quick"
    monkeypatch.setenv("FEATMATCH_PROFILE", "full")
    assert default_profile() == "full"


def test_chapter_defaults_fill_only_none():
    assert chapter_defaults("pruning", "tiny", N_TOKENS=None, LAYER_STEP=2) == {"N_TOKENS": 256, "LAYER_STEP": 2}
    assert chapter_defaults("folding", "my-hub-run", N_TOKENS=None) == {"N_TOKENS": 16384}  # quick's
    with pytest.raises(ValueError, match="unknown chapter 'nope'"):
        chapter_defaults("nope", "tiny")
    with pytest.raises(ValueError, match=r"no default for \['SEED'\]"):
        chapter_defaults("folding", "tiny", SEED=None)
