"""SAEs: one weight view over SAELens SAEs, folding, loading, the SAE-set registry and the zoo.

Stage 1 of the pipeline. :func:`weights` gives a uniform view (W_enc, b_enc, W_dec, b_dec,
θ) of SAELens's Standard, JumpReLU and TopK SAEs; :func:`fold` folds JumpReLU thresholds into
the weights (Balagansky et al. 2025, Eq. 4); :func:`load_sae` loads by folder,
``release:sae_id`` or zoo name; :mod:`featmatch.saes.zoo` trains the embedded zoo with sae-lens.
"""

from featmatch.saes._sae import *  # noqa: F403
from featmatch.saes._sae import __all__ as _sae_all

__all__ = [*_sae_all, "zoo"]  # noqa: F405 - zoo is loaded on demand by __getattr__


def __getattr__(name: str):
    if name == "zoo":  # the zoo imports sae-lens's trainer and the model stage; load it on demand
        import importlib

        return importlib.import_module("featmatch.saes.zoo")
    raise AttributeError(f"module 'featmatch.saes' has no attribute {name!r}")
