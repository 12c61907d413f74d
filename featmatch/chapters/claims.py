r"""The claims engine: every paper claim the book tests, with an effect size, a confidence
interval, a chance level, its preconditions and a verdict.

Every chapter ends with a claims table. A row (:class:`Claim`) holds

* the claim and what the paper says (``paper_value``), with its source (paper and section);
* ``our_value``: our statistic, and ``chance``: the same statistic under a null (random
  permutations, a shuffled order, or the paper's control);
* ``effect``: the effect size, **oriented so that positive supports the claim**, with a
  bootstrap 95 % confidence interval ``[ci_low, ci_high]`` over ``n`` units of ``unit``
  (features, layer pairs, tokens, prompts);
* ``tolerance`` (in ``rule``): the smallest effect that would count as the claim holding;
* ``precondition``: what must be true for the claim to be testable here, and whether it is.

**The one decision rule** (:func:`decide`), applied in this order:

1. ``not testable`` if a precondition fails, the effect or its interval is missing, or the
   comparison is a *tie by construction* (the two sides cannot differ, e.g. folded and
   unfolded on a ReLU SAE without thresholds);
2. ``held`` if the interval excludes zero (``ci_low > 0``) and ``effect >= tolerance``;
3. ``failed`` if the whole interval is below the tolerance (``ci_high < tolerance``): the
   data exclude an effect of the size the claim needs;
4. ``not testable`` if the interval's half-width exceeds the tolerance: the sample is too
   small to decide (the stated power is not reached);
5. ``mixed`` otherwise: the interval is narrow enough but straddles the tolerance.

A null effect therefore reads ``failed`` when the sample is large enough to exclude the
tolerance, and ``not testable`` when it is not. Confidence intervals come from
:func:`bootstrap_ci` (SciPy's :func:`scipy.stats.bootstrap`, percentile method, resampling
the stated units). Chance levels come from :func:`null_distribution`.

Each chapter writes its rows with :func:`write_claims` to ``<OUT_DIR>/<chapter>_claims.csv``
with the columns :data:`CSV_COLUMNS`; the book's results page reads those files.

References
----------
Efron, B. & Tibshirani, R. (1993). *An Introduction to the Bootstrap*, ch. 13 (percentile
intervals).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from featmatch._io import atomic_write_text

__all__ = [
    "VERDICTS",
    "CSV_COLUMNS",
    "Claim",
    "bootstrap_ci",
    "null_distribution",
    "chance_mean",
    "decide",
    "rule_text",
    "bootstrap_diff",
    "bootstrap_corr",
    "decide_equivalence",
    "make_claim",
    "claim_from_samples",
    "claim_equivalent",
    "claims_table",
    "write_claims",
    "read_claims",
    "summary_markdown",
]

#: The verdict vocabulary of every claims table.
VERDICTS = ("held", "failed", "mixed", "not testable")

#: The columns of ``<chapter>_claims.csv``, in order (a stable schema: the results page reads it).
CSV_COLUMNS = (
    "chapter",
    "claim",
    "paper_value",
    "our_value",
    "effect",
    "ci_low",
    "ci_high",
    "chance",
    "n",
    "unit",
    "verdict",
    "rule",
    "precondition",
    "source",
    "section",
)


@dataclass(frozen=True)
class Claim:
    """One row of a chapter's claims table (see the module docstring for the fields).

    Build rows with :func:`make_claim` or :func:`claim_from_samples`, which apply
    :func:`decide`; constructing a ``Claim`` directly only checks the vocabulary.
    """

    chapter: str
    claim: str
    source: str
    paper_value: str
    our_value: float
    effect: float
    ci_low: float
    ci_high: float
    chance: float
    n: int
    unit: str
    verdict: str
    rule: str
    precondition: str = ""
    section: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {list(VERDICTS)}, got {self.verdict!r}")

    def as_row(self) -> dict[str, Any]:
        """The row as a dict with the keys :data:`CSV_COLUMNS`."""
        d = asdict(self)
        return {k: d[k] for k in CSV_COLUMNS}


def _nan(x: float | None) -> bool:
    if x is None:
        return True
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def bootstrap_ci(
    samples: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = np.mean,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    paired: Sequence[float] | np.ndarray | None = None,
) -> tuple[float, float, float]:
    """A statistic of per-unit values with its bootstrap confidence interval.

    Resamples the units (rows of ``samples``) with replacement, via
    :func:`scipy.stats.bootstrap` (percentile method, which stays defined for small and
    skewed samples where BCa does not). NaN units are dropped.

    Parameters
    ----------
    samples : array of shape (n,)
        One value per unit (feature, layer pair, prompt, ...).
    statistic : callable
        Reduces a 1-D array (``axis`` keyword supported) to a number; default the mean.
    level : float
        Confidence level.
    n_resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling.
    paired : array of shape (n,), optional
        A second value per unit; the statistic is then ``statistic(samples) -
        statistic(paired)`` with units resampled jointly (paired bootstrap).

    Returns
    -------
    (estimate, ci_low, ci_high)
        NaNs when fewer than two units remain; a zero-width interval when all units agree.

    Examples
    --------
    >>> est, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    >>> est, lo < est < hi
    (3.0, True)
    """
    x = np.asarray(samples, dtype=float).ravel()
    if paired is not None:
        y = np.asarray(paired, dtype=float).ravel()
        if y.shape != x.shape:
            raise ValueError(f"paired has {y.size} units, samples {x.size}")
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]

        def stat(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.asarray(statistic(a, axis=axis)) - np.asarray(statistic(b, axis=axis))

        data: tuple[np.ndarray, ...] = (x, y)
        est = float(stat(x, y))
    else:
        x = x[~np.isnan(x)]

        def stat(a: np.ndarray, axis: int = -1) -> np.ndarray:  # type: ignore[misc]
            return np.asarray(statistic(a, axis=axis))

        data = (x,)
        est = float(stat(x)) if x.size else math.nan
    if x.size < 2:
        return est, math.nan, math.nan
    if all(np.ptp(d) == 0 for d in data):
        return est, est, est
    with warnings.catch_warnings():
        # a degenerate resample gives a NaN interval, which decide() reads as not testable
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            data,
            stat,
            paired=paired is not None,
            vectorized=True,
            confidence_level=level,
            n_resamples=n_resamples,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
    return est, float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = np.mean,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic(a) - statistic(b)`` for two independent groups of units, with its CI.

    Each group is resampled on its own (:func:`scipy.stats.bootstrap` with two samples,
    ``paired=False``), e.g. early against later layers. NaNs are dropped.
    """
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    if not x.size or not y.size:
        return math.nan, math.nan, math.nan
    est = float(statistic(x) - statistic(y))
    if x.size < 2 or y.size < 2:
        return est, math.nan, math.nan
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return est, est, est

    def stat(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(statistic(u, axis=axis)) - np.asarray(statistic(v, axis=axis))

    with warnings.catch_warnings():
        # a degenerate resample gives a NaN interval, which decide() reads as not testable
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            (x, y), stat, vectorized=True, confidence_level=level, n_resamples=n_resamples,
            method="percentile", random_state=np.random.default_rng(seed),
        )
    return est, float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_corr(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    method: str = "pearson",
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A Pearson or Spearman correlation over units with a paired bootstrap CI.

    Units with a NaN on either side are dropped; fewer than four units, or a constant
    side, give NaNs.
    """
    u = np.asarray(x, dtype=float).ravel()
    v = np.asarray(y, dtype=float).ravel()
    keep = ~(np.isnan(u) | np.isnan(v))
    u, v = u[keep], v[keep]
    if u.size < 4 or np.ptp(u) == 0 or np.ptp(v) == 0:
        return math.nan, math.nan, math.nan
    if method == "spearman":
        u, v = stats.rankdata(u), stats.rankdata(v)
    elif method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")

    def r(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        a = a - a.mean(axis=axis, keepdims=True)
        b = b - b.mean(axis=axis, keepdims=True)
        den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(axis=axis) / den

    est = float(r(u, v))
    with warnings.catch_warnings():
        # a degenerate resample gives a NaN interval, which decide() reads as not testable
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            (u, v), r, paired=True, vectorized=True, confidence_level=level, n_resamples=n_resamples,
            method="percentile", random_state=np.random.default_rng(seed),
        )
    lo, hi = res.confidence_interval.low, res.confidence_interval.high
    return est, float(lo), float(hi)


def null_distribution(
    statistic_under_null: Callable[[np.random.Generator], float], n: int = 200, seed: int = 0
) -> np.ndarray:
    """Draw a statistic ``n`` times under a null (random permutation, shuffled order, ...).

    ``statistic_under_null(rng)`` computes the statistic once on data randomised with
    ``rng``. The chance level of a claim is the mean of the returned draws.

    Examples
    --------
    >>> x = np.arange(10.0)
    >>> draws = null_distribution(lambda rng: float(np.corrcoef(x, rng.permutation(x))[0, 1]), n=50)
    >>> bool(abs(draws.mean()) < 0.3)
    True
    """
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        # a shuffle of a near-constant input may have no defined statistic: that draw is NaN
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray([float(statistic_under_null(rng)) for _ in range(int(n))])


def chance_mean(draws: Sequence[float] | np.ndarray) -> float:
    """The chance level from :func:`null_distribution` draws: their mean, NaN draws left out
    (NaN, without a warning, when every draw is NaN)."""
    x = np.asarray(draws, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def decide(
    effect: float,
    ci_low: float,
    ci_high: float,
    *,
    tolerance: float,
    preconditions: Mapping[str, bool] | None = None,
    tie: bool = False,
) -> tuple[str, str]:
    """The verdict of one claim by the rule of the module docstring.

    Parameters
    ----------
    effect, ci_low, ci_high : float
        The effect size, oriented so that positive supports the claim, and its interval.
    tolerance : float
        The smallest effect that counts as the claim holding (> 0).
    preconditions : mapping of str to bool, optional
        Named conditions that must hold for the claim to be testable here.
    tie : bool
        The two sides of the comparison cannot differ by construction.

    Returns
    -------
    (verdict, reason)

    Examples
    --------
    >>> decide(0.3, 0.2, 0.4, tolerance=0.1)[0]
    'held'
    >>> decide(0.01, -0.02, 0.04, tolerance=0.1)[0]
    'failed'
    >>> decide(0.01, -0.5, 0.5, tolerance=0.1)[0]
    'not testable'
    >>> decide(0.3, 0.2, 0.4, tolerance=0.1, preconditions={"SAE EV >= 0.6": False})
    ('not testable', 'precondition not met: SAE EV >= 0.6')
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    failed_pre = [name for name, ok in (preconditions or {}).items() if not ok]
    if failed_pre:
        return "not testable", "precondition not met: " + "; ".join(failed_pre)
    if tie:
        return "not testable", "tie by construction: the compared sides cannot differ"
    if _nan(effect) or _nan(ci_low) or _nan(ci_high):
        return "not testable", "no estimate (too few units)"
    if ci_low > 0 and effect >= tolerance:
        return "held", f"CI excludes 0 and effect >= {tolerance:.3g}"
    if ci_high < tolerance:
        return "failed", f"whole CI below the tolerance {tolerance:.3g}"
    if (ci_high - ci_low) / 2 > tolerance:
        return "not testable", f"CI half-width {(ci_high - ci_low) / 2:.3g} > tolerance {tolerance:.3g} (underpowered)"
    return "mixed", f"CI straddles the tolerance {tolerance:.3g}"


def decide_equivalence(
    estimate: float,
    ci_low: float,
    ci_high: float,
    *,
    margin: float,
    preconditions: Mapping[str, bool] | None = None,
) -> tuple[str, str]:
    """The verdict of an "on par" claim: the difference lies within ``±margin``.

    ``held`` if the whole CI lies inside ``(-margin, margin)`` (the two one-sided tests of an
    equivalence test); ``failed`` if it lies wholly outside (beyond ``+margin`` or below
    ``-margin``); ``not testable`` for a failed precondition, a missing estimate, or a CI
    half-width above ``margin``; ``mixed`` otherwise.

    Examples
    --------
    >>> decide_equivalence(0.0, -0.01, 0.01, margin=0.02)[0]
    'held'
    >>> decide_equivalence(0.1, 0.08, 0.12, margin=0.02)[0]
    'failed'
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    failed_pre = [name for name, ok in (preconditions or {}).items() if not ok]
    if failed_pre:
        return "not testable", "precondition not met: " + "; ".join(failed_pre)
    if _nan(estimate) or _nan(ci_low) or _nan(ci_high):
        return "not testable", "no estimate (too few units)"
    if -margin < ci_low and ci_high < margin:
        return "held", f"CI inside ±{margin:.3g}"
    if ci_low > margin or ci_high < -margin:
        return "failed", f"CI outside ±{margin:.3g}"
    if (ci_high - ci_low) / 2 > margin:
        return "not testable", f"CI half-width {(ci_high - ci_low) / 2:.3g} > margin {margin:.3g} (underpowered)"
    return "mixed", f"CI overlaps the margin ±{margin:.3g}"


def rule_text(tolerance: float, effect: str = "effect") -> str:
    """The short rule shown beside each verdict."""
    t = f"{tolerance:.3g}"
    return (
        f"held if CI of {effect} > 0 and {effect} ≥ {t}; failed if CI < {t}; "
        f"not testable if CI half-width > {t} or a precondition fails"
    )


def make_claim(
    *,
    chapter: str,
    claim: str,
    source: str,
    paper_value: str,
    our_value: float,
    effect: float,
    ci: tuple[float, float],
    chance: float,
    n: int,
    unit: str,
    tolerance: float,
    effect_name: str = "effect",
    preconditions: Mapping[str, bool] | None = None,
    tie: bool = False,
    section: str = "",
) -> Claim:
    """A :class:`Claim` whose verdict is :func:`decide` of the given effect and interval.

    The ``precondition`` column lists every precondition with ✓ or ✗, and the reason of a
    ``not testable`` verdict.
    """
    verdict, reason = decide(effect, ci[0], ci[1], tolerance=tolerance, preconditions=preconditions, tie=tie)
    pre = "; ".join(f"{k} {'✓' if ok else '✗'}" for k, ok in (preconditions or {}).items())
    if verdict == "not testable":
        pre = f"{pre}; {reason}" if pre else reason
    return Claim(
        chapter=str(chapter),
        claim=claim,
        source=source,
        paper_value=paper_value,
        our_value=float(our_value),
        effect=float(effect),
        ci_low=float(ci[0]),
        ci_high=float(ci[1]),
        chance=float(chance),
        n=int(n),
        unit=unit,
        verdict=verdict,
        rule=rule_text(tolerance, effect_name),
        precondition=pre,
        section=section,
    )


def claim_from_samples(
    samples: Sequence[float] | np.ndarray,
    *,
    chance: float = 0.0,
    larger_is_better: bool = True,
    paired: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Claim:
    """A claim on the mean of per-unit values against a chance level.

    ``our_value`` is the mean of ``samples`` (minus the mean of ``paired``, when given),
    and the effect is ``our_value - chance``, negated when smaller values support the
    claim; its CI is the bootstrap CI of the mean, shifted the same way. The remaining
    keywords go to :func:`make_claim` (``n`` defaults to the number of non-NaN units).
    """
    est, lo, hi = bootstrap_ci(samples, paired=paired, seed=seed)
    sign = 1.0 if larger_is_better else -1.0
    eff = sign * (est - chance)
    ci = sorted((sign * (lo - chance), sign * (hi - chance)))
    x = np.asarray(samples, dtype=float)
    kwargs.setdefault("n", int(np.sum(~np.isnan(x))))
    return make_claim(our_value=est, effect=eff, ci=(ci[0], ci[1]), chance=chance, **kwargs)


def claim_equivalent(
    samples: Sequence[float] | np.ndarray,
    *,
    margin: float,
    chapter: str,
    claim: str,
    source: str,
    paper_value: str,
    unit: str,
    chance: float = math.nan,
    preconditions: Mapping[str, bool] | None = None,
    section: str = "",
    seed: int = 0,
) -> Claim:
    """An "on par" claim: the mean of per-unit differences lies within ``±margin``.

    ``our_value`` and ``effect`` are the mean difference (a signed effect: zero supports the
    claim), the CI its bootstrap CI, and the verdict :func:`decide_equivalence`.
    """
    est, lo, hi = bootstrap_ci(samples, seed=seed)
    verdict, reason = decide_equivalence(est, lo, hi, margin=margin, preconditions=preconditions)
    pre = "; ".join(f"{k} {'✓' if ok else '✗'}" for k, ok in (preconditions or {}).items())
    if verdict == "not testable":
        pre = f"{pre}; {reason}" if pre else reason
    x = np.asarray(samples, dtype=float)
    return Claim(
        chapter=str(chapter), claim=claim, source=source, paper_value=paper_value, our_value=est, effect=est,
        ci_low=lo, ci_high=hi, chance=float(chance), n=int(np.sum(~np.isnan(x))), unit=unit, verdict=verdict,
        rule=f"held if CI inside ±{margin:.3g}; failed if CI outside it; not testable if CI half-width > {margin:.3g}",
        precondition=pre, section=section,
    )


def claims_table(claims: Iterable[Claim]) -> pd.DataFrame:
    """The claims as a DataFrame with the columns :data:`CSV_COLUMNS`."""
    rows = []
    for c in claims:
        if not isinstance(c, Claim):
            raise TypeError(f"claims_table takes Claim objects, got {type(c).__name__}")
        rows.append(c.as_row())
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def write_claims(
    claims: Sequence[Claim] | pd.DataFrame, out_dir: str | os.PathLike | None, chapter: str
) -> Path | None:
    """Write a chapter's claims table to ``out_dir/<chapter>_claims.csv`` (atomically).

    Returns the path, or ``None`` when ``out_dir`` is not given.
    """
    if not out_dir:
        return None
    table = claims if isinstance(claims, pd.DataFrame) else claims_table(claims)
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"claims table lacks columns {missing}")
    path = Path(out_dir) / f"{chapter}_claims.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, table[list(CSV_COLUMNS)].to_csv(index=False))


def read_claims(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``<chapter>_claims.csv``; a file without the schema's columns is an error naming it."""
    table = pd.read_csv(path)
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a featmatch claims table (missing columns {missing})")
    bad = set(table["verdict"]) - set(VERDICTS)
    if bad:
        raise ValueError(f"{path}: unknown verdicts {sorted(bad)}")
    return table[list(CSV_COLUMNS)]



def _fmt(x: float) -> str:
    return "n/a" if _nan(x) else f"{x:.3g}"


def summary_markdown(claims: Sequence[Claim] | pd.DataFrame) -> str:
    """A chapter's "What this shows, and what it cannot show" list, written from its claims.

    One bullet per claim, grouped by verdict: the effect with its CI and chance level, and
    for ``not testable`` rows the precondition that failed. Markdown text, for
    ``IPython.display.Markdown``.
    """
    table = claims if isinstance(claims, pd.DataFrame) else claims_table(claims)
    heads = {
        "held": "**What this shows (held).**",
        "failed": "**What the data contradict (failed).**",
        "mixed": "**Where the data are mixed.**",
        "not testable": "**What this chapter cannot show on this zoo (not testable).**",
    }
    out = []
    for verdict in VERDICTS:
        rows = table[table["verdict"] == verdict]
        if rows.empty:
            continue
        out.append(heads[verdict])
        for _, r in rows.iterrows():
            line = (f"- {r['claim']}: effect {_fmt(r['effect'])} [95% CI {_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] "
                    f"over {int(r['n']) if not _nan(r['n']) else 0} {r['unit']}; our value {_fmt(r['our_value'])}, chance {_fmt(r['chance'])}.")
            if verdict == "not testable" and isinstance(r["precondition"], str) and r["precondition"]:
                line += f" Why: {r['precondition']}."
            out.append(line)
        out.append("")
    counts = ", ".join(f"{int((table['verdict'] == v).sum())} {v}" for v in VERDICTS)
    out.append(f"*{len(table)} claims: {counts}.*")
    return "\n".join(out)
