"""The SAE zoo: profiles, resumable and checksummed builds, SAELens disk format, clear errors.

The build tests train a 3-layer zoo on a tiny random HookedTransformer with a byte
tokenizer (a few seconds each). They stay fakes on purpose: each one trains and retrains
SAEs (resume, corruption, force), which on SmolLM2 takes minutes per build even at the
tiny profile. The real tiny zoo (built by ``make test`` before pytest) is checked as is by
``test_real_tiny_zoo_verifies_and_loads``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _builders import tiny_model
from sae_lens import SAE

from featmatch.saes import zoo


class ByteTokenizer:
    """One token per byte: with the 50-token random model, the real tokenizer would not fit."""

    bos_token_id = 0
    eos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + (b % 48) for b in text.encode("utf-8")]


def unit_profile(name: str = "unit", **over):
    base = dict(
        n_tokens=1536,
        eval_tokens=512,
        seq_len=16,
        sae={"d_sae": 32, "target_l0": 4},
        trainer={"epochs": 2, "train_batch_size_samples": 256, "n_batches_for_norm_estimate": 2},
        l0b={"layers": [1, 2], "sae": {"target_l0": 8}},
        seed2={"layers": []},
    )
    base.update(over)
    return zoo.make_profile(name, base="tiny", **base)


@pytest.fixture
def model():
    return tiny_model(n_layers=3, d_model=16, d_vocab=50, n_ctx=32)


def build(prof, model, **kw):
    return zoo.build_zoo(prof, model=model, tokenizer=ByteTokenizer(), progress=False, **kw)


def weight_file(prof, variant, layer):
    return zoo.zoo_dir(prof) / prof.release_of(variant) / zoo.sae_id(prof, layer) / "sae_weights.safetensors"


# --------------------------------------------------------------------------- profiles


def test_shipped_profiles():
    assert {"tiny", "quick", "full"} <= set(zoo.PROFILES)
    quick = zoo.PROFILES["quick"]
    assert quick.release == "featmatch-smollm2-quick"
    assert quick.release_of("l0b") == "featmatch-smollm2-quick-l0b"
    assert quick.layers_for(30) == list(range(30))
    assert quick.sae["jumprelu_sparsity_loss_mode"] == "quadratic"
    assert zoo.PROFILES["full"].sae["d_sae"] >= 4096 and zoo.PROFILES["full"].n_tokens >= 1_000_000
    assert quick.sae_config("l0b")["target_l0"] != quick.sae_config("main")["target_l0"]
    assert zoo.sae_id("quick", 5) == "blocks.5.hook_resid_post"


def test_unknown_profile_is_a_clear_error(tmp_cache):
    with pytest.raises(ValueError, match="unknown zoo profile 'huge'.*tiny"):
        zoo.build_zoo("huge")
    with pytest.raises(ValueError, match="unknown zoo profile"):
        zoo.manifest("huge")
    with pytest.raises(ValueError, match="unknown zoo variant"):
        zoo.load_zoo_sae("tiny", 0, variant="l0c")


def test_unknown_model_is_a_clear_error(tmp_cache):
    prof = unit_profile(model="no-such-model")
    with pytest.raises(ValueError, match="no-such-model"):
        zoo.build_zoo(prof, progress=False)


def test_layers_outside_the_model(tmp_cache, model):
    with pytest.raises(ValueError, match="outside the model"):
        build(unit_profile(layers=[0, 7]), model)


def test_missing_zoo_says_how_to_build(tmp_cache):
    with pytest.raises(FileNotFoundError, match="featmatch zoo build --profile quick"):
        zoo.manifest("quick")
    with pytest.raises(FileNotFoundError, match="featmatch zoo build --profile tiny"):
        zoo.sae_path("featmatch-smollm2-tiny", "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="unknown zoo release"):
        zoo.sae_path("featmatch-smollm2-enormous", "blocks.0.hook_resid_post")


# --------------------------------------------------------------------------- builds


def test_build_manifest_and_sae_lens_format(tmp_cache, model):
    prof = unit_profile()
    path = build(prof, model)
    man = zoo.manifest(prof)
    assert path == zoo.manifest_path(prof) and man["complete"]
    assert sorted(man["saes"]["main"], key=int) == ["0", "1", "2"]
    assert sorted(man["saes"]["l0b"], key=int) == ["1", "2"]
    for key in ("config", "corpus", "versions", "timings", "fingerprint"):
        assert key in man
    assert len(man["corpus"]["hash"]) == 64
    for variant in ("main", "l0b"):
        for layer, entry in man["saes"][variant].items():
            q = entry["quality"]
            assert q["l0"] >= 0 and 0 <= q["dead_fraction"] <= 1 and q["explained_variance"] <= 1
            assert set(entry["files"]) == {"cfg.json", "sae_weights.safetensors"}
            # SAELens's own loader reads it, with the hook name in the metadata
            folder = zoo.sae_path(prof.release_of(variant), entry["sae_id"])
            sae = SAE.load_from_disk(folder)
            assert sae.cfg.architecture() == "jumprelu"
            assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
            assert sae.cfg.d_in == 16 and sae.cfg.d_sae == 32
    sae = zoo.load_zoo_sae(prof, 1, variant="l0b")
    assert sae.cfg.metadata.featmatch["variant"] == "l0b"
    with pytest.raises(ValueError, match="has no SAE"):
        zoo.sae_path(prof.release, "blocks.9.hook_resid_post")
    table = zoo.quality_table(prof)
    assert len(table) == 5 and {"l0", "explained_variance", "dead_fraction"} <= set(table.columns)


def test_interrupted_build_resumes_without_retraining(tmp_cache, model, monkeypatch):
    prof = unit_profile()
    real = zoo._train_sae
    calls: list[tuple[str, int]] = []

    def failing(p, variant, layer, *a, **k):
        calls.append((variant, layer))
        if (variant, layer) == ("main", 2):
            raise KeyboardInterrupt("simulated interruption")
        return real(p, variant, layer, *a, **k)

    monkeypatch.setattr(zoo, "_train_sae", failing)
    with pytest.raises(KeyboardInterrupt):
        build(prof, model)
    man = zoo.manifest(prof)
    assert not man["complete"] and sorted(man["saes"]["main"]) == ["0", "1"]
    with pytest.raises(FileNotFoundError, match="not built yet"):
        zoo.sae_path(prof.release, "blocks.2.hook_resid_post")
    before = {
        layer: (weight_file(prof, "main", layer).stat().st_mtime_ns, man["saes"]["main"][str(layer)]["files"])
        for layer in (0, 1)
    }

    calls.clear()
    monkeypatch.setattr(zoo, "_train_sae", lambda *a, **k: (calls.append(a[1:3]), real(*a, **k))[1])
    build(prof, model)
    assert calls == [("main", 2), ("l0b", 1), ("l0b", 2)], "finished layers must not be retrained"
    man = zoo.manifest(prof)
    assert man["complete"]
    for layer, (mtime, files) in before.items():
        assert weight_file(prof, "main", layer).stat().st_mtime_ns == mtime
        assert man["saes"]["main"][str(layer)]["files"] == files

    # a complete zoo re-runs without training anything
    calls.clear()
    build(prof, model)
    assert calls == []


def test_corrupted_weights_are_detected_and_rebuilt(tmp_cache, model, monkeypatch):
    prof = unit_profile(l0b={"layers": [], "sae": {}})
    build(prof, model)
    target = weight_file(prof, "main", 1)
    good = zoo.manifest(prof)["saes"]["main"]["1"]["files"]["sae_weights.safetensors"]
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))

    with pytest.raises(zoo.ZooIntegrityError, match="checksum"):
        zoo.sae_path(prof.release, "blocks.1.hook_resid_post")
    with pytest.raises(zoo.ZooIntegrityError):
        zoo.load_zoo_sae(prof, 1)

    real = zoo._train_sae
    calls = []
    monkeypatch.setattr(zoo, "_train_sae", lambda *a, **k: (calls.append(a[1:3]), real(*a, **k))[1])
    with pytest.warns(UserWarning, match="checksum"):
        build(prof, model)
    assert calls == [("main", 1)]
    # training is seeded, so the rebuilt file is the original one
    assert zoo.manifest(prof)["saes"]["main"]["1"]["files"]["sae_weights.safetensors"] == good
    zoo.load_zoo_sae(prof, 1)

    # a deleted file is also rebuilt
    target.unlink()
    calls.clear()
    with pytest.warns(UserWarning, match="missing"):
        build(prof, model)
    assert calls == [("main", 1)]


def test_changed_profile_rebuilds_and_force_retrains(tmp_cache, model, monkeypatch):
    prof = unit_profile(l0b={"layers": [], "sae": {}})
    build(prof, model)
    real = zoo._train_sae
    calls = []
    monkeypatch.setattr(zoo, "_train_sae", lambda *a, **k: (calls.append(a[1:3]), real(*a, **k))[1])
    build(prof, model, force=True)
    assert len(calls) == 3
    calls.clear()
    changed = unit_profile(l0b={"layers": [], "sae": {}}, sae={"d_sae": 48})
    with pytest.warns(UserWarning, match="changed"):
        build(changed, model)
    assert len(calls) == 3
    assert json.loads(zoo.manifest_path(prof).read_text())["saes"]["main"]["0"]["d_sae"] == 48


def test_memmap_storage_is_cleaned_up(tmp_cache, model):
    prof = unit_profile(storage="memmap", l0b={"layers": [], "sae": {}})
    build(prof, model)
    assert not (zoo.zoo_dir(prof) / "activations").exists()
    assert zoo.manifest(prof)["complete"]


def test_gather_drops_position_zero(model):
    tokens = torch.randint(2, 50, (4, 8))
    x = zoo._gather(model, tokens, [0, 2], "blocks.{layer}.hook_resid_post", 3, None, False, "")
    assert x.shape == (2, 4 * 7, 16) and x.dtype == torch.float16
    _, cache = model.run_with_cache(tokens)
    ref = cache["blocks.2.hook_resid_post"][:, 1:].reshape(-1, 16)
    torch.testing.assert_close(x[1].float(), ref, atol=2e-2, rtol=1e-2)


def test_outliers_are_filtered():
    x = torch.randn(1000, 8).half()
    x[7] = 1000.0
    x[9] = float("inf")
    keep = zoo._keep_mask(x, 10.0)
    assert not keep[7] and not keep[9] and keep.sum() == 998


# --------------------------------------------------------------------------- real model


def test_real_tiny_zoo_verifies_and_loads(monkeypatch):
    """The shipped tiny profile on SmolLM2, in the default cache: a re-run only verifies."""

    def never(*args, **kwargs):
        raise AssertionError("a complete zoo was retrained or the model loaded")

    monkeypatch.setattr(zoo, "_train_sae", never)
    monkeypatch.setattr(zoo, "_load_model", never)
    path = zoo.build_zoo("tiny", progress=False)
    man = json.loads(path.read_text())
    assert man["complete"] and len(man["saes"]["main"]) == 30 and sorted(man["saes"]["l0b"]) == ["14", "15"]
    sae = zoo.load_zoo_sae("tiny", 15)
    assert sae.cfg.d_in == 576
    assert os.path.isdir(zoo.sae_path("featmatch-smollm2-tiny-l0b", "blocks.14.hook_resid_post"))


# --------------------------------------------------------------------------- progress


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    "progress, out_tty, err_tty, mode",
    [
        (False, True, True, "off"),
        (True, True, True, "terminal"),
        (True, False, True, "log"),  # make book > book.log
        (True, True, False, "log"),  # make book 2> err.log
        (True, False, False, "log"),  # a pipe, CI, a notebook kernel
    ],
)
def test_progress_mode(progress, out_tty, err_tty, mode):
    assert zoo._progress_mode(progress, _Stream(out_tty), _Stream(err_tty)) == mode


def test_log_mode_shows_one_bar_per_job_and_no_sae_lens_bars(tmp_cache, model, capsys):
    """Captured output is not a terminal: the gathering passes and the loop over SAEs only."""
    prof = unit_profile(layers=[0, 1], l0b={"layers": [], "sae": {}}, n_tokens=512, eval_tokens=256)
    zoo.build_zoo(prof, model=model, tokenizer=ByteTokenizer(), progress=True)
    err = capsys.readouterr().err
    descs = {line.split(":")[0].strip() for line in err.replace("\r", "\n").splitlines() if "%|" in line}
    assert descs == {"gathering train activations", "gathering eval activations", "zoo unit"}
    assert "Training SAE" not in err and "norm scaling factor" not in err


def test_quiet_tqdm_silences_and_restores_sae_lens_bars(capsys):
    from sae_lens.training import activation_scaler, sae_trainer

    originals = (sae_trainer.tqdm, activation_scaler.tqdm)
    with zoo._quiet_tqdm(True):
        for _ in sae_trainer.tqdm(range(3), desc="Training SAE"):
            pass
    assert "Training SAE" not in capsys.readouterr().err
    assert (sae_trainer.tqdm, activation_scaler.tqdm) == originals
    with zoo._quiet_tqdm(False):
        assert sae_trainer.tqdm is originals[0]


def test_thresholds_at_or_below_zero_are_floored_and_counted():
    from _builders import jumprelu_sae

    from featmatch.saes import fold
    from featmatch.saes import zoo as zoo_mod

    sae = jumprelu_sae(d_in=8, d_sae=16, seed=3)
    with torch.no_grad():
        sae.threshold[:3] = torch.tensor([-0.01, 0.0, -1e-6])
    with pytest.raises(ValueError, match="<= 0"):
        fold(sae)
    before = sae.threshold.clone()
    assert zoo_mod._floor_thresholds(sae) == 3
    assert torch.all(sae.threshold[:3] == zoo_mod.THRESHOLD_FLOOR)
    assert torch.equal(sae.threshold[3:], before[3:])
    fold(sae)  # now valid
    assert zoo_mod._floor_thresholds(sae) == 0


# --------------------------------------------------------------------------- verification (issue 17)


@pytest.fixture
def tiny_copy(tmp_path, monkeypatch):
    """A private copy of the real tiny zoo (the shared one is never modified)."""
    import shutil

    real = zoo.manifest_path("tiny").parent
    monkeypatch.setenv("FEATMATCH_CACHE", str(tmp_path / "cache"))
    shutil.copytree(real, zoo.zoo_dir("tiny", create=False), ignore=shutil.ignore_patterns(".build.lock"))
    return zoo.manifest_path("tiny").parent


def test_verify_rehashes_every_recorded_file(tiny_copy):
    assert zoo.verify("tiny") == {}
    man = zoo.manifest("tiny")
    e3, e9 = man["saes"]["main"]["3"], man["saes"]["l0b"]["14"]
    w3 = tiny_copy / e3["path"] / "sae_weights.safetensors"
    data = bytearray(w3.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    w3.write_bytes(bytes(data))
    (tiny_copy / e9["path"] / "cfg.json").unlink()
    bad = zoo.verify("tiny")
    assert set(bad) == {str(w3), str(tiny_copy / e9["path"] / "cfg.json")}
    assert "sha256 differs" in bad[str(w3)] and bad[str(tiny_copy / e9["path"] / "cfg.json")] == "missing"


def test_truncated_manifest_is_an_error_naming_it(tiny_copy):
    man = tiny_copy / "manifest.json"
    man.write_text(man.read_text()[:300])
    with pytest.raises(zoo.ZooIntegrityError, match=f"zoo manifest {man} is corrupt"):
        zoo.manifest("tiny")
    with pytest.raises(zoo.ZooIntegrityError, match=f"zoo manifest {man} is corrupt"):
        zoo.sae_path("featmatch-smollm2-tiny", "blocks.3.hook_resid_post")
    man.write_text("[1, 2]")
    with pytest.raises(zoo.ZooIntegrityError, match="not a JSON object"):
        zoo.verify("tiny")


def test_zoo_training_uses_the_fitted_thread_count(tmp_cache, model, monkeypatch):
    """Each SAE trains inside featmatch._threads.fitted_threads (FEATMATCH_THREADS pins it here)."""
    seen = []
    real = zoo._train_sae

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    before = torch.get_num_threads()
    monkeypatch.setattr(zoo, "_train_sae", spy)
    monkeypatch.setenv("FEATMATCH_THREADS", "1" if before > 1 else "2")
    build(unit_profile("threads", layers=[0], l0b={"layers": []}), model)
    assert seen and set(seen) == {1 if before > 1 else 2}
    assert torch.get_num_threads() == before  # restored
