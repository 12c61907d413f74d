"""The book's generated pages: "Results at a glance" and the chapters' parameters.

:func:`write_book_pages` (CLI: ``featmatch book-pages --figures book/notebooks/figures --out
book``) writes, after the notebooks have run and before jupyter-book builds:

* ``<out>/results.md`` (:func:`results_page`): every claim of every chapter, read from the
  ``*_claims.csv`` files the chapters wrote (:mod:`featmatch.chapters.claims`), with what the
  paper says, what we find, the verdict and a link to the section that tests it; the number
  of claims per verdict; the limitations of this build (:data:`LIMITATIONS`, with numbers
  read from the tables where they exist); the chapters as links;
* ``<out>/_generated/parameters.md`` (:func:`parameters_page`): each chapter's parameters,
  defaults and meaning, read from the notebooks' ``parameters`` cells
  (:func:`featmatch.chapters.run.notebook_parameters`); ``book/rerun.md`` includes it.

Both are generated files (gitignored), never edited by hand.
"""

from __future__ import annotations

import html as _html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from featmatch._io import atomic_write_text
from featmatch.chapters.display import VERDICT_COLOURS, fmt_number, load_claims, we_find
from featmatch.chapters.run import list_notebooks, notebook_parameters

__all__ = [
    "LIMITATIONS",
    "Chapter",
    "chapters",
    "section_anchor",
    "find_claims_files",
    "collect_claims",
    "verdict_counts",
    "results_page",
    "parameters_page",
    "write_book_pages",
]

VERDICT_ORDER = ("held", "failed", "mixed", "not testable")

#: The limitations every reader should know, one sentence each; ``{...}`` fields are filled
#: from the claims tables and the zoo profile by :func:`results_page` (see ``_facts``).
LIMITATIONS: tuple[tuple[str, str], ...] = (
    ("The judge is a proxy, not an LLM",
     "Unless an OpenAI-compatible endpoint is configured (see the rerun page), every "
     "DIFFERENT/MAYBE/SAME label comes from the offline embedding proxy (cosine similarity of "
     "all-MiniLM-L6-v2 embeddings with two thresholds), not from the papers' LLM judge, so judge "
     "numbers are not comparable with the papers'{judge_note}."),
    ("Small, briefly trained SAEs",
     "The SAEs are JumpReLU SAEs of width {width} trained here for {epochs} epochs on "
     "{tokens} tokens per layer (zoo profile `{profile}`), much smaller and less trained than "
     "Gemma Scope's 16k-wide SAEs; effects that need well-converged thresholds may not appear."),
    ("The circuit graphs",
     "{faithfulness}"),
    ("Small samples",
     "{samples} {n_not_testable} of {n_claims} claims are *not testable* here: a precondition "
     "fails, or the confidence interval is wider than the effect the claim needs. The book runs "
     "the `quick` sizes so that it builds on two CPU cores; the rerun page says how to run larger ones."),
    ("Offline corpus and one small model",
     "Activations come from English prose and Python source shipped by Python packages "
     "(docs/corpus.md), run through SmolLM2-135M; the papers use web text and Gemma-2-2B. "
     "The GPT-2 and Gemma-2-2B recipes on the rerun page were not run for this build."),
)


@dataclass(frozen=True)
class Chapter:
    """One chapter page: notebook stem (``01_folding``), title, and page path in the book."""

    stem: str
    title: str

    @property
    def number(self) -> str:
        """The two-digit chapter number."""
        return self.stem[:2]

    @property
    def page(self) -> str:
        """The page's source path relative to the book root (``notebooks/01_folding.ipynb``)."""
        return f"notebooks/{self.stem}.ipynb"

    @property
    def html(self) -> str:
        """The built page relative to the book root (``notebooks/01_folding.html``)."""
        return f"notebooks/{self.stem}.html"

    def matches(self, key: str) -> bool:
        """Whether a claims-file key (``01``, ``folding``, ``compression``) names this chapter."""
        key = str(key).strip()
        return bool(key) and (key in (self.stem, self.number, self.stem[3:]) or self.stem.endswith("_" + key))


def _title(nb: Path) -> str:
    """The first level-1 Markdown heading of a notebook (its page title in the book)."""
    cells = json.loads(nb.read_text(encoding="utf-8")).get("cells", [])
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return nb.stem[3:].replace("_", " ").capitalize()


def chapters(folder: str | os.PathLike | None = None) -> list[Chapter]:
    """The book's chapters, in order, from the paired notebooks (:func:`list_notebooks`)."""
    return [Chapter(nb.stem, _title(nb)) for nb in list_notebooks(Path(folder) if folder else None)]


def section_anchor(title: str) -> str:
    """The HTML id Sphinx gives a section with this heading.

    docutils' :func:`docutils.nodes.make_id` (the function that names sections): lower case,
    non-ASCII dropped, runs of other characters → "-", leading digits and hyphens removed, so
    ``"3. Matching score (Fig. 7)"`` → ``"matching-score-fig-7"``.
    """
    from docutils.nodes import make_id

    return make_id(str(title))


def find_claims_files(figures: str | os.PathLike) -> list[Path]:
    """The ``*_claims.csv`` files in ``figures``, sorted."""
    return sorted(Path(figures).glob("*_claims.csv"))


def collect_claims(figures: str | os.PathLike, chapter_list: Sequence[Chapter] | None = None) -> pd.DataFrame:
    """Every claim of every chapter: the normalized claims columns plus ``stem``, ``title``, ``page``.

    Claims files are matched to chapters by their name (``01_claims.csv``,
    ``folding_claims.csv``, ``compression_claims.csv``) or, failing that, by their
    ``chapter`` column. A file that matches no chapter is kept under its own name. When two
    files name the same chapter (a table left by an earlier run under another name), the
    newer one (modification time) is used.
    """
    chapter_list = list(chapter_list) if chapter_list is not None else chapters()
    newest: dict[str, tuple[float, pd.DataFrame]] = {}
    for path in find_claims_files(figures):
        key = path.name[: -len("_claims.csv")]
        df = load_claims(path)
        found = next((c for c in chapter_list if c.matches(key)), None)
        if found is None and len(df):
            found = next((c for c in chapter_list if c.matches(str(df["chapter"].iloc[0]))), None)
        df["stem"] = found.stem if found else key
        df["title"] = found.title if found else key
        df["page"] = found.page if found else ""
        stem, mtime = (found.stem if found else key), path.stat().st_mtime
        if stem not in newest or mtime >= newest[stem][0]:
            newest[stem] = (mtime, df)
    frames = [df for _, df in newest.values()]
    if not frames:
        return pd.DataFrame(columns=[*load_claims(pd.DataFrame()).columns, "stem", "title", "page"])
    order = {c.stem: i for i, c in enumerate(chapter_list)}
    out = pd.concat(frames, ignore_index=True)
    out["_o"] = out["stem"].map(order).fillna(len(order))
    return out.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def verdict_counts(claims: pd.DataFrame) -> pd.Series:
    """Number of claims per verdict, in the order held, failed, mixed, not testable (zeros kept)."""
    counts = claims["verdict"].value_counts() if len(claims) else pd.Series(dtype=int)
    extra = [v for v in counts.index if v not in VERDICT_ORDER]
    return pd.Series({v: int(counts.get(v, 0)) for v in (*VERDICT_ORDER, *extra)}, name="claims")


def _cell(text: object) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    s = "" if text is None or (isinstance(text, float) and pd.isna(text)) else str(text)
    return " ".join(s.split()).replace("|", "\\|")


def _verdict_badge(v: str) -> str:
    bg, fg = VERDICT_COLOURS.get(v, ("#ffffff", "#000000"))
    return f'<span style="background-color:{bg};color:{fg};font-weight:bold;padding:0 4px;white-space:nowrap">{v}</span>'


def _link(row: pd.Series) -> str:
    """The claim's text, linked to the section that tests it (or to the chapter page)."""
    text = _html.escape(_cell(row["claim"]), quote=False)
    if not row["page"]:
        return text
    html = row["page"][: -len(".ipynb")] + ".html"
    section = str(row["section"]).strip()
    anchor = section_anchor(section) if section else ""
    where = _html.escape(f"{row['title']}: {section}" if section else str(row["title"]), quote=True)
    return f'<a href="{html}{"#" + anchor if anchor else ""}" title="tested in {where}">{text}</a>'


def _executed_profile(figures: Path) -> str | None:
    """The ``PROFILE`` the executed notebooks next to ``figures`` ran with (papermill metadata)."""
    for nb in sorted(figures.parent.glob("[0-9][0-9]_*.ipynb")):
        try:
            meta = json.loads(nb.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
        except (OSError, ValueError):
            continue
        prof = (meta.get("parameters") or {}).get("PROFILE")
        if prof:
            return str(prof)
    return None


def _facts(claims: pd.DataFrame, profile: str) -> dict[str, str]:
    """The numbers the limitations quote, read from the claims and the zoo profile."""
    from featmatch.saes.zoo import get_profile

    facts: dict[str, str] = {"profile": profile}
    try:
        p = get_profile(profile)
        facts |= {"width": f"{p.sae['d_sae']:,}", "epochs": str(p.trainer["epochs"]), "tokens": f"{p.n_tokens:,}"}
    except (KeyError, ValueError, AttributeError, TypeError):
        facts |= {"width": "(unknown)", "epochs": "a few", "tokens": "(unknown)"}
    n = pd.to_numeric(claims["n"], errors="coerce").dropna() if len(claims) else pd.Series(dtype=float)
    facts |= {
        "samples": (f"Each claim rests on {fmt_number(n.min())} to {fmt_number(n.max())} units (features, layer "
                    f"pairs, prompts; median {fmt_number(n.median())})." if len(n) else
                    "The claims tables of this build give no sample sizes."),
        "n_not_testable": str(int((claims["verdict"] == "not testable").sum())) if len(claims) else "0",
        "n_claims": str(len(claims)),
    }
    text = claims[["claim", "rule", "precondition", "source", "our_value"]].astype(str).agg(" ".join, axis=1) if len(claims) else pd.Series(dtype=str)
    facts["judge_note"] = (" (this build's claims name the proxy judge)" if text.str.contains("proxy", case=False).any() else "")
    # the claims on the graph's own faithfulness, not the comparisons of groupings ("more faithful … than")
    is_faith = claims["claim"].str.contains("faithful", case=False) & ~claims["claim"].str.contains(r"\bthan\b", case=False)
    circ = claims[claims["stem"].str.startswith("05") & is_faith] if len(claims) else claims
    if len(circ):
        parts = [f"“{_cell(r.claim)}”: **{r.verdict}** (we find {we_find(r._asdict())})" for r in circ.itertuples()]
        facts["faithfulness"] = ("How faithful the attribution graph of chapter 05 is decides how much its "
                                 "compression results mean. Read from its claims: " + "; ".join(parts) + ".")
    else:
        facts["faithfulness"] = ("Chapter 05's claims table has no faithfulness row in this build, so how well "
                                 "its attribution graph reproduces the model is not established here.")
    return facts


def results_page(figures: str | os.PathLike, chapter_list: Sequence[Chapter] | None = None, profile: str | None = None) -> str:
    """The MyST Markdown of "Results at a glance" (see the module docstring)."""
    figures = Path(figures)
    chapter_list = list(chapter_list) if chapter_list is not None else chapters()
    claims = collect_claims(figures, chapter_list)
    profile = profile or _executed_profile(figures) or "quick"
    counts = verdict_counts(claims)
    lines = [
        "# Results at a glance",
        "",
        "Every claim of the papers that the chapters test, with our number and the verdict of the",
        "claims engine (`featmatch.chapters.claims`). This page is generated from the claims tables the",
        f"chapters wrote when they ran (profile `{profile}`); nothing on it is typed by hand.",
        "",
        "## Verdicts",
        "",
    ]
    if not len(claims):
        lines += [f"No claims tables were found in `{figures.name}/`: run the notebooks first "
                  "(`featmatch run-notebook all --out book/notebooks`).", ""]
    else:
        lines += ["| verdict | claims |", "|---|---:|"]
        lines += [f"| {_verdict_badge(v)} | {n} |" for v, n in counts.items()]
        lines += [f"| **all** | **{int(counts.sum())}** |", ""]
        per = pd.crosstab(claims["stem"], claims["verdict"]).reindex(columns=list(counts.index), fill_value=0)
        lines += ["| chapter | " + " | ".join(counts.index) + " |", "|---|" + "---:|" * len(counts)]
        titles = dict(zip(claims["stem"], claims["title"], strict=False))
        for stem in dict.fromkeys(claims["stem"]):
            row = per.loc[stem] if stem in per.index else pd.Series(0, index=counts.index)
            lines.append(f"| {_cell(titles[stem])} | " + " | ".join(str(int(row[v])) for v in counts.index) + " |")
        lines += ["", "## Every claim", ""]
        # the table takes the page's full width (sphinx-book-theme's "full-width" class)
        lines += ["Each claim links to the section of its chapter that tests it.", "", ":::{div} full-width", "",
                  "| ch. | claim | paper says | we find | verdict |", "|---|---|---|---|---|"]
        for _, r in claims.iterrows():
            lines.append(
                f"| {_cell(r['stem'][:2])} | {_link(r)} | {_cell(r['paper_value']) or '—'} | "
                f"{_cell(we_find(r))} | {_verdict_badge(r['verdict'])} |"
            )
        lines += ["", ":::"]
        lines += ["", "*We find*: our value · the effect (oriented so that positive supports the claim) with its",
                  "95 % bootstrap confidence interval · the chance level · the number of units. The rule behind",
                  "each verdict is in the chapter's claims table.", ""]
    facts = _facts(claims, profile)
    lines += ["## Limitations", ""]
    lines += [f"- **{name}.** {text.format(**facts)}" for name, text in LIMITATIONS]
    lines += ["", "## Chapters", ""]
    for c in chapter_list:
        n = int((claims["stem"] == c.stem).sum()) if len(claims) else 0
        lines.append(f"1. [{c.title}]({c.page}) — {n} claim{'s' if n != 1 else ''}")
    return "\n".join(lines) + "\n"


def parameters_page(chapter_list: Sequence[Chapter] | None = None, folder: str | os.PathLike | None = None) -> str:
    """Each chapter's parameters (name, default, meaning) as MyST Markdown, from the notebooks' cells.

    Headings start at level 3 so that the page including it keeps its own structure.
    """
    chapter_list = list(chapter_list) if chapter_list is not None else chapters(folder)
    nb_folder = Path(folder) if folder else None
    profiles = _profile_defaults()
    lines: list[str] = []
    for c in chapter_list:
        nb = (nb_folder / f"{c.stem}.ipynb") if nb_folder else c.stem
        params = notebook_parameters(nb)
        per_profile = next((v for k, v in profiles.items() if c.matches(k)), {})
        lines += [f"### {c.number} {c.title}", "", "| parameter | default | per profile (when the default is `None`) | meaning |",
                  "|---|---|---|---|"]
        for name, p in params.items():
            default = str(p.get("default", "")).replace("`", "'")
            by = " · ".join(f"{prof}: `{_cell(vals[name])}`" for prof, vals in per_profile.items() if name in vals)
            lines.append(f"| `{name}` | `{_cell(default)}` | {by or '—'} | {_cell(p.get('help', '')) or '—'} |")
        lines.append("")
    return "\n".join(lines)


def _profile_defaults() -> dict[str, dict[str, dict[str, object]]]:
    """``chapter -> profile -> {parameter: value}`` from ``featmatch/chapters/profiles.yaml``."""
    from importlib import resources

    import yaml

    text = resources.files("featmatch.chapters").joinpath("profiles.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def write_book_pages(figures: str | os.PathLike, out: str | os.PathLike, *, notebooks: str | os.PathLike | None = None) -> list[Path]:
    """Write ``<out>/results.md`` and ``<out>/_generated/parameters.md`` (atomically); return their paths."""
    out = Path(out)
    chapter_list = chapters(notebooks)
    results = atomic_write_text(out / "results.md", results_page(figures, chapter_list))
    params = out / "_generated" / "parameters.md"
    params.parent.mkdir(parents=True, exist_ok=True)
    header = "<!-- generated by `featmatch book-pages` from the notebooks' parameters cells: do not edit -->\n\n"
    return [results, atomic_write_text(params, header + parameters_page(chapter_list, notebooks))]


