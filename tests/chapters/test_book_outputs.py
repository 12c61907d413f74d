"""What a reader of the book sees: the outputs of the executed notebooks.

:func:`check_executed_notebook` inspects one executed ``.ipynb`` (as written by
``featmatch run-notebook``) and lists its faults:

* fewer ``image/png`` outputs than figures the notebook saves (its ``save_figure(`` calls,
  or its ``figures/NN_*.png`` files, whichever is larger): the figures are not on the page;
* an output that shows a warning, a progress bar, an error, or an absolute path of the
  machine that ran it (the injected parameters cell included).

The checker is tested here on small planted notebooks. The executed chapters themselves are
checked only when ``FEATMATCH_EXECUTED_NOTEBOOKS`` names a folder of them (skipped otherwise)::

    featmatch run-notebook all -p PROFILE tiny --out /tmp/E_out
    FEATMATCH_EXECUTED_NOTEBOOKS=/tmp/E_out pytest -q tests/chapters/test_book_outputs.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from featmatch.chapters.run import list_notebooks

ENV = "FEATMATCH_EXECUTED_NOTEBOOKS"

#: Output text that must not reach the page, by fault.
FAULTS: dict[str, re.Pattern[str]] = {
    "warning": re.compile(r"Warning"),
    "progress bar": re.compile(r"\d+(\.\d+)?(it|s)/(s|it)\]|%\||\|\s*\d+/\d+ \["),
    "absolute path": re.compile(r"(?<![\w.~-])/(root|tmp|home|work|Users|private|var/folders)/"),
}

#: MIME types of text an output shows in the book.
TEXT_MIME = ("text/plain", "text/html", "text/markdown", "text/latex")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

_SAVE_CALL = re.compile(r"\bsave_figure\(")


def _code_lines(source: str) -> list[str]:
    return [line for line in source.splitlines() if not line.lstrip().startswith("#")]


def expected_figures(nb: nbformat.NotebookNode, path: Path) -> int:
    """The figures a notebook saves: its ``save_figure(`` calls or its saved PNGs, the larger."""
    calls = sum(
        len(_SAVE_CALL.findall(line))
        for cell in nb.cells
        if cell.cell_type == "code"
        for line in _code_lines(cell.source)
    )
    figures = path.parent / "figures"
    files = (
        len(list(figures.glob(f"{path.stem[:3]}*.png")))
        if figures.is_dir() and path.stem[:2].isdigit()
        else 0
    )
    return max(calls, files)


def _output_texts(output: nbformat.NotebookNode) -> list[str]:
    kind = output.get("output_type")
    if kind == "stream":
        return [output.get("text", "")]
    if kind == "error":
        return [f"{output.get('ename')}: {output.get('evalue')}", *output.get("traceback", [])]
    data = output.get("data", {})
    return [data[m] if isinstance(data[m], str) else "".join(data[m]) for m in TEXT_MIME if m in data]


def check_executed_notebook(path: str | os.PathLike) -> list[str]:
    """The faults a reader would see in one executed notebook (empty: it is clean).

    Parameters
    ----------
    path : path-like
        An executed ``.ipynb``; its figures folder, if any, is ``path.parent / "figures"``.

    Returns
    -------
    list of str
        One line per fault: ``"<cell>: <fault>: <excerpt>"``.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    problems: list[str] = []
    n_png = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"cell {index}"
        texts: list[str] = []
        if "injected-parameters" in cell.metadata.get("tags", []):
            texts.append(cell.source)  # shown in the book like an output
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            n_png += "image/png" in data
            if output.get("output_type") == "error":
                problems.append(f"{where}: error: {output.get('ename')}: {output.get('evalue')}")
            if WIDGET_MIME in data:
                problems.append(f"{where}: progress bar: a widget output (ipywidgets)")
            texts += _output_texts(output)
        for text in texts:
            for fault, pattern in FAULTS.items():
                match = pattern.search(text)
                if match:
                    start = max(match.start() - 60, 0)
                    excerpt = text[start : match.end() + 60].replace("\n", " ").strip()
                    problems.append(f"{where}: {fault}: {excerpt!r}")
    expected = expected_figures(nb, path)
    if n_png < expected:
        problems.append(f"figures: {n_png} image/png outputs for {expected} saved figures")
    return problems


# --------------------------------------------------------------------------- planted notebooks

_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def _planted(tmp_path: Path, fault: str | None = None, name: str = "01_planted") -> Path:
    """A small executed-looking notebook: clean, or with one planted ``fault``."""
    params = new_code_cell('# Parameters\nOUT_DIR = "figures"\nPROFILE = "tiny"\n')
    params.metadata["tags"] = ["injected-parameters"]
    figure = new_code_cell(
        'fig, ax = plt.subplots()\n# save_figure(...) in a comment is no call\nsave_figure(fig, OUT_DIR, "01_a")\nplt.show()'
    )
    figure.outputs = [
        new_output("display_data", data={"image/png": _PNG, "text/plain": "<Figure size 640x480>"})
    ]
    table = new_code_cell("label_counts(judged)")
    table.outputs = [new_output("execute_result", data={"text/plain": "   a  b\n0  1  2"}, execution_count=3)]
    printed = new_code_cell('print("judge: proxy")')
    printed.outputs = [
        new_output("stream", name="stdout", text="judge: proxy\n12 evaluation tokens, 3.5 s\n")
    ]
    if fault == "missing figure":
        figure.outputs = []
    elif fault == "warning":
        printed.outputs.append(
            new_output(
                "stream", name="stderr", text="setup.py:101: UserWarning: activation cache is unreadable\n"
            )
        )
    elif fault == "progress bar":
        printed.outputs.append(
            new_output(
                "stream",
                name="stderr",
                text="\rLoading weights: 100%|██████████| 103/103 [00:00<00:00, 14303.66it/s]",
            )
        )
    elif fault == "widget":
        printed.outputs.append(
            new_output(
                "display_data",
                data={WIDGET_MIME: {"model_id": "abc", "version_major": 2, "version_minor": 0}},
            )
        )
    elif fault == "absolute path":
        table.outputs[0]["data"]["text/plain"] += "\nsaved to /root/.cache/featmatch/activations/x.npz"
    elif fault == "absolute parameter":
        params.source = '# Parameters\nOUT_DIR = "/work/main/book/notebooks/figures"\nPROFILE = "tiny"\n'
    elif fault == "error":
        printed.outputs.append(
            new_output("error", ename="ValueError", evalue="planted", traceback=["ValueError: planted"])
        )
    elif fault is not None:
        raise ValueError(fault)
    nb = new_notebook(
        cells=[
            new_markdown_cell("# A chapter\nSee `/tmp/` and save_figure( in prose."),
            params,
            figure,
            table,
            printed,
        ]
    )
    path = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def test_a_clean_notebook_passes(tmp_path):
    assert check_executed_notebook(_planted(tmp_path)) == []


@pytest.mark.parametrize(
    ("fault", "reported"),
    [
        ("missing figure", "figures: 0 image/png outputs for 1 saved figures"),
        ("warning", "warning: "),
        ("progress bar", "progress bar: "),
        ("widget", "progress bar: a widget output"),
        ("absolute path", "absolute path: "),
        ("absolute parameter", "absolute path: "),
        ("error", "error: ValueError: planted"),
    ],
)
def test_each_planted_fault_is_reported(tmp_path, fault, reported):
    problems = check_executed_notebook(_planted(tmp_path, fault))
    assert problems and all(reported.split(":")[0] in p for p in problems), problems
    assert any(reported in p for p in problems), problems


def test_saved_figure_files_count_when_calls_are_fewer(tmp_path):
    """A figure saved in a loop (one call, several files) must still be on the page."""
    path = _planted(tmp_path)
    (tmp_path / "figures").mkdir()
    for name in ("01_a", "01_b", "02_other_chapter"):
        (tmp_path / "figures" / f"{name}.png").write_bytes(b"png")
    assert check_executed_notebook(path) == ["figures: 1 image/png outputs for 2 saved figures"]


def test_quiet_progress_bars_silences_and_restores(capsys):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from featmatch.lm.models import quiet_progress_bars

    assert hf_logging.is_progress_bar_enabled(), "the test assumes the default (bars on)"
    with quiet_progress_bars():
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert "Loading weights" not in capsys.readouterr().err


# --------------------------------------------------------------------------- the executed book


def _executed_notebooks() -> list:
    folder = os.environ.get(ENV)
    if not folder:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{ENV} is not set"), id="unset")]
    found = sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb") if not p.name.endswith(".failed.ipynb"))
    return [pytest.param(p, id=p.stem) for p in found] or [pytest.param(Path(folder), id="none-found")]


@pytest.mark.parametrize("path", _executed_notebooks())
def test_executed_notebook_is_clean(path):
    assert path.suffix == ".ipynb", f"no executed NN_*.ipynb in {path}"
    problems = check_executed_notebook(path)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.skipif(not os.environ.get(ENV), reason=f"{ENV} is not set")
def test_every_chapter_was_executed():
    folder = Path(os.environ[ENV])
    missing = [nb.name for nb in list_notebooks() if not (folder / nb.name).is_file()]
    assert not missing, f"no executed copy in {folder} of {missing}"
