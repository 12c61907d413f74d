"""Run the book's notebooks headlessly with parameters (papermill) and find them.

The notebooks in ``notebooks/`` are paired jupytext files: ``NN_name.py`` (py:percent,
the reviewed source) and ``NN_name.ipynb``. Each has one cell tagged ``parameters``;
papermill injects new values after it. Executed copies are written to an output folder
(``book/notebooks`` for the published book), never over the sources.

The kernels get the runner's environment without ``MPLBACKEND``: a headless parent
(``make`` exports ``MPLBACKEND=Agg``) would otherwise hand its non-interactive backend to
the kernel, where ``plt.show()`` then draws nothing and the book has no figures. Without
the variable, ipykernel selects matplotlib's inline backend, which embeds every shown
figure as an ``image/png`` output.

The kernels run in the output folder, and ``OUT_DIR`` is injected as the relative path
:data:`FIGURES_DIR` (``"figures"``): the notebooks save their figures and tables to
``<out>/figures``, and the published parameters cell shows no path of the machine that ran it.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featmatch._io import atomic_save

__all__ = [
    "FIGURES_DIR",
    "notebook_parameters",
    "check_parameters",
    "NotebookRun",
    "notebook_dir",
    "list_notebooks",
    "resolve_notebook",
    "run_notebook",
    "parse_param",
    "kernel_environment",
]

KERNEL_NAME = "python3"

#: ``OUT_DIR`` as injected: relative to the output folder, the kernels' working directory.
FIGURES_DIR = "figures"

#: Environment variables the kernels do not inherit from the runner (see the module docstring).
KERNEL_ENV_DROP: tuple[str, ...] = ("MPLBACKEND",)


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Unset :data:`KERNEL_ENV_DROP` while kernels start; restore them afterwards.

    A kernel copies ``os.environ`` when it is launched and ``papermill.execute_notebook``
    takes no environment argument, so the variables are removed from this process for the
    duration of the block (the runner executes one notebook at a time).
    """
    saved = {name: os.environ.pop(name) for name in KERNEL_ENV_DROP if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def notebook_dir() -> Path:
    """The project's ``notebooks/`` folder (``$FEATMATCH_NOTEBOOKS`` overrides it)."""
    env = os.environ.get("FEATMATCH_NOTEBOOKS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "notebooks"


def list_notebooks(folder: Path | None = None) -> list[Path]:
    """The paired ``.ipynb`` notebooks, in chapter order."""
    folder = folder or notebook_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"notebook folder not found: {folder}")
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def resolve_notebook(name: str, folder: Path | None = None) -> Path:
    """Find a notebook by file name, stem, number (``"01"``) or short name (``"folding"``)."""
    notebooks = list_notebooks(folder)
    key = Path(name).stem
    for nb in notebooks:
        stem = nb.stem
        if key in (stem, stem[:2], stem[3:]):
            return nb
    known = ", ".join(nb.stem for nb in notebooks) or "(none)"
    raise ValueError(f"unknown notebook {name!r}; known: {known}")


def parse_param(value: str) -> Any:
    """Parse a ``-p key value`` string as a Python literal when possible, else keep the string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def notebook_parameters(nb: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The parameters a notebook declares in its ``parameters`` cell.

    Read by papermill's ``inspect_notebook``, without running anything.

    Returns
    -------
    dict
        ``name -> {"default": source text of the default, "help": the line's comment}``,
        in the cell's order.
    """
    import papermill as pm

    path = resolve_notebook(str(nb)) if not Path(nb).is_file() else Path(nb)
    found = pm.inspect_notebook(str(path))
    return {k: {"default": v.get("default", ""), "help": v.get("help", "")} for k, v in found.items()}


def _literal_type(default: str) -> type | None:
    """The type of a literal default (int, float, str, bool); ``None`` when it is not one."""
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError):
        return None
    return type(value) if isinstance(value, (bool, int, float, str)) else None


def check_parameters(nb: Path, declared: dict[str, dict[str, str]], params: dict[str, Any]) -> None:
    """Refuse a value whose type differs from the notebook's literal default.

    An ``int`` is accepted for a ``float`` default; defaults that are ``None`` or an
    expression (``os.environ.get(...)``) accept any value.

    Raises
    ------
    ValueError
        One line naming the notebook, the parameter, its default and the value given.
    """
    for key, value in params.items():
        if key not in declared:
            continue
        want = _literal_type(declared[key]["default"])
        if want is None:
            continue
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        ok = ok or (want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ValueError(
                f"{nb.stem}: parameter {key} takes {'an' if want is int else 'a'} {want.__name__} (default {declared[key]['default']}), "
                f"got {value!r}"
            )


def _unknown_parameters(targets: list[Path], declared: dict[Path, dict], params: dict[str, Any]) -> None:
    """Refuse a parameter that no target notebook declares, listing the ones they do."""
    known = {k for d in declared.values() for k in d}
    unknown = [k for k in params if k not in known]
    if unknown:
        import difflib

        names = sorted(known)
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1)) else k for k in unknown]
        where = targets[0].stem if len(targets) == 1 else "the notebooks"
        raise ValueError(f"{where} has no parameter {', '.join(hints)}; parameters: {', '.join(names)}")


@dataclass(frozen=True)
class NotebookRun:
    """One executed notebook: where it went and how long it took."""

    name: str
    output: Path
    seconds: float


def run_notebook(
    name: str,
    params: dict[str, Any] | None = None,
    out_dir: str | os.PathLike = "runs",
    *,
    progress: bool = True,
) -> list[NotebookRun]:
    """Execute one notebook (or ``"all"``) with papermill, injecting ``params``.

    Parameters
    ----------
    name : str
        A notebook stem, number, short name, or ``"all"``.
    params : dict, optional
        Values for the notebook's ``parameters`` cell (e.g. ``{"PROFILE": "full"}``). A name
        that no target notebook declares, or a value of another type than a literal default,
        is refused before anything runs (:func:`notebook_parameters`, :func:`check_parameters`).
    out_dir : path
        Folder for the executed copies, and the kernels' working directory. Each copy is
        written atomically, so an interrupted run leaves the previous copy (if any) in place.
        The notebooks save figures under ``OUT_DIR``, a parameter they receive as
        ``"figures"``, i.e. ``out_dir/figures`` (a relative ``OUT_DIR`` given in ``params``
        is likewise relative to ``out_dir``).

    Returns
    -------
    list of NotebookRun
    """
    import papermill as pm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = list_notebooks() if name == "all" else [resolve_notebook(name)]
    if not targets:
        raise FileNotFoundError(f"no notebooks found in {notebook_dir()}")
    params = dict(params or {})
    declared = {nb: notebook_parameters(nb) for nb in targets}
    _unknown_parameters(targets, declared, params)
    for nb in targets:  # every value is checked before anything runs
        check_parameters(nb, declared[nb], params)
    runs: list[NotebookRun] = []
    for nb in targets:
        values: dict[str, Any] = {"OUT_DIR": FIGURES_DIR}
        # with "all", each notebook gets the parameters it declares (no papermill warning)
        values.update({k: v for k, v in params.items() if k in declared[nb]})
        start = time.perf_counter()
        dest = out / nb.name

        def _execute(tmp: Path, nb: Path = nb, values: dict[str, Any] = values, dest: Path = dest) -> None:
            try:
                pm.execute_notebook(
                    str(nb),
                    str(tmp),
                    parameters=values,
                    kernel_name=KERNEL_NAME,
                    progress_bar=progress,
                    cwd=str(out.resolve()),
                )
            except pm.PapermillExecutionError as exc:
                # keep the partly executed copy: it shows the failing cell and its traceback
                failed = dest.with_suffix(".failed.ipynb")
                shutil.copyfile(tmp, failed)
                raise RuntimeError(
                    f"{nb.stem} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} (see {failed})"
                ) from None

        with kernel_environment():
            atomic_save(dest.with_suffix(".ipynb"), _execute)
        dest.with_suffix(".failed.ipynb").unlink(missing_ok=True)
        runs.append(NotebookRun(nb.stem, dest, time.perf_counter() - start))
        print(f"[featmatch] {nb.stem}: {runs[-1].seconds:.1f} s -> {dest}", flush=True)
    return runs
