"""Evaluation metrics of SAE Match (Balagansky et al., ICLR 2025; PAPERS.md section 1.4).

Every metric here follows the project's token convention (``docs/contracts.md``):
position 0 (BOS, an attention sink in SmolLM2) is excluded everywhere.

Feature-level metrics (computed from the streaming statistics of
:func:`featmatch.lm.activations.gather`, i.e. without a new forward pass):

* :func:`matching_score` -- :math:`P(f_B[\\pi(i)] > 0 \\mid f_A[i] > 0)`, the paper's
  "probability of paired feature activation" (Sec. 4), which the paper does not define
  by a formula; this is featmatch's definition.
* :func:`activation_correlation` -- Pearson correlation of the matched activations
  (Balcells et al., 2024).
* :func:`parameter_mse` -- MSE of the matched SAE parameters, always scored in the
  folded scale (Eq. 4), for the three variants of Fig. 3.

Hidden-state and model-level metrics:

* :func:`explained_variance` and its streaming form :class:`EVAccumulator`.
* :func:`token_losses`, :func:`cross_entropy` and :func:`delta_ce` (nats).

Each feature-level metric returns a :class:`FeatureScores` (per-feature array plus the
mean over the features where it is defined).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "FeatureScores",
    "matching_score",
    "activation_correlation",
    "parameter_mse",
    "explained_variance",
    "EVAccumulator",
    "token_losses",
    "cross_entropy",
    "delta_ce",
]

Variant = Literal["vanilla", "unfolded", "folded"]


# ---------------------------------------------------------------------------------------
# result container
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureScores:
    """A per-feature metric over the features of layer A and its mean.

    Attributes
    ----------
    name : str
        Metric name (``"matching_score"``, ``"correlation"``, ``"parameter_mse"``).
    per_feature : numpy.ndarray
        ``(F_A,)`` float64. ``NaN`` where the metric is undefined for feature ``i``
        (unmatched, never fires, zero variance, ...; see the producing function).
    mean : float
        ``nanmean(per_feature)``: the mean over the features where it is defined
        (``NaN`` if there are none).
    n : int
        Number of features entering :attr:`mean`.
    meta : dict
        Provenance (layers, variant, ``on`` ...).
    """

    name: str
    per_feature: np.ndarray
    mean: float
    n: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_array(cls, name: str, values: np.ndarray, **meta: Any) -> FeatureScores:
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(values)
        n = int(ok.sum())
        mean = float(values[ok].mean()) if n else float("nan")
        return cls(name=name, per_feature=values, mean=mean, n=n, meta=dict(meta))

    def __float__(self) -> float:
        return self.mean

    def to_frame(self):
        """A tidy ``pandas.DataFrame`` with columns ``feature`` and :attr:`name`."""
        import pandas as pd

        return pd.DataFrame({"feature": np.arange(len(self.per_feature)), self.name: self.per_feature})


# ---------------------------------------------------------------------------------------
# helpers for ActivationStats and Matching (duck-typed against docs/contracts.md)
# ---------------------------------------------------------------------------------------
def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _layer_stat(stats: Any, name: str, layer: int) -> np.ndarray:
    """``stats.<name>[layer]`` as a float64 array (a mapping or a callable accessor)."""
    obj = getattr(stats, name)
    val = obj(layer) if callable(obj) and not isinstance(obj, Mapping) else obj[layer]
    return _to_numpy(val).astype(np.float64, copy=False)


def _pair_entries(stats: Any, name: str, la: int, lb: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Entries ``M[rows, cols]`` of the pair statistic ``stats.<name>[(la, lb)]``.

    Works for dense numpy / torch matrices and scipy sparse matrices. If only the
    reversed pair ``(lb, la)`` is stored, its transpose is used. Without a dense matrix,
    the evaluated feature pairs of ``stats.pair_edges`` (``gather(evaluate=...)``) are
    read through ``stats.edge_values``; asking for a pair that was not evaluated is a
    ``KeyError``.
    """
    obj = getattr(stats, name)
    getter = (lambda k: obj(*k)) if callable(obj) and not isinstance(obj, Mapping) else obj.__getitem__
    try:
        mat = getter((la, lb))
    except (KeyError, IndexError):
        try:
            mat = getter((lb, la))
        except (KeyError, IndexError):
            edges = getattr(stats, "pair_edges", None)
            if edges and ((la, lb) in edges or (lb, la) in edges):
                # the sparse path: only the evaluated feature pairs were summed (no F_a x F_b array)
                co, pr = stats.edge_values(la, lb, rows, cols)
                return (co if name == "coact" else pr).astype(np.float64)
            raise KeyError(
                f"ActivationStats has no {name} for layer pair ({la}, {lb}); "
                f"gather it with pairs=[({la}, {lb})] or evaluate=[({la}, {lb}, matching)]"
            ) from None
        rows, cols = cols, rows
    if isinstance(mat, torch.Tensor):
        mat = mat.detach().cpu()
        return mat[torch.as_tensor(rows), torch.as_tensor(cols)].numpy().astype(np.float64)
    if hasattr(mat, "tocsr"):  # scipy.sparse
        return np.asarray(mat.tocsr()[rows, cols]).ravel().astype(np.float64)
    return np.asarray(mat)[rows, cols].astype(np.float64)


def _perm(matching: Any, stats: Any = None, lb: int | None = None) -> np.ndarray:
    """The ``perm`` array of a :class:`featmatch.matching.Matching` (or a raw array).

    With ``stats`` and ``lb``, entries are checked against the width of layer ``lb``.
    """
    perm = matching.perm if hasattr(matching, "perm") else matching
    perm = _to_numpy(perm).astype(np.int64, copy=False).ravel()
    if stats is not None and perm.size:
        try:
            f_b = _layer_stat(stats, "fire_count", lb).shape[0]
        except (KeyError, IndexError):  # the pair lookup reports a missing layer clearly
            return perm
        if perm.max() >= f_b or perm.min() < -1:
            raise ValueError(f"perm entries must be -1 (unmatched) or in [0, {f_b}) for layer {lb}")
    return perm


def _stats_n_tokens(stats: Any) -> int:
    n = int(stats.n_tokens)
    if n <= 0:
        raise ValueError("ActivationStats.n_tokens must be positive")
    return n


# ---------------------------------------------------------------------------------------
# matching score and correlation
# ---------------------------------------------------------------------------------------
def matching_score(stats: Any, la: int, lb: int, matching: Any, *, min_fires: int = 1) -> FeatureScores:
    r"""Matching score: probability that the matched feature of B fires when A's does.

    For feature :math:`i` of layer A matched to :math:`\pi(i)` in layer B,

    .. math::

        s_i = P\big(f^B_{\pi(i)}(x) > 0 \mid f^A_i(x) > 0\big)
            = \frac{\#\{x : f^A_i(x) > 0 \wedge f^B_{\pi(i)}(x) > 0\}}{\#\{x : f^A_i(x) > 0\}}

    where :math:`x` runs over the same token positions for both layers (all positions
    of the activation pass except position 0). This is featmatch's definition of the
    paper's "probability of paired feature activation" (Balagansky et al. 2025, Sec. 4;
    the paper gives no formula, see ``docs/decisions.md``). The reported mean is over
    the features of A that are matched and fire at least ``min_fires`` times;
    :math:`s_i` is ``NaN`` for the other features (unmatched, ``perm == -1``, or
    (near-)dead), so they do not enter the mean. The score is invariant to folding of
    either SAE (folding rescales activations by :math:`1/\theta > 0`).

    Parameters
    ----------
    stats : featmatch.lm.activations.ActivationStats
        Must hold ``fire_count[la]`` and the pair statistic ``coact[(la, lb)]``.
    la, lb : int
        Layers of SAE A and SAE B.
    matching : featmatch.matching.Matching or array-like
        ``perm`` (F_A,) int64 into B, ``-1`` for unmatched. Many-to-one maps are fine.
    min_fires : int, default 1
        Minimum number of firing positions of feature :math:`i` for it to be scored.

    Returns
    -------
    FeatureScores
        ``per_feature`` (F_A,) in [0, 1] or ``NaN``; ``mean`` over the scored features.
    """
    perm = _perm(matching, stats, lb)
    fire = _layer_stat(stats, "fire_count", la)
    if fire.shape[0] != perm.shape[0]:
        raise ValueError(f"matching has {perm.shape[0]} features, layer {la} has {fire.shape[0]}")
    ok = (perm >= 0) & (fire >= max(1, min_fires))
    rows = np.flatnonzero(ok)
    out = np.full(perm.shape[0], np.nan)
    if rows.size:
        co = _pair_entries(stats, "coact", la, lb, rows, perm[rows])
        out[rows] = co / fire[rows]
    return FeatureScores.from_array("matching_score", out, la=la, lb=lb, min_fires=min_fires)


def activation_correlation(
    stats: Any, la: int, lb: int, matching: Any, *, eps: float = 1e-12
) -> FeatureScores:
    r"""Pearson correlation of each matched pair's activations (Balcells et al., 2024).

    Computed from the streaming sums over the :math:`n` token positions of the pass
    (position 0 excluded), zeros included:

    .. math::

        r_i = \frac{\tfrac1n\sum_x f^A_i f^B_{\pi(i)} - \mu^A_i\,\mu^B_{\pi(i)}}
                   {\sqrt{\big(\tfrac1n\sum_x (f^A_i)^2 - (\mu^A_i)^2\big)
                          \big(\tfrac1n\sum_x (f^B_{\pi(i)})^2 - (\mu^B_{\pi(i)})^2\big)}},
        \qquad \mu^A_i = \tfrac1n\textstyle\sum_x f^A_i ,

    using ``prod_sum[(la, lb)]``, ``act_sum``, ``act_sq_sum`` and ``n_tokens``.
    :math:`r_i` is ``NaN`` for unmatched features and where either variance is
    :math:`\le` ``eps`` times the squared mean square (dead or constant features);
    values are clipped to [-1, 1] against rounding. Invariant to folding.

    Parameters
    ----------
    stats : featmatch.lm.activations.ActivationStats
    la, lb : int
    matching : featmatch.matching.Matching or array-like
    eps : float, default 1e-12
        Relative variance floor.

    Returns
    -------
    FeatureScores
    """
    perm = _perm(matching, stats, lb)
    n = _stats_n_tokens(stats)
    sa, sqa = _layer_stat(stats, "act_sum", la), _layer_stat(stats, "act_sq_sum", la)
    sb, sqb = _layer_stat(stats, "act_sum", lb), _layer_stat(stats, "act_sq_sum", lb)
    if sa.shape[0] != perm.shape[0]:
        raise ValueError(f"matching has {perm.shape[0]} features, layer {la} has {sa.shape[0]}")
    rows = np.flatnonzero(perm >= 0)
    out = np.full(perm.shape[0], np.nan)
    if rows.size:
        cols = perm[rows]
        prod = _pair_entries(stats, "prod_sum", la, lb, rows, cols) / n
        ma, mb = sa[rows] / n, sb[cols] / n
        va = sqa[rows] / n - ma**2
        vb = sqb[cols] / n - mb**2
        good = (va > eps * (sqa[rows] / n)) & (vb > eps * (sqb[cols] / n)) & (va > 0) & (vb > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (prod - ma * mb) / np.sqrt(va * vb)
        r = np.where(good, np.clip(r, -1.0, 1.0), np.nan)
        out[rows] = r
    return FeatureScores.from_array("correlation", out, la=la, lb=lb)


# ---------------------------------------------------------------------------------------
# parameter MSE (Fig. 3)
# ---------------------------------------------------------------------------------------
def parameter_mse(
    sae_a: Any,
    sae_b: Any,
    matching: Any = None,
    *,
    on: Literal["encoder", "decoder", "both"] = "both",
    variant: Variant = "folded",
    include_b_enc: bool = False,
    match_kwargs: Mapping[str, Any] | None = None,
) -> FeatureScores:
    r"""MSE of the matched SAE parameters, always in the folded scale (Fig. 3).

    With folded feature vectors :math:`v'_i` (Eq. 4; the encoder column
    :math:`W'_{enc}[:, i]`, the decoder row :math:`W'_{dec}[i]` or their concatenation,
    as :func:`featmatch.matching.feature_vectors` with ``fold=True``), the score of
    feature :math:`i` of A is

    .. math::

        \mathrm{MSE}_i = \frac1D \big\lVert v'^A_i - v'^B_{\pi(i)} \big\rVert^2 ,

    the same per-element mean as the ``metric="mse"`` cost matrix. The variants differ
    only in :math:`\pi`, as in the paper ("for unfolded matching, parameters are first
    matched, then folded, and finally MSE is evaluated"):

    * ``"vanilla"`` -- no permutation, :math:`\pi(i) = i` (needs :math:`F_A = F_B`;
      ``matching`` must be ``None``);
    * ``"unfolded"`` -- :math:`\pi` from matching the unfolded parameters;
    * ``"folded"`` -- :math:`\pi` from matching the folded parameters (SAE Match).

    If ``matching`` is ``None`` for the matched variants it is computed with
    :func:`featmatch.matching.match` (``fold`` set by the variant, ``on`` and
    ``include_b_enc`` passed through, plus ``match_kwargs``). Unmatched features
    (``perm == -1``) get ``NaN``. The decoder bias is not scored: it does not depend on
    the feature order (paper, Fig. 3 caption).

    Parameters
    ----------
    sae_a, sae_b : sae_lens.SAE
    matching : featmatch.matching.Matching, optional
    on : {"encoder", "decoder", "both"}
    variant : {"vanilla", "unfolded", "folded"}
    include_b_enc : bool, default False
        Append the folded encoder bias to the scored vectors.
    match_kwargs : mapping, optional
        Extra arguments for :func:`featmatch.matching.match`.

    Returns
    -------
    FeatureScores
        ``per_feature`` (F_A,) MSE in the folded scale; ``mean`` over matched features.
    """
    from featmatch import matching as fm_matching

    if variant not in ("vanilla", "unfolded", "folded"):
        raise ValueError(f"variant must be 'vanilla', 'unfolded' or 'folded', got {variant!r}")
    va = _to_numpy(fm_matching.feature_vectors(sae_a, on=on, fold=True, include_b_enc=include_b_enc))
    vb = _to_numpy(fm_matching.feature_vectors(sae_b, on=on, fold=True, include_b_enc=include_b_enc))
    va, vb = va.astype(np.float64), vb.astype(np.float64)
    if variant == "vanilla":
        if matching is not None:
            raise ValueError("variant='vanilla' uses the identity; do not pass a matching")
        if va.shape[0] != vb.shape[0]:
            raise ValueError(f"vanilla matching needs F_A == F_B, got {va.shape[0]} and {vb.shape[0]}")
        perm = np.arange(va.shape[0], dtype=np.int64)
    else:
        if matching is None:
            matching = fm_matching.match(
                sae_a,
                sae_b,
                on=on,
                fold=(variant == "folded"),
                include_b_enc=include_b_enc,
                **dict(match_kwargs or {}),
            )
        perm = _perm(matching)
        if perm.shape[0] != va.shape[0]:
            raise ValueError(f"matching has {perm.shape[0]} features, SAE A has {va.shape[0]}")
    out = np.full(va.shape[0], np.nan)
    rows = np.flatnonzero(perm >= 0)
    if rows.size:
        out[rows] = np.mean((va[rows] - vb[perm[rows]]) ** 2, axis=1)
    return FeatureScores.from_array("parameter_mse", out, on=on, variant=variant, include_b_enc=include_b_enc)


# ---------------------------------------------------------------------------------------
# explained variance
# ---------------------------------------------------------------------------------------
class EVAccumulator:
    r"""Streaming explained variance over batches of (true, predicted) hidden states.

    Accumulates, in float64, per dimension :math:`d` the sums of :math:`x_d`,
    :math:`x_d^2`, :math:`r_d` and :math:`r_d^2` with :math:`r = \hat x - x`, so that
    the result equals :func:`explained_variance` of all tokens seen at once.

    Attributes
    ----------
    n : int
        Number of token vectors seen.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sx: torch.Tensor | None = None
        self._sxx: torch.Tensor | None = None
        self._sr: torch.Tensor | None = None
        self._srr: torch.Tensor | None = None

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add token vectors ``x`` (true) and ``x_hat`` (predicted), both ``(..., d)``."""
        x = torch.as_tensor(x).detach()
        x_hat = torch.as_tensor(x_hat).detach()
        if x.shape != x_hat.shape:
            raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        r = x_hat.reshape(-1, x_hat.shape[-1]).to(torch.float64) - x
        if self._sx is None:
            d = x.shape[-1]
            z = torch.zeros(d, dtype=torch.float64)
            self._sx, self._sxx, self._sr, self._srr = z.clone(), z.clone(), z.clone(), z.clone()
        self._sx += x.sum(0)
        self._sxx += (x * x).sum(0)
        self._sr += r.sum(0)
        self._srr += (r * r).sum(0)
        self.n += x.shape[0]

    @staticmethod
    def _var(s: torch.Tensor, ss: torch.Tensor, n: int) -> float:
        return float((ss / n - (s / n) ** 2).clamp_min(0).sum())

    @property
    def total_variance(self) -> float:
        """:math:`\\sum_d \\mathrm{Var}(x_d)` (population variance over tokens)."""
        return self._var(self._sx, self._sxx, self.n) if self.n else float("nan")

    @property
    def residual_variance(self) -> float:
        """:math:`\\sum_d \\mathrm{Var}(\\hat x_d - x_d)`."""
        return self._var(self._sr, self._srr, self.n) if self.n else float("nan")

    @property
    def ev(self) -> float:
        """Explained variance :math:`1 - \\mathrm{Var}(\\hat x - x)/\\mathrm{Var}(x)`."""
        if not self.n:
            return float("nan")
        tot = self.total_variance
        return 1.0 - self.residual_variance / tot if tot > 0 else float("nan")

    @property
    def mse(self) -> float:
        """Mean squared error per element, :math:`\\frac{1}{n d}\\sum \\lVert\\hat x - x\\rVert^2`."""
        if not self.n:
            return float("nan")
        return float(self._srr.sum()) / (self.n * self._srr.numel())


def explained_variance(x: torch.Tensor | np.ndarray, x_hat: torch.Tensor | np.ndarray) -> float:
    r"""Explained variance of a reconstruction, :math:`1 - \mathrm{Var}(\hat x - x)/\mathrm{Var}(x)`.

    The paper's Sec. 4 writes :math:`\mathrm{Var}(\hat x - x)/\mathrm{Var}(x)` but plots
    one minus it; featmatch uses

    .. math::

        \mathrm{EV} = 1 - \frac{\sum_{d} \mathrm{Var}_t(\hat x_{t,d} - x_{t,d})}
                              {\sum_{d} \mathrm{Var}_t(x_{t,d})}

    where :math:`t` runs over all token vectors (every leading dimension of the inputs
    is flattened into tokens), :math:`d` over the last (hidden) dimension, and
    :math:`\mathrm{Var}_t` is the population variance over tokens. The variances are
    summed over dimensions before the ratio (not a mean of per-dimension ratios). EV is
    1 for a perfect reconstruction, 0 for predicting the per-dimension mean, and can be
    negative. A constant offset of :math:`\hat x` is not penalised (it has no variance).
    Callers exclude position 0 before calling (the pruning splices do).

    Parameters
    ----------
    x, x_hat : torch.Tensor or numpy.ndarray
        Same shape ``(..., d)``.

    Returns
    -------
    float
    """
    acc = EVAccumulator()
    acc.update(
        torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x,
        torch.as_tensor(np.asarray(x_hat)) if not isinstance(x_hat, torch.Tensor) else x_hat,
    )
    return acc.ev


# ---------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------
HookList = Sequence[tuple[str | Callable[[str], bool], Callable[..., Any]]]


def _batches(tokens: torch.Tensor, batch_size: int | None) -> Iterable[torch.Tensor]:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (n_seq, seq_len), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < 3:
        raise ValueError("seq_len must be >= 3 (position-0 predictions are excluded)")
    bs = tokens.shape[0] if not batch_size else int(batch_size)
    for i in range(0, tokens.shape[0], bs):
        yield tokens[i : i + bs]


@torch.no_grad()
def token_losses(model: Any, tokens: torch.Tensor, fwd_hooks: HookList = ()) -> torch.Tensor:
    r"""Next-token losses (nats) of one batch, with the position-0 prediction dropped.

    Column :math:`j` (:math:`j = 0, \dots, L-3`) is
    :math:`-\log p(\text{tokens}[:, j+2] \mid \text{tokens}[:, :j+2])`, the loss of the
    prediction made at position :math:`p = j + 1`. The prediction made at position 0
    (from BOS alone, an attention sink) is excluded, and BOS is never a target.

    Parameters
    ----------
    model : transformer_lens.HookedTransformer
    tokens : torch.LongTensor
        ``(batch, L)``, BOS in column 0.
    fwd_hooks : list of (hook name, hook function)
        Applied for this forward only (``model.hooks``; removed afterwards).

    Returns
    -------
    torch.Tensor
        ``(batch, L - 2)`` float32.
    """
    tokens = tokens.to(model.cfg.device)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        loss = model(tokens, return_type="loss", loss_per_token=True)
    return loss[:, 1:].float().cpu()


def cross_entropy(
    model: Any, tokens: torch.Tensor, fwd_hooks: HookList = (), *, batch_size: int | None = None
) -> float:
    """Mean next-token cross-entropy (nats) over positions ``1 .. L-2`` (see :func:`token_losses`).

    Parameters
    ----------
    model : transformer_lens.HookedTransformer
    tokens : torch.LongTensor
        ``(n_seq, L)``, BOS in column 0.
    fwd_hooks : list of (hook name, hook function), optional
    batch_size : int, optional
        Sequences per forward (default: all at once).

    Returns
    -------
    float
    """
    total, n = 0.0, 0
    for batch in _batches(tokens, batch_size):
        lt = token_losses(model, batch, fwd_hooks).double()
        total += float(lt.sum())
        n += lt.numel()
    return total / n


def delta_ce(
    model: Any, tokens: torch.Tensor, fwd_hooks: HookList, *, batch_size: int | None = None
) -> float:
    r"""Change of cross-entropy loss (nats) caused by ``fwd_hooks``.

    .. math::

        \Delta\mathrm{CE} = \frac{1}{N}\sum_{s,\,p=1}^{L-2}
            \big(\ell^{\text{hooked}}_{s,p} - \ell^{\text{clean}}_{s,p}\big),
        \qquad N = n_\text{seq}(L-2),

    where :math:`\ell_{s,p}` is the loss of predicting token :math:`p+1` of sequence
    :math:`s` at position :math:`p`; position-0 predictions are excluded (BOS
    excluded, paper Sec. 4). Both runs use the same batches, so hooks that do not change
    the forward give exactly 0.

    Parameters
    ----------
    model : transformer_lens.HookedTransformer
    tokens : torch.LongTensor
        ``(n_seq, L)``, BOS in column 0.
    fwd_hooks : list of (hook name, hook function)
    batch_size : int, optional

    Returns
    -------
    float
        Hooked minus clean mean CE, in nats.
    """
    diff, n = 0.0, 0
    for batch in _batches(tokens, batch_size):
        clean = token_losses(model, batch).double()
        hooked = token_losses(model, batch, fwd_hooks).double()
        diff += float((hooked - clean).sum())
        n += clean.numel()
    return diff / n
