"""SAE Match: costs, dense and certified sparse assignment, matchings, composition, paths.

Data-free matching of SAE features between layers (Balagansky et al. 2025): fold,
compute the parameter cost, solve the linear assignment exactly, compose into paths.
"""

from featmatch.matching._lap import SparseMatchInfo, auto_solver, default_block_size, match_stack, sparse_match
from featmatch.matching._matching import (
    Matching,
    MatchingFileError,
    assign,
    compose,
    cost_matrix,
    feature_vectors,
    match,
    pairwise_cost,
    paths,
)

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
    "paths",
]
