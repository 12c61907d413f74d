"""featmatch._io: atomic writes leave no partial files; checks name the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmatch._io import atomic_save, atomic_write_json, cache_dir, check_finite, sha256_file, tokens_sha256


def test_atomic_save_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    before = target.read_bytes()

    def broken_writer(tmp):
        tmp.write_text("{partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(target, broken_writer)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_save_keeps_suffix_for_numpy(tmp_path):
    target = tmp_path / "arrays.npz"
    atomic_save(target, lambda p: np.savez(p, x=np.arange(3)))
    assert np.load(target)["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.npz"]


def test_cache_dir_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATMATCH_CACHE", str(tmp_path / "c"))
    assert cache_dir("zoo") == tmp_path / "c" / "zoo"
    assert (tmp_path / "c" / "zoo").is_dir()


def test_sha256_changes_with_content(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    h1 = sha256_file(p)
    p.write_bytes(b"abd")
    assert h1 != sha256_file(p)
    assert h1 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_names_the_array(bad):
    with pytest.raises(ValueError, match="W_dec contains 1 non-finite"):
        check_finite("W_dec", torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="theta"):
        check_finite("theta", np.array([bad, 0.0]))
    check_finite("ok", np.array([1, 2]))


def test_tokens_sha256_keeps_both_cache_key_framings():
    """The digests are pinned: they are cache keys (activation statistics) and stored token
    hashes (reference spaces), so a change would silently invalidate or mismatch them."""
    toks = torch.arange(6).reshape(2, 3)
    plain = "9e84b51c449b81c3ef3017a0137b130578a496eab1a16787a6dc6a1ec36dfcc5"
    terminated = "71ced0ef620949e5e013bf240266b0bc72cab99691210e3138220506a9041a34"
    for same in (toks, toks.int(), toks.numpy(), toks.tolist(), toks.T.contiguous().T):
        assert tokens_sha256(same) == plain
        assert tokens_sha256(same, terminated=True) == terminated
    assert tokens_sha256(toks.reshape(3, 2)) != plain  # the shape is part of the key
    assert tokens_sha256(toks + 1) != plain
