"""featmatch.chapters.claims: the decision rule on synthetic data with known truth."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from featmatch.chapters.claims import (
    CSV_COLUMNS,
    VERDICTS,
    Claim,
    bootstrap_ci,
    claim_from_samples,
    claims_table,
    decide,
    make_claim,
    null_distribution,
    read_claims,
    write_claims,
)

KW = dict(chapter="99", claim="c", source="s", paper_value="p", unit="units")


def test_true_effect_reads_held():
    rng = np.random.default_rng(1)
    c = claim_from_samples(rng.normal(0.5, 1.0, 400), tolerance=0.1, **KW)
    assert c.verdict == "held"
    assert c.ci_low > 0 and c.effect >= 0.1


def test_null_effect_reads_failed_when_powered_and_not_testable_when_not():
    rng = np.random.default_rng(2)
    # powered: sd 1, n = 2000 -> CI half-width ~0.044 < tolerance 0.1
    big = claim_from_samples(rng.normal(0.0, 1.0, 2000), tolerance=0.1, **KW)
    assert big.verdict == "failed"
    # underpowered: mean 0, sd 1, n = 10 -> half-width ~0.6 > 0.1
    small = claim_from_samples(np.tile([-1.0, 1.0], 5), tolerance=0.1, **KW)
    assert small.verdict == "not testable"
    assert "underpowered" in small.precondition


def test_effect_against_chance_and_direction():
    rng = np.random.default_rng(3)
    # smaller is better: values around 0.2 against a chance level of 0.5 support the claim
    c = claim_from_samples(rng.normal(0.2, 0.1, 300), chance=0.5, larger_is_better=False, tolerance=0.1, **KW)
    assert c.verdict == "held"
    assert c.effect == pytest.approx(0.5 - c.our_value)
    assert c.ci_low <= c.effect <= c.ci_high


def test_tie_reads_not_testable():
    c = claim_from_samples(np.zeros(50), tie=True, tolerance=0.1, **KW)
    assert c.verdict == "not testable" and "tie" in c.precondition
    # a tie undeclared but degenerate (all zero): the CI is [0, 0] -> failed, not held
    assert decide(0.0, 0.0, 0.0, tolerance=0.1)[0] == "failed"


def test_violated_precondition_reads_not_testable():
    rng = np.random.default_rng(4)
    c = claim_from_samples(
        rng.normal(1.0, 0.1, 100), tolerance=0.1, preconditions={"SAE EV >= 0.6": False, "n >= 10": True}, **KW
    )
    assert c.verdict == "not testable"
    assert "SAE EV >= 0.6 ✗" in c.precondition and "n >= 10 ✓" in c.precondition


def test_mixed_when_narrow_ci_straddles_tolerance():
    assert decide(0.08, 0.03, 0.13, tolerance=0.1)[0] == "mixed"


def test_nan_reads_not_testable_and_tolerance_must_be_positive():
    assert decide(math.nan, 0, 1, tolerance=0.1)[0] == "not testable"
    with pytest.raises(ValueError):
        decide(0.1, 0, 1, tolerance=0.0)


def test_bootstrap_ci_covers_true_mean_about_95_percent():
    rng = np.random.default_rng(5)
    hits = 0
    reps = 300
    for i in range(reps):
        x = rng.exponential(1.0, 60)  # skewed: the percentile interval's coverage is ~0.93-0.95
        _, lo, hi = bootstrap_ci(x, n_resamples=999, seed=i)
        hits += lo <= 1.0 <= hi
    cover = hits / reps
    # binomial sd at p=0.95, n=300 is 0.0126; percentile intervals undercover slightly for skewed data
    assert 0.89 <= cover <= 0.99, cover


def test_paired_bootstrap_matches_difference_of_means():
    rng = np.random.default_rng(6)
    a = rng.normal(1.0, 1.0, 200)
    b = a - 0.3 + rng.normal(0, 0.05, 200)
    est, lo, hi = bootstrap_ci(a, paired=b)
    assert est == pytest.approx(a.mean() - b.mean())
    assert lo < 0.3 < hi and hi - lo < 0.05


def test_null_distribution_permutation_chance():
    x = np.arange(30.0)
    draws = null_distribution(lambda rng: float(np.corrcoef(x, rng.permutation(x))[0, 1]), n=300, seed=0)
    assert abs(draws.mean()) < 0.05  # the chance correlation of a permutation is 0
    assert draws.std() == pytest.approx(1 / math.sqrt(29), rel=0.2)


def test_csv_round_trip_and_schema(tmp_path):
    c = make_claim(our_value=0.4, effect=0.3, ci=(0.2, 0.4), chance=0.1, n=12, tolerance=0.1, **KW)
    path = write_claims([c], tmp_path, "99")
    assert path.name == "99_claims.csv"
    table = read_claims(path)
    assert list(table.columns) == list(CSV_COLUMNS)
    assert table.loc[0, "verdict"] == "held" and table.loc[0, "n"] == 12
    assert list(claims_table([c]).columns) == list(CSV_COLUMNS)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_claims(tmp_path / "bad.csv")


def test_vocabulary():
    assert VERDICTS == ("held", "failed", "mixed", "not testable")
    with pytest.raises(ValueError):
        Claim(**KW, our_value=0, effect=0, ci_low=0, ci_high=0, chance=0, n=0, verdict="not tested", rule="")
    assert isinstance(claims_table([]), pd.DataFrame)


def test_equivalence_rule():
    from featmatch.chapters.claims import claim_equivalent, decide_equivalence

    rng = np.random.default_rng(7)
    assert claim_equivalent(rng.normal(0, 0.01, 100), margin=0.02, **KW).verdict == "held"
    assert claim_equivalent(rng.normal(0.1, 0.01, 100), margin=0.02, **KW).verdict == "failed"
    assert claim_equivalent(np.tile([-1.0, 1.0], 4), margin=0.02, **KW).verdict == "not testable"
    assert decide_equivalence(0.02, 0.01, 0.03, margin=0.02)[0] == "mixed"


def test_bootstrap_diff_and_corr_against_truth():
    from featmatch.chapters.claims import bootstrap_corr, bootstrap_diff

    rng = np.random.default_rng(8)
    est, lo, hi = bootstrap_diff(rng.normal(1.0, 0.2, 300), rng.normal(0.5, 0.2, 300))
    assert lo < 0.5 < hi and hi - lo < 0.1
    x = rng.normal(size=400)
    y = 0.6 * x + 0.8 * rng.normal(size=400)  # true Pearson r = 0.6
    r, lo, hi = bootstrap_corr(x, y)
    assert lo < 0.6 < hi and r == pytest.approx(np.corrcoef(x, y)[0, 1])
    rs, _, _ = bootstrap_corr(x, y, method="spearman")
    from scipy.stats import spearmanr

    assert rs == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(bootstrap_corr([1, 2, 3], [1, 2, 3])[0])  # too few units


def test_null_effect_rarely_reads_held():
    # the false-positive rate of "held" under a null effect stays near the 2.5% one-sided level
    rng = np.random.default_rng(9)
    held = sum(claim_from_samples(rng.normal(0, 1, 200), tolerance=0.05, seed=i, **KW).verdict == "held" for i in range(100))
    assert held <= 8
