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


def test_atomic_save_to_a_directory_names_it_and_leaves_nothing(tmp_path):
    """Issue 17: ``--out DIR`` gave IsADirectoryError on the temporary file's name."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(IsADirectoryError, match=f"^{folder} is a directory"):
        atomic_write_json(folder, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_atomic_write_json_can_keep_key_order(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"z": 1, "a": 2}, sort_keys=False)
    assert (tmp_path / "a.json").read_text().index('"z"') < (tmp_path / "a.json").read_text().index('"a"')


# --------------------------------------------------------------------------------------
# featmatch._threads: torch threads for the CPUs that are available and free
# --------------------------------------------------------------------------------------


def test_thread_count_counts_available_cpus_that_are_not_busy(monkeypatch):
    import psutil

    from featmatch import _threads

    monkeypatch.delenv("FEATMATCH_THREADS", raising=False)
    monkeypatch.setattr(_threads, "available_cpus", lambda: [0, 1, 2, 3])
    loads = {"now": [3.0, 99.0, 20.0, 100.0, 0.0, 0.0]}  # CPUs 4 and 5 are outside the affinity
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: loads["now"])
    assert _threads.fitted_thread_count() == 2
    loads["now"] = [100.0, 100.0, 90.0, 75.0]
    assert _threads.fitted_thread_count() == 1  # never zero
    monkeypatch.setenv("FEATMATCH_THREADS", "3")
    assert _threads.fitted_thread_count() == 3
    monkeypatch.setenv("FEATMATCH_THREADS", "two")
    with pytest.raises(ValueError, match="FEATMATCH_THREADS must be a positive integer"):
        _threads.fitted_thread_count()


def test_available_cpus_is_the_affinity_mask():
    import os

    from featmatch._threads import available_cpus

    assert available_cpus() == sorted(os.sched_getaffinity(0))


def test_a_busy_cpu_is_seen_and_torch_threads_are_restored(monkeypatch):
    """A real busy process pinned to one of our CPUs lowers the count (by one, when the
    rest of the machine is idle); the previous torch setting comes back afterwards."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    from featmatch._threads import fitted_thread_count, fitted_threads

    monkeypatch.delenv("FEATMATCH_THREADS", raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    pin = cpus[-1]
    hog = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, {pin})
    )
    try:
        time.sleep(0.5)
        load = psutil.cpu_percent(interval=0.3, percpu=True)
        n = fitted_thread_count(sample_seconds=0.3)
        assert 1 <= n <= len(cpus) - 1 or len(cpus) == 1
        if len(cpus) > 1 and all(load[c] < 20 for c in cpus[:-1]):  # only meaningful on a quiet machine
            assert n == len(cpus) - 1
        before = torch.get_num_threads()
        with fitted_threads(sample_seconds=0.1) as used:
            assert torch.get_num_threads() == used >= 1
        assert torch.get_num_threads() == before
    finally:
        hog.kill()
        hog.wait()
