"""featmatch.chapters.run: notebook discovery and parameter parsing (execution is covered by nbmake)."""

from __future__ import annotations

import pytest

from featmatch.chapters.run import list_notebooks, parse_param, resolve_notebook


def test_parse_param_literals():
    assert parse_param("3") == 3
    assert parse_param("[1, 2]") == [1, 2]
    assert parse_param("quick") == "quick"
    assert parse_param("'quick'") == "quick"


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
    with pytest.raises(ValueError, match="unknown notebook"):
        resolve_notebook("no-such-notebook")
