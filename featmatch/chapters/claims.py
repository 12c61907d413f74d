"""The claims engine: one :class:`Claim` type, one verdict vocabulary, one boundary rule.

Every chapter of the book ends with a claims table: each claim of the papers that the
chapter tests, where it comes from, our number, and a verdict. The verdicts are computed by
the rules below; none is written by hand.

**Vocabulary** (:data:`VERDICTS`): ``held``, ``failed``, ``mixed``, ``not tested``.

**One boundary rule** for every number-based verdict (:func:`verdict_threshold`): with
thresholds ``held_at`` and ``failed_at`` and the good direction given by their order,

* ``held``   if the value reaches ``held_at`` (``>=`` when larger is better, ``<=`` otherwise),
* ``failed`` if it reaches ``failed_at`` (``<=`` when larger is better, ``>=`` otherwise),
* ``mixed``  strictly in between,
* ``not tested`` for NaN or a missing value.

Both boundaries are inclusive, on the side they name. A fraction of successful cases
(:func:`verdict_fraction`) and "every case / no case" (:func:`verdict_all`, ``held_at=1``,
``failed_at=0``) are this same rule applied to the fraction. Win/loss/tie comparisons across
several scores use :func:`verdict_outcomes`.

Each chapter writes its table with :func:`write_claims` to ``<OUT_DIR>/<chapter>_claims.csv``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from featmatch._io import atomic_write_text

__all__ = [
    "VERDICTS",
    "Claim",
    "claims_table",
    "write_claims",
    "verdict_threshold",
    "verdict_fraction",
    "verdict_all",
    "verdict_outcomes",
    "claim_threshold",
    "claim_fraction",
]

#: The verdict vocabulary of every claims table.
VERDICTS = ("held", "failed", "mixed", "not tested")

#: The outcomes of one score compared between two methods (:func:`verdict_outcomes`).
OUTCOMES = ("win", "loss", "tie", "n/a")


@dataclass(frozen=True)
class Claim:
    """One row of a chapter's claims table.

    Attributes
    ----------
    claim : str
        The claim, in the paper's words where possible.
    source : str
        Paper and section (or "featmatch" for claims of this book).
    ours : str
        Our number and the rule that turned it into the verdict.
    verdict : str
        One of :data:`VERDICTS`.
    """

    claim: str
    source: str
    ours: str
    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {list(VERDICTS)}, got {self.verdict!r}")


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """The claims table every chapter ends with: Claim, Source, Our number, Verdict."""
    for c in claims:
        if not isinstance(c, Claim):
            raise TypeError(f"claims_table takes Claim objects, got {type(c).__name__}")
    return pd.DataFrame(
        [(c.claim, c.source, c.ours, c.verdict) for c in claims],
        columns=["Claim", "Source", "Our number", "Verdict"],
    )


def write_claims(claims: Sequence[Claim] | pd.DataFrame, out_dir: str | os.PathLike | None, chapter: str) -> Path | None:
    """Write a chapter's claims table to ``out_dir/<chapter>_claims.csv`` (atomically).

    Returns the path, or ``None`` when ``out_dir`` is not given.
    """
    if not out_dir:
        return None
    table = claims if isinstance(claims, pd.DataFrame) else claims_table(claims)
    path = Path(out_dir) / f"{chapter}_claims.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, table.to_csv(index=False))


def _is_missing(value: float | None) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def verdict_threshold(value: float | None, held_at: float, failed_at: float) -> str:
    """The verdict of one number (the boundary rule of the module docstring).

    If ``held_at > failed_at`` large values support the claim: ``held`` if
    ``value >= held_at``, ``failed`` if ``value <= failed_at``. If ``held_at < failed_at``
    small values support it: ``held`` if ``value <= held_at``, ``failed`` if
    ``value >= failed_at``. ``mixed`` in between; ``not tested`` for NaN or ``None``.

    Examples
    --------
    >>> verdict_threshold(0.8, held_at=0.75, failed_at=0.25)
    'held'
    >>> verdict_threshold(0.25, held_at=0.75, failed_at=0.25)
    'failed'
    >>> verdict_threshold(0.3, held_at=0.1, failed_at=0.5)
    'mixed'
    """
    if held_at == failed_at:
        raise ValueError("held_at and failed_at must differ")
    if _is_missing(value):
        return "not tested"
    v = float(value)  # type: ignore[arg-type]
    if held_at > failed_at:
        return "held" if v >= held_at else "failed" if v <= failed_at else "mixed"
    return "held" if v <= held_at else "failed" if v >= failed_at else "mixed"


def verdict_fraction(
    successes: Iterable[bool | float], held_at: float = 0.75, failed_at: float = 0.25
) -> tuple[str, float, int]:
    """The verdict of the fraction of cases (layers, pairs, ...) in which a claim holds.

    A case is a success when its entry is true (or a number > 0.5); NaN entries are not
    cases. The fraction goes through :func:`verdict_threshold`.

    Returns
    -------
    (str, float, int)
        Verdict, fraction (NaN without cases), number of cases.
    """
    if not 0 <= failed_at < held_at <= 1:
        raise ValueError("need 0 <= failed_at < held_at <= 1")
    vals = [float(x) for x in successes]
    vals = [x for x in vals if not math.isnan(x)]
    if not vals:
        return "not tested", math.nan, 0
    frac = float(np.mean(np.asarray(vals) > 0.5))
    return verdict_threshold(frac, held_at, failed_at), frac, len(vals)


def verdict_all(successes: Iterable[bool]) -> str:
    """``held`` if every case succeeds, ``failed`` if none does, ``mixed`` otherwise.

    :func:`verdict_fraction` with ``held_at=1`` and ``failed_at=0``; no case gives
    ``not tested``.
    """
    return verdict_fraction([bool(x) for x in successes], held_at=1.0, failed_at=0.0)[0]


def verdict_outcomes(outcomes: pd.DataFrame | Sequence[str]) -> str:
    """The verdict of "ours beats the baseline" from per-score outcomes.

    ``held``: at least one win and no loss; ``failed``: no win (losses or ties only);
    ``mixed``: wins and losses; ``not tested``: no comparable score (all ``n/a``).
    """
    out = list(outcomes["outcome"]) if isinstance(outcomes, pd.DataFrame) else list(outcomes)
    bad = set(out) - set(OUTCOMES)
    if bad:
        raise ValueError(f"unknown outcomes {sorted(bad)}")
    wins, losses = out.count("win"), out.count("loss")
    if wins + losses + out.count("tie") == 0:
        return "not tested"
    if wins and not losses:
        return "held"
    if not wins:
        return "failed"
    return "mixed"


def claim_fraction(
    claim: str,
    source: str,
    successes: Iterable[bool | float],
    what: str,
    *,
    held_at: float = 0.75,
    failed_at: float = 0.25,
) -> Claim:
    """A :class:`Claim` whose verdict is :func:`verdict_fraction` of ``successes``.

    ``what`` describes a success (e.g. "pairs where folded > unfolded").
    """
    verdict, frac, n = verdict_fraction(successes, held_at, failed_at)
    ours = f"{what}: {frac:.0%} of {n}" if n else f"{what}: no cases"
    ours += f" (held if >= {held_at:.0%}, failed if <= {failed_at:.0%})"
    return Claim(claim, source, ours, verdict)


def claim_threshold(
    claim: str, source: str, value: float, what: str, *, held_at: float, failed_at: float, fmt: str = ".3g"
) -> Claim:
    """A :class:`Claim` whose verdict is :func:`verdict_threshold` of ``value``."""
    verdict = verdict_threshold(value, held_at, failed_at)
    rel = (">=", "<=") if held_at > failed_at else ("<=", ">=")
    ours = f"{what} = {value:{fmt}} (held if {rel[0]} {held_at:{fmt}}, failed if {rel[1]} {failed_at:{fmt}})"
    return Claim(claim, source, ours, verdict)
