"""Tests for benchmarks/run_all.py's section merge (regenerating one table keeps the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import run_all as mod

    return mod


def test_merge_replaces_named_sections_and_keeps_the_rest(run_all):
    old = "\n".join(
        [
            "# Benchmarks",
            "old header line",
            "## bench_matching (issue 8): exact",
            "| old table |",
            "### a subsection that belongs to it",
            "## Status",
            "hand-written status",
            "## bench_semantic",
            "| semantic table |",
        ]
    )
    new = run_all.merge_sections(
        old, {"bench_matching": "## bench_matching\n\n| new table |", "bench_extra": "## bench_extra\n| x |"}, "# H"
    )
    assert new.startswith("# H\n")
    assert "old header line" not in new
    assert "| new table |" in new and "| old table |" not in new and "a subsection" not in new
    assert "hand-written status" in new and "| semantic table |" in new
    # order kept: matching before status before semantic; unknown sections appended
    assert new.index("| new table |") < new.index("hand-written status") < new.index("| semantic table |")
    assert new.rstrip().endswith("| x |")


def test_merge_into_an_empty_file(run_all):
    assert run_all.merge_sections("", {"bench_a": "## bench_a\nbody"}, "# H") == "# H\n\n## bench_a\nbody\n"
