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
# zoo and run-notebook, on the real tiny zoo and a real tiny notebook
# --------------------------------------------------------------------------------------


def test_zoo_info_prints_the_real_manifest(capsys):
    from featmatch.saes import zoo

    assert main(["zoo", "info", "--profile", "tiny", "--json"]) == 0
    man = json.loads(capsys.readouterr().out)
    assert man == zoo.manifest("tiny")
    assert man["profile"] == "tiny" and man["complete"] and len(man["saes"]["main"]) == 30
    assert main(["zoo", "info", "--profile", "tiny"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("zoo profile 'tiny'\n") and "  profile: tiny\n" in text
    assert "  saes: 2 entries" in text  # the main and l0b sets


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
