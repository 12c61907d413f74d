"""featmatch.chapters.claims: the verdict rules and the claims table (moved from the old test_analysis.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from featmatch.chapters.claims import (
    Claim,
    claim_fraction,
    claim_threshold,
    claims_table,
    verdict_fraction,
    verdict_threshold,
    write_claims,
)


def test_verdict_fraction_rule():
    assert verdict_fraction([1, 1, 1, 0])[0] == "held"  # 75%: the boundary is inclusive
    assert verdict_fraction([1, 0, 0, 0])[0] == "failed"  # 25%
    assert verdict_fraction([1, 1, 0, 0])[0] == "mixed"
    assert verdict_fraction([True, math.nan, math.nan]) == ("held", 1.0, 1)  # NaN is not a case
    assert verdict_fraction([])[0] == "not tested"
    with pytest.raises(ValueError):
        verdict_fraction([1], held_at=0.2, failed_at=0.5)


def test_verdict_threshold_rule_both_directions():
    assert verdict_threshold(0.8, held_at=0.7, failed_at=0.3) == "held"
    assert verdict_threshold(0.3, held_at=0.7, failed_at=0.3) == "failed"
    assert verdict_threshold(0.5, held_at=0.7, failed_at=0.3) == "mixed"
    assert verdict_threshold(0.05, held_at=0.1, failed_at=0.5) == "held"  # small values support the claim
    assert verdict_threshold(0.6, held_at=0.1, failed_at=0.5) == "failed"
    assert verdict_threshold(math.nan, held_at=0.1, failed_at=0.5) == "not tested"
    with pytest.raises(ValueError):
        verdict_threshold(1.0, 1.0, 1.0)


def test_claim_builders_state_the_number_and_the_rule():
    c = claim_fraction("x", "y", [1, 0, 1], "cases")
    assert c.verdict == "mixed" and c.ours == "cases: 67% of 3 (held if >= 75%, failed if <= 25%)"
    assert claim_fraction("x", "y", [], "cases").ours.startswith("cases: no cases")
    t = claim_threshold("x", "y", 0.5, "v", held_at=0.7, failed_at=0.3)
    assert t.verdict == "mixed" and t.ours == "v = 0.5 (held if >= 0.7, failed if <= 0.3)"
    with pytest.raises(ValueError, match="verdict must be one of"):
        Claim("x", "y", "z", "passed")


def test_claims_table_and_write_claims(tmp_path):
    claims = [Claim("a", "s", "n", "held"), Claim("b", "s", "m", "failed")]
    tbl = claims_table(claims)
    assert list(tbl.columns) == ["Claim", "Source", "Our number", "Verdict"]
    assert tbl["Verdict"].tolist() == ["held", "failed"]
    with pytest.raises(TypeError):
        claims_table([("a", "s", "n", "held")])
    path = write_claims(claims, tmp_path / "out", "folding")
    assert path == tmp_path / "out" / "folding_claims.csv"
    pd.testing.assert_frame_equal(pd.read_csv(path), tbl)
    assert write_claims(claims, None, "folding") is None
