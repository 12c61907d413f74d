"""Support for the Semantic OT chapter (notebook ``04_semantic_ot``): tables, rules, plots.

Everything the notebook computes beyond calling :mod:`featmatch.semantic`,
:mod:`featmatch.evaluation.metrics` and :mod:`featmatch.judging.judges` lives here, so tests can reach it:

* :func:`paper_pairs`: the analogues of the paper's layer pairs for any set of layers;
* :func:`reference_spaces`: several reference spaces from **one** forward pass (the same
  result as :func:`featmatch.semantic.reference_coordinates`, called once per space);
* :func:`score_table`, :func:`judge_pairs`, :func:`judge_table`: per pair and method,
  matching score, activation correlation and the judge's mean label;
* :data:`PAPER_JUDGE` and :func:`paper_layout`: the paper's LLM-judge table with our row
  beside each of its pairs;
* :func:`beats`, :func:`wins_verdict`, :func:`threshold_verdict`: the rules that turn
  numbers into claim verdicts (never hard-coded in the notebook);
* :func:`disagreements`: features of A that two methods match differently, ranked;
* plotting helpers that draw on a given :class:`matplotlib.axes.Axes`.

The paper is Cao, Do and Thai (2026), *Semantic Optimal Transport for Sparse Autoencoder
Feature Matching and Circuit Compression* (arXiv:2605.28567; ``PAPERS.md`` section 2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from featmatch.evaluation.metrics import matching_score

__all__ = [
    "METHODS",
    "PAPER_METHODS",
    "PAPER_JUDGE",
    "paper_pairs",
    "pair_kind",
    "resolve_reference",
    "reference_spaces",
    "score_table",
    "judge_features",
    "judge_pairs",
    "judge_table",
    "paper_layout",
    "beats",
    "wins_verdict",
    "threshold_verdict",
    "disagreements",
    "approximation_sample",
    "plot_method_scores",
    "plot_judge_labels",
    "plot_approximation",
    "plot_reference_spaces",
]

#: Method names used in every table of the chapter (the paper's three columns first).
PAPER_METHODS: tuple[str, ...] = ("Semantic OT", "Feature Flow", "SAE Match")
#: The paper's three methods plus featmatch's many-to-one variant of Semantic OT.
METHODS: tuple[str, ...] = PAPER_METHODS + ("Semantic OT top-1",)

#: LLM-judge scores (1-3) reported by the paper (``PAPERS.md`` section 2.5; the baseline
#: rows come from a third-party copy of its tables). ``kind`` names the analogue pair.
PAPER_JUDGE = pd.DataFrame(
    [
        ("GPT-2 small", 5, 11, "mid→last", 1.56, 1.49, 1.49),
        ("GPT-2 small", 0, 11, "first→last", 1.39, 1.34, 1.27),
        ("GPT-2 small", 5, 6, "adjacent", 2.53, 2.46, 2.25),
        ("Gemma-2-2B", 12, 25, "mid→last", 1.83, 1.26, 1.26),
        ("Gemma-2-2B", 0, 25, "first→last", 1.83, 1.23, 1.21),
        ("Gemma-2-2B", 12, 13, "adjacent", 2.32, 1.51, 1.41),
    ],
    columns=["model", "layer_a", "layer_b", "kind", *PAPER_METHODS],
)

_KIND_ORDER = ("adjacent", "mid→last", "first→last")


# --------------------------------------------------------------------------------------
# Layer pairs
# --------------------------------------------------------------------------------------


def paper_pairs(layers: Sequence[int]) -> list[tuple[int, int]]:
    """Analogues of the paper's layer pairs: adjacent, mid→last, first→last.

    With the layers sorted as :math:`l_0 < \\dots < l_{n-1}`, the *mid* layer is
    :math:`l_{\\lfloor n/2 \\rfloor - 1}`, which reproduces the paper's choice on both of
    its models: GPT-2 small (12 layers) gives 5→6, 5→11, 0→11 and Gemma-2-2B (26 layers)
    gives 12→13, 12→25, 0→25. On SmolLM2-135M (30 layers) it gives 14→15, 14→29, 0→29.

    Returns
    -------
    list of (int, int)
        ``[(mid, next), (mid, last), (first, last)]``, duplicates removed (order kept).
    """
    ls = sorted({int(x) for x in layers})
    if len(ls) < 2:
        raise ValueError(f"need at least two layers, got {ls}")
    i_mid = max(len(ls) // 2 - 1, 0)
    mid, nxt, first, last = ls[i_mid], ls[i_mid + 1], ls[0], ls[-1]
    out: list[tuple[int, int]] = []
    for pair in ((mid, nxt), (mid, last), (first, last)):
        if pair not in out:
            out.append(pair)
    return out


def pair_kind(pair: tuple[int, int], layers: Sequence[int]) -> str:
    """Which of the paper's pair types ``pair`` is (``"adjacent"``, ``"mid→last"``, ...).

    Pairs that are none of :func:`paper_pairs` are ``"other"``.
    """
    names = dict(zip(paper_pairs(layers), _KIND_ORDER, strict=False))
    # when pairs coincide (e.g. 2 layers), the first kind wins, as in paper_pairs
    return names.get((int(pair[0]), int(pair[1])), "other")


# --------------------------------------------------------------------------------------
# Reference spaces from one forward pass
# --------------------------------------------------------------------------------------


def resolve_reference(space: str, n_layers: int) -> tuple[str, str]:
    """Canonical spec and hook name of a reference space (as ``reference_coordinates``).

    ``"layer:L"`` (negative ``L`` counts from the end, ``"layer:mid"`` is
    ``n_layers // 2``), ``"final"`` (the last block's ``hook_resid_post``), ``"embed"``
    (``hook_embed``), or ``"hook:<name>"``.

    Returns
    -------
    (spec, hook_name)
        ``spec`` is the string passed in (kept for naming); ``hook_name`` is the hook.
    """
    if space == "embed":
        return space, "hook_embed"
    if space == "final":
        return space, f"blocks.{n_layers - 1}.hook_resid_post"
    if space.startswith("hook:"):
        return space, space[5:]
    if space.startswith("layer:"):
        arg = space[6:]
        layer = n_layers // 2 if arg == "mid" else int(arg)
        if layer < 0:
            layer += n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"reference layer {arg} out of range for a {n_layers}-layer model")
        return space, f"blocks.{layer}.hook_resid_post"
    raise ValueError(
        f"unknown reference space {space!r}; use 'layer:L', 'layer:mid', 'final', 'embed' or 'hook:<name>'"
    )


def _tokens_sha(tokens: torch.Tensor) -> str:
    # the same hash as featmatch.semantic uses to tie a space to its token batch
    from featmatch import semantic

    fn = getattr(semantic, "_tokens_sha", None)
    if fn is not None:
        return fn(tokens)
    arr = np.ascontiguousarray(np.asarray(tokens.cpu()), dtype=np.int64)  # pragma: no cover
    h = hashlib.sha256()  # pragma: no cover
    for part in (str(arr.shape).encode(), arr.tobytes()):  # pragma: no cover
        h.update(part)
        h.update(b"\x00")
    return h.hexdigest()  # pragma: no cover


def reference_spaces(
    model: Any,
    tokens: torch.Tensor,
    specs: Mapping[str, tuple[str, int | None]],
    batch_size: int = 16,
) -> dict[str, Any]:
    """Several reference spaces of the same tokens from one forward pass.

    Equivalent to calling :func:`featmatch.semantic.reference_coordinates` once per spec
    (same coordinates, same ``name`` and ``space_id``), but the model runs once, up to the
    deepest hook any spec reads.

    Parameters
    ----------
    model : HookedTransformer
    tokens : (n_seq, seq_len) LongTensor
        Column 0 is BOS (excluded from the PCA fit, as in ``ReferenceSpace.from_hidden``).
    specs : mapping label -> (space, pca_k)
        E.g. ``{"layer 15, PCA 32": ("layer:mid", 32), "embedding": ("embed", 32)}``;
        ``pca_k=None`` keeps the raw hidden states.
    batch_size : int
        Sequences per forward.

    Returns
    -------
    dict label -> featmatch.semantic.ReferenceSpace
    """
    from featmatch.semantic._semantic import ReferenceSpace

    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError("tokens must be a (n_seq, seq_len) LongTensor")
    if not specs:
        raise ValueError("specs is empty")
    n_layers = int(model.cfg.n_layers)
    hooks = {label: resolve_reference(space, n_layers)[1] for label, (space, _) in specs.items()}
    wanted = sorted(set(hooks.values()))
    stop: int | None = 0
    for h in wanted:
        if h.startswith("blocks."):
            layer = int(h.split(".")[1])
            stop = None if layer + 1 >= n_layers else max(stop or 0, layer + 1)
            if stop is None:
                break
        elif h not in ("hook_embed", "hook_pos_embed"):
            stop = None
            break
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in wanted}

    def grab(act: torch.Tensor, hook: Any) -> None:
        chunks[hook.name].append(act.detach().float().cpu())

    device = getattr(model.cfg, "device", None) or "cpu"
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            kwargs = {} if stop is None else {"stop_at_layer": stop}
            model.run_with_hooks(batch, fwd_hooks=[(h, grab) for h in wanted], **kwargs)
    hidden = {h: torch.cat(c, 0) for h, c in chunks.items()}
    tsha = _tokens_sha(tokens)
    model_name = getattr(model.cfg, "model_name", "model")
    out = {}
    for label, (space, pca_k) in specs.items():
        hook = hooks[label]
        name = f"{model_name}|{space}|{hook}|pca={pca_k}|tokens={tsha[:12]}"
        out[label] = ReferenceSpace.from_hidden(
            hidden[hook], name=name, pca_k=pca_k, hook_name=hook, tokens_sha=tsha
        )
    return out


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def score_table(
    stats: Any, matchings: Mapping[tuple[int, int], Mapping[str, Any]], common: bool = True
) -> pd.DataFrame:
    """Matching score and activation correlation of every (pair, method).

    Parameters
    ----------
    stats : ActivationStats
        Held-out statistics with ``coact``/``prod_sum`` for every pair.
    matchings : mapping (la, lb) -> mapping method -> Matching
    common : bool
        Average over the features of A that *every* method of the pair matches (default),
        so all methods are scored on the same features; otherwise each method's mean is
        over its own matched features.

    Returns
    -------
    pandas.DataFrame
        Columns ``layer_a, layer_b, pair, method, matching_score, correlation, n_scored,
        n_matched, one_to_one``: means over the scored features of A that fire (see
        :func:`featmatch.evaluation.metrics.matching_score`); ``n_scored`` counts them.
    """
    from featmatch.evaluation.metrics import activation_correlation, matching_score

    rows = []
    for (la, lb), by_method in matchings.items():
        keep = np.ones(len(next(iter(by_method.values())).perm), dtype=bool)
        if common:
            for m in by_method.values():
                keep &= np.asarray(m.perm) >= 0
        for method, m in by_method.items():
            ms = matching_score(stats, la, lb, m).per_feature
            corr = activation_correlation(stats, la, lb, m).per_feature
            ms_k, corr_k = ms[keep & np.isfinite(ms)], corr[keep & np.isfinite(corr)]
            rows.append(
                {
                    "layer_a": int(la),
                    "layer_b": int(lb),
                    "pair": f"{la}→{lb}",
                    "method": method,
                    "matching_score": float(ms_k.mean()) if ms_k.size else float("nan"),
                    "correlation": float(corr_k.mean()) if corr_k.size else float("nan"),
                    "n_scored": int(ms_k.size),
                    "n_matched": int(m.n_matched),
                    "one_to_one": bool(m.is_injective),
                }
            )
    return pd.DataFrame(rows)


def judge_features(
    stats: Any, layer: int, matchings: Mapping[str, Any], n: int, seed: int = 0, min_fires: int = 4
) -> np.ndarray:
    """A seeded sample of features of ``layer`` to judge, the same for every method.

    Candidates fire at least ``min_fires`` times in ``stats`` and are matched by every
    method (so each method is judged on the same features of A and only the chosen
    partner differs). Returns sorted feature ids (at most ``n``).
    """
    fires = np.asarray(stats.fire_count[layer]) >= min_fires
    ok = fires.copy()
    for m in matchings.values():
        ok &= np.asarray(m.perm) >= 0
    cand = np.flatnonzero(ok)
    if len(cand) <= n:
        return cand
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(cand, size=n, replace=False))


def judge_pairs(
    source: Any, layer_a: int, layer_b: int, matchings: Mapping[str, Any], features: Sequence[int]
) -> pd.DataFrame:
    """Text pairs to judge for every method (``matched_pairs`` plus a ``method`` column)."""
    from featmatch.judging.explanations import matched_pairs

    frames = []
    for method, m in matchings.items():
        df = matched_pairs(source, layer_a, layer_b, m, features=features)
        df.insert(0, "method", method)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def judge_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Mean judge label per pair and method, with its standard error and label counts.

    ``verdicts`` is the output of ``judge.score_many`` on :func:`judge_pairs` frames
    (columns ``method, layer_a, layer_b, label, judge``); malformed/missing labels are
    left out. Returns columns ``layer_a, layer_b, pair, method, judge_mean, judge_se,
    n_judged, DIFFERENT, MAYBE, SAME, judge``.
    """
    rows = []
    for (la, lb, method), g in verdicts.groupby(["layer_a", "layer_b", "method"], sort=False):
        lab = g["label"].dropna().astype(float).to_numpy()
        n = len(lab)
        rows.append(
            {
                "layer_a": int(la),
                "layer_b": int(lb),
                "pair": f"{la}→{lb}",
                "method": method,
                "judge_mean": float(lab.mean()) if n else float("nan"),
                "judge_se": float(lab.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                "n_judged": n,
                "DIFFERENT": int((lab == 1).sum()),
                "MAYBE": int((lab == 2).sum()),
                "SAME": int((lab == 3).sum()),
                "judge": ",".join(sorted({str(j) for j in g["judge"] if j})),
            }
        )
    return pd.DataFrame(rows)


def paper_layout(
    ours: pd.DataFrame,
    model_label: str,
    layers: Sequence[int],
    value: str = "judge_mean",
    source: str = "ours",
) -> pd.DataFrame:
    """The paper's judge table with our numbers beside each analogous pair.

    Parameters
    ----------
    ours : DataFrame
        Long format with ``layer_a, layer_b, method`` and the ``value`` column
        (e.g. :func:`judge_table`).
    model_label : str
        Our model's name as shown (e.g. ``"SmolLM2-135M (featmatch zoo quick)"``).
    layers : sequence of int
        Our SAE set's layers (to name our pairs' kinds, :func:`pair_kind`).
    value : str
        Column of ``ours`` to show.
    source : str
        Text of the ``source`` column for our rows.

    Returns
    -------
    pandas.DataFrame
        Columns ``kind, model, pair, source, Semantic OT, Feature Flow, SAE Match``,
        grouped by kind (adjacent, mid→last, first→last), the paper's rows first.
    """
    wide = ours.pivot_table(index=["layer_a", "layer_b"], columns="method", values=value, aggfunc="first")
    rows = []
    for (la, lb), r in wide.iterrows():
        rows.append(
            {
                "kind": pair_kind((la, lb), layers),
                "model": model_label,
                "pair": f"{la}→{lb}",
                "source": source,
                **{m: float(r[m]) if m in r.index else float("nan") for m in PAPER_METHODS},
            }
        )
    paper = PAPER_JUDGE.assign(
        pair=[f"{a}→{b}" for a, b in zip(PAPER_JUDGE.layer_a, PAPER_JUDGE.layer_b, strict=True)],
        source="paper (LLM judge)",
    )[["kind", "model", "pair", "source", *PAPER_METHODS]]
    table = pd.concat([paper, pd.DataFrame(rows)], ignore_index=True)
    order = {k: i for i, k in enumerate((*_KIND_ORDER, "other"))}
    table["_k"] = table["kind"].map(order)
    table["_s"] = (table["source"] != "paper (LLM judge)").astype(int)
    return table.sort_values(["_k", "_s"], kind="stable").drop(columns=["_k", "_s"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Verdict rules
# --------------------------------------------------------------------------------------


def beats(
    table: pd.DataFrame,
    value: str,
    method: str = "Semantic OT",
    baselines: Sequence[str] = ("Feature Flow", "SAE Match"),
    margin: float = 0.0,
) -> pd.Series:
    """Per pair: does ``method`` exceed every baseline's ``value`` by more than ``margin``?

    ``table`` is long format (``pair, method, value``). A NaN on either side counts as
    not beating. Returns a boolean Series indexed by ``pair`` (in table order).
    """
    wide = table.pivot_table(index="pair", columns="method", values=value, aggfunc="first", sort=False)
    ok = pd.Series(True, index=wide.index)
    for b in baselines:
        ok &= (wide[method] - wide[b]) > margin
    return ok.fillna(False).astype(bool)


def wins_verdict(wins: Sequence[bool] | pd.Series) -> str:
    """``"held"`` if every entry is true, ``"failed"`` if none is, ``"mixed"`` otherwise.

    An empty input is ``"not tested"``.
    """
    w = [bool(x) for x in wins]
    if not w:
        return "not tested"
    if all(w):
        return "held"
    if not any(w):
        return "failed"
    return "mixed"


def threshold_verdict(values: Sequence[float], goal: float) -> str:
    """``wins_verdict`` of ``value >= goal`` (NaN counts as missing the goal)."""
    return wins_verdict([bool(np.isfinite(v) and v >= goal) for v in values])


# --------------------------------------------------------------------------------------
# Disagreements
# --------------------------------------------------------------------------------------


def disagreements(
    stats: Any, la: int, lb: int, m_first: Any, m_second: Any, n: int = 2, min_fires: int = 4
) -> pd.DataFrame:
    """Features of A that two matchings send to different features of B, ranked.

    For every feature ``i`` of ``la`` that fires at least ``min_fires`` times and is
    matched by both to different partners, the per-feature matching scores
    ``P(f_B[pi(i)] > 0 | f_A[i] > 0)`` of the two partners are compared. The ``n``
    features where the *first* matching's partner wins by most, then the ``n`` where the
    *second* wins by most, are returned (so both directions are shown).

    Returns
    -------
    pandas.DataFrame
        Columns ``feature_a, b_first, b_second, score_first, score_second, gap, winner,
        fires``; ``gap = score_first - score_second``.
    """
    pa, pb = np.asarray(m_first.perm), np.asarray(m_second.perm)
    s1 = matching_score(stats, la, lb, pa).per_feature
    s2 = matching_score(stats, la, lb, pb).per_feature
    fires = np.asarray(stats.fire_count[la])
    ok = (pa >= 0) & (pb >= 0) & (pa != pb) & (fires >= min_fires) & np.isfinite(s1) & np.isfinite(s2)
    idx = np.flatnonzero(ok)
    df = pd.DataFrame(
        {
            "feature_a": idx,
            "b_first": pa[idx],
            "b_second": pb[idx],
            "score_first": s1[idx],
            "score_second": s2[idx],
            "gap": s1[idx] - s2[idx],
            "fires": fires[idx],
        }
    )
    top = df[df.gap > 0].sort_values(["gap", "fires"], ascending=False, kind="stable").head(n)
    bottom = df[df.gap < 0].sort_values(["gap", "fires"], ascending=[True, False], kind="stable").head(n)
    out = pd.concat([top.assign(winner="first"), bottom.assign(winner="second")], ignore_index=True)
    return out[["feature_a", "b_first", "b_second", "score_first", "score_second", "gap", "winner", "fires"]]


def approximation_sample(
    a: Any, b: Any, methods: Mapping[str, tuple[str, dict]], n_pairs: int, seed: int = 0
) -> pd.DataFrame:
    """Exact and approximate distances on a seeded sample of pairs (for a scatter plot).

    ``methods`` maps a label to ``(method, kwargs)`` of
    :func:`featmatch.semantic.pair_distances`. Returns columns ``row_a, row_b, exact``
    and one column per label.
    """
    from featmatch.semantic._semantic import pair_distances

    total = len(a) * len(b)
    if total == 0:
        raise ValueError("no pairs: one of the sets is empty")
    n = min(int(n_pairs), total)
    flat = np.random.default_rng(seed).choice(total, size=n, replace=False)
    pairs = np.stack([flat // len(b), flat % len(b)], 1)
    out = pd.DataFrame({"row_a": pairs[:, 0], "row_b": pairs[:, 1]})
    out["exact"] = pair_distances(a, b, pairs, "exact")
    for label, (method, kw) in methods.items():
        out[label] = pair_distances(a, b, pairs, method, **kw)
    return out


# --------------------------------------------------------------------------------------
# Plots (each draws on the Axes it is given and returns it)
# --------------------------------------------------------------------------------------


def plot_method_scores(ax: Any, table: pd.DataFrame, value: str, ylabel: str, title: str) -> Any:
    """Grouped bars: one group per pair, one bar per method."""
    wide = table.pivot_table(index="pair", columns="method", values=value, aggfunc="first", sort=False)
    methods = [m for m in METHODS if m in wide.columns] + [m for m in wide.columns if m not in METHODS]
    x = np.arange(len(wide.index))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, wide[m].to_numpy(), width, label=m)
    ax.set_xticks(x, [f"layers {p}" for p in wide.index])
    ax.set_xlabel("layer pair (A→B)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_judge_labels(ax: Any, jt: pd.DataFrame, judge_name: str) -> Any:
    """Stacked bars of the label shares (DIFFERENT / MAYBE / SAME) per pair and method."""
    labels = [f"{r.pair}\n{r.method}" for r in jt.itertuples()]
    n = jt["n_judged"].clip(lower=1).to_numpy()
    bottom = np.zeros(len(jt))
    for name, colour in (("DIFFERENT", "#d62728"), ("MAYBE", "#ffbf00"), ("SAME", "#2ca02c")):
        share = jt[name].to_numpy() / n
        ax.barh(np.arange(len(jt)), share, left=bottom, color=colour, label=name)
        bottom += share
    ax.set_yticks(np.arange(len(jt)), labels, fontsize="x-small")
    ax.invert_yaxis()
    ax.set_xlabel("share of judged pairs")
    ax.set_ylabel("layer pair, method")
    ax.set_title(f"Judge labels ({judge_name})")
    ax.legend(fontsize="small", loc="lower right")
    return ax


def plot_approximation(ax: Any, sample: pd.DataFrame, label: str, rho: float | None = None) -> Any:
    """Scatter of one approximation against the exact distance, with its fitted scale."""
    x, y = sample["exact"].to_numpy(), sample[label].to_numpy()
    ax.scatter(x, y, s=6, alpha=0.5)
    denom = float(y @ y)
    if denom > 0:
        s = float(y @ x) / denom  # least squares W ≈ s * approx
        grid = np.linspace(0, x.max(), 2)
        ax.plot(grid, grid / s, color="k", lw=1, label=f"exact / {s:.3g}")
        ax.legend(fontsize="small")
    ax.set_xlabel("exact $W_2$")
    ax.set_ylabel(f"{label} distance")
    ax.set_title(f"{label} vs exact" + (f" (Spearman {rho:.3f})" if rho is not None else ""))
    return ax


def plot_reference_spaces(ax: Any, table: pd.DataFrame, value: str, xlabel: str, title: str) -> Any:
    """Horizontal bars of one score per reference-space choice (``table`` has ``space``)."""
    ax.barh(np.arange(len(table)), table[value].to_numpy())
    ax.set_yticks(np.arange(len(table)), table["space"].tolist(), fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reference space")
    ax.set_title(title)
    return ax
