"""SAE Match: costs, dense and certified sparse assignment, matchings, composition, paths.

Data-free matching of SAE features between layers (Balagansky et al. 2025): fold,
compute the parameter cost, solve the linear assignment exactly, compose into paths.

Modules, bottom up (each imports only the ones above it):

* :mod:`~featmatch.matching._costs`: feature vectors, the pairwise cost, the dense
  assignment, the option values;
* :mod:`~featmatch.matching._lap`: the certified sparse solver on ``(F, D)`` arrays;
* :mod:`~featmatch.matching._matching`: :class:`Matching` and its file format,
  :func:`match`, :func:`compose`, :func:`paths`;
* :mod:`~featmatch.matching._stack`: :func:`match_stack`;
* :mod:`~featmatch.matching.baselines`: the top-1 decoder cosine of Feature Flow.
"""

from featmatch.matching._costs import assign, cost_matrix, feature_vectors, pairwise_cost
from featmatch.matching._lap import SparseMatchInfo, auto_solver, default_block_size, sparse_match
from featmatch.matching._matching import Matching, MatchingFileError, compose, end_hooks, match, paths
from featmatch.matching._stack import match_stack

__all__ = [
    "Matching",
    "MatchingFileError",
    "feature_vectors",
    "pairwise_cost",
    "cost_matrix",
    "assign",
    "sparse_match",
    "auto_solver",
    "SparseMatchInfo",
    "default_block_size",
    "match",
    "match_stack",
    "compose",
    "end_hooks",
    "paths",
]
