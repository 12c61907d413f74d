"""Evaluation: matching score, correlation, parameter MSE, EV, ΔCE, and pruning splices.

* :mod:`featmatch.evaluation.metrics`: the paper's metrics (Balagansky et al. 2025, Sec. 4-5).
* :mod:`featmatch.evaluation.pruning`: encode-permute-decode and its baselines as hooks.
* :mod:`featmatch.evaluation.transfer`: what a matching carries over between layers
  (θ ratios, pairs with near-zero thresholds dropped, cost-ordered hybrids).
"""

import importlib

__all__ = ["metrics", "pruning", "transfer"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"featmatch.evaluation.{name}")
    raise AttributeError(f"module 'featmatch.evaluation' has no attribute {name!r}")
