"""Tests for the ``featmatch`` command line (featmatch.cli)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featmatch
from featmatch.cli import main
from featmatch.matching import Matching
from featmatch.synthetic import planted_pair, recovery

REPO = Path(featmatch.__file__).resolve().parents[1]


@pytest.fixture
def sae_dirs(tmp_path):
    p = planted_pair(d=32, f_a=40, f_b=44, n_shared=34, noise=0.02, seed=7)
    a, b = tmp_path / "sae_a", tmp_path / "sae_b"
    p.sae_a.save_model(a)
    p.sae_b.save_model(b)
    return a, b, p.truth


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_match_writes_matching_and_prints_summary(sae_dirs, tmp_path, capsys):
    a, b, truth = sae_dirs
    out = tmp_path / "out" / "m.json"
    assert main(["match", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "matched:  40 / 40" in text and "q50=" in text and "time:" in text and str(out) in text
    assert len(text.splitlines()) <= 20  # one screen
    m = Matching.load(out)
    assert recovery(m.perm, truth) >= 0.99
    assert m.meta["source_a"] == str(a) and m.meta["fold"] is True and m.meta["on"] == "both"


def test_match_options_reach_the_matching(sae_dirs, tmp_path, capsys):
    a, b, _ = sae_dirs
    out = tmp_path / "m.json"
    argv = ["match", str(a), str(b), "--on", "decoder", "--metric", "cosine", "--no-fold", "--b-enc",
            "--unmatched-quantile", "0.8", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    meta = Matching.load(out).meta
    assert (meta["on"], meta["metric"], meta["fold"], meta["include_b_enc"]) == (
        "decoder",
        "cosine",
        False,
        True,
    )
    assert meta["unmatched_quantile"] == 0.8
    assert "unmatched threshold" in capsys.readouterr().out


def test_compose_command(sae_dirs, tmp_path, capsys):
    a, b, _ = sae_dirs
    assert main(["match", str(a), str(b), "--out", str(tmp_path / "ab.json")]) == 0
    assert main(["match", str(b), str(a), "--out", str(tmp_path / "ba.json")]) == 0
    assert (
        main(
            [
                "compose",
                str(tmp_path / "ab.json"),
                str(tmp_path / "ba.json"),
                "--out",
                str(tmp_path / "aa.json"),
            ]
        )
        == 0
    )
    aa = Matching.load(tmp_path / "aa.json")
    ab = Matching.load(tmp_path / "ab.json")
    ba = Matching.load(tmp_path / "ba.json")
    np.testing.assert_array_equal(aa.perm, ba.perm[ab.perm])
    assert "wrote:" in capsys.readouterr().out


def test_failed_match_leaves_no_output(sae_dirs, tmp_path, capsys):
    a, _, _ = sae_dirs
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main(["match", str(a), str(tmp_path / "missing"), "--out", str(out_dir / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featmatch: error: ") and err.count("\n") == 1 and "missing" in err
    assert _outputs(out_dir) == []


def test_d_in_mismatch_is_one_line_error(sae_dirs, tmp_path, capsys):
    from _builders import jumprelu_sae

    a, _, _ = sae_dirs
    other = tmp_path / "wide"
    jumprelu_sae(d_in=20, d_sae=8).save_model(other)
    assert main(["match", str(a), str(other), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "d_in mismatch" in err and err.count("\n") == 1
    assert not (tmp_path / "m.json").exists()


def test_interrupted_match_leaves_no_partial_output(sae_dirs, tmp_path, monkeypatch, capsys):
    import featmatch.matching._matching as fm

    a, b, _ = sae_dirs
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def interrupted(path, obj, indent=2, sort_keys=True):  # Ctrl-C while the file is being written
        def writer(tmp):
            tmp.write_text(json.dumps(obj)[:10])
            raise KeyboardInterrupt

        from featmatch._io import atomic_save

        return atomic_save(path, writer)

    monkeypatch.setattr(fm, "atomic_write_json", interrupted)
    assert main(["match", str(a), str(b), "--out", str(out_dir / "m.json")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _outputs(out_dir) == []  # no matching file, no temporary file


def test_bad_matching_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["compose", str(bad), str(bad), "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and err.count("\n") == 1
    assert not (tmp_path / "c.json").exists()


def test_unknown_source_is_one_line_error(tmp_path, capsys):
    assert main(["match", "not-a-source", "also-not", "--out", str(tmp_path / "m.json")]) == 2
    assert "unknown SAE source 'not-a-source'" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["match", "only-one"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["match", "a", "b", "--out", "x.json", "--unmatched-quantile", "0.5", "--unmatched-above", "1"])
    assert exc.value.code == 2


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("FEATMATCH_DEBUG", None)
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "featmatch.cli",
            "match",
            str(tmp_path / "nope_a"),
            str(tmp_path / "nope_b"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "SAE folder not found" in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------
# zoo and run-notebook, on the real tiny zoo and a real tiny notebook
# --------------------------------------------------------------------------------------


def test_zoo_info_prints_the_real_manifest(capsys):
    from featmatch.saes import zoo

    assert main(["zoo", "info", "--profile", "tiny", "--json"]) == 0
    man = json.loads(capsys.readouterr().out)
    assert man.pop("bad_files") == {}  # every recorded checksum verified
    assert man == zoo.manifest("tiny")
    assert man["profile"] == "tiny" and man["complete"] and len(man["saes"]["main"]) == 30
    assert main(["zoo", "info", "--profile", "tiny"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("zoo profile 'tiny'\n") and "  profile: tiny\n" in text
    assert f"  saes: {len(man['saes'])} entries" in text and {"main", "l0b"} <= set(man["saes"])
    n_files = sum(len(e["files"]) for v in man["saes"].values() for e in v.values())
    assert f"  verified: {n_files} files match their sha256 checksums" in text


def test_zoo_errors_are_one_line(tmp_cache, capsys):
    assert main(["zoo", "info", "--profile", "quick"]) == 2  # an empty cache: not built
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `featmatch zoo build --profile quick`" in err
    assert main(["zoo", "info", "--profile", "huge"]) == 2
    assert "unknown zoo profile 'huge'" in capsys.readouterr().err


def test_zoo_build_of_a_built_zoo_verifies_without_training(monkeypatch, capsys):
    from featmatch.saes import zoo

    def never(*args, **kwargs):  # spies: a verified zoo needs neither training nor the model
        raise AssertionError("zoo build retrained or loaded the model for a complete zoo")

    monkeypatch.setattr(zoo, "_train_sae", never)
    monkeypatch.setattr(zoo, "_load_model", never)
    before = zoo.manifest("tiny")
    assert main(["zoo", "build", "--profile", "tiny"]) == 0
    assert capsys.readouterr().out == f"zoo 'tiny' ready: {zoo.manifest_path('tiny')}\n"
    after = zoo.manifest("tiny")
    assert after["saes"] == before["saes"] and after["timings"] == before["timings"]


def test_run_notebook_passes_parsed_parameters(tmp_path, monkeypatch, capsys):
    import nbformat
    from _builders import tiny_notebook

    tiny_notebook(tmp_path / "nb", "01_tiny")
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(tmp_path / "nb"))
    out = tmp_path / "out"
    argv = ["run-notebook", "01", "-p", "GREETING", "'ab'", "-p", "N", "3", "--out", str(out)]
    assert main(argv) == 0
    assert f"01_tiny: {out / '01_tiny.ipynb'} (" in capsys.readouterr().out
    nb = nbformat.read(out / "01_tiny.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "ababab|int|" in printed  # "3" arrived as the int 3, "'ab'" as the string ab


def test_run_notebook_unknown_name_is_one_line(tmp_path, monkeypatch, capsys):
    from _builders import tiny_notebook

    tiny_notebook(tmp_path, "01_tiny")
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(tmp_path))
    assert main(["run-notebook", "03_folding", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "featmatch: error: unknown notebook '03_folding'; known: 01_tiny\n"


def test_compose_refuses_matchings_that_do_not_chain(tmp_path, capsys):
    from featmatch.synthetic import planted_chain

    saes, _ = planted_chain(n_layers=3, d=16, f=24, seed=3)
    for k, sae in enumerate(saes):
        sae.save_model(tmp_path / f"sae_{k}")
    for k in (0, 1):
        argv = ["match", str(tmp_path / f"sae_{k}"), str(tmp_path / f"sae_{k + 1}"), "--out", str(tmp_path / f"{k}{k + 1}.json")]
        assert main(argv) == 0
    capsys.readouterr()
    m01, m12, out = str(tmp_path / "01.json"), str(tmp_path / "12.json"), tmp_path / "c" / "x.json"
    for first, second in ((m12, m01), (m01, m01)):  # wrong order; a matching with itself
        assert main(["compose", first, second, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot compose" in err and "--force" in err
        assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert main(["compose", m12, m01, "--out", str(out), "--force"]) == 0
    assert main(["compose", m01, m12, "--out", str(out)]) == 0
    assert Matching.load(out).n_a == 24


# --------------------------------------------------------------------------------------
# issue 17: output files that are not featmatch's, errors naming the side, zoo checksums,
# Ctrl-C during a dense solve
# --------------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("featmatch: error: ") and err.count("\n") == 1, err
    return err


def test_out_never_overwrites_an_unrelated_file_without_force(sae_dirs, tmp_path, capsys):
    """Found 1a: ``--out`` replaced any existing file without a word."""
    a, b, _ = sae_dirs
    out = tmp_path / "config.json"
    out.write_text('{"keep": "me"}\n')
    assert main(["match", str(a), str(b), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert str(out) in err and "not a featmatch matching" in err and "--force" in err
    assert out.read_text() == '{"keep": "me"}\n'
    assert main(["match", str(a), str(b), "--out", str(out), "--force"]) == 0
    assert "replaced an existing file that was not a featmatch matching" in capsys.readouterr().out
    assert main(["match", str(b), str(a), "--out", str(out)]) == 0  # featmatch's own file: replaced, and said so
    assert f"wrote:    {out} (replaced an earlier featmatch matching)" in capsys.readouterr().out
    assert Matching.load(out).n_a == 44
    # compose follows the same rule; its one --force also covers the chain check
    other = tmp_path / "other.txt"
    other.write_text("notes")
    assert main(["compose", str(out), str(out), "--out", str(other)]) == 2
    assert "not a featmatch matching" in _one_error_line(capsys) and other.read_text() == "notes"


def test_out_naming_a_file_in_arrays_deletes_nothing(sae_dirs, tmp_path, capsys):
    """Found 1b: ``{"arrays": "notes.txt"}`` at --out made featmatch delete notes.txt."""
    a, b, _ = sae_dirs
    (tmp_path / "notes.txt").write_text("precious")
    victim = tmp_path / "victim.json"
    victim.write_text('{"arrays": "notes.txt"}')
    assert main(["match", str(a), str(b), "--out", str(victim)]) == 2
    capsys.readouterr()
    assert main(["match", str(a), str(b), "--out", str(victim), "--force"]) == 0
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert Matching.load(victim).n_a == 40


def test_copied_matching_survives_a_save_to_the_copy(sae_dirs, tmp_path, capsys):
    """Found 1c: ``cp a.json b.json`` then ``--out b.json`` broke a.json."""
    import shutil

    a, b, _ = sae_dirs
    assert main(["match", str(a), str(b), "--out", str(tmp_path / "a.json")]) == 0
    shutil.copy(tmp_path / "a.json", tmp_path / "b.json")
    assert main(["match", str(b), str(a), "--out", str(tmp_path / "b.json")]) == 0
    assert Matching.load(tmp_path / "a.json").n_a == 40 and Matching.load(tmp_path / "b.json").n_a == 44
    assert _outputs(tmp_path) == ["a.json", "b.json", "sae_a", "sae_b"]


def test_out_directory_is_a_one_line_error(sae_dirs, tmp_path, capsys):
    """Found 5: ``--out DIR`` gave IsADirectoryError on a temporary name."""
    a, b, _ = sae_dirs
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["match", str(a), str(b), "--out", str(folder)]) == 2
    err = _one_error_line(capsys)
    assert f"--out {folder} is a directory" in err and ".tmp" not in err
    assert _outputs(folder) == []


def _damage(sae_dir: Path, how: str) -> None:
    from sae_lens import SAE

    if how == "cfg":
        text = (sae_dir / "cfg.json").read_text()
        (sae_dir / "cfg.json").write_text(text[: len(text) // 2])
    elif how == "safetensors":
        f = sae_dir / "sae_weights.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    else:
        import torch

        sae = SAE.load_from_disk(sae_dir)
        with torch.no_grad():
            if how == "nan":
                sae.W_dec[3, 1] = float("nan")
            else:
                sae.threshold[:2] = torch.tensor([-0.5, 0.0])
        sae.save_model(sae_dir)


@pytest.mark.parametrize(
    "how, side, expected",
    [
        ("cfg", "B", "cfg.json is corrupt"),
        ("safetensors", "A", "sae_weights.safetensors: corrupt or truncated safetensors file"),
        ("nan", "B", "SAE B parameter W_dec contains 1 non-finite values"),
        ("theta", "A", "SAE A threshold (theta) has 2 values <= 0"),
    ],
)
def test_sae_load_errors_name_the_file_and_the_side(sae_dirs, tmp_path, capsys, how, side, expected):
    """Found 5: raw JSON / SafetensorError messages, NaN and theta errors without the side."""
    a, b, _ = sae_dirs
    bad = a if side == "A" else b
    _damage(bad, how)
    assert main(["match", str(a), str(b), "--out", str(tmp_path / "m.json")]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"featmatch: error: SAE {side}") and expected in err and str(bad) in err
    assert "SafetensorError" not in err.split(":")[1] and not (tmp_path / "m.json").exists()
    if how == "theta":
        assert "folding" in err
        assert main(["match", str(a), str(b), "--no-fold", "--out", str(tmp_path / "m.json")]) == 2
        err = _one_error_line(capsys)
        assert expected in err and "fold" not in err and "must be > 0" in err


def test_truncated_zoo_manifest_names_the_file_and_the_side(sae_dirs, tmp_path, monkeypatch, capsys):
    """Found 5: a truncated zoo manifest.json printed only a JSON decoder message."""
    from featmatch.saes import zoo

    real = zoo.manifest_path("tiny").read_text()
    monkeypatch.setenv("FEATMATCH_CACHE", str(tmp_path / "cache"))
    man = zoo.manifest_path("tiny")
    man.parent.mkdir(parents=True)
    man.write_text(real[:200])
    _, b, _ = sae_dirs
    argv = ["match", str(b), "featmatch-smollm2-tiny:blocks.3.hook_resid_post", "--out", str(tmp_path / "m.json")]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert err.startswith("featmatch: error: SAE B") and f"zoo manifest {man} is corrupt" in err
    assert main(["zoo", "info", "--profile", "tiny"]) == 2
    assert f"zoo manifest {man} is corrupt" in _one_error_line(capsys)


def test_zoo_info_verifies_checksums_and_names_bad_files(tmp_path, monkeypatch, capsys):
    """Found 5: ``zoo info`` printed ``complete: True`` over corrupt weight files."""
    import shutil

    from featmatch.saes import zoo

    real = zoo.manifest_path("tiny").parent
    monkeypatch.setenv("FEATMATCH_CACHE", str(tmp_path / "cache"))
    shutil.copytree(real, zoo.zoo_dir("tiny", create=False), ignore=shutil.ignore_patterns(".build.lock"))
    entry = zoo.manifest("tiny")["saes"]["main"]["4"]
    weights = zoo.manifest_path("tiny").parent / entry["path"] / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a loadable file, wrong weights
    weights.write_bytes(bytes(data))
    (weights.parent.parent / "blocks.7.hook_resid_post" / "cfg.json").unlink()
    assert main(["zoo", "info", "--profile", "tiny"]) == 2
    out = capsys.readouterr().out
    assert "complete: False" in out and "complete: True" not in out
    assert f"BAD {weights}: sha256 differs" in out and "blocks.7.hook_resid_post/cfg.json: missing" in out
    assert "verified: 2 of " in out
    assert main(["zoo", "info", "--profile", "tiny", "--json"]) == 2
    man = json.loads(capsys.readouterr().out)
    assert man["complete"] is False and str(weights) in man["bad_files"] and len(man["bad_files"]) == 2


def test_sigint_during_a_dense_solve_exits_130_at_once_and_leaves_nothing(tmp_path):
    """Found 2: Ctrl-C did nothing while scipy solved a dense 8192 x 8192 assignment.

    SIGINT goes to the whole process group, as Ctrl-C in a terminal does, 2 s after the
    solve started (when the worker process that runs it appears)."""
    import signal
    import time

    import psutil
    from _builders import jumprelu_sae

    for name, seed in (("a", 0), ("b", 1)):
        jumprelu_sae(d_in=64, d_sae=8192, seed=seed).save_model(tmp_path / name)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "featmatch.cli", "match", str(tmp_path / "a"), str(tmp_path / "b"),
            "--solver", "dense", "--out", str(out_dir / "m.json")]  # fmt: skip
    # stderr to a file, not a pipe: nothing reads a pipe until the process ends, and a CLI that
    # fills its 64 KiB buffer (progress bars, warnings) would block on a write and never exit
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        # Ctrl-C at a terminal: SIGINT at its default disposition in the CLI. A process started in
        # the background by a shell without job control (`make test &` in a script, nohup) inherits
        # SIGINT *ignored*, and Python then never raises KeyboardInterrupt (the test timed out so)
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
            stderr=err,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 300

        def solver_workers() -> list:
            # the forked solver has the parent's command line; a short-lived helper that an import
            # may spawn (ldconfig and the like) does not, and must not be taken for the solver
            try:
                return [c for c in parent.children() if c.cmdline() == parent.cmdline()]
            except psutil.Error:
                return []

        while not (workers := solver_workers()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers and proc.poll() is None, "the dense solve did not start in a worker"
        time.sleep(2.0)
        assert proc.poll() is None and workers[0].is_running()  # still solving (it takes minutes)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
        assert rc == 130 and elapsed < 3.0, (rc, elapsed)
        assert "interrupted" in err_path.read_text()
        assert _outputs(out_dir) == []
        assert not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_match_stack_writes_one_matching_per_pair_locally_and_on_a_cluster(dask_client, tmp_path, capsys):
    from featmatch.matching import match_stack
    from featmatch.saes._sae import load_sae

    sources = [f"featmatch-smollm2-tiny:blocks.{L}.hook_resid_post" for L in range(3, 7)]
    want = match_stack([load_sae(s) for s in sources], progress=False, unmatched_quantile=0.9)
    local, dist = tmp_path / "local", tmp_path / "dist"
    assert main(["match-stack", *sources, "--unmatched-quantile", "0.9", "--out-dir", str(local)]) == 0
    argv = ["match-stack", "--set", "featmatch-smollm2-tiny", "--layers", "3:7", "--unmatched-quantile", "0.9"]
    assert main([*argv, "--scheduler", dask_client.scheduler.address, "--out-dir", str(dist)]) == 0
    text = capsys.readouterr().out
    assert "3 pairs" in text and dask_client.scheduler.address in text
    assert _outputs(local) == ["pair_00_01.json", "pair_01_02.json", "pair_02_03.json"]
    assert _outputs(dist) == ["pair_03_04.json", "pair_04_05.json", "pair_05_06.json"]
    for m, f_local, f_dist in zip(want, sorted(local.iterdir()), sorted(dist.iterdir()), strict=True):
        np.testing.assert_array_equal(Matching.load(f_local).perm, m.perm)
        np.testing.assert_array_equal(Matching.load(f_dist).perm, m.perm)
    assert Matching.load(dist / "pair_03_04.json").meta["source_a"] == sources[0]


def test_match_stack_failure_writes_nothing(dask_client, tmp_path, capsys):
    good = "featmatch-smollm2-tiny:blocks.3.hook_resid_post"
    out = tmp_path / "out"
    argv = ["match-stack", good, good, str(tmp_path / "missing"), "--out-dir", str(out)]
    assert main([*argv, "--scheduler", dask_client.scheduler.address]) == 2
    assert "missing" in capsys.readouterr().err
    assert not out.exists()  # the good first pair was not written either
    assert main(["match-stack", good, "--out-dir", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["match-stack", good, good, "--scheduler", "local:0", "--out-dir", str(out)]) == 2
    assert "local:N" in capsys.readouterr().err


def test_match_on_a_cluster_names_the_bad_side(dask_client, sae_dirs, tmp_path, capsys):
    a, b, truth = sae_dirs
    out = tmp_path / "m.json"
    assert main(["match", str(a), str(b), "--scheduler", dask_client.scheduler.address, "--out", str(out)]) == 0
    assert recovery(Matching.load(out).perm, truth) >= 0.99
    bad = ["match", str(a), str(tmp_path / "nope"), "--scheduler", dask_client.scheduler.address]
    assert main([*bad, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "SAE B" in err and "nope" in err and len(err.strip().splitlines()) == 1
