"""Evaluation: matching score, correlation, parameter MSE, EV, ΔCE, and pruning splices.

* :mod:`featmatch.evaluation.metrics`: the paper's metrics (Balagansky et al. 2025, Sec. 4-5).
* :mod:`featmatch.evaluation.pruning`: encode-permute-decode and its baselines as hooks.
"""

import importlib

__all__ = ["metrics", "pruning"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"featmatch.evaluation.{name}")
    raise AttributeError(f"module 'featmatch.evaluation' has no attribute {name!r}")
