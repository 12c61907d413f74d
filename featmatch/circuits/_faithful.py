r"""Faithfulness against node budget on held-out prompts, and how far the linear estimate is
from real ablation.

A circuit :math:`C` is a set of nodes (SAE features and the per-layer SAE error terms, which
are nodes like any other, as in Marks et al. 2024). With every node outside :math:`C`
mean-ablated at all positions but BOS (the means :math:`\bar a_u` of
:func:`~featmatch.circuits.ablation_means`), prompt :math:`p` gives the metric
:math:`m_p(C)`, and

.. math::

    F(C) = \frac{\sum_p m_p(C) - m_p(\varnothing)}{\sum_p m_p(\text{full}) - m_p(\varnothing)}

(a ratio of means over the prompts; Marks et al. 2024, Eq. 5). Its 95 % interval is the
percentile bootstrap over prompts of that ratio (numerator and denominator resampled
together).

Node scores
-----------
* **linear** (attribution patching towards the mean):
  :math:`\hat\delta_p(u) = \sum_{t\ge1} (a^{(p,t)}_u - \bar a_u)\,\partial m_p/\partial a^{(p,t)}_u`,
  the first-order estimate of :math:`m_p(\text{full}) - m_p(\text{all but } u)`; summing it
  over :math:`C` gives the linear estimate of :math:`m(C) - m(\varnothing)` and
  :math:`F_{lin}(C) = \sum_{u\in C}\hat\delta(u) / \sum_{u}\hat\delta(u)`.
* **exact** (for the top candidates by :math:`|\hat\delta|`): the real effect
  :math:`\delta(u) = m(\text{full}) - m(\text{all but } u)` of mean-ablating :math:`u` alone,
  one forward per candidate.

A node budget :math:`n` keeps the :math:`n` nodes with the largest :math:`|\text{score}|`
computed on the **selection** prompts; :math:`F(n)` is measured on **held-out** prompts
never used to rank the nodes.

References
----------
1. Marks et al. *Sparse Feature Circuits*, arXiv:2403.19647, 2024 (faithfulness, error nodes).
2. Kramár et al. *AtP\**, arXiv:2403.00745, 2024 (attribution patching and its failure modes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ._attribution import (
    _check_saes,
    _chunks,
    _clean_metrics,
    _intervened_metrics,
    _keep_masks,
    _metric,
    _n_features,
    _splice_hooks,
    node_id,
)
from ._tasks import TaskPrompts, TaskTokens, tokenize_task

__all__ = [
    "split_prompts",
    "linear_node_scores",
    "exact_node_effects",
    "ratio_ci",
    "ratio_diff_ci",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "smallest_faithful",
    "circuit_nodes",
]


def split_prompts(task: TaskTokens, frac_select: float = 0.5, seed: int = 0) -> tuple[TaskTokens, TaskTokens]:
    """Seeded split of a task into selection and held-out prompts (each non-empty).

    Returns ``(select, held_out)``, each in task order.
    """
    n = len(task)
    if n < 2:
        raise ValueError(f"need at least 2 prompts to hold some out, got {n}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = min(n - 1, max(1, int(round(frac_select * n))))
    return task.subset(np.sort(perm[:k])), task.subset(np.sort(perm[k:]))


def linear_node_scores(
    model,
    saes: Mapping[int, Any],
    task: TaskPrompts | TaskTokens,
    means: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 16,
) -> tuple[pd.DataFrame, np.ndarray]:
    r"""Linear mean-ablation scores :math:`\hat\delta_p(u)` of every node, per prompt.

    Returns
    -------
    (nodes, per_prompt)
        ``nodes``: one row per node (every feature and each layer's error node) with
        ``node_id, layer, feature, kind, score`` (the mean of :math:`\hat\delta_p(u)` over
        prompts) and ``abs_score``; ``per_prompt``: ``(n_prompts, n_nodes)`` float64 in the
        rows' order.
    """
    tt = tokenize_task(model, task)
    sl = _check_saes(saes)
    layers = list(sl)
    n = len(tt)
    per = {L: np.zeros((n, _n_features(sl[L][0]) + 1)) for L in layers}
    with torch.enable_grad():
        for idx, toks, ans, cf in _chunks(tt, batch_size):
            store: dict = {}
            logits = model.run_with_hooks(toks, fwd_hooks=_splice_hooks(sl, store, need_grad=True))
            m = _metric(logits, ans, cf)
            inputs = [store[L][0] for L in layers] + [store[L][1] for L in layers]
            grads = torch.autograd.grad(m.sum(), inputs, allow_unused=True)
            for j, L in enumerate(layers):
                mf, me = means[L]
                if mf.ndim == 2:  # per-position means (position_means): drop BOS like f
                    mf, me = mf[1:], me[1:]
                f, e = store[L][0].detach()[:, 1:], store[L][1].detach()[:, 1:]
                gf = torch.zeros_like(f) if grads[j] is None else grads[j][:, 1:]
                ge = torch.zeros_like(e) if grads[len(layers) + j] is None else grads[len(layers) + j][:, 1:]
                per[L][idx, :-1] = ((f - mf) * gf).sum(1).double().numpy()
                per[L][idx, -1] = ((e - me) * ge).sum((1, 2)).double().numpy()
    rows, cols = [], []
    for L in layers:
        F = _n_features(sl[L][0])
        feats = np.r_[np.arange(F), -1]
        rows.append(
            pd.DataFrame(
                {
                    "node_id": [node_id(L, f) for f in feats],
                    "layer": L,
                    "feature": feats,
                    "kind": ["feature"] * F + ["error"],
                }
            )
        )
        cols.append(per[L])
    nodes = pd.concat(rows, ignore_index=True)
    P = np.concatenate(cols, axis=1)
    nodes["score"] = P.mean(0)
    nodes["abs_score"] = nodes["score"].abs()
    return nodes, P


def exact_node_effects(
    model,
    saes: Mapping[int, Any],
    task: TaskPrompts | TaskTokens,
    nodes: Sequence[tuple[int, int]],
    means: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 16,
) -> np.ndarray:
    r"""Real effects :math:`\delta_p(u) = m_p(\text{full}) - m_p(\text{all but } u)` per prompt.

    One mean-ablation forward per node (``(layer, feature)``, feature −1 = the error node).
    Returns ``(n_prompts, len(nodes))``.
    """
    tt = tokenize_task(model, task)
    sl = _check_saes(saes)
    full, _ = _clean_metrics(model, tt, batch_size)
    specs = [_keep_masks(sl, None, {(int(L), int(f))}) for L, f in nodes]
    m, _ = _intervened_metrics(model, sl, tt, specs, means, batch_size)
    return full[:, None] - m.T


def ratio_ci(
    num: np.ndarray, den: np.ndarray, level: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    r"""``sum(num) / sum(den)`` with its percentile bootstrap interval over units.

    Units (prompts) are resampled jointly (SciPy's :func:`scipy.stats.bootstrap`, ``paired``);
    NaNs when fewer than two units or a zero denominator.
    """
    return _ratios_ci([(num, den)], [1.0], level, n_resamples, seed)


def ratio_diff_ci(
    num_a: np.ndarray,
    den_a: np.ndarray,
    num_b: np.ndarray,
    den_b: np.ndarray,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    r"""``sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b)`` with a paired bootstrap interval.

    The four arrays hold one value per unit (prompt), resampled jointly, as in
    :func:`ratio_ci`: the two ratios are measured on the same prompts.
    """
    return _ratios_ci([(num_a, den_a), (num_b, den_b)], [1.0, -1.0], level, n_resamples, seed)


def _ratios_ci(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    weights: list[float],
    level: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float, float]:
    """``Σ_k w_k sum(num_k)/sum(den_k)`` with a percentile bootstrap over units resampled jointly."""
    arrs = [np.asarray(x, float).ravel() for pair in pairs for x in pair]
    if len({a.shape for a in arrs}) != 1:
        raise ValueError("num and den need one value per unit")

    def stat(*xs, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            return sum(
                w * np.sum(xs[2 * k], axis=axis) / np.sum(xs[2 * k + 1], axis=axis)
                for k, w in enumerate(weights)
            )

    dens = arrs[1::2]
    est = float(stat(*arrs)) if all(d.sum() != 0 for d in dens) else np.nan
    if arrs[0].size < 2 or not np.isfinite(est):
        return est, np.nan, np.nan
    if all(np.ptp(a) == 0 for a in arrs):
        return est, est, est
    res = stats.bootstrap(
        tuple(arrs),
        stat,
        paired=True,
        vectorized=True,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return est, float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class FaithfulnessCurve:
    """F(n) on held-out prompts for one or more node rankings.

    Attributes
    ----------
    table : pandas.DataFrame
        ``ranking, n_nodes, faithfulness, ci_low, ci_high, linear, accuracy`` per budget
        (``linear`` = :math:`F_{lin}` of the same node set on the held-out prompts, NaN
        when not computed).
    per_prompt : dict
        ``(ranking, n) -> (m_p(C) - m_p(∅))`` per held-out prompt, and ``"den"`` ->
        :math:`m_p(\\text{full}) - m_p(\\varnothing)`.
    orders : dict
        ``ranking -> list of (layer, feature)`` in ranking order.
    """

    table: pd.DataFrame
    per_prompt: dict = field(default_factory=dict)
    orders: dict = field(default_factory=dict)


def faithfulness_curve(
    model,
    saes: Mapping[int, Any],
    held_out: TaskTokens,
    orders: Mapping[str, Sequence[tuple[int, int]]],
    budgets: Sequence[int],
    means: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    linear: tuple[pd.DataFrame, np.ndarray] | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> FaithfulnessCurve:
    """F(top-n nodes of each ranking) on held-out prompts, with bootstrap CIs over prompts.

    Parameters
    ----------
    orders : mapping name -> sequence of (layer, feature)
        Node rankings (best first) from the selection prompts.
    budgets : sequence of int
        Node counts n (budgets beyond a ranking's length are clipped to it).
    linear : (nodes, per_prompt), optional
        :func:`linear_node_scores` on the *held-out* prompts, for the linear estimate
        :math:`F_{lin}` of each kept set.
    """
    sl = _check_saes(saes)
    full, acc_full = _clean_metrics(model, held_out, batch_size)
    specs, keys, seen, rows_of = [_keep_masks(sl, set(), None)], [None], {}, []
    for name, order in orders.items():
        order = [(int(L), int(f)) for L, f in order]
        for n in sorted({min(int(b), len(order)) for b in budgets}):
            kept = frozenset(order[:n])
            if kept not in seen:  # the same node set under two rankings is measured once
                seen[kept] = len(specs)
                specs.append(_keep_masks(sl, set(kept), None))
            keys.append((name, n))
            rows_of.append(seen[kept])
    m_u, acc_u = _intervened_metrics(model, sl, held_out, specs, means, batch_size)
    idx = [0, *rows_of]
    m, acc = m_u[idx], acc_u[idx]
    empty = m[0]
    den = full - empty
    lin_score = None
    if linear is not None:
        ln, lp = linear
        lin_score = dict(
            zip(
                zip(ln["layer"].astype(int), ln["feature"].astype(int), strict=False),
                lp.mean(0),
                strict=False,
            )
        )
        lin_total = float(lp.mean(0).sum())
    rows, per = [], {"den": den}
    for r, key in enumerate(keys[1:], start=1):
        name, n = key
        num = m[r] - empty
        f, lo, hi = ratio_ci(num, den, seed=seed)
        lin = np.nan
        if lin_score is not None and lin_total != 0:
            lin = (
                sum(lin_score.get(u, 0.0) for u in [(int(L), int(ff)) for L, ff in orders[name]][:n])
                / lin_total
            )
        rows.append(
            {
                "ranking": name,
                "n_nodes": n,
                "faithfulness": f,
                "ci_low": lo,
                "ci_high": hi,
                "linear": lin,
                "accuracy": float(acc[r].mean()),
            }
        )
        per[key] = num
        per[("correct", *key)] = acc[r].astype(float)
    table = pd.DataFrame(rows)
    table.attrs.update(
        m_full=float(full.mean()),
        m_empty=float(empty.mean()),
        accuracy_full=float(acc_full.mean()),
        accuracy_empty=float(acc[0].mean()),
        n_prompts=len(held_out),
    )
    return FaithfulnessCurve(table, per, {k: [(int(L), int(f)) for L, f in v] for k, v in orders.items()})


def smallest_faithful(curve: FaithfulnessCurve, target: float = 0.8, ranking: str | None = None) -> pd.Series:
    """The smallest budget whose F on held-out prompts reaches ``target``.

    Among all rankings (or the one named), the row with ``faithfulness >= target`` and the
    fewest nodes; when none reaches it, the row with the largest F (``reached`` False).
    The returned row has an added boolean ``reached``.
    """
    t = curve.table if ranking is None else curve.table[curve.table["ranking"] == ranking]
    ok = t[t["faithfulness"] >= target]
    if len(ok):
        row = ok.sort_values(["n_nodes", "faithfulness"], ascending=[True, False]).iloc[0].copy()
        row["reached"] = True
    else:
        row = t.sort_values("faithfulness", ascending=False).iloc[0].copy()
        row["reached"] = False
    return row


def circuit_nodes(curve: FaithfulnessCurve, ranking: str, n: int) -> list[tuple[int, int]]:
    """The node set ``(layer, feature)`` of the top ``n`` of ``ranking``."""
    return list(curve.orders[ranking][: int(n)])


@torch.no_grad()
def position_means(
    model, saes: Mapping[int, Any], task: TaskPrompts | TaskTokens, batch_size: int = 16
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    r"""Per-position mean feature activations and errors over a templated prompt set.

    .. math:: \bar f_L^{(t)} = \frac1N\sum_p f_L(x_p^{(t)}), \qquad
              \bar\varepsilon_L^{(t)} = \frac1N\sum_p \varepsilon_L(x_p^{(t)})

    For prompts that share one template (all of one length), mean-ablating position by
    position keeps what every prompt has in common (the template) and removes what
    distinguishes them (the operands): Marks et al. 2024 treat templatic data position by
    position. Returns ``{layer: (mean_f (T, F), mean_err (T, d))}``, usable wherever
    :func:`~featmatch.circuits.ablation_means` is (broadcast over the batch).

    Raises
    ------
    ValueError
        When the prompts have different lengths.
    """
    tt = tokenize_task(model, task)
    lengths = {t.numel() for t in tt.tokens}
    if len(lengths) != 1:
        raise ValueError(f"position means need prompts of one length; got lengths {sorted(lengths)}")
    sl = _check_saes(saes)
    sums: dict[int, list] = {L: [0.0, 0.0] for L in sl}

    def make(L, sae):
        def fn(x, hook=None):
            f = sae.encode(x)
            e = x - sae.decode(f)
            sums[L][0] = sums[L][0] + f.double().sum(0)
            sums[L][1] = sums[L][1] + e.double().sum(0)

        return fn

    hooks = [(h, make(L, sae)) for L, (sae, h) in sl.items()]
    stop = min(max(sl) + 1, model.cfg.n_layers)
    for _idx, toks, _a, _c in _chunks(tt, batch_size):
        model.run_with_hooks(toks, fwd_hooks=hooks, stop_at_layer=stop)
    n = len(tt)
    return {L: ((s[0] / n).float(), (s[1] / n).float()) for L, s in sums.items()}
