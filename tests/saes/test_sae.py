"""Tests for featmatch.saes: the weight view, folding (Eq. 4), loading and the SAE-set registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae, standard_sae
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

import featmatch
from featmatch.saes import (
    HubUnreachableError,
    SAEWeights,
    check_same_d_in,
    fold,
    load_layer_sae,
    load_sae,
    sae_set,
    sae_sets,
    weights,
)


def _random_jumprelu(
    d_in: int, d_sae: int, seed: int, log_theta: tuple[float, float], apply_b_dec: bool
) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec)
    sae = JumpReLUSAE(cfg)
    lo, hi = log_theta
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(0.5 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
        sae.threshold.copy_(torch.exp(lo + (hi - lo) * torch.rand(d_sae, generator=g)))
    return sae


def _row_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of ||a - b|| / max(||b||, tiny)."""
    num = (a.double() - b.double()).norm(dim=-1)
    den = b.double().norm(dim=-1).clamp_min(1e-12)
    return float((num / den).max())


# --------------------------------------------------------------------------------------
# Folding invariance (property test on SAELens JumpReLUSAE objects)
# --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    d_in=st.integers(2, 24),
    d_sae=st.integers(1, 48),
    seed=st.integers(0, 2**31 - 1),
    log_theta_lo=st.floats(-4.0, 1.5),
    log_theta_width=st.floats(0.0, 2.0),
    apply_b_dec=st.booleans(),
    n_tokens=st.integers(1, 16),
)
def test_fold_preserves_reconstruction_and_divides_activations(
    d_in, d_sae, seed, log_theta_lo, log_theta_width, apply_b_dec, n_tokens
):
    sae = _random_jumprelu(d_in, d_sae, seed, (log_theta_lo, log_theta_lo + log_theta_width), apply_b_dec)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(n_tokens, d_in, generator=torch.Generator().manual_seed(seed + 1)) * 2.0
    theta = sae.threshold.detach()

    with torch.no_grad():
        pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        # a pre-activation within float32 rounding of theta can flip either way: not a fold bug
        assume(bool(((pre - theta).abs() > 1e-4 * theta.abs().clamp_min(1.0)).all()))
        f = sae.encode(x)
        x_hat = sae(x)  # SAELens's own forward on the original
        folded = fold(sae)
        f_fold = folded.encode(x)
        x_hat_fold = folded(x)

    assert type(folded) is JumpReLUSAE and folded is not sae
    assert torch.equal(folded.threshold.detach(), torch.ones(d_sae))
    assert folded.cfg.apply_b_dec_to_input == apply_b_dec
    # the original SAE is untouched
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), k
    # same firing pattern, activations divided by theta
    assert torch.equal(f_fold > 0, f > 0)
    assert _row_rel_err(f_fold * theta, f) <= 1e-5
    torch.testing.assert_close(
        f_fold, f / theta, rtol=1e-5, atol=1e-6 * float(f.abs().max() / theta.min() + 1)
    )
    # same reconstruction within 1e-5 relative
    assert _row_rel_err(x_hat_fold, x_hat) <= 1e-5


def test_fold_is_idempotent_and_matches_eq4():
    sae = jumprelu_sae(d_in=8, d_sae=12, seed=3)
    folded = fold(sae)
    theta = sae.threshold.detach()
    torch.testing.assert_close(folded.W_enc.detach(), sae.W_enc.detach() / theta, rtol=1e-6, atol=0)
    torch.testing.assert_close(folded.b_enc.detach(), sae.b_enc.detach() / theta, rtol=1e-6, atol=0)
    torch.testing.assert_close(folded.W_dec.detach(), sae.W_dec.detach() * theta[:, None], rtol=1e-6, atol=0)
    torch.testing.assert_close(folded.b_dec.detach(), sae.b_dec.detach(), rtol=0, atol=0)
    twice = fold(folded)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(twice, name).detach(), getattr(folded, name).detach()), name


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_fold_without_threshold_returns_independent_equivalent_copy(kind):
    if kind == "standard":
        sae = standard_sae(d_in=8, d_sae=16, seed=1)
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=3))
    copy = fold(sae)
    assert type(copy) is type(sae) and copy is not sae
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(x), sae(x))
        assert torch.equal(copy.encode(x), sae.encode(x))
        copy.W_dec.mul_(2.0)
    assert not torch.equal(copy.W_dec, sae.W_dec)  # a copy, not a view


# --------------------------------------------------------------------------------------
# Weight view and validation
# --------------------------------------------------------------------------------------


def test_weights_view_shapes_and_types():
    w = weights(jumprelu_sae(d_in=6, d_sae=10, seed=0, hook_name="blocks.3.hook_resid_post"))
    assert isinstance(w, SAEWeights)
    assert (w.d_in, w.d_sae) == (6, 10)
    assert (
        w.W_enc.shape == (6, 10)
        and w.W_dec.shape == (10, 6)
        and w.b_enc.shape == (10,)
        and w.b_dec.shape == (6,)
    )
    assert w.threshold is not None and w.threshold.shape == (10,)
    assert w.architecture == "jumprelu" and w.hook_name == "blocks.3.hook_resid_post"
    assert all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in (w.W_enc, w.b_enc, w.W_dec, w.b_dec)
    )
    assert weights(standard_sae(d_in=6, d_sae=10)).threshold is None


def test_effective_b_enc_reproduces_pre_activation():
    sae = _random_jumprelu(7, 9, seed=5, log_theta=(0.0, 0.5), apply_b_dec=True)
    w = weights(sae)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(x @ w.W_enc + w.b_enc_effective, pre, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("param", ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected_with_the_parameter_name(param, bad):
    sae = jumprelu_sae(d_in=4, d_sae=6, seed=0)
    with torch.no_grad():
        getattr(sae, param).view(-1)[2] = bad
    with pytest.raises(ValueError, match=rf"{param}.*non-finite"):
        weights(sae)
    with pytest.raises(ValueError, match=param):
        fold(sae)


@pytest.mark.parametrize("value", [0.0, -0.3])
def test_non_positive_threshold_is_rejected(value):
    sae = jumprelu_sae(d_in=4, d_sae=6, seed=0)
    with torch.no_grad():
        sae.threshold[1] = value
    with pytest.raises(ValueError, match=r"threshold.*<= 0"):
        weights(sae)
    with pytest.raises(ValueError, match=r"threshold"):
        fold(sae)


def test_d_in_mismatch_is_named():
    with pytest.raises(ValueError, match=r"d_in mismatch.*d_in=4.*d_in=5"):
        check_same_d_in(weights(jumprelu_sae(d_in=4, d_sae=6)), weights(jumprelu_sae(d_in=5, d_sae=6)))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _saved(tmp_path: Path, seed: int = 0) -> tuple[JumpReLUSAE, Path]:
    sae = jumprelu_sae(d_in=6, d_sae=10, seed=seed, hook_name="blocks.2.hook_resid_post")
    folder = tmp_path / f"sae{seed}"
    sae.save_model(folder)
    return sae, folder


@pytest.mark.parametrize("as_str", [True, False])
def test_load_sae_from_disk_round_trip(tmp_path, as_str):
    sae, folder = _saved(tmp_path)
    loaded = load_sae(str(folder) if as_str else folder)
    assert type(loaded) is JumpReLUSAE
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, name).detach(), getattr(sae, name).detach()), name
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"


@pytest.mark.parametrize("source", ["not-a-source", "gemma scope", "   "])
def test_unknown_source_string_is_a_value_error(source):
    with pytest.raises(ValueError, match="SAE source"):
        load_sae(source)


@pytest.mark.parametrize("source", ["release:", ":sae_id", ":"])
def test_garbled_release_id_is_a_value_error(source):
    with pytest.raises(ValueError, match="release:sae_id"):
        load_sae(source)


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="SAE folder not found"):
        load_sae(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path / "empty")


def test_unknown_release_is_a_value_error():
    with pytest.raises(ValueError, match="no-such-release"):
        load_sae("no-such-release:blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="not found in release"):
        load_sae("gpt2-small-res-jb:blocks.99.hook_resid_pre")


def test_hub_unreachable_offline_is_reported_clearly():
    import huggingface_hub.constants as hfc

    if not hfc.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 at import time (set by conftest) so no network is touched")
    with pytest.raises(HubUnreachableError, match=r"unreachable.*HF_HUB_OFFLINE=1 is set"):
        load_sae("gpt2-small-res-jb:blocks.0.hook_resid_pre")


def test_zoo_release_loads_from_the_real_tiny_zoo():
    """``featmatch-*`` releases resolve through featmatch.saes.zoo (checksums verified)."""
    sae = load_sae("featmatch-smollm2-tiny:blocks.5.hook_resid_post")
    assert type(sae) is JumpReLUSAE
    assert sae.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, 128)  # SmolLM2's width, the tiny profile's F
    assert sae.cfg.metadata.featmatch["layer"] == 5 and sae.cfg.metadata.featmatch["profile"] == "tiny"
    assert weights(sae).threshold.min() > 0  # floored at build time, so it folds
    same = load_sae("featmatch-smollm2-tiny", sae_id="blocks.5.hook_resid_post")
    assert torch.equal(same.W_dec, sae.W_dec)
    l0b = load_sae("featmatch-smollm2-tiny-l0b:blocks.14.hook_resid_post")
    assert l0b.cfg.metadata.featmatch["variant"] == "l0b"
    with pytest.raises(ValueError, match="has no SAE 'blocks.99.hook_resid_post'"):
        load_sae("featmatch-smollm2-tiny:blocks.99.hook_resid_post")
    with pytest.raises(ValueError, match="unknown zoo release"):
        load_sae("featmatch-smollm2-enormous:blocks.0.hook_resid_post")


# --------------------------------------------------------------------------------------
# SAE-set registry
# --------------------------------------------------------------------------------------


def test_registry_has_the_contract_sets():
    names = set(sae_sets())
    assert {
        "featmatch-smollm2-tiny",
        "featmatch-smollm2-quick",
        "featmatch-smollm2-full",
        "gpt2-small-res-jb",
        "gemma-scope-2b-pt-res-canonical",
    } <= names
    g = sae_set("gemma-scope-2b-pt-res-canonical")
    assert g.sae_id_for(3) == "layer_3/width_16k/canonical" and g.layers == tuple(range(26))
    assert g.hook_name(3) == "blocks.3.hook_resid_post" and g.model == "gemma-2-2b"
    j = sae_set("gpt2-small-res-jb")
    assert j.sae_id_for(11) == "blocks.11.hook_resid_pre" and j.hook_name(0) == "blocks.0.hook_resid_pre"
    q = sae_set("featmatch-smollm2-quick")
    assert q.is_zoo and q.source(5) == "featmatch-smollm2-quick:blocks.5.hook_resid_post"


@pytest.mark.parametrize("name", ["gpt2-small-res-jb", "gemma-scope-2b-pt-res-canonical"])
def test_hub_sets_name_real_saelens_ids(name):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    s = sae_set(name)
    saes_map = get_pretrained_saes_directory()[s.release].saes_map
    missing = [s.sae_id_for(layer) for layer in s.layers if s.sae_id_for(layer) not in saes_map]
    assert missing == []


def test_zoo_sets_take_their_layers_from_the_zoo_profiles():
    from featmatch.saes import zoo

    for prof in ("tiny", "quick", "full"):
        p = zoo.get_profile(prof)
        main, l0b = sae_set(f"featmatch-smollm2-{prof}"), sae_set(f"featmatch-smollm2-{prof}-l0b")
        assert main.layers == tuple(p.layers_for(30)) and l0b.layers == tuple(p.l0b_layers_for(30))
        assert main.release == p.release_of("main") and l0b.release == p.release_of("l0b")
        assert main.sae_id_for(main.layers[0]) == zoo.sae_id(p, main.layers[0])
        assert main.hook == p.hook and main.model == p.model


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown SAE set 'nope'.*gpt2-small-res-jb"):
        sae_set("nope")
    with pytest.raises(ValueError, match="no layer 12"):
        sae_set("gpt2-small-res-jb").sae_id_for(12)


def test_load_layer_sae_reads_the_real_tiny_zoo():
    loaded = load_layer_sae("featmatch-smollm2-tiny", 2)
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert loaded.cfg.metadata.featmatch["layer"] == 2
    l0b = load_layer_sae("featmatch-smollm2-tiny-l0b", 15)
    assert l0b.cfg.metadata.featmatch["variant"] == "l0b"
    assert not np.array_equal(l0b.W_enc.detach().numpy(), load_layer_sae("featmatch-smollm2-tiny", 15).W_enc.detach().numpy())
    with pytest.raises(ValueError, match="no layer 3"):
        load_layer_sae("featmatch-smollm2-tiny-l0b", 3)


def test_package_reexports_are_the_stage_objects():
    import importlib
    import subprocess
    import sys

    stages = {"fold": "saes", "load_sae": "saes", "weights": "saes"}
    for name in set(featmatch.__all__) - {"__version__"}:
        stage = importlib.import_module(f"featmatch.{stages.get(name, 'matching')}")
        assert getattr(featmatch, name) is getattr(stage, name), name
    from importlib.metadata import version

    assert featmatch.__version__ == version("featmatch")
    # the re-exports are lazy: importing the package alone does not import torch
    code = "import sys, featmatch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --------------------------------------------------------------------------------------
# issue 17: errors naming the file and the side
# --------------------------------------------------------------------------------------


def test_corrupt_cfg_and_truncated_safetensors_name_the_file(tmp_path):
    folder = tmp_path / "sae"
    jumprelu_sae(d_in=8, d_sae=16).save_model(folder)
    weights_file = folder / "sae_weights.safetensors"
    good = weights_file.read_bytes()
    weights_file.write_bytes(good[:64])
    with pytest.raises(ValueError, match=rf"{weights_file}: corrupt or truncated safetensors file"):
        load_sae(folder)
    weights_file.write_bytes(good)
    cfg = folder / "cfg.json"
    cfg.write_text(cfg.read_text()[:25])
    with pytest.raises(ValueError, match=rf"{cfg} is corrupt \(truncated or not JSON"):
        load_sae(folder)


def test_weight_errors_name_the_side_and_the_fold_setting():
    sae = jumprelu_sae(d_in=8, d_sae=16)
    with torch.no_grad():
        sae.threshold[3] = -0.25
    with pytest.raises(ValueError, match=r"^SAE B threshold \(theta\) has 1 values <= 0 .*folding divides"):
        weights(sae, side="B")
    with pytest.raises(ValueError, match=r"^SAE A threshold") as exc:
        weights(sae, side="A", fold=False)
    assert "fold" not in str(exc.value)
    with torch.no_grad():
        sae.threshold[3] = 1.0
        sae.W_enc[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^SAE A parameter W_enc contains 1 non-finite"):
        featmatch.match(sae, jumprelu_sae(d_in=8, d_sae=16, seed=1))
    with pytest.raises(ValueError, match=r"^SAE B parameter W_enc contains 1 non-finite"):
        featmatch.match(jumprelu_sae(d_in=8, d_sae=16, seed=1), sae)
