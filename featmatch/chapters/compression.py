r"""Support for the circuit-compression notebook (``notebooks/05_circuit_compression``).

Everything the notebook computes beyond calls into :mod:`featmatch.circuits`,
:mod:`featmatch.semantic` and :mod:`featmatch.judging.judges` lives here, so that tests reach it:

* :func:`load_circuit_setup`: the model, the SAEs of the chosen layers and held-out tokens,
  without (re)building SAEs of layers the notebook does not use.
* :func:`pick_prompts`, :func:`linearisation_layers`: the prompts the graph aggregates and
  the layers of the linearisation check.
* :func:`semantic_ot_distance`, :func:`node_distances`, :func:`group_by_distance`: the
  four node distances of an attribution graph and the supernodes they give.
* :func:`graph_summary`, :func:`distance_agreement`, :func:`supernode_overview`: tables
  about the graph, how the four node distances relate and the groupings.
* :func:`describe_feature`, :func:`judge_chance_level`: the judge's texts and its level on
  random pairs.
* :func:`comparison_table`: the paper's layout (methods as rows, the paper's "accuracy"
  beside featmatch's scores).
* :func:`export_circuit`: the compressed graph as circuit-tracer / Neuronpedia JSON,
  reloaded and validated.
* :func:`compared_scores`, :func:`score_outcomes`, :func:`compression_claims`: the rules
  that turn numbers into the claims table's verdicts (through
  :mod:`featmatch.chapters.claims`), with their thresholds as module constants.
* :class:`Stopwatch`: the notebook's lap timer.
* :func:`plot_accuracy_by_format`, :func:`plot_faithfulness_curves`: figures that draw on a
  given Axes.

The paper (Cao, Do, Thai 2026, arXiv:2605.28567) reports one "accuracy" per method for
compressing Neuronpedia circuits to about 10 % of their nodes without defining it; the
numbers are kept in :data:`PAPER_ACCURACY` and are never compared arithmetically with ours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from featmatch.chapters.claims import Claim, verdict_outcomes, verdict_threshold

__all__ = [
    "METHOD_LABELS",
    "PAPER_ACCURACY",
    "SCORE_COLUMNS",
    "COMPARED_SCORES",
    "TIES",
    "MIN_FAITHFULNESS",
    "COMPRESSION_HELD",
    "COMPRESSION_FAILED",
    "LINEARISATION_HELD",
    "LINEARISATION_FAILED",
    "FAITHFUL_HELD",
    "FAITHFUL_FAILED",
    "Stopwatch",
    "load_circuit_setup",
    "pick_prompts",
    "linearisation_layers",
    "semantic_ot_distance",
    "node_distances",
    "group_by_distance",
    "describe_feature",
    "judge_chance_level",
    "graph_summary",
    "distance_agreement",
    "supernode_overview",
    "comparison_table",
    "export_circuit",
    "compared_scores",
    "score_outcomes",
    "paper_source",
    "compression_claims",
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

#: Whole-graph faithfulness below which the faithfulness and task-accuracy curves describe a
#: circuit that does not carry the behaviour, so a "beats" claim compares only coherence
#: and judge agreement (:func:`compared_scores`; featmatch's rule).
MIN_FAITHFULNESS: float = 0.5

#: "Circuits compress to about 10 % of their nodes" (paper §2.6): supernodes / nodes (error
#: singletons included) at most this is *held* ...
COMPRESSION_HELD: float = 0.15
#: ... and at least this is *failed* (featmatch's band around the paper's "about 10 %").
COMPRESSION_FAILED: float = 0.30

#: "Node attributions predict the metric change" (featmatch issue 7): median relative error
#: of the attribution-patching prediction at the smallest step, at most this is *held* ...
LINEARISATION_HELD: float = 0.10
#: ... and at least this is *failed*.
LINEARISATION_FAILED: float = 0.30

#: "The graph is faithful" (Marks et al. 2024, the faithfulness of Sparse Feature Circuits):
#: faithfulness of the whole graph at least this is *held* ...
FAITHFUL_HELD: float = 0.8
#: ... and at most this is *failed* (the same level as :data:`MIN_FAITHFULNESS`).
FAITHFUL_FAILED: float = 0.5


class Stopwatch:
    """Lap timer: seconds spent between successive :meth:`lap` calls, by name.

    Examples
    --------
    >>> sw = Stopwatch()
    >>> sw.lap("load")
    >>> list(sw.laps)
    ['load']
    """

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._start = self._last = self._clock()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap (or the start) under ``name``."""
        now = self._clock()
        self.laps[name] = now - self._last
        self._last = now

    def table(self) -> pd.DataFrame:
        """The laps and the total since the start, in seconds (one decimal), one column."""
        times = {**self.laps, "total": self._clock() - self._start}
        return pd.Series(times, name="seconds").round(1).to_frame()


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


def pick_prompts(task: Any, n: int, seed: int = 0) -> Any:
    """A seeded sample of ``n`` prompts of ``task`` (all of them when fewer), in task order.

    Parameters
    ----------
    task : featmatch.circuits.TaskTokens
        E.g. the correctly answered prompts of :func:`featmatch.circuits.keep_correct`.
    n : int
    seed : int

    Returns
    -------
    featmatch.circuits.TaskTokens
        ``task.subset`` of the sorted sample.
    """
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(task), size=min(n, len(task)), replace=False))
    return task.subset(pick)


def linearisation_layers(layers: Sequence[int], given: Sequence[int] | None = None) -> list[int]:
    """The layers of the linearisation check: ``given``, or the first and last of ``layers``.

    Examples
    --------
    >>> linearisation_layers([2, 4, 6])
    [2, 6]
    >>> linearisation_layers([5])
    [5]
    """
    return list(given) if given else sorted({layers[0], layers[-1]})


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


def node_distances(
    graph: Any,
    saes: Mapping[int, Any],
    samples: Mapping[int, tuple[Any, Any]],
    ref: Any,
    method: str = "exact",
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The four node distances of the chapter, keyed like :data:`METHOD_LABELS`.

    ``semantic_ot`` (:func:`semantic_ot_distance`), ``decoder_cosine`` (Feature Flow),
    ``sae_match`` (folded decoder MSE) and ``layer`` (layer adjacency), all in
    ``graph.feature_nodes()`` order.

    Returns
    -------
    (dict str -> ndarray, list of str)
        The matrices and the feature nodes without activation samples.
    """
    from featmatch.circuits import decoder_cosine_distance, layer_distance, sae_match_distance

    D: dict[str, np.ndarray] = {}
    D["semantic_ot"], missing = semantic_ot_distance(graph, samples, ref, method=method, seed=seed)
    D["decoder_cosine"] = decoder_cosine_distance(graph, saes)
    D["sae_match"] = sae_match_distance(graph, saes)
    D["layer"] = layer_distance(graph)
    return D, missing


def group_by_distance(graph: Any, distances: Mapping[str, np.ndarray], fraction: float) -> dict[str, Any]:
    """Supernodes of ``graph`` for every distance (:func:`featmatch.circuits.supernodes`).

    Each grouping keeps about ``fraction`` feature supernodes per feature node and is named
    by :data:`METHOD_LABELS`.
    """
    from featmatch.circuits import supernodes

    return {
        k: supernodes(graph, d, fraction=fraction, name=METHOD_LABELS.get(k, k)) for k, d in distances.items()
    }


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


def export_circuit(
    path: str | Any,
    graph: Any,
    groups: Any,
    *,
    model_name: str,
    sae_set: str,
    tokenizer: Any,
    prompt: Sequence[int] | Any,
    explainer: Any,
    n_layers: int,
    clerp_chars: int = 120,
) -> tuple[Any, pd.DataFrame, pd.DataFrame, list[list[str]]]:
    """Write the compressed graph as circuit-tracer / Neuronpedia JSON, reload and validate it.

    The graph's slug is ``featmatch-<model_name>-digit-addition``; each feature node's
    ``clerp`` is the first ``clerp_chars`` characters of ``explainer.explain`` (empty when
    the feature has no recorded context); the prompt is shown token by token.

    Parameters
    ----------
    path : path-like
        The JSON file.
    graph : featmatch.circuits.AttributionGraph
    groups : featmatch.circuits.Supernodes
        The grouping exported.
    model_name, sae_set : str
        Written as the scan and the SAE ids (``<sae_set>:<layer>``).
    tokenizer
        Decodes the prompt's tokens.
    prompt : sequence of int
        Token ids of the prompt shown.
    explainer : ContextExplanations
    n_layers : int
        Layers of the model.

    Returns
    -------
    (pathlib.Path, pandas.DataFrame, pandas.DataFrame, list)
        The path and :func:`featmatch.circuits.graph_from_json` of the reloaded file
        (nodes including the metric node, links, supernodes).

    Raises
    ------
    ValueError
        When the written file does not validate.
    """
    from pathlib import Path

    from featmatch.circuits import export_graph_json, graph_from_json, load_graph_json

    json_path = export_graph_json(
        Path(path),
        graph,
        groups,
        slug=f"featmatch-{model_name}-digit-addition",
        scan=model_name,
        sae_ids=[f"{sae_set}:{L}" for L in graph.layers],
        prompt_tokens=[tokenizer.decode([int(t)]) for t in prompt],
        clerps={
            r.node_id: (explainer.explain(r.layer, r.feature) or "")[:clerp_chars]
            for r in graph.feature_nodes().itertuples()
        },
        n_layers=n_layers,
    )
    nodes, links, supernodes = graph_from_json(load_graph_json(json_path))  # validates
    return json_path, nodes, links, supernodes


# ----------------------------------------------------------------------------- verdicts
def compared_scores(faithfulness_graph: float, min_faithfulness: float = MIN_FAITHFULNESS) -> dict[str, bool]:
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


def paper_source(baseline: str) -> str:
    """The source of "Semantic OT beats ``baseline``": paper §2.6 with its two accuracies.

    Built from :data:`PAPER_ACCURACY`; a baseline the paper does not report is featmatch's.

    Examples
    --------
    >>> paper_source("decoder_cosine")
    'paper §2.6 (68.12 vs 66.55 GPT-2; 61.51 vs 53.49 Gemma)'
    >>> paper_source("layer")
    'featmatch (not in the paper)'
    """
    if baseline not in PAPER_ACCURACY:
        return "featmatch (not in the paper)"
    ours, base = PAPER_ACCURACY["semantic_ot"], PAPER_ACCURACY[baseline]
    return (
        f"paper §2.6 ({ours['GPT-2 small']:.2f} vs {base['GPT-2 small']:.2f} GPT-2; "
        f"{ours['Gemma-2-2B']:.2f} vs {base['Gemma-2-2B']:.2f} Gemma)"
    )


def compression_claims(
    summary: pd.DataFrame,
    lin: pd.DataFrame,
    n_nodes: int,
    shown: str = "semantic_ot",
    baselines: Sequence[str] = ("decoder_cosine", "sae_match", "layer"),
) -> tuple[list[Claim], pd.DataFrame]:
    """The chapter's claims, each with its verdict computed from the numbers.

    * "``shown`` beats baseline X": :func:`score_outcomes` on :func:`compared_scores` of the
      whole graph's faithfulness, verdict by
      :func:`featmatch.chapters.claims.verdict_outcomes`.
    * Compression to about 10 %: supernodes / nodes, :func:`~featmatch.chapters.claims.verdict_threshold`
      with :data:`COMPRESSION_HELD` / :data:`COMPRESSION_FAILED`.
    * Linearisation: median relative error over the checked layers at the smallest step,
      with :data:`LINEARISATION_HELD` / :data:`LINEARISATION_FAILED`.
    * Faithful graph: faithfulness of the whole graph, with :data:`FAITHFUL_HELD` /
      :data:`FAITHFUL_FAILED`.

    Parameters
    ----------
    summary : pandas.DataFrame
        :func:`featmatch.circuits.compare_methods` summary, indexed by method key, with
        ``faithfulness_graph``, ``n_supernodes``, ``n_nodes`` and the compared scores.
    lin : pandas.DataFrame
        :func:`featmatch.circuits.linearisation_check` (``scale``, ``rel_error``).
    n_nodes : int
        Nodes of the graph (shown in the text).
    shown : str
        The method whose claims these are.
    baselines : sequence of str
        Method keys it is compared with.

    Returns
    -------
    (list of Claim, pandas.DataFrame)
        The claims, and the per-score outcomes (rows: scores; columns: baselines labelled by
        :data:`METHOD_LABELS`).
    """
    claims, details = [], {}
    f_graph = float(summary.loc[shown, "faithfulness_graph"])
    scores = compared_scores(f_graph)  # faithfulness-based scores only when the graph is faithful
    for base in baselines:
        oc = score_outcomes(summary, shown, base, scores=scores)
        details[METHOD_LABELS.get(base, base)] = oc.set_index("score")["outcome"]
        won = ", ".join(f"{r.score} {r.outcome} ({r.ours:.3g} vs {r.baseline:.3g})" for r in oc.itertuples())
        claims.append(
            Claim(
                f"{METHOD_LABELS.get(shown, shown)} supernodes beat {METHOD_LABELS.get(base, base)}",
                paper_source(base),
                won,
                verdict_outcomes(oc),
            )
        )
    ratio = summary.loc[shown, "n_supernodes"] / summary.loc[shown, "n_nodes"]
    claims.append(
        Claim(
            "Circuits compress to about 10 % of their nodes",
            "paper §2.6",
            f"{summary.loc[shown, 'n_supernodes']} supernodes / {n_nodes} nodes = {ratio:.2f}",
            verdict_threshold(float(ratio), COMPRESSION_HELD, COMPRESSION_FAILED),
        )
    )
    s_min = float(lin["scale"].min())
    lin_err = float(lin.loc[lin["scale"] == s_min, "rel_error"].median())
    claims.append(
        Claim(
            f"Node attributions predict the metric change (s = {s_min:g})",
            "featmatch issue 7",
            f"median relative error {lin_err:.3f} (s = 1: "
            f"{float(lin.loc[lin['scale'] == 1.0, 'rel_error'].median()):.3f})",
            verdict_threshold(lin_err, LINEARISATION_HELD, LINEARISATION_FAILED),
        )
    )
    claims.append(
        Claim(
            f"The {n_nodes}-node graph is faithful",
            "Marks et al. 2024 (method)",
            f"F(graph) = {f_graph:.3f}",
            verdict_threshold(f_graph, FAITHFUL_HELD, FAITHFUL_FAILED),
        )
    )
    return claims, pd.DataFrame(details)
