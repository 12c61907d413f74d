"""Tables as a reader sees them: the claims table in full, wide tables compacted.

:func:`show_claims` renders a chapter's claims table (the rows of
:mod:`featmatch.chapters.claims`, or the ``<chapter>_claims.csv`` it wrote) as a pandas
:class:`~pandas.io.formats.style.Styler`. In a notebook it displays as ``text/html``, which
jupyter-book puts on the page as it is:

* every text in full and wrapped (no "…"), no index column;
* columns *Claim*, *Paper says*, *We find* (our value, the effect with its 95 % confidence
  interval, the chance level and the sample size), *Verdict* (coloured: held green, failed
  red, mixed amber, not testable grey), *Rule*, *Precondition*, *Source*.

Claims tables of the older layout (columns ``Claim, Source, Our number, Verdict``; verdict
``not tested``) are read too (:func:`normalize_claims`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CLAIM_COLUMNS",
    "VERDICT_COLOURS",
    "normalize_claims",
    "load_claims",
    "fmt_number",
    "we_find",
    "claims_frame",
    "show_claims",
    "compact",
]

#: The claims CSV schema (the same as :data:`featmatch.chapters.claims.CSV_COLUMNS`, kept here
#: so that the readers of old and new files do not depend on the engine's import state).
CLAIM_COLUMNS = (
    "chapter", "claim", "paper_value", "our_value", "effect", "ci_low", "ci_high", "chance",
    "n", "unit", "verdict", "rule", "precondition", "source", "section",
)

#: Old column names → schema names.
OLD_COLUMNS = {"Claim": "claim", "Source": "source", "Our number": "our_value", "Verdict": "verdict"}

#: Old verdict words → the vocabulary of :mod:`featmatch.chapters.claims`.
OLD_VERDICTS = {"not tested": "not testable"}

#: Background and text colour of each verdict (text contrast ≥ 4.5 : 1, WCAG AA).
VERDICT_COLOURS: Mapping[str, tuple[str, str]] = {
    "held": ("#d4edda", "#155724"),
    "failed": ("#f8d7da", "#721c24"),
    "mixed": ("#fff3cd", "#664d03"),
    "not testable": ("#e2e3e5", "#383d41"),
}

_NUMERIC = ("our_value", "effect", "ci_low", "ci_high", "chance", "n")


def normalize_claims(table: pd.DataFrame, chapter: str = "") -> pd.DataFrame:
    """A claims table with exactly the columns :data:`CLAIM_COLUMNS`, in order.

    Old tables are mapped (:data:`OLD_COLUMNS`, :data:`OLD_VERDICTS`); missing columns are
    empty strings (text) or NaN (numbers); ``chapter`` fills an empty ``chapter`` column.
    Numeric columns stay as they are when they hold text (an old "Our number" is a sentence).
    """
    df = table.rename(columns={k: v for k, v in OLD_COLUMNS.items() if k in table.columns}).copy()
    for col in CLAIM_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan if col in _NUMERIC else ""
    df["verdict"] = df["verdict"].astype(str).str.strip().replace(OLD_VERDICTS)
    text_cols = [c for c in CLAIM_COLUMNS if c not in _NUMERIC]
    df[text_cols] = df[text_cols].astype(object).where(df[text_cols].notna(), "")
    if chapter:
        df["chapter"] = df["chapter"].astype(str).replace({"": chapter})
    return df[list(CLAIM_COLUMNS)].reset_index(drop=True)


def load_claims(table_or_csv: pd.DataFrame | str | os.PathLike | Any) -> pd.DataFrame:
    """A normalized claims table from a DataFrame, a CSV path, or a sequence of claim objects.

    Raises
    ------
    FileNotFoundError
        One line naming the CSV when it does not exist.
    """
    if isinstance(table_or_csv, pd.DataFrame):
        return normalize_claims(table_or_csv)
    if isinstance(table_or_csv, (str, os.PathLike)):
        path = Path(table_or_csv)
        if not path.is_file():
            raise FileNotFoundError(f"claims table not found: {path}")
        return normalize_claims(pd.read_csv(path, keep_default_na=True))
    rows = [c.as_row() if hasattr(c, "as_row") else dict(vars(c)) for c in table_or_csv]
    return normalize_claims(pd.DataFrame(rows))


def fmt_number(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; text is kept; NaN/None is "—"."""
    if x is None:
        return "—"
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "—"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.{digits}g}"


def we_find(row: Mapping[str, Any] | pd.Series) -> str:
    """What we find, in one line: our value; effect [95 % CI]; chance; n and unit.

    Parts whose numbers are missing are left out, e.g.
    ``"0.412 · effect +0.21 [0.12, 0.3] · chance 0.2 · n = 23 layer pairs"``.
    """
    parts = [fmt_number(row.get("our_value"))]
    eff = row.get("effect")
    if fmt_number(eff) != "—":
        lo, hi = fmt_number(row.get("ci_low")), fmt_number(row.get("ci_high"))
        sign = "+" if float(eff) > 0 else ""
        ci = f" [{lo}, {hi}]" if "—" not in (lo, hi) else ""
        parts.append(f"effect {sign}{fmt_number(eff)}{ci}")
    if fmt_number(row.get("chance")) != "—":
        parts.append(f"chance {fmt_number(row.get('chance'))}")
    if fmt_number(row.get("n")) != "—":
        unit = str(row.get("unit") or "").strip()
        parts.append(f"n = {fmt_number(row.get('n'))}" + (f" {unit}" if unit else ""))
    parts = [p for p in parts if p != "—"] or ["—"]
    return " · ".join(parts)


def claims_frame(table_or_csv: pd.DataFrame | str | os.PathLike | Any) -> pd.DataFrame:
    """The displayed columns: Claim, Paper says, We find, Verdict, Rule, Precondition, Source.

    Columns that are empty in every row (e.g. *Rule* in an old table) are dropped.
    """
    df = load_claims(table_or_csv)
    out = pd.DataFrame(
        {
            "Claim": df["claim"],
            "Paper says": df["paper_value"],
            "We find": [we_find(r) for _, r in df.iterrows()],
            "Verdict": df["verdict"],
            "Rule": df["rule"],
            "Precondition": df["precondition"],
            "Source": df["source"],
        }
    )
    keep = [c for c in out.columns if c in ("Claim", "We find", "Verdict") or out[c].astype(str).str.strip().ne("").any()]
    return out[keep]


def _verdict_style(v: str) -> str:
    bg, fg = VERDICT_COLOURS.get(str(v), ("#ffffff", "#000000"))
    return f"background-color: {bg}; color: {fg}; font-weight: bold; white-space: nowrap;"


_TABLE_STYLES = [
    {"selector": "", "props": "border-collapse: collapse; width: 100%; font-size: 0.85em; table-layout: auto;"},
    {"selector": "th", "props": "text-align: left; vertical-align: bottom; padding: 4px 6px; border-bottom: 2px solid #999;"},
    {"selector": "td", "props": "text-align: left; vertical-align: top; padding: 4px 6px; border-bottom: 1px solid #ddd;"
                                " white-space: normal; overflow-wrap: anywhere; max-width: 28em;"},
]


def show_claims(table_or_csv: pd.DataFrame | str | os.PathLike | Any, caption: str | None = None) -> Any:
    """A chapter's claims table, styled for the page (see the module docstring).

    Parameters
    ----------
    table_or_csv : DataFrame, path, or sequence of claims
        The claims table (new or old layout), the CSV written by
        :func:`featmatch.chapters.claims.write_claims`, or the claim objects.
    caption : str, optional
        Table caption.

    Returns
    -------
    pandas.io.formats.style.Styler
        Displays as HTML in a notebook; ``.to_html()`` gives the markup. Text is HTML-escaped.
    """
    frame = claims_frame(table_or_csv)
    styler = frame.style.hide(axis="index").format(escape="html")
    styler = styler.map(_verdict_style, subset=["Verdict"]).set_table_styles(_TABLE_STYLES)
    if caption:
        styler = styler.set_caption(caption)
    return styler


def compact(df: pd.DataFrame, *, precision: int = 3, max_rows: int | None = None, index: bool = False) -> Any:
    """A wide or long table made readable: numbers to ``precision`` significant digits, small
    font, wrapped headers, horizontal scrolling instead of running off the page.

    Rows are cut only when ``max_rows`` is given, and the caption then says how many are shown.
    Returns a :class:`~pandas.io.formats.style.Styler`.
    """
    shown = df if max_rows is None or len(df) <= max_rows else df.head(max_rows)
    num = shown.select_dtypes("number").columns
    styler = shown.style.format({c: (lambda x, p=precision: fmt_number(x, p)) for c in num}, escape="html")
    if not index:
        styler = styler.hide(axis="index")
    styler = styler.set_table_styles(
        [
            {"selector": "", "props": "display: block; overflow-x: auto; max-width: 100%; border-collapse: collapse; font-size: 0.8em;"},
            {"selector": "th", "props": "white-space: normal; text-align: right; padding: 2px 5px; border-bottom: 1px solid #999;"},
            {"selector": "td", "props": "text-align: right; padding: 2px 5px; white-space: nowrap;"},
        ]
    )
    if shown is not df:
        styler = styler.set_caption(f"first {len(shown)} of {len(df)} rows")
    return styler
