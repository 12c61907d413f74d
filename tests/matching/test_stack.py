"""Tests for featmatch.matching.match_stack, and the option checks it shares with match."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _builders import jumprelu_sae

from featmatch.matching import match, match_stack
from featmatch.matching._costs import feature_vectors, rounding_bound
from featmatch.matching._matching import check_match_options


@pytest.mark.parametrize("solver", ["sparse", "dense"])
def test_match_stack_equals_pairwise(solver):
    saes = [
        jumprelu_sae(d_in=16, d_sae=40, seed=s, hook_name=f"blocks.{s}.hook_resid_post") for s in range(4)
    ]
    stack = match_stack(saes, solver=solver, progress=False, on="decoder", metric="cosine")
    assert len(stack) == 3
    for t, m in enumerate(stack):
        ref = match(saes[t], saes[t + 1], solver="dense", on="decoder", metric="cosine")
        assert np.array_equal(m.perm, ref.perm)
        if solver == "dense":
            np.testing.assert_array_equal(m.cost, ref.cost)
        else:
            # the sparse solver's products may round differently from the dense path's
            x_a, x_b = (feature_vectors(s, on="decoder") for s in saes[t : t + 2])
            delta = rounding_bound(x_a, x_b, "cosine")[np.arange(40), m.perm]
            assert (np.abs(m.cost - ref.cost) <= delta).all()
        assert m.meta["hook_a"] == f"blocks.{t}.hook_resid_post"
        meta = {k: v for k, v in m.meta.items() if k not in ("seconds", "solver_info")}
        assert meta == {k: v for k, v in ref.meta.items() if k not in ("seconds", "solver")} | {
            "solver": solver
        }
    if solver == "sparse":
        assert all(m.meta["solver_info"]["certified"] for m in stack)


def test_match_stack_rectangular_generator_and_errors():
    sizes = [30, 40, 25]
    gen = (jumprelu_sae(d_in=8, d_sae=f, seed=i) for i, f in enumerate(sizes))
    stack = match_stack(gen, solver="sparse", progress=False)
    assert [(m.n_a, m.n_b) for m in stack] == [(30, 40), (40, 25)]
    assert stack[1].n_matched == 25
    with pytest.raises(ValueError, match="at least two"):
        match_stack([jumprelu_sae(d_in=8, d_sae=10)], progress=False)
    with pytest.raises(TypeError, match="unexpected"):
        match_stack([jumprelu_sae(), jumprelu_sae()], progress=False, bogus=1)


BAD_OPTIONS = [
    ({"on": "bias"}, "on must be one of 'encoder', 'decoder', 'both'; got 'bias'"),
    ({"metric": "l1"}, "metric must be one of 'mse', 'cosine'; got 'l1'"),
    ({"solver": "greedy"}, "solver must be one of 'auto', 'dense', 'sparse'; got 'greedy'"),
    (
        {"unmatched_above": 1.0, "unmatched_quantile": 0.5},
        "give at most one of unmatched_above and unmatched_quantile",
    ),
    ({"unmatched_quantile": 1.5}, "unmatched_quantile must lie in [0, 1], got 1.5"),
    ({"unmatched_quantile": float("nan")}, "unmatched_quantile must lie in [0, 1], got nan"),
    ({"unmatched_above": float("nan")}, "unmatched_above must be finite, got nan"),
    ({"unmatched_above": float("inf")}, "unmatched_above must be finite, got inf"),
    ({"k": 0}, "k must be >= 1, got 0"),
    ({"block_size": 0}, "block_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("solver", ["sparse", "dense"])
@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[m.split(" ")[0] for _, m in BAD_OPTIONS])
def test_match_and_match_stack_reject_bad_options_alike(options, message, solver):
    """Every bad option is rejected by match and by match_stack, on either solver, before any
    work and with the same message: both call check_match_options. (Before, match_stack's
    sparse path returned a matching labelled metric="l1", raised a bare IndexError for k=0
    and accepted unmatched_above=nan.)"""
    a, b = jumprelu_sae(d_in=8, d_sae=12, seed=0), jumprelu_sae(d_in=8, d_sae=12, seed=1)
    opts = {"solver": solver, **options}
    errors = []
    for call in (lambda: match(a, b, **opts), lambda: match_stack([a, b], progress=False, **opts)):
        with pytest.raises(ValueError) as exc:
            call()
        errors.append(str(exc.value))
    assert errors == [message, message]
    with pytest.raises(ValueError) as exc:
        check_match_options(**opts)
    assert str(exc.value) == message


def test_match_stack_checks_options_before_reading_the_stack():
    read = []

    def stack():
        read.append(1)
        yield jumprelu_sae(d_in=8, d_sae=12, seed=0)

    with pytest.raises(ValueError, match="max_rounds must be >= 1, got 0"):
        match_stack(stack(), progress=False, max_rounds=0)
    assert read == []


def test_match_stack_sparse_path_keeps_metric_and_thresholds():
    saes = [jumprelu_sae(d_in=8, d_sae=30, seed=s) for s in range(3)]
    for m in match_stack(saes, solver="sparse", metric="cosine", unmatched_above=0.5, progress=False):
        assert m.meta["metric"] == "cosine" and m.meta["unmatched_above"] == 0.5
        assert np.nanmax(m.cost) <= 0.5 and m.meta["unmatched_threshold"] == 0.5
        assert torch.isfinite(torch.from_numpy(m.cost[m.matched])).all()


@pytest.mark.parametrize("solver", ["sparse", "dense"])
def test_match_stack_solves_the_thresholded_problem_like_match(solver):
    saes = [jumprelu_sae(d_in=16, d_sae=40, seed=s, hook_name=f"blocks.{s}.hook_resid_post") for s in range(3)]
    full = match(saes[0], saes[1], solver="dense")
    lam = float(np.quantile(full.cost, 0.6))
    stack = match_stack(saes, solver=solver, unmatched_above=lam, progress=False)
    for t, m in enumerate(stack):
        ref = match(saes[t], saes[t + 1], solver=solver, unmatched_above=lam)
        assert np.array_equal(m.perm, ref.perm)
        assert m.meta.get("unmatched_mode") == "solve"
    masked = match_stack(saes, solver=solver, unmatched_above=lam, unmatched_mode="mask", progress=False)
    ref = match(saes[0], saes[1], solver=solver, unmatched_above=lam, unmatched_mode="mask")
    assert np.array_equal(masked[0].perm, ref.perm)
