"""Tests for the ``featmatch`` command line (featmatch.cli)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from _planted import planted_pair, recovery

import featmatch
from featmatch.cli import main
from featmatch.matching import Matching

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

    def interrupted(path, obj, indent=2):  # Ctrl-C while the metadata is being written
        def writer(tmp):
            tmp.write_text(json.dumps(obj)[:10])
            raise KeyboardInterrupt

        from featmatch._io import atomic_save

        return atomic_save(path, writer)

    monkeypatch.setattr(fm, "atomic_write_json", interrupted)
    assert main(["match", str(a), str(b), "--out", str(out_dir / "m.json")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _outputs(out_dir) == []  # no JSON, no array file, no temporary file


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
# Dispatch to modules owned by others (zoo, book): argparse + lazy import only
# --------------------------------------------------------------------------------------


@pytest.fixture
def fake_modules(monkeypatch):
    calls: dict[str, list] = {"build": [], "manifest": [], "run": []}
    zoo = types.ModuleType("featmatch.saes.zoo")
    zoo.build_zoo = lambda profile, force=False: (
        calls["build"].append((profile, force)) or Path("/tmp/manifest.json")
    )
    zoo.manifest = lambda profile: (
        calls["manifest"].append(profile) or {"profile": profile, "layers": [0, 1, 2]}
    )
    book = types.ModuleType("featmatch.chapters.run")

    def parse_param(value):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value

    book.parse_param = parse_param
    book.run_notebook = lambda name, params=None, out_dir="runs": (
        calls["run"].append((name, params, out_dir)) or []
    )
    for name, mod in (("zoo", zoo), ("book", book)):
        monkeypatch.setitem(sys.modules, f"featmatch.{name}", mod)
        monkeypatch.setattr(featmatch, name, mod, raising=False)
    return calls


def test_zoo_commands_dispatch(fake_modules, capsys):
    assert main(["zoo", "build", "--profile", "tiny", "--force"]) == 0
    assert main(["zoo", "build", "--profile", "quick"]) == 0
    assert fake_modules["build"] == [("tiny", True), ("quick", False)]
    capsys.readouterr()
    assert main(["zoo", "info", "--profile", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"profile": "tiny", "layers": [0, 1, 2]}
    assert main(["zoo", "info", "--profile", "tiny"]) == 0
    assert "layers: 3 entries" in capsys.readouterr().out


def test_run_notebook_dispatch(fake_modules):
    assert (
        main(
            [
                "run-notebook",
                "03_folding",
                "-p",
                "N_TOKENS",
                "2000",
                "-p",
                "PROFILE",
                "full",
                "--out",
                "runs/x",
            ]
        )
        == 0
    )
    assert fake_modules["run"] == [("03_folding", {"N_TOKENS": 2000, "PROFILE": "full"}, "runs/x")]


def test_missing_zoo_module_is_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "featmatch.saes.zoo", None)
    monkeypatch.delattr(featmatch, "zoo", raising=False)
    assert main(["zoo", "info", "--profile", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featmatch: error: ") and err.count("\n") == 1
