"""featmatch.chapters.display: claims tables rendered in full, coloured, without index."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from featmatch.chapters import display


class _Table(HTMLParser):
    """Cells of the first HTML table (the standard library's parser as the reference reader)."""

    def __init__(self) -> None:
        super().__init__()
        self.head: list[str] = []
        self.rows: list[list[tuple[str, str]]] = []  # (text, class)
        self._cell: list[str] | None = None
        self._tag = ""
        self._cls = ""

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell, self._tag, self._cls = [], tag, dict(attrs).get("class", "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            if self._tag == "th" and "col_heading" in self._cls:
                self.head.append(text)
            self.rows[-1].append((text, self._cls))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(html: str) -> _Table:
    t = _Table()
    t.feed(html)
    return t


LONG = "Folding the thresholds into the weights makes the matched features agree more often " * 6


def _new_table() -> pd.DataFrame:
    rows = []
    for k, verdict in enumerate(("held", "failed", "mixed", "not testable")):
        rows.append({
            "chapter": "01", "claim": LONG if k == 0 else f"claim {k} with a < b & c", "paper_value": "Fig. 7: folded > unfolded",
            "our_value": 0.41234, "effect": 0.2 - 0.1 * k, "ci_low": 0.1 - 0.1 * k, "ci_high": 0.3, "chance": 0.25,
            "n": 23, "unit": "layer pairs", "verdict": verdict, "rule": "held if CI > 0", "precondition": "JumpReLU ✓",
            "source": "SAE Match §5.2, Fig. 7", "section": "3. Matching score",
        })
    return pd.DataFrame(rows)


def test_show_claims_renders_every_text_in_full_with_coloured_verdicts_and_no_index():
    html = display.show_claims(_new_table()).to_html()
    t = _parse(html)
    assert t.head == ["Claim", "Paper says", "We find", "Verdict", "Rule", "Precondition", "Source"]
    body = [r for r in t.rows if r and r[0][1].startswith("data")]
    assert len(body) == 4 and all(len(r) == 7 for r in body)  # no index cell in any row
    assert "row_heading" not in html and "…" not in html
    assert body[0][0][0] == LONG.strip()  # the whole claim, not cut
    assert body[1][0][0] == "claim 1 with a < b & c" and "a &lt; b &amp; c" in html  # escaped markup, same text
    for row, verdict in zip(body, ("held", "failed", "mixed", "not testable"), strict=True):
        assert row[3][0] == verdict
    for k, verdict in enumerate(("held", "failed", "mixed", "not testable")):
        bg, fg = display.VERDICT_COLOURS[verdict]
        # the CSS rule of the verdict cell (row k, column 3) sets its colours
        rule = re.search(rf"#T_\w+_row{k}_col3\s*\{{([^}}]*)\}}", html).group(1)
        assert f"background-color: {bg};" in rule and f"color: {fg};" in rule, verdict
    assert "white-space: normal" in html  # wrapped text
    assert body[0][2][0] == "0.412 · effect +0.2 [0.1, 0.3] · chance 0.25 · n = 23 layer pairs"


def test_verdict_colours_have_readable_contrast():
    def lum(hex_colour):
        rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    for bg, fg in display.VERDICT_COLOURS.values():
        hi, lo = sorted((lum(bg), lum(fg)), reverse=True)
        assert (hi + 0.05) / (lo + 0.05) >= 4.5


def test_old_layout_and_csv_files_are_read(tmp_path):
    old = pd.DataFrame({"Claim": ["x holds"], "Source": ["SAE Match §5"], "Our number": ["ρ = 0.3 over 12 pairs"],
                        "Verdict": ["not tested"]})
    path = tmp_path / "folding_claims.csv"
    old.to_csv(path, index=False)
    norm = display.load_claims(path)
    assert list(norm.columns) == list(display.CLAIM_COLUMNS)
    assert norm.loc[0, "verdict"] == "not testable" and norm.loc[0, "our_value"] == "ρ = 0.3 over 12 pairs"
    t = _parse(display.show_claims(path).to_html())
    assert t.head == ["Claim", "We find", "Verdict", "Source"]  # empty columns dropped
    assert [c[0] for c in t.rows[-1]] == ["x holds", "ρ = 0.3 over 12 pairs", "not testable", "SAE Match §5"]
    _new_table().to_csv(tmp_path / "01_claims.csv", index=False)
    assert display.load_claims(tmp_path / "01_claims.csv")["verdict"].tolist() == ["held", "failed", "mixed", "not testable"]
    with pytest.raises(FileNotFoundError, match="missing_claims.csv"):
        display.load_claims(tmp_path / "missing_claims.csv")


def test_claims_schema_matches_the_engine():
    from featmatch.chapters import claims

    assert tuple(claims.CSV_COLUMNS) == display.CLAIM_COLUMNS
    assert set(display.VERDICT_COLOURS) == set(claims.VERDICTS)


def test_we_find_and_fmt_number():
    assert display.fmt_number(float("nan")) == "—" and display.fmt_number(12.0) == "12" and display.fmt_number("abc") == "abc"
    assert display.we_find({"our_value": math.nan, "effect": math.nan, "n": 3, "unit": "prompts"}) == "n = 3 prompts"
    assert display.we_find({"our_value": -0.5, "effect": -0.25, "ci_low": -0.4, "ci_high": np.nan}) == "-0.5 · effect -0.25"


def test_compact_formats_numbers_and_scrolls(rng):
    df = pd.DataFrame(rng.normal(size=(30, 12)) * 1e3, columns=[f"column_{i}" for i in range(12)])
    html = display.compact(df, max_rows=10).to_html()
    t = _parse(html)
    body = [r for r in t.rows if r and r[0][1].startswith("data")]
    assert len(body) == 10 and "first 10 of 30 rows" in html and "overflow-x: auto" in html
    assert body[0][0][0] == display.fmt_number(df.iloc[0, 0])
