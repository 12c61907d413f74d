"""featmatch.chapters.results: the generated "Results at a glance" and parameters pages."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from featmatch.chapters import results as R
from featmatch.chapters.run import notebook_parameters

CHAPTERS = [R.Chapter("01_folding", "Folding"), R.Chapter("02_persistence", "Persistence"),
            R.Chapter("05_circuit_compression", "Circuit compression")]


def _row(chapter, claim, verdict, n=10, section="", **kw):
    base = {"chapter": chapter, "claim": claim, "paper_value": "Fig. 7", "our_value": 0.5, "effect": 0.1,
            "ci_low": 0.0, "ci_high": 0.2, "chance": 0.25, "n": n, "unit": "layer pairs", "verdict": verdict,
            "rule": "r", "precondition": "", "source": "SAE Match §5", "section": section}
    return base | kw


@pytest.fixture
def figures(tmp_path):
    f = tmp_path / "figures"
    f.mkdir()
    pd.DataFrame([_row("01", "folding helps", "held", n=29, section="3. Matching score (Fig. 7)"),
                  _row("01", "encoder worse | clearly", "failed", n=29)]).to_csv(f / "01_claims.csv", index=False)
    # an old-layout table, named by the chapter's short name
    pd.DataFrame({"Claim": ["paths persist"], "Source": ["SAE Match §5.4"], "Our number": ["ρ = 0.3"],
                  "Verdict": ["not tested"]}).to_csv(f / "persistence_claims.csv", index=False)
    pd.DataFrame([_row("05", "the graph is faithful", "failed", n=8, our_value=-0.12),
                  _row("05", "Semantic OT supernodes agree with the judge", "mixed", n=4),
                  _row("05", "Semantic OT supernodes keep more faithfulness than SAE Match", "held", n=4)]).to_csv(
        f / "compression_claims.csv", index=False)
    return f


def test_collect_claims_maps_files_to_chapters_in_order(figures):
    claims = R.collect_claims(figures, CHAPTERS)
    assert claims["stem"].tolist() == ["01_folding"] * 2 + ["02_persistence"] + ["05_circuit_compression"] * 3
    assert claims.loc[2, "verdict"] == "not testable"  # old vocabulary mapped
    counts = R.verdict_counts(claims)
    assert counts.to_dict() == {"held": 2, "failed": 2, "mixed": 1, "not testable": 1}


def test_results_page_counts_links_and_limitations(figures):
    page = R.results_page(figures, CHAPTERS, profile="quick")
    assert page.startswith("# Results at a glance\n")
    for verdict, n in {"held": 2, "failed": 2, "mixed": 1, "not testable": 1}.items():
        assert re.search(rf">{verdict}</span> \| {n} \|", page), verdict
    assert "| **all** | **6** |" in page
    # one table row per claim, in the claims section
    every = page.split("## Every claim")[1].split("## Limitations")[0]
    assert len([ln for ln in every.splitlines() if re.match(r"\| 0[125] \|", ln)]) == 6
    assert "encoder worse \\| clearly" in every  # a pipe in a claim does not break the table
    # the claim links to its section, by the id docutils gives the heading
    assert ('<a href="notebooks/01_folding.html#matching-score-fig-7" title="tested in Folding: 3. Matching score (Fig. 7)">'
            "folding helps</a>") in every
    assert '<a href="notebooks/02_persistence.html" title="tested in Persistence">paths persist</a>' in every
    lim = page.split("## Limitations")[1].split("## Chapters")[0]
    assert len(re.findall(r"^- \*\*", lim, flags=re.M)) == len(R.LIMITATIONS)
    assert "width 1,024" in lim  # read from the quick zoo profile
    assert "“the graph is faithful”: **failed**" in lim and "-0.12" in lim  # read from 05's claims
    assert "keep more faithfulness than" not in lim  # comparisons of groupings are not the graph's faithfulness
    assert "on 4 to 29 units" in lim
    assert "[Folding](notebooks/01_folding.ipynb) — 2 claims" in page
    assert "{" not in lim  # every field filled


def test_results_page_without_claims_says_so(tmp_path):
    page = R.results_page(tmp_path, CHAPTERS, profile="quick")
    assert "No claims tables were found" in page and "## Limitations" in page and "## Chapters" in page


def test_section_anchor_is_docutils_make_id():
    from docutils.nodes import make_id

    for title in ("3. Matching score (Fig. 7)", "1. Where θ sits", "Claims"):
        assert R.section_anchor(title) == make_id(title)
    assert R.section_anchor("3. Matching score (Fig. 7)") == "matching-score-fig-7"


def test_parameters_page_lists_every_parameter_of_every_notebook():
    chapters = R.chapters()
    page = R.parameters_page(chapters)
    for c in chapters:
        assert f"### {c.number} {c.title}" in page
        for name in notebook_parameters(c.stem):
            assert f"| `{name}` |" in page
    assert "tiny: `2048`" in page and "quick: `16384`" in page  # folding's N_TOKENS per profile


def test_write_book_pages(figures, tmp_path):
    out = tmp_path / "book"
    paths = R.write_book_pages(figures, out)
    assert [p.relative_to(out).as_posix() for p in paths] == ["results.md", "_generated/parameters.md"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_a_stale_table_of_the_same_chapter_is_ignored(figures):
    import os

    old = figures / "folding_claims.csv"  # left by an earlier run under the old name
    pd.DataFrame({"Claim": ["stale"], "Source": ["x"], "Our number": ["1"], "Verdict": ["held"]}).to_csv(old, index=False)
    os.utime(old, (1_000_000_000, 1_000_000_000))
    claims = R.collect_claims(figures, CHAPTERS)
    assert "stale" not in claims["claim"].tolist() and (claims["stem"] == "01_folding").sum() == 2
    os.utime(old, None)  # now the newer one
    claims = R.collect_claims(figures, CHAPTERS)
    assert claims.loc[claims["stem"] == "01_folding", "claim"].tolist() == ["stale"]
