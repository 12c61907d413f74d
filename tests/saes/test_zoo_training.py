"""Zoo training: θ stays at or above the training minimum, and the same-layer seed control.

Trains a 2-layer zoo on a tiny random HookedTransformer (a fake for the same reason as in
``test_zoo.py``: a SmolLM2 build takes minutes).
"""

from __future__ import annotations

import pytest
import torch
from _builders import tiny_model

from featmatch.saes import zoo

from .test_zoo import ByteTokenizer, unit_profile


@pytest.fixture
def model():
    return tiny_model(n_layers=3, d_model=16, d_vocab=50, n_ctx=32)


def test_theta_min_is_half_the_bandwidth():
    assert zoo.theta_min_of({"jumprelu_bandwidth": 0.05}) == pytest.approx(0.025)


def test_training_keeps_theta_at_or_above_the_minimum(tmp_cache, model):
    # a large learning rate and a tiny initial threshold push θ towards zero within a few steps
    prof = unit_profile(
        "thmin", layers=[0, 1], l0b={"layers": []},
        sae={"d_sae": 32, "target_l0": 1, "jumprelu_init_threshold": 0.03, "jumprelu_bandwidth": 0.05},
        trainer={"epochs": 3, "train_batch_size_samples": 128, "lr": 0.05, "n_batches_for_norm_estimate": 2},
    )
    zoo.build_zoo(prof, model=model, tokenizer=ByteTokenizer(), progress=False)
    floor = zoo.theta_min_of(prof.sae_config())
    for layer in (0, 1):
        sae = zoo.load_zoo_sae(prof, layer)
        meta = sae.cfg.metadata.featmatch
        assert meta["theta_min_train"] == pytest.approx(floor) and meta["training_revision"] == zoo.TRAINING_REVISION
        assert meta["train_normalize_activations"] == prof.sae["normalize_activations"]
        th = sae.threshold.detach()
        assert torch.all(th > 0)
        # saved θ = trained θ rescaled by sae-lens's folds (positive factors): none is left at the old 1e-3 floor
        assert int(zoo.manifest(prof)["saes"]["main"][str(layer)]["n_threshold_floored"]) == 0


def test_seed2_variant_is_the_main_config_with_another_seed(tmp_cache, model):
    prof = unit_profile("seeds", layers=[0, 1], l0b={"layers": []}, seed2={"layers": [1]})
    assert prof.release_of("seed2") == f"{prof.release}-seed2"
    assert prof.sae_config("seed2") == prof.sae_config("main")
    zoo.build_zoo(prof, model=model, tokenizer=ByteTokenizer(), progress=False)
    a, b = zoo.load_zoo_sae(prof, 1), zoo.load_zoo_sae(prof, 1, variant="seed2")
    assert a.cfg.metadata.hook_name == b.cfg.metadata.hook_name
    assert not torch.allclose(a.W_dec, b.W_dec)  # another seed, another SAE
    with pytest.raises(ValueError, match="seed2.layers"):
        unit_profile("bad", seed2={"layers": [7]}).seed2_layers_for(3)
