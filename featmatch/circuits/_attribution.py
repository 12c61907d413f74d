r"""Attribution graphs over SAE features (attribution patching, Sparse Feature Circuits).

Splicing
--------
At every chosen layer :math:`L` the residual stream :math:`x` (hook
``blocks.{L}.hook_resid_post`` unless the SAE's metadata names another hook) is replaced by

.. math::

    x' = \mathrm{dec}(f) + \varepsilon, \qquad f = \mathrm{enc}(x), \qquad
    \varepsilon = x - \mathrm{dec}(\mathrm{enc}(x)),

with :math:`\varepsilon` computed through its *own* call of the encoder. The forward pass is
unchanged (:math:`x' = x`), the gradient reaching :math:`x` is the model's true gradient, and
the gradients with respect to the feature activations :math:`f` and the error node
:math:`\varepsilon` are :math:`\partial m/\partial f = W_{dec}\,\partial m/\partial x'` and
:math:`\partial m/\partial\varepsilon = \partial m/\partial x'` (Marks et al. 2024).

Nodes and edges
---------------
Position 0 (BOS, an attention sink) is never attributed and never ablated. A node is one SAE
feature (or the error term) of one layer, summed over the other positions, and averaged over
the prompts (Marks et al. 2024 sum over positions for non-templatic data):

.. math::

    \mathrm{attr}(u) = \frac{1}{N}\sum_{n=1}^{N}\sum_{t\ge 1} a_u^{(n,t)}\,
    \frac{\partial m^{(n)}}{\partial a_u^{(n,t)}},

the attribution-patching estimate of the effect of zero-ablating :math:`u`
(:math:`m_{clean} - m_{u=0} \approx \mathrm{attr}(u)`). For an error node the product is the
inner product :math:`\langle\varepsilon, \partial m/\partial\varepsilon\rangle`.

Edges join nodes of consecutive chosen layers :math:`L_i < L_{i+1}`. Following SFC's
:math:`\hat{\mathrm{IE}}(u\to d) = \nabla_d m\;\nabla_u d\;(u_{patch}-u_{clean})` with a zero
patch and the activation×gradient sign convention,

.. math::

    w(u \to d) = \frac{1}{N}\sum_{n}\sum_{t,s\ge 1} a_u^{(n,s)}\,
    \frac{\partial}{\partial a_u^{(n,s)}}\Big[\operatorname{sg}\!\Big(\frac{\partial m^{(n)}}
    {\partial a_d^{(n,t)}}\Big)\, a_d^{(n,t)}\Big],

where sg stops the gradient (the downstream gradient is held at its clean value) and the
Jacobian :math:`\partial a_d / \partial a_u` runs through the model between the two layers,
with the downstream layer's encoder. For a downstream error node
:math:`a_d\,\partial m/\partial a_d` is the inner product :math:`\langle\operatorname{sg}(g_\varepsilon),\varepsilon\rangle`.
Nodes of the last chosen layer connect to the metric node ``"logit"`` with weight
:math:`\mathrm{attr}(u)`.

References
----------
1. S. Marks, C. Rager, E. J. Michaud, Y. Belinkov, D. Bau, A. Mueller. *Sparse Feature
   Circuits: Discovering and Editing Interpretable Causal Graphs in Language Models*.
   arXiv:2403.19647, 2024.
2. J. Kramár, T. Lieberum, R. Shah, N. Nanda. *AtP\*: An efficient and scalable method for
   localizing LLM behaviour to components*. arXiv:2403.00745, 2024.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from featmatch._hooks import block_index, hook_name

from ._tasks import TaskPrompts, TaskTokens, tokenize_task

__all__ = [
    "AttributionGraph",
    "attribution_graph",
    "ablation_means",
    "linearisation_check",
    "node_id",
    "LOGIT_NODE",
]

LOGIT_NODE = "logit"


def node_id(layer: int, feature: int) -> str:
    """Internal node id: ``"{layer}_{feature}"``, or ``"{layer}_err"`` for ``feature == -1``."""
    return f"{int(layer)}_err" if int(feature) < 0 else f"{int(layer)}_{int(feature)}"


# ----------------------------------------------------------------------------- plumbing
def _check_saes(saes: Mapping[int, object]) -> dict[int, tuple[object, str]]:
    """Sorted ``{layer: (sae, hook_name)}``; checks the hook names match the layers."""
    if not saes:
        raise ValueError("need at least one SAE")
    out: dict[int, tuple[object, str]] = {}
    for layer in sorted(int(k) for k in saes):
        sae = saes[layer]
        hook = hook_name(sae, layer)
        hook_layer = block_index(hook)
        if hook_layer is not None and hook_layer != layer:
            raise ValueError(f"SAE given for layer {layer} reads hook {hook!r} (layer {hook_layer})")
        out[layer] = (sae, hook)
    return out


def _n_features(sae) -> int:
    return int(sae.W_dec.shape[0])


def _metric(logits: torch.Tensor, ans: torch.Tensor, cf: torch.Tensor | None) -> torch.Tensor:
    last = logits[:, -1, :]
    m = last.gather(1, ans[:, None])[:, 0]
    if cf is not None:
        m = m - last.gather(1, cf[:, None])[:, 0]
    return m


def _chunks(tt: TaskTokens, batch_size: int):
    for grp in tt.groups():
        for s in range(0, len(grp), batch_size):
            idx = grp[s : s + batch_size]
            yield (idx, *tt.batch(idx))


def _splice_hooks(sl: dict, store: dict, need_grad: bool):
    """Forward hooks that splice ``dec(enc(x)) + err`` and record ``(f, err)`` per layer."""
    hooks = []
    for layer, (sae, hook) in sl.items():

        def fn(x, hook=None, layer=layer, sae=sae):
            if need_grad and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            f = sae.encode(x)
            err = x - sae.decode(sae.encode(x))
            store[layer] = (f, err)
            return sae.decode(f) + err

        hooks.append((hook, fn))
    return hooks


# ----------------------------------------------------------------------------- node pass
@dataclass
class _NodeStats:
    attr_f: dict[int, np.ndarray]
    attr_e: dict[int, float]
    act_f: dict[int, np.ndarray]
    act_e: dict[int, float]
    frac_active: dict[int, np.ndarray]
    metric: np.ndarray  # (n_prompts,)


def _node_pass(model, sl: dict, tt: TaskTokens, batch_size: int) -> _NodeStats:
    layers = list(sl)
    n = len(tt)
    attr_f = {L: np.zeros(_n_features(sl[L][0])) for L in layers}
    act_f = {L: np.zeros(_n_features(sl[L][0])) for L in layers}
    active = {L: np.zeros(_n_features(sl[L][0])) for L in layers}
    attr_e = dict.fromkeys(layers, 0.0)
    act_e = dict.fromkeys(layers, 0.0)
    metric = np.zeros(n)
    with torch.enable_grad():
        for idx, toks, ans, cf in _chunks(tt, batch_size):
            store: dict = {}
            logits = model.run_with_hooks(toks, fwd_hooks=_splice_hooks(sl, store, need_grad=True))
            m = _metric(logits, ans, cf)
            inputs = [store[L][0] for L in layers] + [store[L][1] for L in layers]
            grads = torch.autograd.grad(m.sum(), inputs, allow_unused=True)
            for j, L in enumerate(layers):
                f, e = store[L][0].detach()[:, 1:], store[L][1].detach()[:, 1:]
                gf, ge = grads[j], grads[len(layers) + j]
                gf = torch.zeros_like(store[L][0]) if gf is None else gf
                ge = torch.zeros_like(store[L][1]) if ge is None else ge
                attr_f[L] += (f * gf[:, 1:]).sum((0, 1)).double().numpy()
                attr_e[L] += float((e * ge[:, 1:]).sum())
                act_f[L] += f.sum((0, 1)).double().numpy()
                active[L] += (f > 0).any(1).sum(0).double().numpy()
                act_e[L] += float(e.norm(dim=-1).sum())
            metric[idx] = m.detach().double().numpy()
    return _NodeStats(
        attr_f={L: v / n for L, v in attr_f.items()},
        attr_e={L: v / n for L, v in attr_e.items()},
        act_f={L: v / n for L, v in act_f.items()},
        act_e={L: v / n for L, v in act_e.items()},
        frac_active={L: v / n for L, v in active.items()},
        metric=metric,
    )


# ----------------------------------------------------------------------------- edge pass
def _batched_grad(outputs: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of each output scalar wrt ``inputs``: list of ``(n_out, *input.shape)``."""
    eye = torch.eye(outputs.numel(), dtype=outputs.dtype)
    try:
        gs = torch.autograd.grad(outputs, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
        return [
            torch.zeros((outputs.numel(), *x.shape)) if g is None else g
            for g, x in zip(gs, inputs, strict=False)
        ]
    except RuntimeError:  # vmap over the backward not supported by some op: loop
        rows = [
            torch.autograd.grad(o, inputs, retain_graph=True, allow_unused=True) for o in outputs.unbind(0)
        ]
        return [
            torch.stack([torch.zeros_like(x) if r[k] is None else r[k] for r in rows])
            for k, x in enumerate(inputs)
        ]


def _edge_pass(
    model, sl: dict, tt: TaskTokens, kept: dict[int, np.ndarray], batch_size: int, edge_chunk: int
) -> list[tuple[str, str, float]]:
    """Edge weights between kept nodes of consecutive layers (means over prompts)."""
    layers = list(sl)
    n = len(tt)
    acc: dict[tuple[str, str], float] = {}
    with torch.enable_grad():
        for _idx, toks, ans, cf in _chunks(tt, batch_size):
            store: dict = {}
            logits = model.run_with_hooks(toks, fwd_hooks=_splice_hooks(sl, store, need_grad=True))
            m = _metric(logits, ans, cf)
            inputs = [store[L][0] for L in layers] + [store[L][1] for L in layers]
            grads = torch.autograd.grad(m.sum(), inputs, retain_graph=True, allow_unused=True)
            gmap = {
                L: tuple(
                    torch.zeros_like(store[L][k])
                    if grads[k * len(layers) + j] is None
                    else grads[k * len(layers) + j]
                    for k in (0, 1)
                )
                for j, L in enumerate(layers)
            }
            for lu, ld in zip(layers[:-1], layers[1:], strict=False):
                up, down = kept[lu], kept[ld]
                if len(up) == 0 or len(down) == 0:
                    continue
                fu, eu = store[lu]
                fd, ed = store[ld]
                gfd, ged = gmap[ld]
                outs = []
                for d in down:
                    if d >= 0:
                        outs.append((gfd[:, 1:, d] * fd[:, 1:, d]).sum())
                    else:
                        outs.append((ged[:, 1:] * ed[:, 1:]).sum())
                up_f = torch.as_tensor(up[up >= 0], dtype=torch.long)
                has_err = bool((up < 0).any())
                au = fu.detach()[:, 1:][..., up_f]  # (B, T-1, U)
                ae = eu.detach()[:, 1:]
                for s in range(0, len(outs), edge_chunk):
                    S = torch.stack(outs[s : s + edge_chunk])
                    Gf, Ge = _batched_grad(S, [fu, eu])
                    wf = torch.einsum("dbtu,btu->du", Gf[:, :, 1:][..., up_f], au).double().numpy()
                    we = torch.einsum("dbtk,btk->d", Ge[:, :, 1:], ae).double().numpy()
                    for r, d in enumerate(down[s : s + edge_chunk]):
                        dst = node_id(ld, d)
                        for c, u in enumerate(up_f.tolist()):
                            key = (node_id(lu, u), dst)
                            acc[key] = acc.get(key, 0.0) + float(wf[r, c])
                        if has_err:
                            key = (node_id(lu, -1), dst)
                            acc[key] = acc.get(key, 0.0) + float(we[r])
            del store, grads, gmap
    return [(s, d, w / n) for (s, d), w in acc.items()]


# ----------------------------------------------------------------------------- graph
@dataclass
class AttributionGraph:
    """An attribution graph over SAE features, aggregated over a prompt set.

    Attributes
    ----------
    nodes : pandas.DataFrame
        One row per kept node, sorted by layer then decreasing ``|attribution|``. Columns:
        ``node_id`` (``"{layer}_{feature}"`` or ``"{layer}_err"``), ``layer``, ``feature``
        (−1 for error nodes), ``kind`` (``"feature"``/``"error"``), ``activation`` (mean over
        prompts of the activation summed over positions; ‖ε‖ summed for error nodes),
        ``frac_active`` (fraction of prompts where the feature fires), ``attribution``
        (mean activation × gradient, see the module docstring), ``abs_attribution``.
    edges : pandas.DataFrame
        ``src``, ``dst`` (node ids; ``"logit"`` is the metric node), ``weight``,
        ``src_layer``, ``dst_layer``.
    metric : float
        Mean clean metric over the prompts.
    metric_name : str
        ``"answer_logit"`` or ``"logit_diff"``.
    layers : tuple of int
        The layers with SAEs (all features of these layers are candidate nodes).
    task : TaskTokens
        The prompts the graph aggregates.
    candidates : pandas.DataFrame
        Every node with non-zero attribution before pruning (same columns as ``nodes``).
    meta : dict
        Settings and totals (``node_budget``, ``n_prompts``, ``total_attribution`` per layer).
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    metric: float
    metric_name: str
    layers: tuple[int, ...]
    task: TaskTokens
    candidates: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        """Number of kept nodes (features and error nodes)."""
        return len(self.nodes)

    @property
    def prompts(self) -> list[str]:
        """Prompt texts."""
        return list(self.task.prompts)

    def feature_nodes(self) -> pd.DataFrame:
        """The feature rows of :attr:`nodes` (error nodes dropped), in node order."""
        return self.nodes[self.nodes["kind"] == "feature"]

    def kept(self) -> dict[int, np.ndarray]:
        """``{layer: feature indices}`` of the kept nodes (−1 stands for the error node)."""
        return {L: self.nodes.loc[self.nodes["layer"] == L, "feature"].to_numpy() for L in self.layers}


def _node_frame(stats: _NodeStats, layers: Sequence[int]) -> pd.DataFrame:
    parts = []
    for L in layers:
        F = len(stats.attr_f[L])
        feats = np.arange(F)
        nz = np.flatnonzero((stats.attr_f[L] != 0) | (stats.act_f[L] != 0))
        parts.append(
            pd.DataFrame(
                {
                    "layer": L,
                    "feature": feats[nz],
                    "kind": "feature",
                    "activation": stats.act_f[L][nz],
                    "frac_active": stats.frac_active[L][nz],
                    "attribution": stats.attr_f[L][nz],
                }
            )
        )
        parts.append(
            pd.DataFrame(
                {
                    "layer": [L],
                    "feature": [-1],
                    "kind": ["error"],
                    "activation": [stats.act_e[L]],
                    "frac_active": [1.0],
                    "attribution": [stats.attr_e[L]],
                }
            )
        )
    df = pd.concat(parts, ignore_index=True)
    df["abs_attribution"] = df["attribution"].abs()
    df.insert(0, "node_id", [node_id(L, f) for L, f in zip(df["layer"], df["feature"], strict=False)])
    df["layer"] = df["layer"].astype(int)
    df["feature"] = df["feature"].astype(int)
    return df


def attribution_graph(
    model,
    saes: Mapping[int, object],
    task: TaskPrompts | TaskTokens,
    node_budget: int = 100,
    edges: bool = True,
    batch_size: int = 16,
    edge_chunk: int = 32,
    keep: Sequence[tuple[int, int]] | None = None,
) -> AttributionGraph:
    r"""Attribution graph of the task metric over the SAE features of the given layers.

    Node effects are activation × gradient with SAE error nodes (see the module docstring for
    the splicing and the exact formulas), averaged over the prompts; the ``node_budget``
    nodes with the largest :math:`|\mathrm{attr}|` (features and error nodes compete alike)
    are kept; edges are computed between kept nodes of consecutive chosen layers, plus
    last-layer → ``"logit"``.

    Parameters
    ----------
    model : transformer_lens.HookedTransformer
    saes : mapping int -> sae_lens.SAE
        SAE per layer, reading ``blocks.{layer}.hook_resid_post`` (or the hook in its metadata).
    task : TaskPrompts or TaskTokens
        Prompts; keep only correctly answered ones first (:func:`keep_correct`).
    node_budget : int
        Number of nodes kept.
    edges : bool
        Compute edges (one batched backward per downstream node and prompt batch).
    batch_size : int
        Prompts per forward (prompts are batched by equal length).
    edge_chunk : int
        Downstream nodes per vectorised backward.
    keep : sequence of (layer, feature), optional
        Keep exactly these nodes (feature −1 = error node) instead of the top
        ``node_budget`` by attribution, e.g. a circuit chosen by its faithfulness on
        held-out prompts (:func:`featmatch.circuits.faithfulness_curve`).

    Returns
    -------
    AttributionGraph

    References
    ----------
    Marks et al. 2024, *Sparse Feature Circuits*, arXiv:2403.19647 (Eq. 2–4).
    """
    if node_budget < 1:
        raise ValueError("node_budget must be >= 1")
    tt = tokenize_task(model, task)
    sl = _check_saes(saes)
    layers = tuple(sl)
    stats = _node_pass(model, sl, tt, batch_size)
    cand = _node_frame(stats, layers)
    if keep is None:
        kept = cand.sort_values(["abs_attribution", "layer", "feature"], ascending=[False, True, True]).head(
            node_budget
        )
    else:
        want = {node_id(int(L), int(f)) for L, f in keep}
        bad = sorted({int(L) for L, _f in keep} - set(layers))
        if bad:
            raise ValueError(f"keep names layers {bad} without an SAE (layers {list(layers)})")
        kept = cand[cand["node_id"].isin(want)]
        absent = sorted(want - set(kept["node_id"]))
        if absent:  # features that never fired and had no gradient on these prompts
            extra = pd.DataFrame(
                [
                    {
                        "node_id": a,
                        "layer": int(a.split("_")[0]),
                        "feature": int(a.split("_")[1]),
                        "kind": "feature",
                        "activation": 0.0,
                        "frac_active": 0.0,
                        "attribution": 0.0,
                        "abs_attribution": 0.0,
                    }
                    for a in absent
                ]
            )
            kept = pd.concat([kept, extra[kept.columns]], ignore_index=True)
        node_budget = len(kept)
    nodes = kept.sort_values(["layer", "abs_attribution", "feature"], ascending=[True, False, True])
    nodes = nodes.reset_index(drop=True)
    graph = AttributionGraph(
        nodes=nodes,
        edges=pd.DataFrame(columns=["src", "dst", "weight", "src_layer", "dst_layer"]),
        metric=float(stats.metric.mean()),
        metric_name=tt.metric_name,
        layers=layers,
        task=tt,
        candidates=cand.sort_values(["layer", "feature"]).reset_index(drop=True),
        meta={
            "node_budget": int(node_budget),
            "n_prompts": len(tt),
            "hooks": {L: h for L, (_s, h) in sl.items()},
            "total_attribution": {L: float(stats.attr_f[L].sum() + stats.attr_e[L]) for L in layers},
            "metric_per_prompt": stats.metric.tolist(),
        },
    )
    rows: list[tuple[str, str, float]] = []
    if edges:
        rows += _edge_pass(model, sl, tt, graph.kept(), batch_size, edge_chunk)
    last = nodes[nodes["layer"] == layers[-1]]
    rows += [
        (nid, LOGIT_NODE, float(a)) for nid, a in zip(last["node_id"], last["attribution"], strict=False)
    ]
    lay = dict(zip(nodes["node_id"], nodes["layer"], strict=False))
    lay[LOGIT_NODE] = max(layers) + 1
    e = pd.DataFrame(rows, columns=["src", "dst", "weight"])
    e["src_layer"] = e["src"].map(lay).astype(int)
    e["dst_layer"] = e["dst"].map(lay).astype(int)
    graph.edges = e
    return graph


# ----------------------------------------------------------------------------- ablations
@torch.no_grad()
def ablation_means(
    model, saes: Mapping[int, object], tokens: torch.Tensor | TaskTokens, batch_size: int = 16
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    r"""Mean feature activations and mean error per layer over a reference token set.

    .. math::

        \bar f_L = \frac{1}{|P|}\sum_{p\in P} f_L(x_p), \qquad
        \bar\varepsilon_L = \frac{1}{|P|}\sum_{p\in P} \big(x_p - \mathrm{dec}(f_L(x_p))\big),

    over the clean (unspliced) residual streams at all positions ``p`` except BOS (column 0).

    Parameters
    ----------
    tokens : (n_seq, seq_len) LongTensor or TaskTokens
        Reference tokens with BOS in column 0 (e.g. ``featmatch.lm.corpus.token_batches``), or
        the task prompts themselves.

    Returns
    -------
    dict int -> (mean_f (F,), mean_err (d,))
    """
    sl = _check_saes(saes)
    sums = {L: [None, None, 0] for L in sl}

    def make(L, sae):
        def fn(x, hook=None):
            xs = x[:, 1:].reshape(-1, x.shape[-1])
            f = sae.encode(xs)
            e = xs - sae.decode(f)
            s = sums[L]
            s[0] = f.sum(0).double() if s[0] is None else s[0] + f.sum(0).double()
            s[1] = e.sum(0).double() if s[1] is None else s[1] + e.sum(0).double()
            s[2] += xs.shape[0]

        return fn

    hooks = [(h, make(L, sae)) for L, (sae, h) in sl.items()]
    if isinstance(tokens, TaskTokens):
        batches = (b[1] for b in _chunks(tokens, batch_size))
    else:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError("reference tokens must be (n_seq, seq_len >= 2) with BOS in column 0")
        batches = (tokens[s : s + batch_size] for s in range(0, len(tokens), batch_size))
    stop = max(sl) + 1
    for toks in batches:
        model.run_with_hooks(toks, fwd_hooks=hooks, stop_at_layer=min(stop, model.cfg.n_layers))
    return {L: (s[0].float() / s[2], s[1].float() / s[2]) for L, s in sums.items()}


def _keep_masks(sl: dict, keep: set[tuple[int, int]] | None, ablate: set[tuple[int, int]] | None):
    """Per-layer ``(keep_f (F,) bool, keep_e bool)`` from a keep-set or an ablate-set."""
    out = {}
    for L, (sae, _h) in sl.items():
        F = _n_features(sae)
        if keep is not None:
            kf = np.zeros(F, dtype=bool)
            feats = [f for (l_, f) in keep if l_ == L and f >= 0]
            kf[feats] = True
            ke = (L, -1) in keep
        else:
            kf = np.ones(F, dtype=bool)
            feats = [f for (l_, f) in ablate if l_ == L and f >= 0]
            kf[feats] = False
            ke = (L, -1) not in ablate
        out[L] = (kf, ke)
    return out


@torch.no_grad()
def _intervened_metrics(
    model,
    sl: dict,
    tt: TaskTokens,
    specs: list[dict[int, tuple[np.ndarray, bool]]],
    means: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Metric and greedy correctness under mean-ablation specs.

    Each spec maps a layer to ``(keep_f, keep_e)``; features (and the error term) not kept
    are replaced by their means at every position but BOS. Downstream layers re-encode the
    intervened stream. Returns ``metric (n_specs, n_prompts)``, ``correct (n_specs, n_prompts)``.
    """
    n_s, n = len(specs), len(tt)
    metric = np.zeros((n_s, n))
    correct = np.zeros((n_s, n), dtype=bool)
    layers = list(sl)
    kf_all = {L: torch.as_tensor(np.stack([s[L][0] for s in specs])) for L in layers}
    ke_all = {L: torch.as_tensor(np.array([s[L][1] for s in specs])) for L in layers}
    for idx, toks, ans, cf in _chunks(tt, batch_size):
        B, T = toks.shape
        R = max(1, 4 * batch_size // B)  # interventions stacked along the batch
        pos = torch.arange(T) >= 1
        for r0 in range(0, n_s, R):
            rs = slice(r0, min(n_s, r0 + R))
            nr = rs.stop - rs.start
            hooks = []
            for L, (sae, h) in sl.items():
                kf = kf_all[L][rs].repeat_interleave(B, 0)[:, None, :] | ~pos[None, :, None]
                ke = ke_all[L][rs].repeat_interleave(B, 0)[:, None, None] | ~pos[None, :, None]
                if bool(kf.all()) and bool(ke.all()):
                    continue
                mf, me = means[L]

                def fn(x, hook=None, sae=sae, kf=kf, ke=ke, mf=mf, me=me):
                    f = sae.encode(x)
                    e = x - sae.decode(f)
                    return sae.decode(torch.where(kf, f, mf)) + torch.where(ke, e, me)

                hooks.append((h, fn))
            big = toks.repeat(nr, 1)
            logits = model.run_with_hooks(big, fwd_hooks=hooks) if hooks else model(big)
            m = _metric(logits, ans.repeat(nr), None if cf is None else cf.repeat(nr))
            ok = logits[:, -1].argmax(-1) == ans.repeat(nr)
            metric[rs.start : rs.stop, idx] = m.double().numpy().reshape(nr, B)
            correct[rs.start : rs.stop, idx] = ok.numpy().reshape(nr, B)
    return metric, correct


@torch.no_grad()
def _clean_metrics(model, tt: TaskTokens, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    metric = np.zeros(len(tt))
    correct = np.zeros(len(tt), dtype=bool)
    for idx, toks, ans, cf in _chunks(tt, batch_size):
        logits = model(toks)
        metric[idx] = _metric(logits, ans, cf).double().numpy()
        correct[idx] = (logits[:, -1].argmax(-1) == ans).numpy()
    return metric, correct


def linearisation_check(
    model,
    saes: Mapping[int, object],
    task: TaskPrompts | TaskTokens,
    scales: Sequence[float] = (1.0,),
    batch_size: int = 16,
) -> pd.DataFrame:
    r"""Compare summed node attributions with the true metric change, layer by layer.

    For each chosen layer :math:`L` and scale :math:`s`, every node of :math:`L` (all features
    and the error node, every position but BOS) is scaled by :math:`1-s`
    (:math:`s = 1` is zero-ablation, leaving the decoder bias). The attribution-patching
    prediction of the change is linear in :math:`s`:

    .. math::

        \widehat{\Delta m}_L(s) = s \sum_{u \in L} \mathrm{attr}(u), \qquad
        \Delta m_L(s) = m_{clean} - m\big(f_L \to (1-s) f_L,\ \varepsilon_L \to (1-s)\varepsilon_L\big).

    Since the nodes of one layer decompose its residual stream, the error
    :math:`|\widehat{\Delta m} - \Delta m|` is exactly the linearisation error of the
    downstream network, :math:`O(s^2)`. (Layers are checked one at a time: summing across
    layers would count the same effect once per layer.)

    Returns
    -------
    pandas.DataFrame
        ``layer, scale, predicted, actual, abs_error, rel_error`` (means over prompts;
        ``rel_error = abs_error / max(|actual|, 1e-12)``).
    """
    tt = tokenize_task(model, task)
    sl = _check_saes(saes)
    stats = _node_pass(model, sl, tt, batch_size)
    clean, _ = _clean_metrics(model, tt, batch_size)
    rows = []
    for L, (sae, h) in sl.items():
        total = float(stats.attr_f[L].sum() + stats.attr_e[L])
        for s in scales:
            vals = np.zeros(len(tt))
            for idx, toks, ans, cf in _chunks(tt, batch_size):
                pos = (torch.arange(toks.shape[1]) >= 1)[None, :, None]

                def fn(x, hook=None, sae=sae, s=s, pos=pos):
                    f = sae.encode(x)
                    e = x - sae.decode(f)
                    k = torch.where(pos, torch.tensor(1.0 - s), torch.tensor(1.0))
                    return sae.decode(f * k) + e * k

                with torch.no_grad():
                    logits = model.run_with_hooks(toks, fwd_hooks=[(h, fn)])
                vals[idx] = _metric(logits, ans, cf).double().numpy()
            actual = float(clean.mean() - vals.mean())
            pred = s * total
            err = abs(pred - actual)
            rows.append(
                {
                    "layer": L,
                    "scale": float(s),
                    "predicted": pred,
                    "actual": actual,
                    "abs_error": err,
                    "rel_error": err / max(abs(actual), 1e-12),
                }
            )
    return pd.DataFrame(rows)
