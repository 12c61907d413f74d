"""Hook names: which hook point an SAE reads, and which block a hook belongs to.

One place for the two conventions featmatch relies on:

* an SAE records the hook it was trained on in ``sae.cfg.metadata.hook_name`` (SAELens 6;
  older SAELens kept it in ``sae.cfg.hook_name``, :class:`featmatch.saes.SAEWeights` in
  ``.hook_name``);
* TransformerLens names a block's hooks ``blocks.<layer>.<hook>``, e.g.
  ``blocks.3.hook_resid_post``; hooks outside the blocks (``hook_embed``, ``ln_final...``)
  have no block index.

This module imports nothing from featmatch, so every stage can use it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["RESID_POST", "hook_name", "block_index", "shift_block", "model_device"]

#: The residual stream after block ``layer``: the default hook of an SAE without metadata.
RESID_POST = "blocks.{layer}.hook_resid_post"

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.")


def hook_name(sae: Any, layer: int | None = None) -> str:
    """The hook point an SAE reads.

    Looked up in ``sae.cfg.metadata.hook_name``, then ``sae.cfg.hook_name`` (older SAELens),
    then ``sae.hook_name`` (:class:`featmatch.saes.SAEWeights`); the first non-empty one wins.

    Parameters
    ----------
    sae : object
        A SAELens SAE, an :class:`~featmatch.saes.SAEWeights`, or anything with such a ``cfg``.
    layer : int, optional
        When the SAE records no hook: return ``blocks.{layer}.hook_resid_post`` instead of
        raising.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If the SAE records no hook and ``layer`` is None.
    """
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None) if cfg is not None else None
    name = getattr(meta, "hook_name", None) if meta is not None else None
    name = name or (getattr(cfg, "hook_name", None) if cfg is not None else None)
    if not name:
        own = getattr(sae, "hook_name", None)
        name = own if isinstance(own, str) else None
    if name:
        return str(name)
    if layer is not None:
        return RESID_POST.format(layer=int(layer))
    raise ValueError("SAE has no cfg.metadata.hook_name; pass the hook names explicitly")


def block_index(hook: str) -> int | None:
    """The block (layer) index in a hook name: ``"blocks.3.hook_resid_post"`` -> 3.

    Parameters
    ----------
    hook : str

    Returns
    -------
    int or None
        None for hooks outside the blocks (``hook_embed``, ``ln_final.hook_normalized``, ...).
    """
    m = _BLOCK_RE.search(hook)
    return None if m is None else int(m.group(1))


def shift_block(hook: str, by: int = 1) -> str:
    """The same hook ``by`` blocks later (earlier for negative ``by``).

    Parameters
    ----------
    hook : str
        A hook name with a block index, e.g. ``"blocks.3.hook_resid_post"``.
    by : int

    Returns
    -------
    str
        E.g. ``"blocks.4.hook_resid_post"`` for ``by=1``.

    Raises
    ------
    ValueError
        If ``hook`` has no block index.
    """
    m = _BLOCK_RE.search(hook)
    if m is None:
        raise ValueError(f"cannot find a block index in hook name {hook!r}")
    return hook[: m.start(1)] + str(int(m.group(1)) + by) + hook[m.end(1) :]


def model_device(model: Any) -> Any:
    """Where a model's forward runs: ``model.cfg.device``, else the device of its parameters.

    Never a fixed ``cpu``: on a GPU worker (:mod:`featmatch._dask`) it is the worker's GPU.
    """
    dev = getattr(getattr(model, "cfg", None), "device", None)
    if dev is not None:
        return dev
    import torch

    return next(iter(model.parameters()), torch.empty(0)).device
