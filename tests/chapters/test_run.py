"""featmatch.chapters.run: notebook discovery, parameters, and real papermill runs.

The runs execute tiny notebooks written to ``tmp_path`` (``FEATMATCH_NOTEBOOKS`` points
at them) in a real ``python3`` kernel: a few seconds each, mostly the kernel start.
"""

from __future__ import annotations

import json
import os

import nbformat
import pytest
from _builders import tiny_notebook

from featmatch.chapters.run import (
    kernel_environment,
    list_notebooks,
    parse_param,
    resolve_notebook,
    run_notebook,
)


def test_parse_param_literals():
    assert parse_param("3") == 3
    assert parse_param("[1, 2]") == [1, 2]
    assert parse_param("quick") == "quick"
    assert parse_param("'quick'") == "quick"
    assert parse_param("None") is None
    assert parse_param("1e-3") == pytest.approx(1e-3)


def test_every_notebook_is_paired_and_has_parameters():
    notebooks = list_notebooks()
    assert notebooks, "no notebooks found"
    for nb in notebooks:
        py = nb.with_suffix(".py")
        assert py.exists(), f"{nb.name} has no py:percent pair"
        assert 'tags=["parameters"]' in py.read_text(), f"{py.name} has no parameters cell"


def test_resolve_notebook_by_number_and_name():
    first = list_notebooks()[0]
    assert resolve_notebook(first.stem[:2]) == first
    assert resolve_notebook(first.stem[3:]) == first
    assert resolve_notebook(first.name) == first
    with pytest.raises(ValueError, match="unknown notebook"):
        resolve_notebook("no-such-notebook")


def test_notebook_folder_from_the_environment(tmp_path, monkeypatch):
    tiny_notebook(tmp_path, "02_b")
    tiny_notebook(tmp_path, "01_a")
    (tmp_path / "notes.ipynb").write_text("{}")  # not a chapter: no NN_ prefix
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(tmp_path))
    assert [p.name for p in list_notebooks()] == ["01_a.ipynb", "02_b.ipynb"]
    with pytest.raises(ValueError, match="known: 01_a, 02_b"):
        resolve_notebook("c")
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="notebook folder not found"):
        list_notebooks()


def test_kernel_environment_drops_the_backend_and_restores_it(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    with kernel_environment():
        assert "MPLBACKEND" not in os.environ
    assert os.environ["MPLBACKEND"] == "Agg"
    monkeypatch.delenv("MPLBACKEND")
    with pytest.raises(KeyError), kernel_environment():
        raise KeyError("a failing run")
    assert "MPLBACKEND" not in os.environ


def _outputs(nb, kind: str) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == kind]


def test_run_injects_parameters_and_embeds_figures(tmp_path, monkeypatch):
    """A headless parent (MPLBACKEND=Agg, as `make book` exports) still gets inline figures."""
    src = tiny_notebook(tmp_path / "nb", "01_tiny", figure=True)
    source_bytes = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "01_tiny.failed.ipynb").write_text("{}")  # left by an earlier failed run
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(src.parent))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    (run,) = run_notebook("tiny", {"GREETING": "hi", "N": 2}, out, progress=False)

    assert run.name == "01_tiny" and run.output == out / "01_tiny.ipynb" and run.seconds > 0
    assert sorted(p.name for p in out.iterdir()) == ["01_tiny.ipynb"]  # no temporary or stale file
    assert src.read_bytes() == source_bytes  # the source is never executed in place
    nb = nbformat.read(run.output, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'GREETING = "hi"' in injected[0].source
    assert 'OUT_DIR = "figures"' in injected[0].source  # relative: no path of this machine
    text = "".join(o["text"] for o in _outputs(nb, "stream") if o["name"] == "stdout")
    assert "hihi|int|figures" in text
    assert any("image/png" in o["data"] for o in _outputs(nb, "display_data")), (
        "plt.show() produced no image/png: the kernel inherited a non-interactive MPLBACKEND"
    )


def test_failed_run_keeps_the_previous_copy_and_writes_a_failed_one(tmp_path, monkeypatch):
    src = tiny_notebook(tmp_path / "nb", "02_broken", fail=True)
    out = tmp_path / "out"
    out.mkdir()
    previous = out / "02_broken.ipynb"
    previous.write_text('{"previous": true}')
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(src.parent))

    with pytest.raises(RuntimeError, match=r"02_broken failed in cell \d+: ValueError: planted failure") as err:
        run_notebook("02", {"N": 3}, out, progress=False)

    failed = out / "02_broken.failed.ipynb"
    assert str(failed) in str(err.value) and "\n" not in str(err.value)
    assert json.loads(previous.read_text()) == {"previous": True}  # the last good copy stays
    assert sorted(p.name for p in out.iterdir()) == ["02_broken.failed.ipynb", "02_broken.ipynb"]
    nb = nbformat.read(failed, as_version=4)
    (error,) = _outputs(nb, "error")
    assert error["ename"] == "ValueError" and error["evalue"] == "planted failure"
    assert any("planted failure" in line for line in error["traceback"])
    text = "".join(o["text"] for o in _outputs(nb, "stream"))
    assert "hellohellohello|int|" in text and "never printed" not in text


def test_kernel_runs_in_the_output_folder_so_figures_land_there(tmp_path, monkeypatch):
    """``OUT_DIR = "figures"`` resolves against the kernel's cwd, the output folder."""
    from featmatch.chapters.run import FIGURES_DIR

    src = tiny_notebook(tmp_path / "nb", "01_tiny")
    nb = nbformat.read(src, as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import os\n"
            "import matplotlib.pyplot as plt\n"
            "import pandas as pd\n"
            "from featmatch.chapters.claims import make_claim, write_claims\n"
            "from featmatch.chapters.setup import save_figure\n"
            "fig, ax = plt.subplots(figsize=(1, 1))\n"
            "print(save_figure(fig, OUT_DIR, 'fig_a'))\n"
            "c = make_claim(chapter='tiny', claim='c', source='s', paper_value='p', our_value=1.0, effect=1.0,\n"
            "               ci=(0.5, 1.5), chance=0.0, n=9, unit='u', tolerance=0.1)\n"
            "print(write_claims([c], OUT_DIR, 'tiny'))\n"
            "print('cwd', os.getcwd())"
        )
    )
    nbformat.write(nb, src)
    out = tmp_path / "out"
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(src.parent))

    (run,) = run_notebook("tiny", {}, out, progress=False)

    assert FIGURES_DIR == "figures"
    assert (out / "figures" / "fig_a.png").is_file()
    assert (out / "figures" / "tiny_claims.csv").is_file()
    assert not (src.parent / "figures").exists()  # nothing written next to the sources
    text = "".join(o["text"] for o in _outputs(nbformat.read(run.output, as_version=4), "stream"))
    assert "figures/fig_a.png" in text and f"cwd {out.resolve()}" in text


def test_unknown_or_mistyped_parameters_are_refused_before_anything_runs(tmp_path, monkeypatch):
    from featmatch.chapters.run import notebook_parameters

    src = tiny_notebook(tmp_path / "nb", "01_tiny")
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(src.parent))
    assert list(notebook_parameters(src)) == ["GREETING", "N", "OUT_DIR"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no parameter GREETNG \(did you mean GREETING\?\); parameters: GREETING, N"):
        run_notebook("01", {"GREETNG": "hi"}, out, progress=False)
    with pytest.raises(ValueError, match=r"parameter N takes an int \(default 1\), got 'three'"):
        run_notebook("01", {"N": "three"}, out, progress=False)
    with pytest.raises(ValueError, match="GREETING takes a str"):
        run_notebook("01", {"GREETING": 3}, out, progress=False)
    assert not out.exists() or not list(out.glob("*.ipynb"))  # nothing was executed


def test_cli_lists_parameters_and_rejects_a_typo(tmp_path, monkeypatch, capsys):
    from featmatch.cli import main

    src = tiny_notebook(tmp_path / "nb", "01_tiny")
    monkeypatch.setenv("FEATMATCH_NOTEBOOKS", str(src.parent))
    assert main(["run-notebook", "01", "--list-params"]) == 0
    assert capsys.readouterr().out.splitlines() == ["01_tiny:", '  GREETING = "hello"', "  N = 1", "  OUT_DIR = None"]
    assert main(["run-notebook", "01", "-p", "NN", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no parameter NN (did you mean N?)" in err
