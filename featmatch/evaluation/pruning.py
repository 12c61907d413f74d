r"""Layer pruning with matched SAE features (SAE Match, Sec. 5.5, App. A and B).

A *splice* replaces the hidden state :math:`h_{t+1}` read at SAE B's hook
(``blocks.{t+1}.hook_resid_post`` for the embedded zoo) by a prediction computed from
:math:`h_t` read at SAE A's hook (``blocks.{t}.hook_resid_post``), so the downstream
forward sees the prediction and the computation of block :math:`t+1` is effectively
pruned. Hook names come from the SAEs' ``cfg.metadata.hook_name``; with the
``hook_resid_pre`` convention (GPT-2 ``res-jb``) the same code prunes block :math:`t`.

Methods (``layer`` below is :math:`t`, the layer of SAE A):

``encode_permute_decode`` (Eq. 5)
    :math:`\hat h_{t+1} = W_{dec}^{(t+1)\top} P\,\sigma(W_{enc}^{(t)\top} h_t + b_{enc}^{(t)}) + b_{dec}^{(t+1)}`
    (SAELens shapes :math:`W_{enc}` (d, F), :math:`W_{dec}` (F, d); :math:`P` maps A's
    features to B's, ``P[pi(i), i] = 1``).
    With ``fold=True`` both SAEs are used in folded form (Eq. 4), so feature :math:`i`
    is carried with the scale :math:`\theta^B_{\pi(i)}/\theta^A_i`; with ``fold=False``
    its raw activation is carried over.
``layer_drop``
    :math:`\hat h_{t+1} = h_t`.
``encode_decode_current``
    :math:`\hat h_{t+1} = \mathrm{SAE}_{t+1}(h_{t+1})` (nothing pruned; the SAE error).
``encode_decode_previous``
    :math:`\hat h_{t+1} = \mathrm{SAE}_t(h_t)`.
``quantile_hybrid`` (Eq. 6)
    matched features whose cost is among the lowest fraction ``q`` are decoded by
    :math:`W_{dec}^{(t+1)}P`, the others by :math:`W_{dec}^{(t)}`, plus
    :math:`b_{dec}^{(t+1)}`. ``q=1`` is ``encode_permute_decode``; ``q=0`` is
    :math:`\mathrm{SAE}_t(h_t)` with :math:`b_{dec}^{(t)}` replaced by :math:`b_{dec}^{(t+1)}`.
``top1_cosine`` (Feature Flow, Laptev et al. 2025)
    each feature of A is carried to the B feature with the most cosine-similar decoder
    row; several A features may land on one B feature (many-to-one).

Conventions (``docs/contracts.md``):

* Position 0 (BOS, an attention sink) is **never replaced**: positions
  ``< start_pos`` (default 1) keep their true hidden state, and they are excluded from
  the explained variance (and, by :func:`featmatch.evaluation.metrics.token_losses`, from ΔCE).
* Unmatched features (``perm == -1``) are dropped from the transfer (they contribute
  nothing), except in the hybrid, where by default they count as infinitely costly and
  go to the previous decoder (``unmatched="previous"``).
* Every context manager removes its hooks on exit, also when an exception is raised
  (TransformerLens ``model.hooks`` removes the hooks of its own context level only).

Each splice records the explained variance of its prediction against the true
:math:`h_{t+1}` (:class:`featmatch.evaluation.metrics.EVAccumulator`), so one forward yields both
ΔCE and EV. Use :func:`evaluate_pruning` for one (layer, method) and
:func:`pruning_sweep` for a tidy table over layers × methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from featmatch._hooks import hook_name
from featmatch._hooks import shift_block as _shift_hook
from featmatch.evaluation.metrics import EVAccumulator, _batches, token_losses
from featmatch.matching.baselines import top1_cosine_matching, top1_cosine_perm

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "Splice",
    "splice",
    "make_splice",
    "encode_permute_decode",
    "layer_drop",
    "encode_decode_current",
    "encode_decode_previous",
    "quantile_hybrid",
    "top1_cosine",
    "top1_cosine_perm",
    "top1_cosine_matching",
    "hook_name",
    "evaluate_pruning",
    "pruning_sweep",
    "same_layer_transfer",
]

METHODS = (
    "encode_permute_decode",
    "layer_drop",
    "encode_decode_current",
    "encode_decode_previous",
    "quantile_hybrid",
    "top1_cosine",
)
_ALIASES = {
    "epd": "encode_permute_decode",
    "sae_match": "encode_permute_decode",
    "hybrid": "quantile_hybrid",
    "feature_flow": "top1_cosine",
    "drop": "layer_drop",
}

#: Default methods of :func:`pruning_sweep`: the three baselines (App. A), folded and
#: unfolded SAE Match (Fig. 11) and the Feature Flow top-1 cosine transfer.
DEFAULT_METHODS: tuple[str | dict, ...] = (
    "layer_drop",
    "encode_decode_current",
    "encode_decode_previous",
    {"method": "encode_permute_decode", "fold": True},
    {"method": "encode_permute_decode", "fold": False},
    {"method": "top1_cosine", "fold": True},
)

Predictor = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------
# the splice object
# ---------------------------------------------------------------------------------------
class Splice:
    r"""A reusable replacement of the hidden state at ``target_hook``.

    Parameters
    ----------
    target_hook : str
        Hook whose output (:math:`h_{t+1}`) is replaced.
    predict : callable
        ``predict(h_prev, h_true) -> h_hat``; ``h_prev`` is the activation captured at
        ``source_hook`` in the same forward (``None`` without a source hook), ``h_true``
        the true activation at ``target_hook``; both already restricted to positions
        ``>= start_pos``, shape ``(batch, pos, d)``.
    source_hook : str, optional
        Hook read for :math:`h_t`. Must run before ``target_hook`` in the forward.
    start_pos : int, default 1
        Positions below it are left untouched and not scored (BOS).
    name : str
        Method name, for reporting.
    info : dict, optional
        Extra facts reported by :func:`evaluate_pruning` (e.g. ``n_transferred``).
    keep_last : bool, default False
        Keep the last batch's ``(h_true, h_hat)`` in :attr:`last` (tests, debugging).

    Attributes
    ----------
    ev_stats : featmatch.evaluation.metrics.EVAccumulator
        Accumulated over every forward run while attached; :meth:`reset` clears it.
    n_calls : int
        Number of replaced forwards.
    """

    def __init__(
        self,
        target_hook: str,
        predict: Predictor,
        *,
        source_hook: str | None = None,
        start_pos: int = 1,
        name: str = "custom",
        info: Mapping[str, Any] | None = None,
        keep_last: bool = False,
    ) -> None:
        if source_hook is not None and source_hook == target_hook:
            raise ValueError("source_hook and target_hook must differ")
        if start_pos < 0:
            raise ValueError("start_pos must be >= 0")
        self.target_hook = target_hook
        self.source_hook = source_hook
        self.predict = predict
        self.start_pos = int(start_pos)
        self.name = name
        self.info = dict(info or {})
        self.keep_last = keep_last
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ev_stats = EVAccumulator()
        self.n_calls = 0
        self._h_prev: torch.Tensor | None = None

    # -- results ---------------------------------------------------------------------
    @property
    def ev(self) -> float:
        """Explained variance of the prediction vs the true :math:`h_{t+1}` so far."""
        return self.ev_stats.ev

    @property
    def mse(self) -> float:
        """Mean squared error per element of the prediction so far."""
        return self.ev_stats.mse

    def reset(self) -> None:
        """Forget the accumulated statistics."""
        self.ev_stats = EVAccumulator()
        self.n_calls = 0
        self.last = None

    # -- hooks -----------------------------------------------------------------------
    def _capture(self, act: torch.Tensor, hook: Any) -> None:
        self._h_prev = act.detach()

    def _replace(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        s = self.start_pos
        h_prev = None
        if self.source_hook is not None:
            h_prev, self._h_prev = self._h_prev, None
            if h_prev is None:
                raise RuntimeError(
                    f"splice {self.name!r}: {self.target_hook} ran before {self.source_hook} "
                    "in this forward; the source hook must come first"
                )
            if h_prev.shape != act.shape:
                raise RuntimeError(
                    f"splice {self.name!r}: h_prev {tuple(h_prev.shape)} and h_true "
                    f"{tuple(act.shape)} differ in shape"
                )
            h_prev = h_prev[:, s:]
        h_true = act[:, s:]
        with torch.no_grad():
            pred = self.predict(h_prev, h_true)
        if pred.shape != h_true.shape:
            raise RuntimeError(
                f"splice {self.name!r}: prediction {tuple(pred.shape)} != {tuple(h_true.shape)}"
            )
        self.ev_stats.update(h_true, pred)
        self.n_calls += 1
        if self.keep_last:
            self.last = (h_true.detach().clone(), pred.detach().clone())
        out = act.clone()
        out[:, s:] = pred.to(device=act.device, dtype=act.dtype)
        return out

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        """``[(source_hook, capture), (target_hook, replace)]`` for ``model.hooks``."""
        hooks: list[tuple[str, Callable]] = []
        if self.source_hook is not None:
            hooks.append((self.source_hook, self._capture))
        hooks.append((self.target_hook, self._replace))
        return hooks

    @contextmanager
    def attach(self, model: Any) -> Iterator[Splice]:
        """Context manager: add the hooks to ``model``; always removed on exit."""
        for name in (self.source_hook, self.target_hook):
            if name is not None and name not in model.hook_dict:
                raise KeyError(f"model has no hook point {name!r}")
        self._h_prev = None
        try:
            with model.hooks(fwd_hooks=self.fwd_hooks()):
                yield self
        finally:
            self._h_prev = None

    def __repr__(self) -> str:
        return (
            f"Splice({self.name!r}, source={self.source_hook!r}, target={self.target_hook!r}, "
            f"start_pos={self.start_pos}, ev={self.ev:.4g})"
        )


@contextmanager
def splice(
    model: Any,
    target_hook: str,
    predict: Predictor,
    *,
    source_hook: str | None = None,
    start_pos: int = 1,
    name: str = "custom",
    keep_last: bool = False,
) -> Iterator[Splice]:
    """Context manager for a custom :class:`Splice`; hooks are always removed on exit.

    Examples
    --------
    >>> with splice(model, "blocks.2.hook_resid_post", lambda prev, true: prev,
    ...             source_hook="blocks.1.hook_resid_post") as sp:   # doctest: +SKIP
    ...     loss = model(tokens, return_type="loss")
    >>> sp.ev                                                          # doctest: +SKIP
    """
    sp = Splice(
        target_hook, predict, source_hook=source_hook, start_pos=start_pos, name=name, keep_last=keep_last
    )
    with sp.attach(model):
        yield sp


# ---------------------------------------------------------------------------------------
# SAE helpers
# ---------------------------------------------------------------------------------------
def _theta(sae: Any) -> torch.Tensor:
    """Per-feature JumpReLU threshold θ (ones for SAEs without one, e.g. ReLU)."""
    th = getattr(sae, "threshold", None)
    if isinstance(th, torch.Tensor) and th.ndim == 1 and th.shape[0] == sae.cfg.d_sae:
        return th.detach().float().cpu()
    return torch.ones(sae.cfg.d_sae)


def _check_plain_decoder(sae: Any) -> None:
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in (None, "none"):
        raise NotImplementedError(
            f"feature transfer needs SAEs without run-time activation normalisation "
            f"(got normalize_activations={norm!r})"
        )
    if getattr(sae.cfg, "reshape_activations", "none") not in (None, "none"):
        raise NotImplementedError("feature transfer does not support hook_z reshaping")


def _sae_encode(sae: Any, h: torch.Tensor) -> torch.Tensor:
    p = next(sae.parameters())
    return sae.encode(h.to(device=p.device, dtype=p.dtype))


def _sae_reconstruct(sae: Any, h: torch.Tensor) -> torch.Tensor:
    return sae.decode(_sae_encode(sae, h))


def _perm_cost(matching: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if hasattr(matching, "perm"):
        perm = matching.perm
        cost = getattr(matching, "cost", None)
    else:
        perm, cost = matching, None
    perm = np.asarray(perm.cpu() if isinstance(perm, torch.Tensor) else perm).astype(np.int64).ravel()
    if cost is not None:
        cost = np.asarray(cost, dtype=np.float64).ravel()
    return perm, cost


def _transfer_decoder(
    sae_prev: Any,
    sae_next: Any,
    perm: np.ndarray,
    *,
    fold: bool,
    to_next: np.ndarray | None = None,
    prev_rows: np.ndarray | None = None,
) -> torch.Tensor:
    r"""Effective decoder ``(F_A, d)`` applied to the unfolded activations of SAE A.

    Row :math:`i` is :math:`s_i\,W^B_{dec}[\pi(i)]` for transferred features
    (``to_next``; default all matched), with :math:`s_i = \theta^B_{\pi(i)}/\theta^A_i`
    if ``fold`` else 1 -- the same as encoding with ``fold(sae_prev)`` and decoding with
    ``fold(sae_next)`` (Eq. 4: :math:`f' = f/\theta`, :math:`W'_{dec} = \mathrm{diag}(\theta) W_{dec}`).
    Rows in ``prev_rows`` are :math:`W^A_{dec}[i]`; all others are zero (dropped).
    """
    _check_plain_decoder(sae_next)
    F_a, F_b = sae_prev.cfg.d_sae, sae_next.cfg.d_sae
    if perm.shape[0] != F_a:
        raise ValueError(f"matching has {perm.shape[0]} features, SAE A has {F_a}")
    if perm.max(initial=-1) >= F_b or perm.min(initial=0) < -1:
        raise ValueError(f"matching indices must be in [-1, {F_b})")
    if sae_prev.cfg.d_in != sae_next.cfg.d_in:
        raise ValueError("SAE A and SAE B have different d_in")
    W_b = sae_next.W_dec.detach().float().cpu()
    W = torch.zeros(F_a, W_b.shape[1])
    rows = np.flatnonzero(perm >= 0) if to_next is None else np.asarray(to_next, dtype=np.int64)
    if rows.size:
        r = torch.as_tensor(rows)
        c = torch.as_tensor(perm[rows])
        scale = _theta(sae_next)[c] / _theta(sae_prev)[r] if fold else torch.ones(len(rows))
        W[r] = W_b[c] * scale[:, None]
    if prev_rows is not None and len(prev_rows):
        _check_plain_decoder(sae_prev)
        pr = torch.as_tensor(np.asarray(prev_rows, dtype=np.int64))
        W[pr] = sae_prev.W_dec.detach().float().cpu()[pr]
    return W


def _transfer_predictor(sae_prev: Any, sae_next: Any, W_eff: torch.Tensor) -> Predictor:
    p = next(sae_prev.parameters())
    W = W_eff.to(device=p.device, dtype=p.dtype)
    b = sae_next.b_dec.detach().to(device=p.device, dtype=p.dtype)

    def predict(h_prev: torch.Tensor | None, h_true: torch.Tensor) -> torch.Tensor:
        return _sae_encode(sae_prev, h_prev) @ W + b

    return predict


# ---------------------------------------------------------------------------------------
# splice builders
# ---------------------------------------------------------------------------------------
def _canonical(method: str) -> str:
    m = _ALIASES.get(method, method)
    if m not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {METHODS}")
    return m


def _hybrid_rows(
    perm: np.ndarray, cost: np.ndarray | None, q: float, unmatched: str
) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if unmatched not in ("previous", "drop"):
        raise ValueError("unmatched must be 'previous' or 'drop'")
    matched = np.flatnonzero(perm >= 0)
    if cost is None:
        if q not in (0.0, 1.0):
            raise ValueError("quantile_hybrid with 0 < q < 1 needs matching.cost")
        cost = np.zeros(perm.shape[0])
    order = matched[np.argsort(cost[matched], kind="stable")]
    k = int(math.floor(q * len(order) + 0.5))
    to_next, prev = order[:k], order[k:]
    if unmatched == "previous":
        prev = np.concatenate([prev, np.flatnonzero(perm < 0)])
    return to_next, prev


def make_splice(
    method: str,
    sae_prev: Any | None = None,
    sae_next: Any | None = None,
    matching: Any = None,
    *,
    fold: bool = True,
    q: float = 1.0,
    unmatched: str = "previous",
    source_hook: str | None = None,
    target_hook: str | None = None,
    start_pos: int = 1,
    keep_last: bool = False,
) -> Splice:
    r"""Build (not attach) the :class:`Splice` of a pruning method.

    Parameters
    ----------
    method : str
        One of :data:`METHODS` (aliases: ``"epd"``, ``"hybrid"``, ``"feature_flow"``,
        ``"drop"``).
    sae_prev, sae_next : sae_lens.SAE, optional
        SAE A at layer :math:`t` and SAE B at :math:`t+1`. Hook names are read from
        their ``cfg.metadata.hook_name`` unless ``source_hook``/``target_hook`` are given;
        a missing one is derived by shifting the block index of the other by one.
    matching : featmatch.matching.Matching, optional
        A → B; needed by ``encode_permute_decode`` and ``quantile_hybrid`` (which also
        uses ``matching.cost``). For ``top1_cosine`` it is computed if omitted.
    fold : bool, default True
        Transfer in the folded scale (Eq. 4) -- see the module docstring.
    q : float, default 1.0
        Hybrid quantile: the ``round(q * n_matched)`` lowest-cost matched features go
        through B's decoder (ties by feature index), the rest through A's.
    unmatched : {"previous", "drop"}, default "previous"
        Hybrid only: decode unmatched features with A's decoder (cost :math:`+\infty`)
        or drop them.
    start_pos : int, default 1
    keep_last : bool, default False

    Returns
    -------
    Splice
        With ``info`` holding ``n_transferred`` (features decoded by B) where relevant.
    """
    method = _canonical(method)
    src = source_hook or (hook_name(sae_prev) if sae_prev is not None else None)
    tgt = target_hook or (hook_name(sae_next) if sae_next is not None else None)
    if tgt is None and src is not None:
        tgt = _shift_hook(src, +1)
    if src is None and tgt is not None and method != "encode_decode_current":
        src = _shift_hook(tgt, -1)
    if tgt is None:
        raise ValueError("cannot determine the target hook; pass SAEs or target_hook")

    def need(*names: str) -> None:
        vals = {"sae_prev": sae_prev, "sae_next": sae_next, "matching": matching}
        missing = [n for n in names if vals[n] is None]
        if missing:
            raise ValueError(f"{method} needs {', '.join(missing)}")

    info: dict[str, Any] = {}
    common = dict(start_pos=start_pos, keep_last=keep_last, name=method)
    if method == "layer_drop":
        return Splice(tgt, lambda prev, true: prev, source_hook=src, **common)
    if method == "encode_decode_current":
        need("sae_next")
        return Splice(tgt, lambda prev, true: _sae_reconstruct(sae_next, true), **common)
    if method == "encode_decode_previous":
        need("sae_prev")
        return Splice(tgt, lambda prev, true: _sae_reconstruct(sae_prev, prev), source_hook=src, **common)

    need("sae_prev", "sae_next")
    if method == "top1_cosine" and matching is None:
        perm, _ = top1_cosine_perm(sae_prev, sae_next)
        cost = None
    else:
        need("matching")
        perm, cost = _perm_cost(matching)
    if method in ("encode_permute_decode", "top1_cosine"):
        rows = np.flatnonzero(perm >= 0)
        W = _transfer_decoder(sae_prev, sae_next, perm, fold=fold, to_next=rows)
        info["n_transferred"] = int(rows.size)
    else:  # quantile_hybrid
        to_next, prev_rows = _hybrid_rows(perm, cost, float(q), unmatched)
        W = _transfer_decoder(sae_prev, sae_next, perm, fold=fold, to_next=to_next, prev_rows=prev_rows)
        info["n_transferred"] = int(to_next.size)
    pred = _transfer_predictor(sae_prev, sae_next, W)
    return Splice(tgt, pred, source_hook=src, info=info, **common)


@contextmanager
def _attached(model: Any, sp: Splice) -> Iterator[Splice]:
    with sp.attach(model):
        yield sp


def encode_permute_decode(
    model: Any,
    sae_prev: Any,
    sae_next: Any,
    matching: Any,
    *,
    fold: bool = True,
    start_pos: int = 1,
    keep_last: bool = False,
) -> Any:
    r"""Context manager splicing SAE Match's encode-permute-decode (Eq. 5).

    :math:`\hat h_{t+1} = W_{dec}^{(t+1)\top} P\,\sigma(W_{enc}^{(t)\top} h_t + b_{enc}^{(t)}) + b_{dec}^{(t+1)}`,
    with both SAEs folded (Eq. 4) if ``fold``. Yields the :class:`Splice` (``.ev``).

    Examples
    --------
    >>> with encode_permute_decode(model, sae5, sae6, m) as sp:      # doctest: +SKIP
    ...     loss = model(tokens, return_type="loss")
    """
    sp = make_splice(
        "encode_permute_decode",
        sae_prev,
        sae_next,
        matching,
        fold=fold,
        start_pos=start_pos,
        keep_last=keep_last,
    )
    return _attached(model, sp)


def layer_drop(
    model: Any,
    layer: int,
    *,
    hook_template: str = "blocks.{layer}.hook_resid_post",
    start_pos: int = 1,
    keep_last: bool = False,
) -> Any:
    r"""Context manager: :math:`h_{t+1} := h_t` with :math:`t` = ``layer`` (App. A)."""
    sp = make_splice(
        "layer_drop",
        source_hook=hook_template.format(layer=layer),
        target_hook=hook_template.format(layer=layer + 1),
        start_pos=start_pos,
        keep_last=keep_last,
    )
    return _attached(model, sp)


def encode_decode_current(model: Any, sae_next: Any, *, start_pos: int = 1, keep_last: bool = False) -> Any:
    r"""Context manager: :math:`h_{t+1} := \mathrm{SAE}_{t+1}(h_{t+1})` at SAE's own hook (App. A)."""
    sp = make_splice("encode_decode_current", sae_next=sae_next, start_pos=start_pos, keep_last=keep_last)
    return _attached(model, sp)


def encode_decode_previous(
    model: Any,
    sae_prev: Any,
    *,
    target_hook: str | None = None,
    start_pos: int = 1,
    keep_last: bool = False,
) -> Any:
    r"""Context manager: :math:`h_{t+1} := \mathrm{SAE}_t(h_t)` (App. A).

    The target hook defaults to SAE A's hook with the block index plus one.
    """
    sp = make_splice(
        "encode_decode_previous", sae_prev, target_hook=target_hook, start_pos=start_pos, keep_last=keep_last
    )
    return _attached(model, sp)


def quantile_hybrid(
    model: Any,
    sae_prev: Any,
    sae_next: Any,
    matching: Any,
    q: float,
    *,
    fold: bool = True,
    unmatched: str = "previous",
    start_pos: int = 1,
    keep_last: bool = False,
) -> Any:
    r"""Context manager for the MSE-quantile hybrid (App. B, Eq. 6).

    .. math::

        \hat h_{t+1} = W^{(t)}_{dec} f^{+}_q + W^{(t+1)}_{dec} P f^{-}_q + b^{(t+1)}_{dec}

    where :math:`f^-_q` are the activations of the ``round(q·n_matched)`` matched
    features with the lowest ``matching.cost`` and :math:`f^+_q` the rest (and, with
    ``unmatched="previous"``, the unmatched features). See :func:`make_splice`.
    """
    sp = make_splice(
        "quantile_hybrid",
        sae_prev,
        sae_next,
        matching,
        q=q,
        fold=fold,
        unmatched=unmatched,
        start_pos=start_pos,
        keep_last=keep_last,
    )
    return _attached(model, sp)


def top1_cosine(
    model: Any,
    sae_prev: Any,
    sae_next: Any,
    matching: Any = None,
    *,
    fold: bool = True,
    start_pos: int = 1,
    keep_last: bool = False,
) -> Any:
    r"""Context manager for the many-to-one top-1 decoder-cosine transfer (Feature Flow).

    :math:`\hat h_{t+1} = \sum_i s_i f^A_i W^B_{dec}[\pi(i)] + b^B_{dec}` with
    :math:`\pi` from :func:`top1_cosine_perm` (or ``matching``), :math:`s_i` as in
    encode-permute-decode.
    """
    sp = make_splice(
        "top1_cosine", sae_prev, sae_next, matching, fold=fold, start_pos=start_pos, keep_last=keep_last
    )
    return _attached(model, sp)


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------
def _spec(entry: str | Mapping[str, Any]) -> dict[str, Any]:
    spec = {"method": entry} if isinstance(entry, str) else dict(entry)
    if "method" not in spec:
        raise ValueError(f"method spec {entry!r} has no 'method'")
    spec["method"] = _canonical(spec["method"])
    m = spec["method"]
    if "label" not in spec:
        label = m
        if m in ("encode_permute_decode", "quantile_hybrid", "top1_cosine"):
            label += "_folded" if spec.get("fold", True) else "_unfolded"
        if m == "quantile_hybrid":
            label += f"_q{float(spec.get('q', 1.0)):.2f}"
        spec["label"] = label
    return spec


def _resolve_matching(
    spec: Mapping[str, Any],
    layer: int,
    sae_prev: Any,
    sae_next: Any,
    cache: dict,
) -> Any:
    method, fold = spec["method"], bool(spec.get("fold", True))
    m = spec.get("matching")
    if m is not None:
        if callable(m) and not hasattr(m, "perm"):
            return m(layer)
        if isinstance(m, Mapping):
            return m[layer]
        return m
    if method in ("encode_permute_decode", "quantile_hybrid"):
        kw = dict(spec.get("match_kwargs") or {})
        key = (layer, fold, tuple(sorted(kw.items())))
        if key not in cache:
            from featmatch.matching._matching import match

            cache[key] = match(sae_prev, sae_next, fold=fold, **kw)
        return cache[key]
    return None


def _row(layer: int, spec: Mapping[str, Any], sp: Splice, clean: float, spliced: float, n: int) -> dict:
    return {
        "layer": layer,
        "method": spec["label"],
        "kind": spec["method"],
        "fold": spec.get("fold", True)
        if spec["method"] in ("encode_permute_decode", "quantile_hybrid", "top1_cosine")
        else None,
        "q": float(spec.get("q", 1.0)) if spec["method"] == "quantile_hybrid" else None,
        "delta_ce": (spliced - clean) / n,
        "ev": sp.ev,
        "mse": sp.mse,
        "ce_clean": clean / n,
        "ce_spliced": spliced / n,
        "n_tokens": n,
        "n_ev_tokens": sp.ev_stats.n,
        "n_transferred": sp.info.get("n_transferred"),
        "source_hook": sp.source_hook,
        "target_hook": sp.target_hook,
    }


def _build(
    model: Any,
    sae_by_layer: Mapping[int, Any],
    layer: int,
    spec: Mapping[str, Any],
    start_pos: int,
    cache: dict,
) -> Splice:
    sae_prev, sae_next = sae_by_layer.get(layer), sae_by_layer.get(layer + 1)
    method = spec["method"]
    if method == "layer_drop":
        src = hook_name(sae_prev) if sae_prev is not None else f"blocks.{layer}.hook_resid_post"
        tgt = hook_name(sae_next) if sae_next is not None else _shift_hook(src, +1)
        return make_splice(method, source_hook=src, target_hook=tgt, start_pos=start_pos)
    matching = _resolve_matching(spec, layer, sae_prev, sae_next, cache)
    kw = {k: spec[k] for k in ("fold", "q", "unmatched") if k in spec}
    return make_splice(method, sae_prev, sae_next, matching, start_pos=start_pos, **kw)


def pruning_sweep(
    model: Any,
    tokens: torch.Tensor,
    sae_by_layer: Mapping[int, Any],
    layers: Sequence[int] | None = None,
    methods: Sequence[str | Mapping[str, Any]] = DEFAULT_METHODS,
    *,
    batch_size: int = 8,
    start_pos: int = 1,
    progress: bool = True,
):
    r"""ΔCE and EV of every (layer, method) pair, as a tidy ``pandas.DataFrame``.

    The clean losses are computed once (one pass over the batches of ``batch_size``
    sequences) and every splice is then run on the same batches, so the ΔCE of all
    methods share the clean baseline exactly. Splices are built one at a time (only one
    effective decoder in memory); matchings computed here are cached per (layer, fold)
    -- pass precomputed ones via ``"matching"`` for large SAEs.

    Parameters
    ----------
    model : transformer_lens.HookedTransformer
    tokens : torch.LongTensor
        ``(n_seq, L)``, BOS in column 0.
    sae_by_layer : mapping int → sae_lens.SAE
        SAE of each layer (reading ``blocks.{layer}.hook_resid_post`` in the zoo).
    layers : sequence of int, optional
        Values of :math:`t` (block :math:`t+1` is pruned). Default: every ``t`` with
        SAEs at ``t`` and ``t+1``.
    methods : sequence of str or dict
        A method name or a dict with ``"method"`` and optional ``"label"``, ``"fold"``,
        ``"q"``, ``"unmatched"``, ``"matching"`` (a Matching, a mapping layer →
        Matching, or a callable ``layer -> Matching``) and ``"match_kwargs"``. Missing
        matchings are computed once per (layer, fold) with
        :func:`featmatch.matching.match`; ``top1_cosine`` computes its own map.
    batch_size : int, default 8
    start_pos : int, default 1
        Positions below it are never replaced or scored.
    progress : bool, default True
        Show a tqdm bar over batches × configurations.

    Returns
    -------
    pandas.DataFrame
        One row per (layer, method): ``layer``, ``method`` (label), ``kind`` (canonical
        method), ``fold``, ``q``, ``delta_ce`` (nats), ``ev``, ``mse``, ``ce_clean``,
        ``ce_spliced``, ``n_tokens`` (scored predictions), ``n_ev_tokens``,
        ``n_transferred``, ``source_hook``, ``target_hook``, and ``delta_ce_seq``: a float64
        array with the ΔCE of each sequence (mean over its scored positions; every row's
        array is over the same sequences, in order, so methods pair per sequence and
        confidence intervals resample sequences).

    Examples
    --------
    >>> df = pruning_sweep(model, tokens, saes, methods=[                  # doctest: +SKIP
    ...     "layer_drop", {"method": "quantile_hybrid", "q": 0.5}])
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if layers is None:
        layers = [t for t in sorted(sae_by_layer) if t + 1 in sae_by_layer]
    specs = [_spec(m) for m in methods]
    labels = [s["label"] for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}")
    cache: dict = {}
    configs = [(t, s) for t in layers for s in specs]
    batches = list(_batches(tokens, batch_size))
    bar = tqdm(total=len(batches) * (len(configs) + 1), desc="pruning", disable=not progress)
    rows = []
    try:
        bar.set_postfix_str("clean", refresh=False)
        clean_sum, n = 0.0, 0
        clean_seq: list[torch.Tensor] = []
        for batch in batches:
            clean = token_losses(model, batch).double()
            clean_sum += float(clean.sum())
            n += clean.numel()
            clean_seq.append(clean.sum(dim=1))
            bar.update(1)
        clean_by_seq = torch.cat(clean_seq).numpy()
        per_seq = clean.shape[1] if clean.ndim == 2 else 1
        for t, s in configs:  # one splice (one effective decoder) in memory at a time
            bar.set_postfix_str(f"layer {t} {s['label']}", refresh=False)
            sp = _build(model, sae_by_layer, t, s, start_pos, cache)
            total = 0.0
            spliced_seq: list[torch.Tensor] = []
            for batch in batches:
                with sp.attach(model):
                    losses = token_losses(model, batch).double()
                total += float(losses.sum())
                spliced_seq.append(losses.sum(dim=1))
                bar.update(1)
            row = _row(t, s, sp, clean_sum, total, n)
            row["delta_ce_seq"] = (torch.cat(spliced_seq).numpy() - clean_by_seq) / per_seq
            rows.append(row)
    finally:
        bar.close()
    return pd.DataFrame(rows)


def evaluate_pruning(
    model: Any,
    tokens: torch.Tensor,
    sae_by_layer: Mapping[int, Any],
    layer: int,
    method: str,
    matching: Any = None,
    *,
    fold: bool = True,
    q: float = 1.0,
    unmatched: str = "previous",
    label: str | None = None,
    batch_size: int = 8,
    start_pos: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    r"""ΔCE (nats) and EV of one pruning method at one layer.

    Block :math:`t+1` (``t = layer``) is replaced by the method's prediction of
    :math:`h_{t+1}` from :math:`h_t`; ``delta_ce`` is the spliced minus the clean mean
    loss over the predictions made at positions :math:`1..L-2`
    (:func:`featmatch.evaluation.metrics.delta_ce`), ``ev`` the explained variance
    (:func:`featmatch.evaluation.metrics.explained_variance`) of the prediction against the true
    :math:`h_{t+1}` over positions :math:`\ge 1`, both from the same forwards.

    Parameters
    ----------
    model, tokens, sae_by_layer, batch_size, start_pos, progress
        As in :func:`pruning_sweep`.
    layer : int
        :math:`t`.
    method : str
        One of :data:`METHODS`.
    matching : featmatch.matching.Matching, optional
        A → B; computed with :func:`featmatch.matching.match` (``fold=fold``) when a
        matching-based method needs it and none is given.
    fold, q, unmatched
        See :func:`make_splice`.
    label : str, optional
        Name in the ``method`` field.

    Returns
    -------
    dict
        The keys of one :func:`pruning_sweep` row.
    """
    spec: dict[str, Any] = {"method": method, "fold": fold, "q": q, "unmatched": unmatched}
    if matching is not None:
        spec["matching"] = matching
    if label is not None:
        spec["label"] = label
    df = pruning_sweep(
        model,
        tokens,
        sae_by_layer,
        [layer],
        [spec],
        batch_size=batch_size,
        start_pos=start_pos,
        progress=progress,
    )
    return df.iloc[0].to_dict()


def same_layer_transfer(
    model: Any,
    tokens: torch.Tensor,
    sae_a: Any,
    sae_b: Any,
    matching: Any,
    *,
    fold: bool = True,
    batch_size: int = 8,
    start_pos: int = 1,
) -> dict[str, Any]:
    r"""ΔCE and EV of encode–permute–decode between two SAEs *of the same layer*.

    The hidden state :math:`h_t` is replaced by :math:`\hat h_t = W'_{dec,B}\,P\,f_A(h_t)
    + b_{dec,B}` (the transfer of :func:`make_splice`, with A's input taken from the same
    hook it replaces). With two SAEs of one layer trained from different seeds this is the
    ceiling for any cross-layer encode–permute–decode: nothing is pruned, only the features
    are exchanged.

    Returns
    -------
    dict
        ``delta_ce`` (nats), ``ev``, ``delta_ce_seq`` (per sequence, as in
        :func:`pruning_sweep`), ``n_transferred``.
    """
    hook = hook_name(sae_a)
    if hook != hook_name(sae_b):
        raise ValueError(f"same_layer_transfer needs two SAEs of one hook point, got {hook} and {hook_name(sae_b)}")
    perm, _ = _perm_cost(matching)
    rows = np.flatnonzero(perm >= 0)
    W = _transfer_decoder(sae_a, sae_b, perm, fold=fold, to_next=rows)
    pred = _transfer_predictor(sae_a, sae_b, W)
    sp = Splice(hook, lambda prev, true: pred(true, true), start_pos=start_pos, name="same_layer_transfer",
                info={"n_transferred": int(rows.size)})
    clean_seq, spliced_seq = [], []
    for batch in _batches(tokens, batch_size):
        clean_seq.append(token_losses(model, batch).double())
        with sp.attach(model):
            spliced_seq.append(token_losses(model, batch).double())
    c, t = torch.cat(clean_seq), torch.cat(spliced_seq)
    return {
        "delta_ce": float((t.sum() - c.sum()) / c.numel()),
        "ev": sp.ev,
        "delta_ce_seq": ((t - c).mean(dim=1)).numpy(),
        "n_transferred": int(rows.size),
    }

