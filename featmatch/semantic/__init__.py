"""Semantic OT: features as activation-weighted distributions, compared by Wasserstein distance.

A feature :math:`i` is :math:`\\mu_i = \\sum_t w_{it}\\,\\delta_{z_t}`, its activation-weighted
hidden states mapped into a shared reference space; features of two layers are compared by
:math:`W_p(\\mu_i, \\nu_j)` (exact, entropic or sliced, through POT) and matched by assignment
(Cao, Do, Thai 2026).
"""

from featmatch.semantic._semantic import *  # noqa: F403
from featmatch.semantic._semantic import __all__ as __all__
