"""Judging: the paper's LLM judge, an offline proxy, and the explanation sources they read.

* :mod:`featmatch.judging.judges`: :class:`~featmatch.judging.judges.LLMJudge` (any
  OpenAI-compatible endpoint, cached) and :class:`~featmatch.judging.judges.ProxyJudge`.
* :mod:`featmatch.judging.explanations`: Neuronpedia exports and activating contexts.
"""

import importlib

__all__ = ["judges", "explanations"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"featmatch.judging.{name}")
    raise AttributeError(f"module 'featmatch.judging' has no attribute {name!r}")
