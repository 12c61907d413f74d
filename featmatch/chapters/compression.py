r"""Support for the circuit-compression notebook (``notebooks/05_circuit_compression``).

Everything the notebook computes beyond calls into :mod:`featmatch.circuits`,
:mod:`featmatch.semantic` and :mod:`featmatch.judging.judges` lives here, so that tests reach it:

* :func:`load_circuit_setup`: the model, the SAEs of the chosen layers and held-out tokens,
  without (re)building SAEs of layers the notebook does not use.
* :func:`semantic_ot_distance`: the Semantic OT distance between the feature nodes of an
  attribution graph, from activation samples and a reference space.
* :func:`graph_summary`, :func:`distance_agreement`: tables about the graph and about how
  the four node distances relate.
* :func:`comparison_table`: the paper's layout (methods as rows, the paper's "accuracy"
  beside featmatch's scores).
* :func:`score_outcomes`, :func:`beats_verdict`, :func:`band_verdict`: the rules that turn
  numbers into the claims table's verdicts.
* :func:`plot_accuracy_by_format`, :func:`plot_faithfulness_curves`: figure helpers that
  draw on a given Axes.

The paper (Cao, Do, Thai 2026, arXiv:2605.28567) reports one "accuracy" per method for
compressing Neuronpedia circuits to about 10 % of their nodes without defining it; the
numbers are kept in :data:`PAPER_ACCURACY` and are never compared arithmetically with ours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "METHOD_LABELS",
    "PAPER_ACCURACY",
    "SCORE_COLUMNS",
    "COMPARED_SCORES",
    "TIES",
    "PROFILE_DEFAULTS",
    "resolve_defaults",
    "load_circuit_setup",
    "semantic_ot_distance",
    "describe_feature",
    "judge_chance_level",
    "graph_summary",
    "distance_agreement",
    "supernode_overview",
    "comparison_table",
    "compared_scores",
    "score_outcomes",
    "beats_verdict",
    "band_verdict",
    "plot_accuracy_by_format",
    "plot_faithfulness_curves",
]

#: Method keys used by the notebook -> labels in the paper's table.
METHOD_LABELS: dict[str, str] = {
    "semantic_ot": "Semantic OT",
    "decoder_cosine": "Feature Flow (decoder cosine)",
    "sae_match": "SAE Match",
    "layer": "layer adjacency",
}

#: The paper's circuit-compression "accuracy" (undefined in the sources; PAPERS.md §2.6).
PAPER_ACCURACY: dict[str, dict[str, float]] = {
    "semantic_ot": {"GPT-2 small": 68.12, "Gemma-2-2B": 61.51},
    "decoder_cosine": {"GPT-2 small": 66.55, "Gemma-2-2B": 53.49},
    "sae_match": {"GPT-2 small": 55.55, "Gemma-2-2B": 55.63},
}

#: featmatch's scores shown in the comparison table: summary key -> (column label,
#: higher is better, factor applied for display).
SCORE_COLUMNS: dict[str, tuple[str, bool, float]] = {
    "compression_ratio": ("compression ratio", True, 1.0),
    "faithfulness_auc_nodes": ("faithfulness: nodes", True, 1.0),
    "faithfulness_auc_supernodes": ("faithfulness: supernodes", True, 1.0),
    "additivity_error": ("additivity error (lower better)", False, 1.0),
    "accuracy_auc_supernodes": ("accuracy kept %", True, 100.0),
    "judge_mean": ("judge agreement (1-3)", True, 1.0),
}

#: The scores on which two grouping methods are compared (score -> higher is better), and
#: the tolerance below which a difference counts as a tie. The compression ratio is equal
#: by construction and node-level faithfulness does not depend on the grouping.
COMPARED_SCORES: dict[str, bool] = {
    "faithfulness_auc_supernodes": True,
    "additivity_error": False,
    "accuracy_auc_supernodes": True,
    "judge_mean": True,
}
TIES: dict[str, float] = {
    "faithfulness_auc_supernodes": 0.02,
    "additivity_error": 0.02,
    "accuracy_auc_supernodes": 0.02,
    "judge_mean": 0.05,
}

#: Small, profile-dependent defaults of the notebook's parameters (``None`` there means
#: "take it from here"). ``tiny`` is sized for CI (about a minute of compute), ``quick``
#: for the book on two shared CPU cores.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"LAYERS": [2, 4, 6], "N_PROMPTS": 4, "NODE_BUDGET": 20, "N_ACC": 4, "N_TOKENS": 1024},
    "quick": {"LAYERS": [6, 12, 18, 24], "N_PROMPTS": 8, "NODE_BUDGET": 40, "N_ACC": 16, "N_TOKENS": 2048},
    "full": {
        "LAYERS": [3, 6, 9, 12, 15, 18, 21, 24, 27],
        "N_PROMPTS": 32,
        "NODE_BUDGET": 150,
        "N_ACC": 55,
        "N_TOKENS": 16384,
    },
}


def resolve_defaults(profile: str, **given: Any) -> dict[str, Any]:
    """The parameters in ``given``, with each ``None`` replaced by the profile's default.

    Unknown profiles (e.g. a hub model's run) fall back to the ``quick`` defaults.
    """
    base = PROFILE_DEFAULTS.get(profile, PROFILE_DEFAULTS["quick"])
    out = {k: (base.get(k) if v is None else v) for k, v in given.items()}
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise ValueError(f"no default for {missing} in profile {profile!r}")
    return out


# ----------------------------------------------------------------------------- setup
def load_circuit_setup(
    model: str = "smollm2-135m",
    sae_set: str | None = None,
    layers: Sequence[int] | None = None,
    n_tokens: int = 4096,
    seq_len: int = 128,
    seed: int = 0,
    profile: str | None = None,
):
    """Like :func:`featmatch.chapters.setup.load_setup`, but builds no SAE it does not need.

    ``load_setup`` builds (or finishes building) the *whole* zoo profile before loading a
    layer subset. When every requested zoo layer is already built and verified, this
    function loads just those layers; otherwise (or for hub SAE sets, or ``layers=None``) it
    defers to ``load_setup``, which builds what is missing.

    Returns
    -------
    featmatch.chapters.setup.Setup
    """
    from featmatch.chapters.setup import Setup, default_profile, load_setup

    profile = profile or default_profile()
    set_name = sae_set or f"featmatch-smollm2-{profile}"
    kwargs = dict(model=model, sae_set=sae_set, layers=layers, n_tokens=n_tokens, seq_len=seq_len, seed=seed)
    if layers is None or not set_name.startswith("featmatch-"):
        return load_setup(**kwargs, profile=profile)
    from featmatch.saes._sae import load_layer_sae

    try:
        saes = {int(L): load_layer_sae(set_name, int(L)) for L in layers}
    except FileNotFoundError:
        return load_setup(**kwargs, profile=profile)
    from featmatch.lm.corpus import token_batches
    from featmatch.lm.models import load_model

    hooked = load_model(model)
    tokens = token_batches(hooked.tokenizer, n_tokens=n_tokens, seq_len=seq_len, split="eval", seed=seed)
    return Setup(model, set_name, [int(L) for L in layers], hooked, saes, tokens, profile=profile)


# ----------------------------------------------------------------------------- distances
def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def semantic_ot_distance(
    graph: Any,
    samples: Mapping[int, tuple[Any, Any]],
    ref: Any,
    n: int | None = None,
    method: str = "exact",
    seed: int = 0,
) -> tuple[np.ndarray, list[str]]:
    r"""Semantic OT distance between the feature nodes of an attribution graph.

    Node :math:`u = (l, i)` is represented by the activation-weighted distribution
    :math:`\mu_u` of the reference-space coordinates of the positions where feature
    :math:`i` of layer :math:`l` fires (:meth:`featmatch.semantic.FeatureDistributions.from_samples`
    on the reservoir ``samples[l]``), and

    .. math:: D_{uv} = W_2(\mu_u, \mu_v)

    (:func:`featmatch.semantic.distance_matrix`). A node whose feature has no usable sample
    (it never fired on the sample tokens) has no distribution; its distances are set to the
    largest finite distance of the matrix (1 when there is none), so it joins a supernode
    last, and it is listed in the second return value.

    Parameters
    ----------
    graph : featmatch.circuits.AttributionGraph
    samples : mapping int -> (positions (F, N), values (F, N))
        ``ActivationStats.samples`` of (at least) the graph's layers, gathered on the
        tokens of ``ref``.
    ref : featmatch.semantic.ReferenceSpace
    n : int, optional
        Samples per feature (default: all).
    method : {"exact", "sinkhorn", "sliced"}
    seed : int
        Seed of the sample subsampling and of sliced directions.

    Returns
    -------
    (D, missing) : ((n_feat, n_feat) ndarray, list of str)
        The matrix in ``graph.feature_nodes()`` order and the node ids without samples.
    """
    from featmatch.circuits import node_distance, node_id
    from featmatch.semantic._semantic import FeatureDistributions, distance_matrix

    fn = graph.feature_nodes()
    dists: dict[int, Any] = {}
    rows: dict[int, dict[int, int]] = {}
    missing: list[str] = []
    for L in sorted(set(fn["layer"].astype(int))):
        if L not in samples:
            raise ValueError(f"no activation samples for layer {L}")
        feats = fn.loc[fn["layer"] == L, "feature"].to_numpy(dtype=np.int64)
        pos, val = (_as_numpy(x) for x in samples[L])
        if feats.max(initial=-1) >= pos.shape[0]:
            raise ValueError(f"layer {L}: feature {feats.max()} beyond the {pos.shape[0]} sampled features")
        d = FeatureDistributions.from_samples(
            pos[feats], val[feats], ref, n=n, seed=seed, feature_ids=feats, layer=L, n_features=pos.shape[0]
        )
        dists[L] = d
        rows[L] = {int(f): r for r, f in enumerate(d.feature_ids)}
        missing += [node_id(L, int(f)) for f in d.empty]

    def pair(la, fa, lb, fb):
        out = np.full((len(fa), len(fb)), np.nan)
        ia = [k for k, f in enumerate(fa) if int(f) in rows[la]]
        ib = [k for k, f in enumerate(fb) if int(f) in rows[lb]]
        if ia and ib:
            a = dists[la].subset([rows[la][int(fa[k])] for k in ia])
            b = dists[lb].subset([rows[lb][int(fb[k])] for k in ib])
            out[np.ix_(ia, ib)] = distance_matrix(a, b, method=method, seed=seed, progress=False)
        return out

    D = node_distance(graph, pair)
    finite = D[np.isfinite(D)]
    fill = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    D = np.where(np.isfinite(D), D, fill)
    np.fill_diagonal(D, 0.0)
    return D, missing


def describe_feature(
    source: Any, mode: str = "examples", missing: str = "(no activating context recorded)"
) -> Callable[[int, int], str]:
    """A ``(layer, feature) -> str`` text source for judges that never returns ``None``.

    Parameters
    ----------
    source : object
        With ``explain(layer, feature) -> str | None`` and, for ``mode="examples"``,
        ``examples(layer, feature) -> list[str]`` (e.g.
        :class:`featmatch.judging.explanations.ContextExplanations`).
    mode : {"examples", "explain"}
        ``"examples"``: the activating snippets joined by `` ; `` (what the paper's judge
        sees); ``"explain"``: the source's full summary.
    missing : str
        Text for a feature without any recorded context.
    """
    if mode not in ("examples", "explain"):
        raise ValueError(f"mode must be 'examples' or 'explain', got {mode!r}")

    def describe(layer: int, feature: int) -> str:
        if mode == "examples":
            text = " ; ".join(source.examples(int(layer), int(feature))) or None
        else:
            text = source.explain(int(layer), int(feature))
        return missing if text is None else str(text)

    return describe


def judge_chance_level(
    graph: Any, judge: Any, describe: Callable[[int, int], str], n_pairs: int = 12, seed: int = 0
) -> pd.DataFrame:
    """Judge labels of random pairs of the graph's feature nodes, ignoring any grouping.

    The reference level for within-supernode judge agreement: a grouping whose pairs are
    judged no more alike than random pairs of circuit features carries no semantic signal
    the judge can see. Returns the frame of :func:`featmatch.circuits.judge_agreement`.
    """
    from featmatch.circuits import Supernodes, judge_agreement

    labels = np.where((graph.nodes["kind"] == "feature").to_numpy(), 0, -1)
    one = Supernodes(labels=labels, names=["all features"], method="random pairs")
    return judge_agreement(graph, one, judge, describe, max_pairs=n_pairs, seed=seed)


def distance_agreement(distances: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Spearman rank correlation between node-distance matrices (upper triangles).

    Returns a square DataFrame indexed and labelled by the keys of ``distances``; NaN where
    a matrix is constant or there are fewer than two pairs.
    """
    from scipy.stats import spearmanr

    keys = list(distances)
    if not keys:
        return pd.DataFrame()
    n = np.asarray(distances[keys[0]]).shape[0]
    iu = np.triu_indices(n, 1)
    vecs = {}
    for k in keys:
        D = np.asarray(distances[k], dtype=np.float64)
        if D.shape != (n, n):
            raise ValueError(f"distance {k!r} has shape {D.shape}, expected {(n, n)}")
        vecs[k] = D[iu]
    out = pd.DataFrame(np.nan, index=keys, columns=keys)
    for a in keys:
        for b in keys:
            va, vb = vecs[a], vecs[b]
            if len(va) >= 2 and np.ptp(va) > 0 and np.ptp(vb) > 0:
                out.loc[a, b] = float(spearmanr(va, vb).statistic)
    return out


# ----------------------------------------------------------------------------- tables
def graph_summary(graph: Any) -> pd.DataFrame:
    """Per-layer summary of an attribution graph.

    Columns: ``layer``, ``n_candidates`` (features with a non-zero activation or
    attribution), ``n_feature_nodes`` (kept), ``error_node_kept``, ``attr_kept_features``
    (sum of the kept features' attributions), ``attr_error`` (the error node's attribution),
    ``attr_layer_total`` (all features plus error: the attribution-patching estimate of
    zero-ablating the layer).
    """
    nodes, cand = graph.nodes, graph.candidates
    totals = graph.meta.get("total_attribution", {})
    rows = []
    for L in graph.layers:
        n_l = nodes[nodes["layer"] == L]
        c_l = cand[cand["layer"] == L]
        err = c_l.loc[c_l["kind"] == "error", "attribution"]
        total = float(totals.get(L, c_l["attribution"].sum()))
        rows.append(
            {
                "layer": int(L),
                "n_candidates": int((c_l["kind"] == "feature").sum()),
                "n_feature_nodes": int((n_l["kind"] == "feature").sum()),
                "error_node_kept": bool((n_l["kind"] == "error").any()),
                "attr_kept_features": float(n_l.loc[n_l["kind"] == "feature", "attribution"].sum()),
                "attr_error": float(err.iloc[0]) if len(err) else np.nan,
                "attr_layer_total": total,
            }
        )
    return pd.DataFrame(rows)


def supernode_overview(graph: Any, groups: Mapping[str, Any]) -> pd.DataFrame:
    """One column per grouping: supernode counts, largest size, share spanning several layers.

    ``groups`` maps a method key to its :class:`featmatch.circuits.Supernodes`; columns are
    labelled by :data:`METHOD_LABELS`.
    """
    out = {}
    for key, g in groups.items():
        tab = g.table(graph)
        feat = tab[tab["kind"] == "feature"]
        out[METHOD_LABELS.get(key, key)] = {
            "supernodes (error singletons included)": int(g.n_supernodes),
            "feature supernodes": int(len(feat)),
            "largest supernode (nodes)": int(feat["n_members"].max()) if len(feat) else 0,
            "share of feature supernodes spanning >1 layer": float(
                (feat["max_layer"] > feat["min_layer"]).mean()
            )
            if len(feat)
            else np.nan,
        }
    return pd.DataFrame(out)


def comparison_table(summary: pd.DataFrame, model_label: str) -> pd.DataFrame:
    """The paper's layout: one row per method, the paper's "accuracy" beside our scores.

    Parameters
    ----------
    summary : pandas.DataFrame
        :func:`featmatch.circuits.compare_methods` summary, indexed by method key (keys of
        :data:`METHOD_LABELS`; other keys are shown as they are).
    model_label : str
        The model (and SAEs) our numbers come from, shown in the column header.

    Returns
    -------
    pandas.DataFrame
        Rows labelled by method; two-level columns ``("paper: GPT-2 small", "accuracy")``,
        ``("paper: Gemma-2-2B", "accuracy")`` and ``(f"ours: {model_label}", score)`` for
        every score of :data:`SCORE_COLUMNS` present in ``summary``. Paper cells are NaN for
        methods the paper did not report.
    """
    cols: dict[tuple[str, str], list[float]] = {}
    keys = list(summary.index)
    for model in ("GPT-2 small", "Gemma-2-2B"):
        cols[(f"paper: {model}", "accuracy (undefined)")] = [
            PAPER_ACCURACY.get(k, {}).get(model, np.nan) for k in keys
        ]
    for key, (label, _hib, factor) in SCORE_COLUMNS.items():
        if key in summary.columns:
            cols[(f"ours: {model_label}", label)] = [float(summary.loc[k, key]) * factor for k in keys]
    out = pd.DataFrame(cols, index=pd.Index([METHOD_LABELS.get(k, k) for k in keys], name="method"))
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    return out


# ----------------------------------------------------------------------------- verdicts
def compared_scores(faithfulness_graph: float, min_faithfulness: float = 0.5) -> dict[str, bool]:
    """The scores a "beats" comparison may use, given the whole graph's faithfulness.

    When keeping the whole graph recovers less than ``min_faithfulness`` of the metric (or
    the value is NaN), the faithfulness and task-accuracy curves measure a circuit that does
    not carry the behaviour, so only coherence (additivity error) and judge agreement are
    compared. Otherwise all of :data:`COMPARED_SCORES`.
    """
    f = float(faithfulness_graph)
    if np.isfinite(f) and f >= min_faithfulness:
        return dict(COMPARED_SCORES)
    return {k: v for k, v in COMPARED_SCORES.items() if k in ("additivity_error", "judge_mean")}


def score_outcomes(
    summary: pd.DataFrame,
    ours: str,
    baseline: str,
    scores: Mapping[str, bool] | None = None,
    tol: Mapping[str, float] | float = TIES,
) -> pd.DataFrame:
    """Compare two methods score by score.

    Parameters
    ----------
    summary : pandas.DataFrame
        Indexed by method key, one column per score.
    ours, baseline : str
        Index keys of the two methods.
    scores : mapping score -> higher_is_better, optional
        Default :data:`COMPARED_SCORES`.
    tol : float or mapping score -> float
        Differences with ``|ours - baseline| <= tol`` are ties (default 0.02 for scores not
        in the mapping).

    Returns
    -------
    pandas.DataFrame
        ``score, ours, baseline, difference`` (oriented so that positive favours ``ours``),
        ``outcome`` in ``{"win", "loss", "tie", "n/a"}`` (n/a when either value is NaN).
    """
    if scores is None:
        scores = COMPARED_SCORES
    rows = []
    for key, higher in scores.items():
        a, b = float(summary.loc[ours, key]), float(summary.loc[baseline, key])
        t = float(tol.get(key, 0.02)) if isinstance(tol, Mapping) else float(tol)
        diff = (a - b) if higher else (b - a)
        if not (np.isfinite(a) and np.isfinite(b)):
            outcome = "n/a"
        elif diff > t:
            outcome = "win"
        elif diff < -t:
            outcome = "loss"
        else:
            outcome = "tie"
        rows.append({"score": key, "ours": a, "baseline": b, "difference": diff, "outcome": outcome})
    return pd.DataFrame(rows, columns=["score", "ours", "baseline", "difference", "outcome"])


def beats_verdict(outcomes: pd.DataFrame | Sequence[str]) -> str:
    """Verdict of the claim "ours beats the baseline" from per-score outcomes.

    ``"held"``: at least one win and no loss; ``"failed"``: no win (losses or ties only);
    ``"mixed"``: wins and losses; ``"not tested"``: no comparable score (all n/a).
    """
    out = list(outcomes["outcome"]) if isinstance(outcomes, pd.DataFrame) else list(outcomes)
    bad = set(out) - {"win", "loss", "tie", "n/a"}
    if bad:
        raise ValueError(f"unknown outcomes {sorted(bad)}")
    wins, losses = out.count("win"), out.count("loss")
    if wins + losses + out.count("tie") == 0:
        return "not tested"
    if wins and not losses:
        return "held"
    if not wins:
        return "failed"
    return "mixed"


def band_verdict(value: float, held: float, failed: float, higher_is_better: bool = True) -> str:
    """Verdict of a one-number check: ``held`` / ``failed`` thresholds, ``mixed`` between.

    With ``higher_is_better``: ``value >= held`` -> "held", ``value < failed`` -> "failed";
    otherwise the inequalities are reversed. NaN gives "not tested".
    """
    if higher_is_better and held < failed or not higher_is_better and held > failed:
        raise ValueError("the 'held' threshold must be on the good side of the 'failed' threshold")
    v = float(value)
    if not np.isfinite(v):
        return "not tested"
    if higher_is_better:
        return "held" if v >= held else "failed" if v < failed else "mixed"
    return "held" if v <= held else "failed" if v > failed else "mixed"


# ----------------------------------------------------------------------------- figures
def plot_accuracy_by_format(acc: pd.DataFrame, ax: Any, chosen: Sequence[str] = ()) -> Any:
    """Horizontal bars of per-format accuracy (:func:`featmatch.circuits.accuracy_by_format`).

    The formats in ``chosen`` are drawn in a strong colour; each bar is labelled
    ``n_correct/n``. Returns the Axes.
    """
    df = acc.reset_index(drop=True)
    y = np.arange(len(df))
    colors = ["tab:orange" if f in set(chosen) else "tab:gray" for f in df["format"]]
    ax.barh(y, 100 * df["accuracy"].to_numpy(dtype=float), color=colors)
    for yi, r in zip(y, df.itertuples(index=False), strict=True):
        ax.text(100 * r.accuracy + 1, yi, f"{r.n_correct}/{r.n}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(df["format"])
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("greedy accuracy (%)")
    ax.set_ylabel("prompt format")
    ax.set_title("Digit addition: accuracy per prompt format" + (" (orange: used)" if chosen else ""))
    return ax


def plot_faithfulness_curves(
    curves: pd.DataFrame, ax: Any, labels: Mapping[str, str] | None = None, y: str = "faithfulness"
) -> Any:
    """Faithfulness (or ``y="accuracy"``) against the number of nodes kept, per method.

    ``curves`` is the tidy frame of :func:`featmatch.circuits.compare_methods` (columns
    ``method, level, k, n_nodes`` and ``y``). Supernode level: solid line with markers;
    node level at the same node counts: dashed line in the same colour. Returns the Axes.
    """
    labels = dict(METHOD_LABELS if labels is None else labels)
    for i, (method, df) in enumerate(curves.groupby("method", sort=False)):
        color = f"C{i}"
        sn = df[df["level"] == "supernode"].sort_values("k")
        nd = df[df["level"] == "node"].sort_values("k")
        name = labels.get(method, method)
        ax.plot(sn["n_nodes"], sn[y], "-o", color=color, ms=3, label=f"{name}: supernodes")
        ax.plot(nd["n_nodes"], nd[y], "--", color=color, alpha=0.6, label=f"{name}: nodes")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("nodes kept (top-k supernodes, or the same number of top nodes)")
    ax.set_ylabel(y if y != "faithfulness" else "faithfulness F(C)")
    ax.set_title(f"{'Faithfulness' if y == 'faithfulness' else y.capitalize()} as the circuit grows")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return ax
