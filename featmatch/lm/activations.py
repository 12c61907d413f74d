"""One streaming pass over tokens that gathers SAE activation statistics for many layers.

:func:`gather` runs the model once per batch of token sequences, stopping the forward at
the deepest block any SAE reads (the unembedding is never computed unless an SAE reads
past the last block). A forward hook at each SAE's hook point encodes the residual with
that SAE and folds the result into running statistics, so no more than one batch of
activations is ever held in memory. The result is an :class:`ActivationStats`.

What is gathered
----------------
Position 0 of every sequence (BOS, an attention sink in SmolLM2) is excluded from every
statistic. A *global position* is ``seq * seq_len + pos``. A feature *fires* at a position
when its activation is ``> 0`` (SAELens activations are non-negative; a negative value, if
an exotic architecture produced one, is treated as not firing and left out of every
statistic).

Per layer ``L`` (``F`` features):

* ``fire_count[L] (F,) int64``: positions where the feature fires;
* ``act_sum[L]``, ``act_sq_sum[L] (F,) float64``: sums of the activation and its square;
* ``resid_norm_mean[L]``: mean L2 norm of the residual the SAE reads;
* ``top_values[L] (F, k) float32`` and ``top_positions[L] (F, k) int64``: the ``k``
  largest activations, in decreasing order, ties broken by the smaller position;
  ``-1`` / ``0`` pad a feature that fired fewer than ``k`` times;
* ``samples[L] = (positions (F, N) int64, values (F, N) float32)``: a uniform random
  sample without replacement of up to ``N`` positions where the feature fires, with its
  activation there (``-1`` / ``0`` pad).

Per chosen layer pair ``(la, lb)``:

* ``coact[(la, lb)] (F_a, F_b) int64``: positions where both features fire;
* ``prod_sum[(la, lb)] (F_a, F_b) float64``: ``sum_t f_a(t) f_b(t)``.

These make the matching score ``P(f_b[pi(i)] > 0 | f_a[i] > 0)`` and the Pearson
correlation of any later matching cheap (:func:`featmatch.evaluation.metrics.matching_score`,
:func:`featmatch.evaluation.metrics.activation_correlation`). The pair matrices are dense: ``2 * 8 * F_a * F_b``
bytes per pair, 268 MB at ``F = 4096``, 4.3 GB at ``F = 16384`` and 9.7 GB at 24,576.

Per evaluated edge set (``evaluate=``, the sparse path for real widths):

* ``pair_edges[(la, lb)] = (rows, cols, coact, prod_sum)``: the same two sums, but only
  for the listed feature pairs ``(i, j)`` (the union of the matchings, assignment
  ``perm`` or top-k ``(F_a, k)`` arrays, given to :func:`gather`). Memory is
  ``O(edges)``, never ``F_a * F_b``: the sums are accumulated per batch from the two
  layers' activation columns, in chunks of edges. The metrics look these up when the
  dense matrix of the pair was not gathered.

Sampling scheme
---------------
Before the pass, the global positions are put in a uniformly random order (a
permutation drawn from ``numpy.random.default_rng(seed)``); a position's rank in that
order is its *priority*. Each feature keeps the ``N`` firing positions of smallest
priority, merged batch by batch (a bottom-k sketch). Restricted to the positions where a
feature fires, a uniform permutation is still uniform, so each feature's sample is an
exact uniform sample without replacement of its firing positions, and it does not
depend on the batch size. All features share the priorities, so the samples are
*coordinated*: two features firing on the same positions get the same sample positions,
which lowers the variance when their distributions are compared (and makes the two
sketches estimate the Jaccard overlap of their firing sets). Samples are stored in
increasing priority order (a random order), so the first ``n`` of them are themselves a
uniform sample of size ``n``.

The streaming top-k and the sample are both kept as "the ``K`` best entries per
feature" under an integer score; each batch proposes only the firing entries that beat
the feature's current ``K``-th score, then one stable sort merges them.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from featmatch._hooks import block_index, model_device
from featmatch._hooks import hook_name as resolve_hook_name
from featmatch._io import atomic_save, cache_dir, tokens_sha256
from featmatch._threads import fitted_threads

__all__ = [
    "ActivationStats",
    "ActivationStatsError",
    "gather",
    "resolve_hook_name",
    "cache_key",
    "cache_path",
    "sparse_activations",
]

FORMAT = "featmatch.lm.activations"
FORMAT_VERSION = 1
# Bump when the statistics computed for the same inputs change (invalidates caches).
ALGORITHM_VERSION = 1

_INT64_MAX = np.iinfo(np.int64).max
_EMBED_HOOKS = {"hook_embed", "hook_pos_embed"}


class ActivationStatsError(ValueError):
    """An activation statistics file is corrupt, truncated or not in featmatch's format."""


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Statistics of SAE activations over a token set, from :func:`gather`.

    Attributes
    ----------
    layers : list[int]
        The layers (keys of the ``saes`` dict), sorted.
    n_tokens : int
        Positions counted, BOS (position 0) excluded: ``n_seq * (seq_len - 1)``.
    hook_names : dict[int, str]
        Hook point each layer's SAE read.
    fire_count, act_sum, act_sq_sum : dict[int, numpy.ndarray]
        Per layer ``(F,)``: firing counts (int64), sums of activations and of their
        squares (float64).
    resid_norm_mean : dict[int, float]
        Per layer mean L2 norm of the residual read by the SAE (BOS excluded).
    coact, prod_sum : dict[tuple[int, int], numpy.ndarray]
        Per pair ``(la, lb)``: ``(F_a, F_b)`` counts of both firing (int64) and sums of
        products ``f_a * f_b`` (float64).
    pair_edges : dict[tuple[int, int], tuple[numpy.ndarray, ...]]
        Per evaluated pair ``(la, lb)``: ``(rows, cols, coact, prod_sum)`` for a sorted,
        unique list of feature pairs only (``evaluate=`` of :func:`gather`); see
        :meth:`edge_values`.
    top_values, top_positions : dict[int, numpy.ndarray]
        Per layer ``(F, k)``: largest activations (float32, decreasing) and their global
        positions (int64, ``-1`` pad).
    samples : dict[int, tuple[numpy.ndarray, numpy.ndarray]]
        Per layer ``(positions (F, N) int64 with -1 pad, values (F, N) float32)``: a
        uniform sample without replacement of the positions where each feature fires
        (see the module docstring for the scheme).
    tokens : torch.Tensor
        The ``(n_seq, seq_len)`` int64 tokens the statistics were computed on.
    meta : dict
        Settings and provenance (model, SAE fingerprints, seed, cache key, ...).
    """

    layers: list[int]
    n_tokens: int
    hook_names: dict[int, str]
    fire_count: dict[int, np.ndarray]
    act_sum: dict[int, np.ndarray]
    act_sq_sum: dict[int, np.ndarray]
    resid_norm_mean: dict[int, float]
    coact: dict[tuple[int, int], np.ndarray]
    prod_sum: dict[tuple[int, int], np.ndarray]
    top_values: dict[int, np.ndarray]
    top_positions: dict[int, np.ndarray]
    samples: dict[int, tuple[np.ndarray, np.ndarray]]
    tokens: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    pair_edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )

    # ---- simple derived quantities ---------------------------------------------------

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The layer pairs with co-activation statistics."""
        return list(self.coact)

    @property
    def seq_len(self) -> int:
        """Length of each token sequence (BOS included)."""
        return int(self.tokens.shape[1])

    def d_sae(self, layer: int) -> int:
        """Number of features of the SAE at ``layer``."""
        return int(self.fire_count[layer].shape[0])

    def fire_rate(self, layer: int) -> np.ndarray:
        """Fraction of positions (BOS excluded) where each feature fires, ``(F,)``."""
        return self.fire_count[layer] / max(self.n_tokens, 1)

    def mean_act(self, layer: int) -> np.ndarray:
        """Mean activation over all positions (zeros included), ``(F,)``."""
        return self.act_sum[layer] / max(self.n_tokens, 1)

    def l0(self, layer: int) -> float:
        """Mean number of features firing per position (BOS excluded)."""
        return float(self.fire_count[layer].sum() / max(self.n_tokens, 1))

    def split_position(self, positions: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Split global positions into ``(seq, pos)`` indices into :attr:`tokens`."""
        positions = np.asarray(positions)
        return positions // self.seq_len, positions % self.seq_len

    # ---- pairs -----------------------------------------------------------------------

    def _pair(self, la: int, lb: int) -> tuple[np.ndarray, np.ndarray]:
        if (la, lb) in self.coact:
            return self.coact[(la, lb)], self.prod_sum[(la, lb)]
        if (lb, la) in self.coact:
            return self.coact[(lb, la)].T, self.prod_sum[(lb, la)].T
        raise KeyError(
            f"no co-activation statistics for layers ({la}, {lb}); gathered pairs: {self.pairs}. "
            "Pass pairs=[(la, lb)] to gather()."
        )

    def edge_values(
        self, la: int, lb: int, rows: np.ndarray, cols: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(coact, prod_sum)`` of the feature pairs ``(rows[e], cols[e])`` of ``(la, lb)``.

        Read from the dense matrices when the pair was gathered densely, else from
        :attr:`pair_edges` (the reversed pair is used transposed).

        Raises
        ------
        KeyError
            If the layer pair has neither, or an asked feature pair was not evaluated.
        """
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if (la, lb) in self.coact or (lb, la) in self.coact:
            co, pr = self._pair(la, lb)
            return co[rows, cols].astype(np.int64), pr[rows, cols].astype(np.float64)
        if (la, lb) in self.pair_edges:
            er, ec, eco, epr = self.pair_edges[(la, lb)]
            qr, qc = rows, cols
        elif (lb, la) in self.pair_edges:
            er, ec, eco, epr = self.pair_edges[(lb, la)]
            qr, qc = cols, rows
        else:
            raise KeyError(
                f"no co-activation statistics for layers ({la}, {lb}); gathered pairs: {self.pairs}, "
                f"evaluated edges: {list(self.pair_edges)}. Pass pairs=[(la, lb)] or "
                "evaluate=[(la, lb, matching)] to gather()."
            )
        width = max(int(self.d_sae(lb if (la, lb) in self.pair_edges else la)), 1)
        key = er * width + ec  # sorted by construction
        q = qr * width + qc
        at = np.searchsorted(key, q)
        at = np.minimum(at, max(key.size - 1, 0))
        ok = key[at] == q if key.size else np.zeros(q.shape, dtype=bool)
        if not ok.all():
            e = int(np.flatnonzero(~ok)[0])
            raise KeyError(
                f"feature pair ({int(rows[e])}, {int(cols[e])}) of layers ({la}, {lb}) was not evaluated; "
                "add its matching to gather(evaluate=...)"
            )
        return eco[at], epr[at]

    def _perm(self, la: int, lb: int, perm: np.ndarray | Any) -> tuple[np.ndarray, np.ndarray]:
        perm = np.asarray(getattr(perm, "perm", perm), dtype=np.int64)
        f_a, f_b = self.d_sae(la), self.d_sae(lb)
        if perm.shape != (f_a,):
            raise ValueError(f"perm must have shape ({f_a},) for layer {la}, got {perm.shape}")
        if perm.size and (perm.max() >= f_b or perm.min() < -1):
            raise ValueError(f"perm entries must be -1 (unmatched) or in [0, {f_b})")
        rows = np.flatnonzero(perm >= 0)
        return rows, perm[rows]

    # ---- contexts --------------------------------------------------------------------

    def contexts(
        self,
        layer: int,
        feature: int,
        tokenizer: Any = None,
        window: int = 8,
        *,
        which: Literal["top", "samples"] = "top",
        mark: tuple[str, str] = ("«", "»"),
    ) -> list[dict[str, Any]]:
        """Text around each top activation (or sampled position) of one feature.

        Parameters
        ----------
        layer, feature : int
            Which feature.
        tokenizer : transformers tokenizer, optional
            Used to decode tokens; without it, tokens are shown as ``<id>``.
        window : int
            Tokens kept on each side of the active token (BOS never shown).
        which : {"top", "samples"}
            Top activations (decreasing) or the uniform sample.
        mark : (str, str)
            Strings placed around the active token in ``text``.

        Returns
        -------
        list of dict
            One per position, with keys ``rank``, ``position`` (global), ``seq``, ``pos``,
            ``value``, ``token_id``, ``token``, ``left``, ``right`` and ``text``
            (``left + mark[0] + token + mark[1] + right``).
        """
        if which == "top":
            positions, values = self.top_positions[layer][feature], self.top_values[layer][feature]
        elif which == "samples":
            positions, values = self.samples[layer][0][feature], self.samples[layer][1][feature]
        else:
            raise ValueError(f"which must be 'top' or 'samples', got {which!r}")
        toks = self.tokens

        def decode(ids: Sequence[int]) -> str:
            ids = [int(i) for i in ids]
            if tokenizer is None:
                return "".join(f"<{i}>" for i in ids)
            return tokenizer.decode(ids)

        out = []
        for rank, (gpos, value) in enumerate(zip(positions.tolist(), values.tolist(), strict=True)):
            if gpos < 0:
                break
            seq, pos = divmod(int(gpos), self.seq_len)
            row = toks[seq].tolist()
            left, tok, right = (
                decode(row[max(1, pos - window) : pos]),
                decode([row[pos]]),
                decode(row[pos + 1 : pos + 1 + window]),
            )
            out.append(
                {
                    "rank": rank,
                    "position": int(gpos),
                    "seq": seq,
                    "pos": pos,
                    "value": float(value),
                    "token_id": int(row[pos]),
                    "token": tok,
                    "left": left,
                    "right": right,
                    "text": f"{left}{mark[0]}{tok}{mark[1]}{right}",
                }
            )
        return out

    # ---- persistence -----------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {"tokens": self.tokens.cpu().numpy().astype(np.int64)}
        for layer in self.layers:
            p = f"layer{layer}."
            arrays[p + "fire_count"] = self.fire_count[layer]
            arrays[p + "act_sum"] = self.act_sum[layer]
            arrays[p + "act_sq_sum"] = self.act_sq_sum[layer]
            arrays[p + "top_values"] = self.top_values[layer]
            arrays[p + "top_positions"] = self.top_positions[layer]
            arrays[p + "sample_positions"] = self.samples[layer][0]
            arrays[p + "sample_values"] = self.samples[layer][1]
        for la, lb in self.pairs:
            p = f"pair{la}_{lb}."
            arrays[p + "coact"] = self.coact[(la, lb)]
            arrays[p + "prod_sum"] = self.prod_sum[(la, lb)]
        for (la, lb), parts in self.pair_edges.items():
            for name, arr in zip(("rows", "cols", "coact", "prod_sum"), parts, strict=True):
                arrays[f"edges{la}_{lb}.{name}"] = arr
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write the statistics to one ``.npz`` file, atomically.

        The arrays are stored uncompressed; a ``meta_json`` entry holds the layers, pairs,
        hook names, residual norms and :attr:`meta` as JSON.

        Parameters
        ----------
        path : str or Path
            Target file (conventionally ``*.npz``).

        Returns
        -------
        Path
        """
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layers": list(self.layers),
            "pairs": [list(p) for p in self.pairs],
            "edge_pairs": [list(p) for p in self.pair_edges],
            "n_tokens": int(self.n_tokens),
            "hook_names": {str(k): v for k, v in self.hook_names.items()},
            "resid_norm_mean": {str(k): float(v) for k, v in self.resid_norm_mean.items()},
            "meta": self.meta,
        }
        arrays = self._arrays()
        arrays["meta_json"] = np.frombuffer(
            json.dumps(header, sort_keys=True, default=_json_default).encode("utf-8"), dtype=np.uint8
        )

        def writer(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        return atomic_save(path, writer)

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        """Read statistics written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ActivationStatsError
            If the file is corrupt, truncated, or not a featmatch activation file.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no activation statistics at {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}  # reads everything: zip CRCs are checked
            header = json.loads(bytes(data.pop("meta_json")).decode("utf-8"))
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as exc:
            raise ActivationStatsError(
                f"corrupt or unreadable activation statistics file {path}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ActivationStatsError(f"{path} is not a featmatch activation statistics file")
        if header.get("version") != FORMAT_VERSION:
            raise ActivationStatsError(
                f"{path} has format version {header.get('version')}, expected {FORMAT_VERSION}"
            )
        try:
            layers = [int(x) for x in header["layers"]]
            pairs = [(int(a), int(b)) for a, b in header["pairs"]]
            edge_pairs = [(int(a), int(b)) for a, b in header.get("edge_pairs", [])]
            stats = cls(
                layers=layers,
                n_tokens=int(header["n_tokens"]),
                hook_names={int(k): v for k, v in header["hook_names"].items()},
                fire_count={L: data[f"layer{L}.fire_count"] for L in layers},
                act_sum={L: data[f"layer{L}.act_sum"] for L in layers},
                act_sq_sum={L: data[f"layer{L}.act_sq_sum"] for L in layers},
                resid_norm_mean={int(k): float(v) for k, v in header["resid_norm_mean"].items()},
                coact={p: data[f"pair{p[0]}_{p[1]}.coact"] for p in pairs},
                prod_sum={p: data[f"pair{p[0]}_{p[1]}.prod_sum"] for p in pairs},
                top_values={L: data[f"layer{L}.top_values"] for L in layers},
                top_positions={L: data[f"layer{L}.top_positions"] for L in layers},
                samples={
                    L: (data[f"layer{L}.sample_positions"], data[f"layer{L}.sample_values"]) for L in layers
                },
                tokens=torch.from_numpy(data["tokens"]),
                meta=header.get("meta", {}),
                pair_edges={
                    p: tuple(data[f"edges{p[0]}_{p[1]}.{n}"] for n in ("rows", "cols", "coact", "prod_sum"))
                    for p in edge_pairs
                },
            )
            stats._validate()
        except (KeyError, TypeError, ValueError) as exc:
            raise ActivationStatsError(f"inconsistent activation statistics file {path}: {exc}") from exc
        return stats

    def _validate(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError("tokens must be 2-D")
        if self.n_tokens != self.tokens.shape[0] * (self.tokens.shape[1] - 1):
            raise ValueError("n_tokens does not match the tokens' shape")
        for L in self.layers:
            f = self.fire_count[L].shape
            if len(f) != 1 or self.act_sum[L].shape != f or self.act_sq_sum[L].shape != f:
                raise ValueError(f"layer {L}: per-feature arrays disagree in shape")
            if self.top_values[L].shape != self.top_positions[L].shape or self.top_values[L].shape[0] != f[0]:
                raise ValueError(f"layer {L}: top-k arrays have the wrong shape")
            sp, sv = self.samples[L]
            if sp.shape != sv.shape or sp.shape[0] != f[0]:
                raise ValueError(f"layer {L}: sample arrays have the wrong shape")
        for la, lb in self.pairs:
            shape = (self.d_sae(la), self.d_sae(lb))
            if self.coact[(la, lb)].shape != shape or self.prod_sum[(la, lb)].shape != shape:
                raise ValueError(f"pair ({la}, {lb}): matrices have the wrong shape")
        for (la, lb), parts in self.pair_edges.items():
            if len(parts) != 4 or len({x.shape for x in parts}) != 1:
                raise ValueError(f"edges ({la}, {lb}): arrays disagree in shape")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------
# Hooks, fingerprints and the cache key
# --------------------------------------------------------------------------------------


def _stop_layer(model: Any, hook_names: Iterable[str]) -> int | None:
    """``stop_at_layer`` for a forward that reaches every hook (None = full forward)."""
    stop = 0
    for name in hook_names:
        layer = block_index(name)
        if layer is not None:
            stop = max(stop, layer + 1)
        elif name not in _EMBED_HOOKS:
            return None  # ln_final, unembed, ...: needs the whole forward
    return min(stop, int(model.cfg.n_layers))


def _check_hooks(model: Any, hook_names: dict[int, str]) -> None:
    available = getattr(model, "hook_dict", {})
    for layer, name in hook_names.items():
        if name not in available:
            resid = [h for h in available if h.endswith("hook_resid_post")][:2]
            raise ValueError(
                f"the SAE for layer {layer} reads hook {name!r}, which this model does not have "
                f"({model.cfg.n_layers} layers; residual hooks look like {', '.join(map(repr, resid))}). "
                "Set sae.cfg.metadata.hook_name to one of the model's hook points."
            )


def _model_fingerprint(model: Any) -> dict[str, Any]:
    """Config plus a cheap weight fingerprint (per tensor: float64 sum and a strided sample)."""
    cfg = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else dict(vars(model.cfg))
    cfg = {k: v for k, v in cfg.items() if k not in {"device", "n_devices"}}
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if flat.numel():
                h.update(np.float64(flat.sum(dtype=torch.float64).item()).tobytes())
                step = max(1, flat.numel() // 1024)
                h.update(flat[::step].to(torch.float64).cpu().numpy().tobytes())
    return {
        "name": str(getattr(model.cfg, "model_name", type(model).__name__)),
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_fingerprint": h.hexdigest(),
    }


def _sae_fingerprint(sae: Any, hook_name: str) -> str:
    """SHA-256 of an SAE's class, hook, encoder-relevant config and all its weights."""
    h = hashlib.sha256()
    cfg = getattr(sae, "cfg", None)
    h.update(type(sae).__qualname__.encode())
    h.update(hook_name.encode())
    for attr in ("apply_b_dec_to_input", "normalize_activations", "k", "rescale_acts_by_decoder_norm"):
        h.update(f"{attr}={getattr(cfg, attr, None)!r};".encode())
    with torch.no_grad():
        for name, t in sorted(sae.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(
    model: Any,
    saes: dict[int, Any],
    tokens: torch.Tensor,
    *,
    pairs: Sequence[tuple[int, int]] = (),
    top_k: int = 16,
    n_samples: int = 64,
    seed: int = 0,
    edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key of a :func:`gather` call and the provenance it hashes.

    The key hashes the model (config and a weight fingerprint), every SAE (a SHA-256 of
    its weights, class and hook), the tokens, and the settings that change the result.
    ``batch_size`` is left out: the statistics do not depend on it (sums only up to
    floating-point rounding).

    Returns
    -------
    key : str
        32 hex characters.
    provenance : dict
        The JSON-able description that was hashed.
    """
    layers = sorted(int(k) for k in saes)
    hooks = {L: resolve_hook_name(saes[L], L) for L in layers}
    prov = {
        "algorithm_version": ALGORITHM_VERSION,
        "model": _model_fingerprint(model),
        "saes": {
            str(L): {"hook_name": hooks[L], "sha256": _sae_fingerprint(saes[L], hooks[L])} for L in layers
        },
        "tokens_sha256": tokens_sha256(tokens),
        "tokens_shape": list(tokens.shape),
        "pairs": [list(p) for p in _normalise_pairs(pairs, layers)],
        "top_k": int(top_k),
        "n_samples": int(n_samples),
        "seed": int(seed),
    }
    if edges:  # only when used, so keys of dense-only passes stay what they were
        h = hashlib.sha256()
        for (la, lb), (r, c) in sorted(edges.items()):
            h.update(f"{la},{lb};".encode())
            h.update(np.ascontiguousarray(r, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(c, dtype=np.int64).tobytes())
        prov["evaluate_sha256"] = h.hexdigest()
    key = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:32]
    return key, prov


def cache_path(key: str) -> Path:
    """Where the cached statistics for ``key`` live: ``cache_dir("activations")/{key}.npz``."""
    return cache_dir("activations") / f"{key}.npz"


def _normalise_pairs(pairs: Iterable[Sequence[int]], layers: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pairs:
        if len(p) != 2:
            raise ValueError(f"pairs must be (la, lb) tuples, got {p!r}")
        la, lb = int(p[0]), int(p[1])
        for L in (la, lb):
            if L not in layers:
                raise ValueError(
                    f"pair ({la}, {lb}) names layer {L}, which has no SAE (layers: {list(layers)})"
                )
        if (la, lb) not in out:
            out.append((la, lb))
    return out


def _normalise_evaluate(
    evaluate: Iterable[Sequence[Any]], layers: Sequence[int], widths: dict[int, int]
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Per layer pair, the sorted unique feature pairs ``(rows, cols)`` of the matchings."""
    parts: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for item in evaluate:
        if len(item) != 3:
            raise ValueError(f"evaluate takes (la, lb, matching) triples, got {len(item)} items")
        la, lb, m = int(item[0]), int(item[1]), item[2]
        for L in (la, lb):
            if L not in layers:
                raise ValueError(f"evaluate names layer {L}, which has no SAE (layers: {list(layers)})")
        arrays = []
        if hasattr(m, "perm"):
            arrays.append(np.asarray(m.perm))
            topk = getattr(m, "meta", {}).get("topk_ids")
            if topk is not None:
                arrays.append(np.asarray(topk))
        else:
            arrays.append(np.asarray(m))
        for arr in arrays:
            arr = arr.astype(np.int64).reshape(arr.shape[0], -1)
            if arr.shape[0] != widths[la]:
                raise ValueError(
                    f"a matching for ({la}, {lb}) has {arr.shape[0]} rows, layer {la} has {widths[la]}"
                )
            if arr.size and (arr.max() >= widths[lb] or arr.min() < -1):
                raise ValueError(f"matching entries for ({la}, {lb}) must be -1 or in [0, {widths[lb]})")
            r, k = np.nonzero(arr >= 0)
            parts.setdefault((la, lb), []).append((r, arr[r, k]))
    out = {}
    for key, lst in parts.items():
        r = np.concatenate([x[0] for x in lst])
        c = np.concatenate([x[1] for x in lst])
        flat = np.unique(r * widths[key[1]] + c)
        out[key] = (flat // widths[key[1]], flat % widths[key[1]])
    return out


# --------------------------------------------------------------------------------------
# Streaming accumulation
# --------------------------------------------------------------------------------------


class _BestK:
    """The ``K`` entries of smallest integer score per feature, merged lazily.

    ``score`` must be a non-negative int64 below ``2**score_bits``; ties keep the entry
    seen first (candidates arrive in increasing position order), i.e. the smaller
    position. :meth:`update` drops candidates that cannot beat the feature's ``K``-th
    best score as of the last merge and buffers the rest; the buffer is merged into the
    state (one stable sort) when it grows past ``F * K / 4`` entries and by
    :meth:`finish`. The threshold is stale between merges, which only lets more
    candidates through, so the result is the exact best ``K`` of everything seen.
    """

    merge_min = 4096  # smallest buffer that triggers a merge (tests lower it)

    def __init__(self, n_features: int, k: int, score_bits: int, value_dtype: Any = np.float32):
        if n_features >= 2 ** (62 - score_bits):
            raise ValueError(f"too many features ({n_features}) for a {score_bits}-bit score")
        self.k = k
        self.bits = score_bits
        self.score = np.full((n_features, k), _INT64_MAX, dtype=np.int64)
        self.pos = np.full((n_features, k), -1, dtype=np.int64)
        self.val = np.zeros((n_features, k), dtype=value_dtype)
        self.thr = np.full(n_features, _INT64_MAX, dtype=np.int64)  # k-th best score, MAX if not full
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_buf = 0
        self._limit = max(self.merge_min, n_features * k // 4)

    def update(self, feat: np.ndarray, score: np.ndarray, pos: np.ndarray, val: np.ndarray) -> None:
        """Offer entries (in increasing position order)."""
        if self.k == 0 or feat.size == 0:
            return
        keep = score < self.thr[feat]
        if not keep.all():
            feat, score, pos, val = feat[keep], score[keep], pos[keep], val[keep]
        if feat.size == 0:
            return
        self._buf.append((feat, score, pos, val))
        self._n_buf += feat.size
        if self._n_buf > self._limit:
            self._merge()

    def finish(self) -> None:
        """Merge whatever is buffered (call before reading ``score``/``pos``/``val``)."""
        if self._buf:
            self._merge()

    def _merge(self) -> None:
        feat, score, pos, val = (np.concatenate(parts) for parts in zip(*self._buf, strict=True))
        self._buf, self._n_buf = [], 0
        aff = np.flatnonzero(np.bincount(feat, minlength=self.score.shape[0]))
        old_pos = self.pos[aff]
        valid = old_pos >= 0  # a prefix of each row
        all_f = np.concatenate([np.repeat(aff, valid.sum(1)), feat])
        all_s = np.concatenate([self.score[aff][valid], score])
        all_p = np.concatenate([old_pos[valid], pos])
        all_v = np.concatenate([self.val[aff][valid], val])
        order = np.argsort((all_f << self.bits) | all_s, kind="stable")
        sf = all_f[order]
        n = sf.size
        idx = np.arange(n)
        start = np.empty(n, dtype=bool)
        start[0] = True
        np.not_equal(sf[1:], sf[:-1], out=start[1:])
        rank = idx - np.maximum.accumulate(np.where(start, idx, 0))
        sel = rank < self.k
        o, r, f = order[sel], rank[sel], sf[sel]
        self.score[aff] = _INT64_MAX
        self.pos[aff] = -1
        self.val[aff] = 0
        self.score[f, r] = all_s[o]
        self.pos[f, r] = all_p[o]
        self.val[f, r] = all_v[o]
        last = self.k - 1
        self.thr[aff] = np.where(self.pos[aff, last] >= 0, self.score[aff, last], _INT64_MAX)


def _value_score(vals: np.ndarray) -> np.ndarray:
    """Int score, smaller for larger positive float32 values (IEEE bits are monotone for x > 0)."""
    return np.int64(0x7FFFFFFF) - vals.view(np.int32).astype(np.int64)


class _LayerAccumulator:
    def __init__(self, n_features: int, top_k: int, n_samples: int, prio_bits: int):
        self.F = n_features
        self.fire_count = np.zeros(n_features, dtype=np.int64)
        self.act_sum = np.zeros(n_features, dtype=np.float64)
        self.act_sq_sum = np.zeros(n_features, dtype=np.float64)
        self.norm_sum = 0.0
        self.top = _BestK(n_features, top_k, 31)
        self.res = _BestK(n_features, n_samples, prio_bits)

    def update(
        self,
        rows: np.ndarray,
        cols: np.ndarray,
        vals: np.ndarray,
        gpos: np.ndarray,
        prio: np.ndarray,
    ) -> None:
        F = self.F
        self.fire_count += np.bincount(cols, minlength=F)
        v64 = vals.astype(np.float64)
        self.act_sum += np.bincount(cols, weights=v64, minlength=F)
        self.act_sq_sum += np.bincount(cols, weights=v64 * v64, minlength=F)
        if self.top.k:
            self.top.update(cols, _value_score(vals), gpos[rows], vals)
        if self.res.k:
            self.res.update(cols, prio[rows], gpos[rows], vals)

    def finish(self) -> None:
        self.top.finish()
        self.res.finish()


Encoder = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def _generic_encoder(sae: Any) -> Encoder:
    """``sae.encode`` as an encoder returning ``(acts, acts > 0)``."""
    F = int(sae.cfg.d_sae)

    def enc(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = sae.encode(x).reshape(-1, F).float()
        return acts, acts > 0

    return enc


def _fast_encoder(sae: Any) -> Encoder | None:
    """A fused encoder for plain JumpReLU / ReLU SAEs, else None.

    Returns ``(hidden, mask)``: the pre-activation ``(x - b_dec) @ W_enc + b_enc`` (one
    ``addmm``, the same arithmetic as SAELens) and the firing mask (``hidden > threshold``
    for JumpReLU, ``hidden > 0`` for ReLU). The activation is ``hidden`` where ``mask``
    and 0 elsewhere, exactly ``sae.encode``; the dense activation matrix is only built
    when a layer pair needs it. Used only when nothing in the SAE's encode path could
    differ: no hooks on the SAE's hook points, no input normalisation, no reshaping,
    float32 weights, and (JumpReLU) all thresholds > 0, so the ReLU is implied.
    """
    try:
        from sae_lens import JumpReLUSAE, StandardSAE
    except ImportError:  # pragma: no cover
        return None
    kind = type(sae)
    if kind not in (JumpReLUSAE, StandardSAE):
        return None
    cfg = sae.cfg
    if getattr(cfg, "normalize_activations", "none") not in (None, "none"):
        return None
    if getattr(sae, "hook_z_reshaping_mode", False) or sae.W_enc.dtype != torch.float32:
        return None
    if any(len(m._forward_hooks) or len(m._forward_pre_hooks) for m in sae.modules()):
        return None
    W, b = sae.W_enc, sae.b_enc
    b_dec = sae.b_dec if getattr(cfg, "apply_b_dec_to_input", False) else None
    if kind is JumpReLUSAE:
        thr = sae.threshold
        if not bool((thr > 0).all()):
            return None
    else:
        thr = torch.zeros((), dtype=W.dtype, device=W.device)

    def enc(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (..., d_in), possibly strided; the subtraction makes it contiguous
        x = (x - b_dec if b_dec is not None else x).reshape(-1, W.shape[0])
        h = torch.addmm(b, x, W)
        return h, h > thr

    return enc


def _dense(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The activation matrix: ``hidden`` where it fires, 0 elsewhere (in place)."""
    return hidden.mul_(mask)


# --------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------


def gather(
    model: Any,
    saes: dict[int, Any],
    tokens: torch.Tensor,
    *,
    pairs: Sequence[tuple[int, int]] = (),
    evaluate: Sequence[tuple[int, int, Any]] = (),
    top_k: int = 16,
    n_samples: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
    fast_encode: bool = True,
    client: Any = None,
    n_shards: int | None = None,
    retries: int | None = None,
) -> ActivationStats:
    """Gather SAE activation statistics for many layers in one streaming pass.

    With ``client``, the pass runs on a Dask cluster as one task per corpus shard (a
    contiguous block of sequences, cut at multiples of ``batch_size``); the workers load
    the model and the SAEs from their sources (:mod:`featmatch._dask`) and the shards'
    accumulators merge into the result of one pass (:func:`_merge_partials`): counts,
    top-k and sample membership exactly, float sums up to float64 reassociation.

    Parameters
    ----------
    model : transformer_lens.HookedTransformer or str
        The model; its forward is stopped after the deepest block an SAE reads. A string is
        a registry name for :func:`featmatch.lm.models.load_model` (loaded on the workers
        only, with ``client``).
    saes : dict[int, sae_lens.SAE]
        SAE per layer. Each reads ``sae.cfg.metadata.hook_name`` (default
        ``blocks.{layer}.hook_resid_post``). With ``client``, an SAE loaded by
        :func:`featmatch.saes.load_sae` is reloaded on the workers from its source; any
        other is pickled and scattered to them once.
    tokens : torch.LongTensor, shape (n_seq, seq_len)
        Column 0 is BOS and is excluded from every statistic.
    pairs : sequence of (int, int)
        Layer pairs for which ``coact`` and ``prod_sum`` are gathered (dense
        ``(F_a, F_b)`` matrices; see the module docstring for memory). Use it at small
        widths or when every pair's statistic is wanted.
    evaluate : sequence of (la, lb, matching)
        The sparse path: matchings whose feature pairs get the two sums in
        :attr:`ActivationStats.pair_edges` (memory ``O(edges)``). ``matching`` is a
        :class:`featmatch.matching.Matching` (its ``perm``, plus ``meta["topk_ids"]`` when
        present), an ``(F_a,)`` perm or an ``(F_a, k)`` array of feature ids of ``lb``
        (``-1`` skipped). All matchings of one layer pair share one edge list. The
        metrics of :mod:`featmatch.evaluation.metrics` read it transparently.
    top_k : int
        Top activations kept per feature.
    n_samples : int
        Size of the uniform sample of firing positions kept per feature.
    seed : int
        Seed of the sampling priorities (the result is deterministic given it).
    batch_size : int
        Sequences per forward. Does not change the result (beyond float rounding).
    cache : bool
        Read and write ``cache_dir("activations")/{key}.npz`` (see :func:`cache_key`);
        a corrupt cache file is recomputed and overwritten.
    progress : bool
        Show a tqdm progress bar.
    fast_encode : bool
        Use a fused ``addmm`` + threshold for plain JumpReLU / ReLU SAEs (identical
        results to ``sae.encode``; see ``_fast_encoder``). False always calls
        ``sae.encode``.
    client : dask.distributed.Client or str, optional
        Run the pass on a Dask cluster (a ``Client``, ``"local:N"`` or a scheduler
        address). ``None`` (default) runs it here.
    n_shards : int, optional
        With ``client``: number of corpus shards (tasks); default two per worker thread,
        at most one per batch.
    retries : int, optional
        With ``client``: retries of a shard that raised (default
        :data:`featmatch._dask.RETRIES`). The result (and the cache file) is written only
        after every shard has succeeded.

    Returns
    -------
    ActivationStats

    Raises
    ------
    ValueError
        On an SAE hook point the model lacks, a pair naming a layer without an SAE,
        a width mismatch, or bad tokens.
    """
    if not saes:
        raise ValueError("saes is empty: give at least one {layer: SAE}")
    tokens = _check_tokens(tokens)
    if top_k < 0 or n_samples < 0 or batch_size < 1:
        raise ValueError("top_k and n_samples must be >= 0 and batch_size >= 1")
    if client is not None:
        return _gather_distributed(
            model,
            saes,
            tokens,
            client=client,
            n_shards=n_shards,
            retries=retries,
            pairs=pairs,
            evaluate=evaluate,
            top_k=top_k,
            n_samples=n_samples,
            seed=seed,
            batch_size=batch_size,
            cache=cache,
            progress=progress,
            fast_encode=fast_encode,
        )
    if isinstance(model, str):
        from featmatch.lm.models import load_model

        model = load_model(model)
    plan = _plan(
        model,
        saes,
        tokens,
        pairs=pairs,
        evaluate=evaluate,
        top_k=top_k,
        n_samples=n_samples,
        seed=seed,
        cache=cache,
    )
    layers, hook_names, widths, edges = plan.layers, plan.hook_names, plan.widths, plan.edges
    saes = {int(k): v for k, v in saes.items()}
    if cache:
        hit = _cached(plan.key)
        if hit is not None:
            return hit

    part = _run(
        model,
        saes,
        tokens,
        layers=layers,
        hook_names=hook_names,
        pairs=plan.pairs,
        edges=edges,
        top_k=top_k,
        n_samples=n_samples,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        fast_encode=fast_encode,
    )
    stats = _finish(part, tokens, layers=layers, hook_names=hook_names, widths=widths, edges=edges)
    return _complete(stats, plan, cache=cache)


@dataclass
class _Plan:
    """What a :func:`gather` call computes, checked against the model and the SAEs."""

    layers: list[int]
    hook_names: dict[int, str]
    pairs: list[tuple[int, int]]
    widths: dict[int, int]
    edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
    model_name: str
    top_k: int
    n_samples: int
    seed: int
    key: str | None = None
    provenance: dict[str, Any] | None = None


def _plan(
    model: Any,
    saes: dict[int, Any],
    tokens: torch.Tensor,
    *,
    pairs: Sequence[tuple[int, int]],
    evaluate: Sequence[tuple[int, int, Any]],
    top_k: int,
    n_samples: int,
    seed: int,
    cache: bool,
) -> _Plan:
    """Check a gather call (hooks, widths, pairs, matchings) and compute its cache key."""
    layers = sorted(int(k) for k in saes)
    saes = {int(k): v for k, v in saes.items()}
    hook_names = {L: resolve_hook_name(saes[L], L) for L in layers}
    _check_hooks(model, hook_names)
    pair_list = _normalise_pairs(pairs, layers)
    widths = {L: int(saes[L].cfg.d_sae) for L in layers}
    edges = _normalise_evaluate(evaluate, layers, widths)
    d_model = int(model.cfg.d_model)
    for L in layers:
        d_in = int(saes[L].cfg.d_in)
        if (
            hook_names[L].endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
            and d_in != d_model
        ):
            raise ValueError(f"the SAE for layer {L} has d_in={d_in}, but the model's d_model is {d_model}")
    plan = _Plan(
        layers,
        hook_names,
        pair_list,
        widths,
        edges,
        str(getattr(model.cfg, "model_name", "")),
        int(top_k),
        int(n_samples),
        int(seed),
    )
    if cache:
        plan.key, plan.provenance = cache_key(
            model, saes, tokens, pairs=pair_list, top_k=top_k, n_samples=n_samples, seed=seed, edges=edges
        )
    return plan


def _cached(key: str | None) -> ActivationStats | None:
    """The cached statistics of ``key``, or None (a corrupt or foreign file is recomputed)."""
    if key is None:
        return None
    path = cache_path(key)
    if not path.exists():
        return None
    try:
        stats = ActivationStats.load(path)
        if stats.meta.get("cache_key") == key:
            return stats
        warnings.warn(f"activation cache {path} holds another key; recomputing", stacklevel=3)
    except ActivationStatsError as exc:
        warnings.warn(f"activation cache {path} is unreadable ({exc}); recomputing", stacklevel=3)
    return None


def _complete(stats: ActivationStats, plan: _Plan, *, cache: bool) -> ActivationStats:
    """Describe the run in ``meta`` and write the cache file (atomically)."""
    stats.meta.update(
        {
            "model_name": plan.model_name,
            "top_k": plan.top_k,
            "n_samples": plan.n_samples,
            "seed": plan.seed,
            "sampling": "bottom-k over a seeded uniform permutation of global positions (coordinated)",
            "bos_excluded": True,
        }
    )
    if cache and plan.key is not None:
        stats.meta["cache_key"] = plan.key
        stats.meta["provenance"] = plan.provenance
        stats.save(cache_path(plan.key))
    return stats


# --------------------------------------------------------------------------------------
# gather on a Dask cluster
# --------------------------------------------------------------------------------------


def _plan_task(
    model_item: Any, sae_items: dict[int, Any], tokens: torch.Tensor, kwargs: dict[str, Any]
) -> _Plan:
    """Dask task: the plan, computed where the model and the SAEs are loaded."""
    from featmatch._dask import worker_object

    model = worker_object(model_item)
    dev = str(model_device(model))
    saes = {L: worker_object(s, dev) for L, s in sae_items.items()}
    return _plan(model, saes, tokens, **kwargs)


def _shard_task(
    model_item: Any,
    sae_items: dict[int, Any],
    tokens: torch.Tensor,
    plan: _Plan,
    seq_range: tuple[int, int],
    settings: dict[str, Any],
) -> _Partial:
    """Dask task: the accumulators of one corpus shard (sequences ``seq_range``)."""
    from featmatch._dask import worker_object

    model = worker_object(model_item)
    dev = str(model_device(model))
    saes = {L: worker_object(s, dev) for L, s in sae_items.items()}
    return _run(
        model,
        saes,
        tokens,
        layers=plan.layers,
        hook_names=plan.hook_names,
        pairs=plan.pairs,
        edges=plan.edges,
        top_k=plan.top_k,
        n_samples=plan.n_samples,
        seed=plan.seed,
        progress=False,
        seq_range=seq_range,
        **settings,
    )


def shard_ranges(n_seq: int, n_shards: int, batch_size: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous sequence ranges, cut at multiples of ``batch_size``.

    Cutting at batch boundaries keeps every forward batch what one pass would run, so a
    shard's per-batch sums are the one pass's.

    Examples
    --------
    >>> shard_ranges(10, 3, 2)
    [(0, 4), (4, 6), (6, 10)]
    """
    n_batches = -(-n_seq // batch_size)
    n = max(1, min(int(n_shards), n_batches))
    cuts = [round(i * n_batches / n) * batch_size for i in range(n + 1)]
    cuts[-1] = n_seq
    return [(a, min(b, n_seq)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if a < b]


def _gather_distributed(
    model: Any,
    saes: dict[int, Any],
    tokens: torch.Tensor,
    *,
    client: Any,
    n_shards: int | None,
    retries: int | None,
    pairs: Sequence[tuple[int, int]],
    evaluate: Sequence[tuple[int, int, Any]],
    top_k: int,
    n_samples: int,
    seed: int,
    batch_size: int,
    cache: bool,
    progress: bool,
    fast_encode: bool,
) -> ActivationStats:
    from featmatch._dask import RETRIES, get_client, run_tasks, to_workers, total_threads

    c = get_client(client)
    retries = RETRIES if retries is None else int(retries)
    layers = sorted(int(k) for k in saes)
    from featmatch.lm.models import load_model

    (model_item,) = to_workers(c, [model], load=load_model)
    sae_items = dict(zip(layers, to_workers(c, [saes[L] for L in layers]), strict=True))
    (tok,) = c.scatter([tokens], broadcast=True, hash=False)
    evaluate = list(evaluate)  # matchings are small: (F,) permutations, top-k ids
    kwargs = dict(
        pairs=list(pairs), evaluate=evaluate, top_k=top_k, n_samples=n_samples, seed=seed, cache=cache
    )
    (plan,) = run_tasks(
        c,
        _plan_task,
        [(model_item, sae_items, tok, kwargs)],
        desc="gather plan",
        progress=False,
        retries=retries,
    )
    if cache:
        hit = _cached(plan.key)
        if hit is not None:
            return hit
    n_seq = int(tokens.shape[0])
    ranges = shard_ranges(n_seq, n_shards or 2 * total_threads(c), batch_size)
    settings = dict(batch_size=batch_size, fast_encode=fast_encode)
    (plan_f,) = c.scatter([plan], broadcast=True, hash=False)  # its edge lists once per worker, not per task
    parts = run_tasks(
        c,
        _shard_task,
        [(model_item, sae_items, tok, plan_f, r, settings) for r in ranges],
        desc="gather shards",
        progress=progress,
        retries=retries,
    )
    n_total = int(tokens.shape[0] * tokens.shape[1])
    merged = _merge_partials(parts, n_total=n_total, seed=seed, top_k=top_k, n_samples=n_samples)
    stats = _finish(
        merged, tokens, layers=plan.layers, hook_names=plan.hook_names, widths=plan.widths, edges=plan.edges
    )
    stats.meta["shards"] = [list(r) for r in ranges]
    return _complete(stats, plan, cache=cache)


def _check_tokens(tokens: Any) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-D (n_seq, seq_len) tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"tokens must be integer token ids, got {tokens.dtype}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens need >= 1 sequence of >= 2 positions (BOS + text), got {tuple(tokens.shape)}"
        )
    return tokens.to(torch.int64).cpu()


@fitted_threads()  # torch threads for the CPUs free now (featmatch._threads)
def _run(
    model: Any,
    saes: dict[int, Any],
    tokens: torch.Tensor,
    *,
    layers: list[int],
    hook_names: dict[int, str],
    pairs: list[tuple[int, int]],
    edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None,
    top_k: int,
    n_samples: int,
    seed: int,
    batch_size: int,
    progress: bool,
    fast_encode: bool,
    seq_range: tuple[int, int] | None = None,
) -> _Partial:
    """Accumulate the statistics of the sequences ``seq_range`` (all by default) of ``tokens``.

    Positions are global (``seq * seq_len + pos`` over the whole ``tokens``) and the sampling
    priorities are the whole run's, so the partial results of disjoint ranges merge exactly
    into the result of one pass (:func:`_merge_partials`).
    """
    from tqdm.auto import tqdm

    n_seq, seq_len = tokens.shape
    n_total = n_seq * seq_len
    prio_bits = _prio_bits(n_total)
    priority = _priority(n_total, seed)
    stop = _stop_layer(model, hook_names.values())
    device = model_device(model)
    first, last = (0, n_seq) if seq_range is None else (int(seq_range[0]), int(seq_range[1]))

    widths = {L: int(saes[L].cfg.d_sae) for L in layers}
    acc = {L: _LayerAccumulator(widths[L], top_k, n_samples, prio_bits) for L in layers}
    encoders = {
        L: (_fast_encoder(saes[L]) if fast_encode else None) or _generic_encoder(saes[L]) for L in layers
    }
    coact = {p: np.zeros((widths[p[0]], widths[p[1]]), dtype=np.int64) for p in pairs}
    prod = {p: np.zeros((widths[p[0]], widths[p[1]]), dtype=np.float64) for p in pairs}
    a_side = {p[0] for p in pairs}
    b_side = {p[1] for p in pairs}
    edges = edges or {}
    e_side = {L for p in edges for L in p}
    e_coact = {p: np.zeros(len(r), dtype=np.int64) for p, (r, _) in edges.items()}
    e_prod = {p: np.zeros(len(r), dtype=np.float64) for p, (r, _) in edges.items()}
    e_idx = {p: (torch.from_numpy(r), torch.from_numpy(c)) for p, (r, c) in edges.items()}
    dense_e: dict[int, torch.Tensor] = {}  # layer -> acts (n, F) of this batch

    batch_state: dict[str, Any] = {}
    sparse_t: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (A^T ones, A^T acts) CSR
    dense_b: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (fire float, acts)

    def do_pairs(layer: int) -> None:
        for la, lb in pairs:
            if layer not in (la, lb) or la not in sparse_t or lb not in dense_b:
                continue
            if (la, lb) in batch_state["done"]:
                continue
            batch_state["done"].add((la, lb))
            ones_t, acts_t = sparse_t[la]
            fire_b, acts_b = dense_b[lb]
            coact[(la, lb)] += (ones_t @ fire_b).round_().to(torch.int64).cpu().numpy()
            prod[(la, lb)] += (acts_t @ acts_b).cpu().numpy()

    def do_edges() -> None:
        for p, (r, c) in e_idx.items():
            if p[0] not in dense_e or p[1] not in dense_e or p in batch_state["done_e"]:
                continue
            batch_state["done_e"].add(p)
            acts_a, acts_b = dense_e[p[0]], dense_e[p[1]]
            step = max(1, (1 << 23) // max(acts_a.shape[0], 1))  # <= 8M entries per product
            for s0 in range(0, len(r), step):
                ga = acts_a[:, r[s0 : s0 + step].to(acts_a.device)]
                gb = acts_b[:, c[s0 : s0 + step].to(acts_b.device)]
                e_prod[p][s0 : s0 + step] += (ga * gb).sum(0, dtype=torch.float64).cpu().numpy()
                e_coact[p][s0 : s0 + step] += ((ga > 0) & (gb > 0)).sum(0).cpu().numpy()

    def make_hook(layer: int) -> Callable[[torch.Tensor, Any], None]:
        F = widths[layer]
        encode = encoders[layer]
        sae_dtype = getattr(saes[layer], "dtype", torch.float32)

        def hook(resid: torch.Tensor, hook: Any = None) -> None:
            x = resid[:, 1:]  # a strided view; BOS dropped
            if x.ndim != 3:  # e.g. hook_z (batch, pos, head, d_head): flatten the trailing dims
                x = x.reshape(x.shape[0], x.shape[1], -1)
            a = acc[layer]
            a.norm_sum += float(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).sum())
            hidden, mask = encode(x.to(sae_dtype))
            n = hidden.shape[0]
            if hidden.device.type == "cpu":
                flat = np.flatnonzero(mask.numpy())  # firing entries, row-major = position order
                vals = hidden.numpy().reshape(-1)[flat]
                rows, cols = np.divmod(flat, F)
            else:
                flat_t = torch.nonzero(mask.reshape(-1)).squeeze(1)
                vals = hidden.reshape(-1)[flat_t].float().cpu().numpy()
                rows, cols = np.divmod(flat_t.cpu().numpy(), F)
            vals = vals.astype(np.float32, copy=False)
            a.update(rows, cols, vals, batch_state["gpos"], batch_state["prio"])
            if layer in a_side:
                dev = hidden.device
                order = np.argsort(cols.astype(np.uint16) if F <= 65535 else cols, kind="stable")
                crow = np.zeros(F + 1, dtype=np.int64)
                np.cumsum(np.bincount(cols, minlength=F), out=crow[1:])
                crow_t = torch.from_numpy(crow).to(dev)
                r_sorted = torch.from_numpy(rows[order]).to(dev)
                v_sorted = torch.from_numpy(vals[order]).to(dev)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    sparse_t[layer] = (
                        torch.sparse_csr_tensor(crow_t, r_sorted, torch.ones_like(v_sorted), (F, n)),
                        torch.sparse_csr_tensor(crow_t, r_sorted, v_sorted, (F, n)),
                    )
            if layer in b_side or layer in e_side:
                acts = _dense(hidden.float(), mask)
                if layer in b_side:
                    dense_b[layer] = (mask.float(), acts)
                if layer in e_side:
                    dense_e[layer] = acts
            if layer in a_side or layer in b_side:
                do_pairs(layer)
            if layer in e_side:
                do_edges()

        return hook

    fwd_hooks = [(hook_names[L], make_hook(L)) for L in layers]
    seq_pos = torch.arange(1, seq_len)
    bar = tqdm(
        total=(last - first) * (seq_len - 1),
        unit="tok",
        unit_scale=True,
        desc="gather activations",
        disable=not progress,
    )
    try:
        with torch.no_grad():
            for start in range(first, last, batch_size):
                batch = tokens[start : min(start + batch_size, last)]
                seqs = torch.arange(start, start + batch.shape[0])
                gpos = (seqs[:, None] * seq_len + seq_pos[None, :]).reshape(-1).numpy()
                batch_state.update(gpos=gpos, prio=priority[gpos], done=set(), done_e=set())
                sparse_t.clear()
                dense_b.clear()
                dense_e.clear()
                model.run_with_hooks(batch.to(device), fwd_hooks=fwd_hooks, stop_at_layer=stop)
                bar.update(batch.shape[0] * (seq_len - 1))
    finally:
        bar.close()
        sparse_t.clear()
        dense_b.clear()
        dense_e.clear()

    for L in layers:
        acc[L].finish()
    return _Partial(
        seq_range=(first, last),
        stop_at_layer=stop,
        fire_count={L: acc[L].fire_count for L in layers},
        act_sum={L: acc[L].act_sum for L in layers},
        act_sq_sum={L: acc[L].act_sq_sum for L in layers},
        norm_sum={L: acc[L].norm_sum for L in layers},
        top={L: (acc[L].top.pos, acc[L].top.val) for L in layers},
        samples={L: (acc[L].res.pos, acc[L].res.val) for L in layers},
        coact=coact,
        prod_sum=prod,
        e_coact=e_coact,
        e_prod=e_prod,
    )


def _prio_bits(n_total: int) -> int:
    return max(1, math.ceil(math.log2(n_total + 1)))


def _priority(n_total: int, seed: int) -> np.ndarray:
    """The sampling priority of every global position: a seeded uniform permutation."""
    return np.random.default_rng(seed).permutation(n_total).astype(np.int64)


@dataclass
class _Partial:
    """The accumulators of one pass over a range of sequences (see :func:`_merge_partials`)."""

    seq_range: tuple[int, int]
    stop_at_layer: int | None
    fire_count: dict[int, np.ndarray]
    act_sum: dict[int, np.ndarray]
    act_sq_sum: dict[int, np.ndarray]
    norm_sum: dict[int, float]
    top: dict[int, tuple[np.ndarray, np.ndarray]]
    samples: dict[int, tuple[np.ndarray, np.ndarray]]
    coact: dict[tuple[int, int], np.ndarray]
    prod_sum: dict[tuple[int, int], np.ndarray]
    e_coact: dict[tuple[int, int], np.ndarray]
    e_prod: dict[tuple[int, int], np.ndarray]


def _merge_best(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, score: Callable[..., np.ndarray], bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` per feature of several :class:`_BestK` results, exactly.

    ``parts`` come in increasing position order (shard order); each holds a feature's
    entries in rank order, ties in position order. They are offered to a fresh
    :class:`_BestK` in that order, whose stable merge keeps the earlier entry on a tied
    score: the same tie rule as one pass.
    """
    pos0, val0 = parts[0]
    best = _BestK(pos0.shape[0], k, bits, value_dtype=val0.dtype)
    for pos, val in parts:
        feat, rank = np.nonzero(pos >= 0)  # row-major: by feature, then rank
        p, v = pos[feat, rank], val[feat, rank]
        best.update(feat, score(p, v), p, v)
    best.finish()
    return best.pos, best.val


def _merge_partials(
    parts: Sequence[_Partial], *, n_total: int, seed: int, top_k: int, n_samples: int
) -> _Partial:
    """Merge the partial results of disjoint sequence ranges into the result of one pass.

    * counts (firing, co-activation) are integer sums: exact;
    * the float64 sums (activations, squares, products, residual norms) are the same
      per-batch terms added in another order: equal up to float64 rounding of the
      reassociated sum (relative error below ``n_batches * 2**-52``);
    * the top-k activations and the uniform samples are the best ``k`` of each part by an
      integer score that does not depend on the part (the value's IEEE bits; the position's
      global priority, a seeded permutation), so the best ``k`` of the union is exact:
      the samples are the bottom-``n_samples`` of one uniform random permutation of all
      positions, i.e. a uniform sample without replacement, as in one pass.
    """
    parts = sorted(parts, key=lambda p: p.seq_range[0])
    first = parts[0]
    layers = list(first.fire_count)
    priority = _priority(n_total, seed)
    bits = _prio_bits(n_total)

    def add(name: str) -> dict[Any, np.ndarray]:
        keys = getattr(first, name).keys()
        return {key: np.sum([getattr(p, name)[key] for p in parts], axis=0) for key in keys}

    return _Partial(
        seq_range=(first.seq_range[0], parts[-1].seq_range[1]),
        stop_at_layer=first.stop_at_layer,
        fire_count=add("fire_count"),
        act_sum=add("act_sum"),
        act_sq_sum=add("act_sq_sum"),
        norm_sum={L: float(sum(p.norm_sum[L] for p in parts)) for L in layers},
        top={
            L: _merge_best([p.top[L] for p in parts], top_k, lambda _p, v: _value_score(v), 31)
            for L in layers
        },
        samples={
            L: _merge_best([p.samples[L] for p in parts], n_samples, lambda q, _v: priority[q], bits)
            for L in layers
        },
        coact=add("coact"),
        prod_sum=add("prod_sum"),
        e_coact=add("e_coact"),
        e_prod=add("e_prod"),
    )


def _finish(
    part: _Partial,
    tokens: torch.Tensor,
    *,
    layers: list[int],
    hook_names: dict[int, str],
    widths: dict[int, int],
    edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
) -> ActivationStats:
    """The :class:`ActivationStats` of a whole-run partial."""
    n_tokens = int(tokens.shape[0] * (tokens.shape[1] - 1))
    stats = ActivationStats(
        layers=layers,
        n_tokens=n_tokens,
        hook_names=hook_names,
        fire_count=part.fire_count,
        act_sum=part.act_sum,
        act_sq_sum=part.act_sq_sum,
        resid_norm_mean={L: part.norm_sum[L] / n_tokens for L in layers},
        coact=part.coact,
        prod_sum=part.prod_sum,
        top_values={L: part.top[L][1] for L in layers},
        top_positions={L: part.top[L][0] for L in layers},
        samples=part.samples,
        tokens=tokens,
        meta={"stop_at_layer": part.stop_at_layer, "widths": {str(L): widths[L] for L in layers}},
        pair_edges={p: (edges[p][0], edges[p][1], part.e_coact[p], part.e_prod[p]) for p in edges},
    )
    for L in layers:
        if not (np.isfinite(stats.act_sum[L]).all() and np.isfinite(stats.act_sq_sum[L]).all()):
            raise ValueError(f"non-finite SAE activations at layer {L} (hook {hook_names[L]})")
    return stats


def sparse_activations(
    model: Any,
    saes: dict[int, Any],
    tokens: torch.Tensor,
    *,
    batch_size: int = 16,
    fast_encode: bool = True,
) -> dict[int, Any]:
    """Every layer's SAE activations as a sparse ``(n_tokens, F)`` matrix (BOS excluded).

    Row ``t`` is the ``t``-th non-BOS position in sequence order (the positions counted by
    :attr:`ActivationStats.n_tokens`); only firing entries (``> 0``) are stored, so memory
    is ``12 * n_tokens * L0`` bytes per layer (about 12 MB for 16k tokens at L0 = 64),
    not ``n_tokens * F``. The input of the blocked all-pairs correlation
    (:func:`featmatch.matching.baselines.coactivation_topk`) at 16k–65k widths.

    Returns
    -------
    dict int -> scipy.sparse.csr_matrix (float32)
    """
    from scipy.sparse import csr_matrix

    tokens = _check_tokens(tokens)
    layers = sorted(int(k) for k in saes)
    saes = {int(k): v for k, v in saes.items()}
    hook_names = {L: resolve_hook_name(saes[L], L) for L in layers}
    _check_hooks(model, hook_names)
    stop = _stop_layer(model, hook_names.values())
    encoders = {
        L: (_fast_encoder(saes[L]) if fast_encode else None) or _generic_encoder(saes[L]) for L in layers
    }
    widths = {L: int(saes[L].cfg.d_sae) for L in layers}
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {L: [] for L in layers}
    offset = {"rows": 0}

    def make_hook(layer: int) -> Callable[[torch.Tensor, Any], None]:
        def hook(resid: torch.Tensor, hook: Any = None) -> None:
            x = resid[:, 1:]
            if x.ndim != 3:
                x = x.reshape(x.shape[0], x.shape[1], -1)
            hidden, mask = encoders[layer](x.to(getattr(saes[layer], "dtype", torch.float32)))
            flat = torch.nonzero(mask.reshape(-1)).squeeze(1)
            vals = hidden.reshape(-1)[flat].float().cpu().numpy()
            rows, cols = np.divmod(flat.cpu().numpy(), widths[layer])
            parts[layer].append((rows + offset["rows"], cols, vals))

        return hook

    device = model_device(model)
    fwd_hooks = [(hook_names[L], make_hook(L)) for L in layers]
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size]
            model.run_with_hooks(batch.to(device), fwd_hooks=fwd_hooks, stop_at_layer=stop)
            offset["rows"] += batch.shape[0] * (tokens.shape[1] - 1)
    n = offset["rows"]
    out = {}
    for L in layers:
        if parts[L]:
            r, c, v = (np.concatenate(x) for x in zip(*parts[L], strict=True))
        else:
            r, c, v = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        out[L] = csr_matrix((v.astype(np.float32), (r, c)), shape=(n, widths[L]))
    return out
