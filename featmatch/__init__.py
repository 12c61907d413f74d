"""featmatch: match sparse-autoencoder features across the layers of a language model.

The data-free core (SAE Match, Balagansky et al. 2025) is re-exported here:

>>> import featmatch                                         # doctest: +SKIP
>>> m = featmatch.match(featmatch.load_sae(a), featmatch.load_sae(b))   # doctest: +SKIP

Submodules are imported lazily, so ``import featmatch`` stays cheap (no torch import).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that wait passively instead of spinning: on a shared machine a spinning torch
# thread fights a descheduled peer (measured in benchmarks/bench_contention.py: 54 s passive
# against 311 s with the default policy while another process held one of two cores). It only
# takes effect when set before torch starts its thread pool, hence here; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("featmatch")
    except PackageNotFoundError:  # running from a source checkout without installation
        __version__ = "0.1.0"
except ImportError:  # pragma: no cover
    __version__ = "0.1.0"

__all__ = ["fold", "load_sae", "weights", "match", "match_stack", "compose", "paths", "Matching", "__version__"]

_LAZY = {
    "fold": "featmatch.saes",
    "load_sae": "featmatch.saes",
    "weights": "featmatch.saes",
    "match": "featmatch.matching",
    "compose": "featmatch.matching",
    "paths": "featmatch.matching",
    "Matching": "featmatch.matching",
    "match_stack": "featmatch.matching",
}

if TYPE_CHECKING:
    from featmatch.matching import Matching, compose, match, match_stack, paths
    from featmatch.saes import fold, load_sae, weights


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featmatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
