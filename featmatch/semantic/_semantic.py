r"""Semantic optimal transport: features as activation-weighted distributions.

This module implements the distributional feature representation of Cao, Do and Thai
(2026) [1]_ (``seeds/000``; section 2 of ``PAPERS.md``). A feature is not its decoder
vector: it is the *activation-weighted distribution of the hidden states of the tokens
on which it fires*, read in one **shared reference space** so that features of
different layers can be compared, and two features are compared by a Wasserstein
distance between those distributions.

The paper's full text is not available, so the definitions below are featmatch's own
and are stated where they are used:

* **Reference space** (:func:`reference_coordinates`, :class:`ReferenceSpace`): every
  token position :math:`t` is mapped to the hidden state :math:`h^{(r)}_t \in \mathbb{R}^d`
  of the *same position* at one reference hook :math:`r` (a fixed layer, the final
  residual stream, or the token embedding), optionally reduced by a PCA fitted once,

  .. math::

      z_t = P_k^\top \bigl(h^{(r)}_t - \bar h\bigr) \in \mathbb{R}^k .

* **Feature distribution** (:class:`FeatureDistributions`): with :math:`S_i` the sampled
  positions where feature :math:`i` fires and :math:`f_i(x_t) > 0` its activation,

  .. math::

      \mu_i = \sum_{t \in S_i} w_{it}\, \delta_{z_t}, \qquad
      w_{it} = \frac{f_i(x_t)}{\sum_{s \in S_i} f_i(x_s)} .

* **Distance** (:func:`distance_matrix`): :math:`W_p(\mu_i, \nu_j)` with the Euclidean
  ground metric of the reference space, exact (:func:`ot.emd2`), entropic
  (:func:`ot.sinkhorn2`, log domain) or sliced (quantile embedding); the default is
  :math:`p = 2`.

* **Matching** (:func:`semantic_match`): a linear assignment or a one-to-many top-k on
  the distance matrix, returned as :class:`featmatch.matching.Matching` so every metric
  of featmatch applies unchanged.

Properties (tested in ``tests/test_semantic.py``)
-------------------------------------------------
* *Rescaling invariance.* Multiplying :math:`f_i` by :math:`c > 0` leaves every
  :math:`w_{it}` unchanged, hence :math:`\mu_i` and all its distances.
* *Stability.* If the reference coordinates move, :math:`z_t \mapsto z_t + \delta_t`,
  then, with :math:`\|\delta\|_{\infty,2} = \max_t \|\delta_t\|_2` taken over the
  support points of both measures,

  .. math::

      |W_p(\mu^\delta, \nu^\delta) - W_p(\mu, \nu)|
      \le \Bigl(\sum_t w^\mu_t \|\delta_t\|_2^p\Bigr)^{1/p}
        + \Bigl(\sum_t w^\nu_t \|\delta_t\|_2^p\Bigr)^{1/p}
      \le 2\,\|\delta\|_{\infty,2},

  and :math:`\le \|\delta\|_{\infty,2}` when only one of the two measures is perturbed
  (triangle inequality plus the coupling :math:`(z_t, z_t + \delta_t)`). Because the
  PCA map is an orthogonal projection (1-Lipschitz), the same bound holds with
  :math:`\delta_t` measured on the raw hidden states, for a fixed basis.
* *Recovery.* When every planted pair is closer than any other pair by a margin larger
  than the sampling error, the assignment recovers the planted pairs.

References
----------
.. [1] Cao, T. M., Do, N., Thai, M. T. (2026). Semantic Optimal Transport for Sparse
   Autoencoder Feature Matching and Circuit Compression. arXiv:2605.28567.
.. [2] Flamary, R. et al. (2021). POT: Python Optimal Transport. JMLR 22(78):1-8.
.. [3] Cuturi, M. (2013). Sinkhorn distances: lightspeed computation of optimal
   transport. NeurIPS 26.
.. [4] Bonneel, N., Rabin, J., Peyré, G., Pfister, H. (2015). Sliced and Radon
   Wasserstein barycenters of measures. J. Math. Imaging Vis. 51(1):22-45.
.. [5] Laptev, D. et al. (2025). Analyze Feature Flow to Enhance Interpretation and
   Steering in Language Models (decoder-cosine top-1 matching).
.. [6] Balagansky, N., Maksimov, I., Gavrilov, D. (2025). Mechanistic Permutability:
   Match Features Across Layers. ICLR.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featmatch._hooks import model_device
from featmatch._io import atomic_save, check_finite, tokens_sha256
from featmatch._threads import fitted_thread_count
from featmatch.semantic import _ot

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from featmatch.matching._matching import Matching

__all__ = [
    "ReferenceSpace",
    "reference_coordinates",
    "reference_hook",
    "FeatureDistributions",
    "distance_matrix",
    "pair_distances",
    "quantile_embedding",
    "transport_plan",
    "semantic_match",
    "topk_from_distances",
    "nearest",
    "moment_lower_bound",
    "DEFAULT_CANDIDATES",
    "decoder_cosine_match",
    "sae_match",
    "approximation_report",
    "METHODS",
]

METHODS = ("exact", "sinkhorn", "sliced")

#: Candidates per query that :func:`nearest` reranks by exact :math:`W_2` (``c``), with the
#: default ``embed="moment"``. Measured on real quick-zoo features, every live feature of
#: layer 14 against layers 15 and 29 (1,850 queries; chapter 04's distributions: train split,
#: layer:mid, PCA 64, ≤ 32 samples), against the certified exact search: recall@1 0.9876
#: (Clopper–Pearson 95 % CI [0.9814, 0.9921]) at c = 192, which does not establish 0.99, and
#: 0.9978 ([0.9945, 0.9994]) at c = 384, which does (``benchmarks/bench_nearest.py --decide``).
#: Use ``certify=True`` when every neighbour must be exact.
DEFAULT_CANDIDATES = 384

#: Relative slack on :func:`moment_lower_bound` when it excludes a column from a top-k: a
#: column is skipped only if its bound exceeds the k-th exact distance by more than this, so
#: float64 rounding of the bound or of the solve (~1e-15 relative) never drops a tie.
_BOUND_SLACK = 1e-9


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8") if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Reference space
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ReferenceSpace:
    r"""Coordinates of every token position in one shared reference space.

    Position :math:`t` (the flat global position ``seq * seq_len + pos``) is mapped to

    .. math::

        z_t = P_k^\top \bigl(h^{(r)}_t - \bar h\bigr) \in \mathbb{R}^k, \qquad
        \bar h = \frac{1}{|T'|}\sum_{s \in T'} h^{(r)}_s ,

    where :math:`h^{(r)}_t` is the hidden state of position :math:`t` at the reference
    hook :math:`r`, :math:`T'` is the set of positions with ``pos != 0`` (the BOS
    attention sink is excluded from the fit but still gets coordinates) and
    :math:`P_k \in \mathbb{R}^{d \times k}` holds the top-:math:`k` right singular
    vectors of the centred matrix :math:`(h_s - \bar h)_{s \in T'}` (a PCA fitted once).
    Without PCA, :math:`z_t = h^{(r)}_t`. Distances in this space are Euclidean.

    Parameters
    ----------
    coords : (n_positions, k) float32 array
        :math:`z_t` for every global position.
    seq_len : int
        Sequence length of the token batch (to recognise position 0 of each sequence).
    name : str
        Human-readable description (model, hook, PCA size, token hash).
    space_id : str, optional
        Identifier used to detect mismatched spaces; computed from ``name`` and the
        coordinates when empty.
    mean : (d,) array, optional
        :math:`\bar h` (``None`` without PCA).
    basis : (d, k) array, optional
        :math:`P_k` (``None`` without PCA).
    explained_variance_ratio : (k,) array, optional
        Share of the (BOS-excluded) variance captured by each component.
    hook_name : str, optional
        The reference hook.
    tokens_sha : str, optional
        SHA-256 of the token batch the coordinates were computed on.
    """

    coords: np.ndarray
    seq_len: int
    name: str
    space_id: str = ""
    mean: np.ndarray | None = None
    basis: np.ndarray | None = None
    explained_variance_ratio: np.ndarray | None = None
    hook_name: str | None = None
    tokens_sha: str | None = None

    def __post_init__(self) -> None:
        coords = np.ascontiguousarray(np.asarray(self.coords, dtype=np.float32))
        if coords.ndim != 2:
            raise ValueError(f"ReferenceSpace.coords must be (n_positions, k), got shape {coords.shape}")
        if self.seq_len < 1 or coords.shape[0] % self.seq_len:
            raise ValueError(f"n_positions={coords.shape[0]} is not a multiple of seq_len={self.seq_len}")
        check_finite("ReferenceSpace.coords", coords)
        object.__setattr__(self, "coords", coords)
        if not self.space_id:
            object.__setattr__(self, "space_id", _sha(self.name, str(coords.shape), coords.tobytes())[:16])

    @property
    def n_positions(self) -> int:
        """Number of global token positions."""
        return int(self.coords.shape[0])

    @property
    def k(self) -> int:
        """Dimension of the reference space."""
        return int(self.coords.shape[1])

    def __len__(self) -> int:
        return self.n_positions

    def __repr__(self) -> str:
        return f"ReferenceSpace(name={self.name!r}, space_id={self.space_id!r}, n_positions={self.n_positions}, k={self.k})"

    @classmethod
    def from_hidden(
        cls,
        hidden: np.ndarray | torch.Tensor,
        *,
        name: str,
        pca_k: int | None = 64,
        hook_name: str | None = None,
        tokens_sha: str | None = None,
    ) -> ReferenceSpace:
        """Build the space from hidden states ``(n_seq, seq_len, d)`` (fits the PCA).

        ``pca_k=None`` keeps the raw hidden states; ``pca_k >= d`` keeps all ``d``
        components (a rotation, distances unchanged).
        """
        h = hidden.detach().cpu().numpy() if isinstance(hidden, torch.Tensor) else np.asarray(hidden)
        if h.ndim != 3:
            raise ValueError(f"hidden must be (n_seq, seq_len, d), got shape {h.shape}")
        check_finite("hidden states", h)
        n_seq, seq_len, d = h.shape
        flat = h.reshape(-1, d)
        if pca_k is None:
            return cls(flat.astype(np.float32), seq_len, name, hook_name=hook_name, tokens_sha=tokens_sha)
        if pca_k < 1:
            raise ValueError(f"pca_k must be >= 1 or None, got {pca_k}")
        fit = h[:, 1:, :].reshape(-1, d).astype(np.float64)
        if fit.shape[0] < 2:
            raise ValueError("need at least 2 non-BOS positions to fit the PCA")
        mean = fit.mean(0)
        cov = np.zeros((d, d))
        for start in range(0, fit.shape[0], 8192):  # covariance in blocks, float64
            blk = fit[start : start + 8192] - mean
            cov += blk.T @ blk
        cov /= fit.shape[0] - 1
        u, s, _ = np.linalg.svd(cov, hermitian=True)
        kk = min(pca_k, d)
        basis = u[:, :kk]
        signs = np.sign(basis[np.abs(basis).argmax(0), np.arange(kk)])  # deterministic sign
        basis = basis * np.where(signs == 0, 1.0, signs)
        total = s.sum()
        evr = s[:kk] / total if total > 0 else np.zeros(kk)
        coords = ((flat.astype(np.float64) - mean) @ basis).astype(np.float32)
        return cls(
            coords,
            seq_len,
            name,
            mean=mean.astype(np.float32),
            basis=basis.astype(np.float32),
            explained_variance_ratio=evr,
            hook_name=hook_name,
            tokens_sha=tokens_sha,
        )

    def project(self, hidden: np.ndarray | torch.Tensor) -> np.ndarray:
        """Map new hidden states ``(..., d)`` with the stored (fixed) PCA basis."""
        h = hidden.detach().cpu().numpy() if isinstance(hidden, torch.Tensor) else np.asarray(hidden)
        check_finite("hidden states", h)
        if self.basis is None:
            return h.astype(np.float32)
        return ((h.astype(np.float64) - self.mean) @ self.basis.astype(np.float64)).astype(np.float32)

    def with_coords(self, coords: np.ndarray, name: str | None = None) -> ReferenceSpace:
        """A copy with other coordinates (e.g. perturbed); gets a new ``space_id``."""
        return ReferenceSpace(
            coords,
            self.seq_len,
            name or f"{self.name}|modified",
            mean=self.mean,
            basis=self.basis,
            explained_variance_ratio=self.explained_variance_ratio,
            hook_name=self.hook_name,
            tokens_sha=self.tokens_sha,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``.npz`` (atomic)."""
        arrays: dict[str, np.ndarray] = {
            "coords": self.coords,
            "seq_len": np.asarray(self.seq_len),
            "name": np.asarray(self.name),
            "space_id": np.asarray(self.space_id),
        }
        for key in ("mean", "basis", "explained_variance_ratio"):
            if getattr(self, key) is not None:
                arrays[key] = np.asarray(getattr(self, key))
        for key in ("hook_name", "tokens_sha"):
            if getattr(self, key) is not None:
                arrays[key] = np.asarray(getattr(self, key))
        return atomic_save(path, lambda p: _savez(p, arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceSpace:
        """Load a space written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            opt = {k: z[k] for k in ("mean", "basis", "explained_variance_ratio") if k in z}
            strs = {k: str(z[k]) for k in ("hook_name", "tokens_sha") if k in z}
            return cls(
                z["coords"], int(z["seq_len"]), str(z["name"]), space_id=str(z["space_id"]), **opt, **strs
            )


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a handle, so numpy does not append ".npz"
        np.savez(fh, **arrays)


def reference_hook(space: str, n_layers: int) -> tuple[str, int | None]:
    """Hook name and ``stop_at_layer`` of a reference-space spec.

    ``"layer:L"`` (negative ``L`` counts from the end, ``"layer:mid"`` is
    ``n_layers // 2``), ``"final"`` (the last block's ``hook_resid_post``), ``"embed"``
    (``hook_embed``), or ``"hook:<name>"``.

    Examples
    --------
    >>> reference_hook("layer:mid", 30)
    ('blocks.15.hook_resid_post', 16)
    >>> reference_hook("embed", 30)
    ('hook_embed', 0)
    """
    if space == "embed":
        return "hook_embed", 0
    if space == "final":
        return f"blocks.{n_layers - 1}.hook_resid_post", None
    if space.startswith("hook:"):
        return space[5:], None
    if space.startswith("layer:"):
        arg = space[6:]
        layer = n_layers // 2 if arg == "mid" else int(arg)
        if layer < 0:
            layer += n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"reference layer {arg} out of range for a {n_layers}-layer model")
        return f"blocks.{layer}.hook_resid_post", layer + 1
    raise ValueError(
        f"unknown reference space {space!r}; use 'layer:L', 'layer:mid', 'final', 'embed' or 'hook:<name>'"
    )


def _resolve_space(model: Any, space: str) -> tuple[str, int | None]:
    """Hook name and ``stop_at_layer`` for a reference-space spec of ``model``."""
    return reference_hook(space, int(model.cfg.n_layers))


def reference_coordinates(
    model: Any,
    tokens: torch.Tensor,
    space: str = "layer:mid",
    pca_k: int | None = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> ReferenceSpace:
    r"""Compute the shared reference space for a token batch.

    Runs ``model`` (a TransformerLens ``HookedTransformer``) on ``tokens`` and reads the
    hidden state of **every** position at the reference hook, then fits the PCA of
    :class:`ReferenceSpace` once (BOS positions excluded from the fit).

    Parameters
    ----------
    model : HookedTransformer
        The model whose SAEs are matched.
    tokens : (n_seq, seq_len) LongTensor
        The token batch the activation samples were gathered on (column 0 is BOS).
    space : str
        ``"layer:L"`` (``blocks.L.hook_resid_post``; ``L`` may be negative or ``"mid"``
        for ``n_layers // 2``, the default: layer 15 of SmolLM2-135M), ``"final"``
        (residual stream after the last block), ``"embed"`` (token embeddings,
        ``hook_embed``) or ``"hook:<name>"`` (any hook).
    pca_k : int or None
        Number of PCA components :math:`k` (``None``: raw hidden states).
    batch_size : int
        Sequences per forward pass.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ReferenceSpace
        ``coords`` of shape ``(n_seq * seq_len, k)`` float32, with a ``space_id``.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError("tokens must be a (n_seq, seq_len) LongTensor")
    hook, stop = _resolve_space(model, space)
    device = model_device(model)
    chunks: list[torch.Tensor] = []

    def _grab(act: torch.Tensor, hook: Any) -> None:
        chunks.append(act.detach().float().cpu())

    from tqdm.auto import tqdm

    starts = range(0, tokens.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=f"reference {space}", disable=not progress):
            batch = tokens[start : start + batch_size].to(device)
            model.run_with_hooks(batch, fwd_hooks=[(hook, _grab)], stop_at_layer=stop)
    if len(chunks) != len(starts):
        raise RuntimeError(f"hook {hook!r} did not fire once per batch")
    hidden = torch.cat(chunks, 0)
    model_name = getattr(model.cfg, "model_name", "model")
    tsha = tokens_sha256(tokens, terminated=True)
    name = f"{model_name}|{space}|{hook}|pca={pca_k}|tokens={tsha[:12]}"
    return ReferenceSpace.from_hidden(hidden, name=name, pca_k=pca_k, hook_name=hook, tokens_sha=tsha)


# --------------------------------------------------------------------------------------
# Feature distributions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FeatureDistributions:
    r"""Activation-weighted empirical distributions of a set of features.

    Row ``i`` is the measure :math:`\mu_i = \sum_n w_{in}\,\delta_{x_{in}}` on the
    reference space, with ``coords[i, n]`` :math:`= x_{in}` and ``weights[i, n]``
    :math:`= w_{in}`; padding slots have weight 0. Features that never fire are not
    rows: they are listed in ``empty``.

    Parameters
    ----------
    coords : (F, N, k) float32 array
        Sample coordinates in the reference space.
    weights : (F, N) float64 array
        Non-negative, each row sums to 1.
    feature_ids : (F,) int64 array
        The SAE feature index of each row.
    space_id : str
        :attr:`ReferenceSpace.space_id` of the space the coordinates live in.
    layer : int, optional
        Layer of the SAE (metadata).
    n_features : int, optional
        Width of the SAE (default: ``max(feature_ids, empty) + 1``); matchings are
        reported in this full index space.
    empty : (E,) int64 array
        Features with no usable sample (never fire); excluded from every distance.
    positions : (F, N) int64 array, optional
        Global positions of the samples (−1 for padding), kept for contexts.
    """

    coords: np.ndarray
    weights: np.ndarray
    feature_ids: np.ndarray
    space_id: str
    layer: int | None = None
    n_features: int | None = None
    empty: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    positions: np.ndarray | None = None

    def __post_init__(self) -> None:
        coords = np.ascontiguousarray(np.asarray(self.coords, dtype=np.float32))
        weights = np.ascontiguousarray(np.asarray(self.weights, dtype=np.float64))
        ids = np.asarray(self.feature_ids, dtype=np.int64).reshape(-1)
        empty = np.asarray(self.empty, dtype=np.int64).reshape(-1)
        if coords.ndim != 3:
            raise ValueError(f"coords must be (F, N, k), got shape {coords.shape}")
        if weights.shape != coords.shape[:2]:
            raise ValueError(f"weights shape {weights.shape} does not match coords {coords.shape[:2]}")
        if ids.shape != (coords.shape[0],):
            raise ValueError(f"feature_ids must have shape ({coords.shape[0]},), got {ids.shape}")
        check_finite("FeatureDistributions.coords", coords)
        check_finite("FeatureDistributions.weights", weights)
        if (weights < 0).any():
            raise ValueError("FeatureDistributions.weights must be non-negative")
        if coords.shape[0]:
            sums = weights.sum(1)
            if np.abs(sums - 1.0).max() > 1e-6:
                bad = int(np.abs(sums - 1.0).argmax())
                raise ValueError(
                    f"weights of row {bad} sum to {sums[bad]:.6g}, not 1 (empty features must be excluded)"
                )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("feature_ids must be unique")
        n_features = self.n_features
        if n_features is None:
            n_features = int(max(ids.max(initial=-1), empty.max(initial=-1)) + 1)
        if ids.size and (ids.min() < 0 or ids.max() >= n_features):
            raise ValueError(f"feature_ids must lie in [0, {n_features})")
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "feature_ids", ids)
        object.__setattr__(self, "empty", empty)
        object.__setattr__(self, "n_features", int(n_features))
        if self.positions is not None:
            pos = np.asarray(self.positions, dtype=np.int64)
            if pos.shape != weights.shape:
                raise ValueError(f"positions shape {pos.shape} does not match weights {weights.shape}")
            object.__setattr__(self, "positions", pos)

    # -- shape helpers ---------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def k(self) -> int:
        """Dimension of the reference space."""
        return int(self.coords.shape[2])

    @property
    def n_samples(self) -> int:
        """Sample slots per feature (``N``)."""
        return int(self.coords.shape[1])

    @property
    def support_size(self) -> np.ndarray:
        """``(F,)`` number of samples with positive weight."""
        return (self.weights > 0).sum(1)

    def __repr__(self) -> str:
        return (
            f"FeatureDistributions(F={len(self)}, N={self.n_samples}, k={self.k}, layer={self.layer}, "
            f"space_id={self.space_id!r}, empty={len(self.empty)})"
        )

    def support(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i`` without padding: points ``(n, k)`` and weights ``(n,)`` (sum 1)."""
        w = self.weights[i]
        keep = w > 0
        wk = w[keep]
        return self.coords[i][keep], wk / wk.sum()

    def subset(self, rows: Sequence[int] | np.ndarray) -> FeatureDistributions:
        """The distributions of the given rows (not feature ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        return FeatureDistributions(
            self.coords[rows],
            self.weights[rows],
            self.feature_ids[rows],
            self.space_id,
            layer=self.layer,
            n_features=self.n_features,
            empty=self.empty,
            positions=None if self.positions is None else self.positions[rows],
        )

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_samples(
        cls,
        positions: np.ndarray | torch.Tensor,
        values: np.ndarray | torch.Tensor,
        ref: ReferenceSpace,
        n: int | None = None,
        seed: int = 0,
        *,
        feature_ids: Sequence[int] | np.ndarray | None = None,
        layer: int | None = None,
        n_features: int | None = None,
        exclude_bos: bool = True,
    ) -> FeatureDistributions:
        r"""Build the distributions from activation samples.

        A sample ``(positions[i, j], values[i, j])`` is used when the position is
        ``>= 0`` and the activation is ``> 0`` (and, with ``exclude_bos``, the position
        is not column 0 of its sequence). If ``n`` is given and a feature has more
        usable samples, ``n`` of them are kept, chosen uniformly without replacement by
        a seeded draw that does **not** look at the activation values (so rescaling a
        feature cannot change which samples are kept). Weights are the activations
        normalised to sum to one: :math:`w_{it} = f_i(x_t) / \sum_s f_i(x_s)`. Since
        the samples are a uniform reservoir over firing positions, :math:`\mu_i` is a
        consistent estimate of the activation-weighted distribution over all firing
        positions.

        Parameters
        ----------
        positions : (F, N) int array
            Global positions ``seq * seq_len + pos``, −1 for padding.
        values : (F, N) float array
            Activations at those positions.
        ref : ReferenceSpace
            Space providing the coordinates.
        n : int, optional
            Maximum number of samples per feature (default: all).
        seed : int
            Seed of the subsampling draw.
        feature_ids : (F,) ints, optional
            SAE feature index of each row (default ``arange(F)``).
        layer, n_features : optional
            Metadata (``n_features`` defaults to ``F`` when ``feature_ids`` is None).
        exclude_bos : bool
            Drop samples at position 0 of a sequence.

        Returns
        -------
        FeatureDistributions
            With the features without any usable sample listed in ``empty``.
        """
        pos = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions)
        val = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        if pos.ndim != 2 or pos.shape != val.shape:
            raise ValueError(f"positions and values must both be (F, N); got {pos.shape} and {val.shape}")
        pos = pos.astype(np.int64)
        F, N = pos.shape
        ids = np.arange(F, dtype=np.int64) if feature_ids is None else np.asarray(feature_ids, dtype=np.int64)
        if ids.shape != (F,):
            raise ValueError(f"feature_ids must have shape ({F},), got {ids.shape}")
        if n_features is None and feature_ids is None:
            n_features = F
        if (pos >= ref.n_positions).any():
            raise ValueError(
                f"sample positions reach {int(pos.max())} but the reference space {ref.space_id!r} has only "
                f"{ref.n_positions} positions; were the samples gathered on other tokens?"
            )
        live = pos >= 0
        if np.isnan(val[live]).any() or np.isinf(val[live]).any():
            raise ValueError("activation values contain NaN or Inf")
        valid = live & (val > 0)
        if exclude_bos:
            valid &= (pos % ref.seq_len) != 0
        rng = np.random.default_rng(seed)
        keys = rng.random((F, N))
        keys[~valid] = np.inf
        order = np.argsort(keys, axis=1, kind="stable")  # valid samples first, random order
        counts = valid.sum(1)
        width = int(counts.max(initial=0)) if n is None else min(int(n), int(counts.max(initial=0)))
        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        order = order[:, :width]
        keep = np.take_along_axis(valid, order, 1)
        sel_pos = np.where(keep, np.take_along_axis(pos, order, 1), -1)
        sel_val = np.where(keep, np.take_along_axis(val, order, 1), 0.0)
        nonempty = keep.any(1)
        sel_pos, sel_val = sel_pos[nonempty], sel_val[nonempty]
        w = sel_val / sel_val.sum(1, keepdims=True) if sel_val.size else sel_val.reshape(0, width)
        coords = ref.coords[np.maximum(sel_pos, 0)]
        coords[sel_pos < 0] = 0.0
        return cls(
            coords,
            w,
            ids[nonempty],
            ref.space_id,
            layer=layer,
            n_features=n_features,
            empty=ids[~nonempty],
            positions=sel_pos,
        )

    @classmethod
    def from_stats(
        cls, stats: Any, layer: int, ref: ReferenceSpace, n: int | None = None, seed: int = 0
    ) -> FeatureDistributions:
        """Build from ``ActivationStats.samples[layer]`` (checks the token batch matches ``ref``)."""
        tokens = getattr(stats, "tokens", None)
        if (
            tokens is not None
            and ref.tokens_sha is not None
            and tokens_sha256(tokens, terminated=True) != ref.tokens_sha
        ):
            raise ValueError(
                f"the activation stats were gathered on other tokens than reference space {ref.space_id!r}"
            )
        positions, values = stats.samples[layer]
        return cls.from_samples(positions, values, ref, n=n, seed=seed, layer=layer)

    # -- persistence -----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``.npz`` (atomic, through :func:`featmatch._io.atomic_save`)."""
        arrays = {
            "coords": self.coords,
            "weights": self.weights,
            "feature_ids": self.feature_ids,
            "space_id": np.asarray(self.space_id),
            "layer": np.asarray(-1 if self.layer is None else self.layer),
            "has_layer": np.asarray(self.layer is not None),
            "n_features": np.asarray(self.n_features),
            "empty": self.empty,
        }
        if self.positions is not None:
            arrays["positions"] = self.positions
        return atomic_save(path, lambda p: _savez(p, arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureDistributions:
        """Load distributions written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            return cls(
                z["coords"],
                z["weights"],
                z["feature_ids"],
                str(z["space_id"]),
                layer=int(z["layer"]) if bool(z["has_layer"]) else None,
                n_features=int(z["n_features"]),
                empty=z["empty"],
                positions=z["positions"] if "positions" in z else None,
            )


# --------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------


def _check_pair(a: FeatureDistributions, b: FeatureDistributions) -> None:
    for name, d in (("a", a), ("b", b)):
        if not isinstance(d, FeatureDistributions):
            raise TypeError(f"{name} must be FeatureDistributions, got {type(d).__name__}")
    if a.space_id != b.space_id:
        raise ValueError(
            f"the two sets live in different reference spaces ({a.space_id!r} vs {b.space_id!r}); "
            "build both from the same ReferenceSpace"
        )
    if a.k != b.k:
        raise ValueError(f"reference dimensions differ: {a.k} vs {b.k}")


def _check_method(method: str, p: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")


def quantile_embedding(
    d: FeatureDistributions, n_projections: int = 256, n_quantiles: int = 16, seed: int = 0
) -> np.ndarray:
    r"""Sliced quantile embedding :math:`e_i \in \mathbb{R}^{LQ}` of every feature.

    .. math::

        e_i[l, q] = \frac{1}{\sqrt{LQ}}\, F^{-1}_{\theta_l \# \mu_i}\!\Bigl(\frac{q + 1/2}{Q}\Bigr),
        \qquad \|e_i - e_j\|_2 = \widehat{SW}_2(\mu_i, \mu_j),

    with the same ``L`` directions :math:`\theta_l` (drawn from ``seed``) for every
    feature. See :func:`distance_matrix` for why this is the sliced :math:`W_2`. Use it
    for nearest-neighbour search; two embeddings are comparable only if they used the
    same ``(n_projections, n_quantiles, seed)`` and reference space.

    Returns
    -------
    (F, L * Q) float32 array
    """
    theta = _ot.random_directions(n_projections, d.k, seed)
    emb = _ot.quantile_embedding(d.coords, d.weights, theta, n_quantiles)
    return (emb.reshape(len(d), -1) / np.sqrt(n_projections * n_quantiles)).numpy()


def _sliced_matrix(
    a: FeatureDistributions, b: FeatureDistributions, p: int, n_projections: int, n_quantiles: int, seed: int
) -> np.ndarray:
    theta = _ot.random_directions(n_projections, a.k, seed)
    ea = _ot.quantile_embedding(a.coords, a.weights, theta, n_quantiles)
    eb = _ot.quantile_embedding(b.coords, b.weights, theta, n_quantiles)
    return _ot.sliced_from_embeddings(ea, eb, p=p)


def pair_distances(
    a: FeatureDistributions,
    b: FeatureDistributions,
    pairs: np.ndarray | Sequence[tuple[int, int]],
    method: str = "exact",
    *,
    p: int = 2,
    reg: float = 0.05,
    n_projections: int = 256,
    n_quantiles: int = 16,
    seed: int = 0,
    num_iter_max: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Distances for a list of ``(row_a, row_b)`` pairs (rows, not feature ids).

    Same definitions and parameters as :func:`distance_matrix`; returns ``(P,)`` float64.
    """
    _check_pair(a, b)
    _check_method(method, p)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.size and (
        pairs[:, 0].min() < 0
        or pairs[:, 0].max() >= len(a)
        or pairs[:, 1].min() < 0
        or pairs[:, 1].max() >= len(b)
    ):
        raise IndexError("pair rows out of range")
    out = np.empty(len(pairs), dtype=np.float64)
    if method == "sliced":
        ra, ia = np.unique(pairs[:, 0], return_inverse=True)
        rb, ib = np.unique(pairs[:, 1], return_inverse=True)
        theta = _ot.random_directions(n_projections, a.k, seed)
        ea = _ot.quantile_embedding(a.coords[ra], a.weights[ra], theta, n_quantiles).reshape(len(ra), -1)
        eb = _ot.quantile_embedding(b.coords[rb], b.weights[rb], theta, n_quantiles).reshape(len(rb), -1)
        diff = (ea[ia].double() - eb[ib].double()).abs()
        out[:] = (diff.pow(2).mean(1).sqrt() if p == 2 else diff.mean(1)).numpy()
        return out
    from tqdm.auto import tqdm

    cache_a: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    cache_b: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n, (i, j) in enumerate(tqdm(pairs, desc=f"{method} W{p}", disable=not progress, mininterval=1.0)):
        if i not in cache_a:
            cache_a[i] = a.support(int(i))
        if j not in cache_b:
            cache_b[j] = b.support(int(j))
        (xa, wa), (xb, wb) = cache_a[i], cache_b[j]
        out[n] = _ot.pair_cost(xa, wa, xb, wb, p=p, method=method, reg=reg, num_iter_max=num_iter_max)
    return out


def distance_matrix(
    a: FeatureDistributions,
    b: FeatureDistributions,
    method: str = "exact",
    *,
    p: int = 2,
    reg: float = 0.05,
    n_projections: int = 256,
    n_quantiles: int = 16,
    candidates: int | np.ndarray | None = None,
    seed: int = 0,
    num_iter_max: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    r"""Wasserstein distances between every feature of ``a`` and every feature of ``b``.

    .. math::

        D_{ij} = W_p(\mu_i, \nu_j) = \Bigl(\min_{\gamma \in \Pi(w^a_i, w^b_j)}
        \sum_{n,m} \gamma_{nm}\, \|x_{in} - y_{jm}\|_2^p\Bigr)^{1/p}

    Parameters
    ----------
    a, b : FeatureDistributions
        Both in the same reference space (else ``ValueError``).
    method : {"exact", "sinkhorn", "sliced"}
    p : {1, 2}
        Order of the Wasserstein distance; the default is ``2`` for every method (so the
        three methods estimate comparable quantities). ``p=1`` gives :math:`W_1` with the
        Euclidean ground cost.
    reg : float
        Relative entropic regularisation (``"sinkhorn"`` only).
    n_projections, n_quantiles : int
        ``L`` and ``Q`` of the sliced method (also used to rank candidates).
    candidates : int or (F_A, F_B) bool array, optional
        Candidate pruning. An int ``c`` keeps, for each row of ``a``, the ``c`` columns
        of ``b`` nearest by the sliced distance and computes ``method`` on those only; a
        boolean mask selects the pairs directly. **Pairs not computed are** ``+inf``.
    seed : int
        Seed of the sliced directions.
    num_iter_max : int, optional
        Iteration cap passed to POT (``numItermax``; defaults 100000 for ``emd2``, 2000
        for Sinkhorn).
    progress : bool
        Progress bar for the per-pair solvers.

    Returns
    -------
    (F_A, F_B) float64 array
        Finite, non-negative distances (``+inf`` only for pruned pairs); never NaN.
        Rows and columns follow ``a.feature_ids`` and ``b.feature_ids``.

    Notes
    -----
    ``"exact"``
        :func:`ot.emd2` on :func:`ot.dist` (``metric="euclidean"`` for ``p=1``,
        ``"sqeuclidean"`` then a square root for ``p=2``) [2]_. Cost per pair
        :math:`O(N^3)`; use ``candidates`` beyond a few million pairs.
    ``"sinkhorn"``
        Log-domain :func:`ot.sinkhorn2` (``method="sinkhorn_log"``) with
        :math:`\varepsilon = \mathrm{reg} \cdot \operatorname{mean}(M)` (``reg`` is
        relative to the pair's mean ground cost, so it does not depend on the scale of
        the space). The value is :math:`\langle\gamma_\varepsilon, M\rangle^{1/p}`
        (the entropic plan's transport cost, no entropy term), an upper bound on
        :math:`W_p` that tends to it as ``reg`` goes to 0 [3]_.
    ``"sliced"``
        Sliced Wasserstein [4]_ with ``L = n_projections`` shared random directions
        :math:`\theta_l` (seeded) and ``Q = n_quantiles`` quantile levels
        :math:`u_q = (q + 1/2)/Q`:

        .. math::

            SW_p^p(\mu, \nu) = \int_{S^{k-1}} W_p^p(\theta_\#\mu, \theta_\#\nu)\,d\sigma(\theta)
            \approx \frac{1}{LQ}\sum_{l=1}^{L}\sum_{q=0}^{Q-1}
            \bigl|F^{-1}_{\theta_l\#\mu}(u_q) - F^{-1}_{\theta_l\#\nu}(u_q)\bigr|^p .

        In one dimension the optimal coupling is the monotone one, so
        :math:`W_p^p(\theta_\#\mu, \theta_\#\nu) = \int_0^1 |F^{-1}_{\theta_\#\mu}(u) -
        F^{-1}_{\theta_\#\nu}(u)|^p\,du` *exactly*; the only approximations are the
        Monte-Carlo average over directions (the same directions for every pair, so all
        pairs share one estimator) and the midpoint rule on ``Q`` levels, which is exact
        whenever both quantile functions are constant on each interval
        :math:`[q/Q, (q+1)/Q)` (e.g. uniform weights on ``N`` points with ``Q`` a
        multiple of ``N``) and converges as ``Q`` grows. For ``p = 2`` the double sum is
        a squared Euclidean distance between per-feature *quantile embeddings*
        (:func:`quantile_embedding`), so all pairs come from one matrix product
        :math:`\|e_a\|^2 + \|e_b\|^2 - 2 e_a^\top e_b`. Scale: a projection is
        1-Lipschitz and :math:`\mathbb{E}_\theta (\theta^\top v)^2 = \|v\|^2/k`, so
        :math:`SW_2 \le W_2/\sqrt{k}`, with equality for translated measures; compare
        sliced and exact values by rank, or after one fitted scale
        (:func:`approximation_report`).

    Examples
    --------
    >>> import numpy as np
    >>> from featmatch.semantic._semantic import FeatureDistributions, distance_matrix
    >>> x = np.zeros((2, 1, 3), np.float32); x[1, 0, 0] = 3.0
    >>> d = FeatureDistributions(x, np.ones((2, 1)), np.arange(2), "demo")
    >>> distance_matrix(d, d, progress=False)
    array([[0., 3.],
           [3., 0.]])
    """
    _check_pair(a, b)
    _check_method(method, p)
    FA, FB = len(a), len(b)
    sliced_kw = dict(p=p, n_projections=n_projections, n_quantiles=n_quantiles, seed=seed)
    if candidates is None:
        if method == "sliced":
            return _sliced_matrix(a, b, **sliced_kw)
        mask = None
    else:
        mask = _candidate_mask(a, b, candidates, sliced_kw)
        if method == "sliced":
            out = np.full((FA, FB), np.inf)
            out[mask] = _sliced_matrix(a, b, **sliced_kw)[mask]
            return out
    out = np.full((FA, FB), np.inf)
    n_total = FA * FB if mask is None else int(mask.sum())
    from tqdm.auto import tqdm

    with tqdm(total=n_total, desc=f"{method} W{p}", disable=not progress, mininterval=1.0) as bar:
        rows_per_chunk = max(1, 65536 // max(FB, 1))  # never materialise all F_A * F_B pairs
        for start in range(0, FA, rows_per_chunk):
            block = (
                np.ones((min(rows_per_chunk, FA - start), FB), bool)
                if mask is None
                else mask[start : start + rows_per_chunk]
            )
            pairs = np.argwhere(block)
            if not len(pairs):
                continue
            pairs[:, 0] += start
            out[pairs[:, 0], pairs[:, 1]] = pair_distances(
                a, b, pairs, method, p=p, reg=reg, num_iter_max=num_iter_max, progress=False
            )
            bar.update(len(pairs))
    return out


def _candidate_mask(
    a: FeatureDistributions, b: FeatureDistributions, candidates: int | np.ndarray, sliced_kw: dict
) -> np.ndarray:
    FA, FB = len(a), len(b)
    if isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
        c = int(candidates)
        if c < 1:
            raise ValueError(f"candidates must be >= 1, got {c}")
        mask = np.zeros((FA, FB), dtype=bool)
        if FA == 0 or FB == 0:
            return mask
        c = min(c, FB)
        theta = _ot.random_directions(sliced_kw["n_projections"], a.k, sliced_kw["seed"])
        ea = _ot.quantile_embedding(a.coords, a.weights, theta, sliced_kw["n_quantiles"])
        eb = _ot.quantile_embedding(b.coords, b.weights, theta, sliced_kw["n_quantiles"])
        np.put_along_axis(mask, _ot.sliced_topc(ea, eb, c, p=sliced_kw["p"]), True, axis=1)
        return mask
    mask = np.asarray(candidates)
    if mask.dtype != bool or mask.shape != (FA, FB):
        raise ValueError(f"candidates must be an int or a boolean ({FA}, {FB}) mask")
    return mask


def transport_plan(
    a: FeatureDistributions,
    i: int,
    b: FeatureDistributions,
    j: int,
    method: str = "exact",
    *,
    p: int = 2,
    reg: float = 0.05,
    num_iter_max: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transport plan between row ``i`` of ``a`` and row ``j`` of ``b``.

    Returns ``(plan (n_i, n_j), idx_a, idx_b)``, where ``idx_*`` are the sample slots of
    the two supports (padding removed), so ``a.positions[i, idx_a]`` gives the token
    positions. ``method`` is ``"exact"`` (:func:`ot.emd`) or ``"sinkhorn"``
    (log-domain :func:`ot.sinkhorn`, same ``reg`` convention as :func:`distance_matrix`).
    """
    _check_pair(a, b)
    if method not in ("exact", "sinkhorn"):
        raise ValueError(f"transport_plan supports 'exact' and 'sinkhorn', got {method!r}")
    ia = np.flatnonzero(a.weights[i] > 0)
    ib = np.flatnonzero(b.weights[j] > 0)
    (xa, wa), (xb, wb) = a.support(i), b.support(j)
    plan = _ot.pair_plan(xa, wa, xb, wb, p=p, method=method, reg=reg, num_iter_max=num_iter_max)
    return plan, ia, ib


# --------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------


def _matching_cls() -> type:
    from featmatch.matching._matching import Matching

    return Matching


def topk_from_distances(D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` columns with the smallest finite distance.

    Returns ``(idx (F_A, k) int64, dist (F_A, k) float64)``, sorted by distance; slots
    without a finite candidate are ``-1`` / ``inf``.
    """
    D = np.asarray(D, dtype=np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(k, D.shape[1])
    idx = np.full((D.shape[0], k), -1, dtype=np.int64)
    dist = np.full((D.shape[0], k), np.inf)
    if kk == 0 or D.shape[0] == 0:
        return idx, dist
    part = (
        np.argpartition(D, kk - 1, axis=1)[:, :kk]
        if kk < D.shape[1]
        else np.tile(np.arange(kk), (D.shape[0], 1))
    )
    vals = np.take_along_axis(D, part, 1)
    order = np.argsort(vals, axis=1, kind="stable")
    part = np.take_along_axis(part, order, 1)
    vals = np.take_along_axis(vals, order, 1)
    finite = np.isfinite(vals)
    idx[:, :kk] = np.where(finite, part, -1)
    dist[:, :kk] = np.where(finite, vals, np.inf)
    return idx, dist


def _moments(d: FeatureDistributions) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean ``(F, k)`` and root total variance ``(F,)`` of every distribution (float64)."""
    x = d.coords.astype(np.float64)
    w = d.weights
    m = np.einsum("fn,fnk->fk", w, x)
    var = np.einsum("fn,fn->f", w, ((x - m[:, None, :]) ** 2).sum(-1))
    return m, np.sqrt(np.maximum(var, 0.0))


def moment_lower_bound(
    a: FeatureDistributions, b: FeatureDistributions, rows: np.ndarray | None = None, *, p: int = 2
) -> np.ndarray:
    r"""A lower bound on :math:`W_p(\mu_i, \nu_j)` from first and second moments.

    With :math:`m` the weighted mean and :math:`\sigma = (\mathbb{E}\|X - m\|^2)^{1/2}`
    the root total variance of a measure,

    .. math::

        W_2(\mu, \nu)^2 = \|m_\mu - m_\nu\|^2 + W_2(\mu_0, \nu_0)^2
        \ge \|m_\mu - m_\nu\|^2 + (\sigma_\mu - \sigma_\nu)^2 ,

    where :math:`\mu_0, \nu_0` are the centred measures (the translation identity of
    :math:`W_2`) and :math:`W_2(\mu_0, \nu_0) \ge |W_2(\mu_0, \delta_0) - W_2(\nu_0, \delta_0)|
    = |\sigma_\mu - \sigma_\nu|` (triangle inequality) [7]_. So the bound is the Euclidean
    distance between the points :math:`(m, \sigma) \in \mathbb{R}^{k+1}`. For :math:`p = 1`
    only :math:`W_1 \ge \|m_\mu - m_\nu\|` (Jensen) is used.

    Parameters
    ----------
    a, b : FeatureDistributions
    rows : (R,) ints, optional
        Rows of ``a`` (default all); the result is ``(R, len(b))``, so callers bound a
        block of queries at a time.
    p : {1, 2}

    Returns
    -------
    (R, F_B) float64 array

    References
    ----------
    .. [7] Villani, C. (2009). Optimal Transport: Old and New, ch. 6 (triangle
       inequality); Gelbrich, M. (1990). On a formula for the L2-Wasserstein metric
       between measures on Euclidean and Hilbert spaces. Math. Nachr. 147.
    """
    _check_pair(a, b)
    ma, sa = _moments(a if rows is None else a.subset(rows))
    mb, sb = _moments(b)
    if p == 2:
        ea, eb = np.concatenate([ma, sa[:, None]], 1), np.concatenate([mb, sb[:, None]], 1)
    elif p == 1:
        ea, eb = ma, mb
    else:
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    return torch.cdist(torch.from_numpy(ea), torch.from_numpy(eb)).numpy()


def nearest(
    a: FeatureDistributions,
    b: FeatureDistributions,
    k: int = 10,
    *,
    candidates: int | None = None,
    certify: bool = False,
    embed: str = "moment",
    p: int = 2,
    n_projections: int = 64,
    n_quantiles: int = 16,
    seed: int = 0,
    block: int = 1024,
    progress: bool = False,
    client: Any = None,
    retries: int | None = None,
    threads: int | None = None,
    prune: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The ``k`` nearest features of ``b`` to every feature of ``a`` by exact :math:`W_p`.

    A sparse top-k, never an ``F_A × F_B`` matrix. Three stages:

    1. **embed**: every feature's sliced quantile embedding (:func:`quantile_embedding`,
       ``L = n_projections`` shared directions, ``Q = n_quantiles`` levels), in which the
       Euclidean distance is the sliced :math:`SW_2` [4]_, and/or its moment point
       :math:`(m, \sigma)` of :func:`moment_lower_bound`, whose Euclidean distance is a
       lower bound on :math:`W_2`;
    2. **candidates**: for each query ``c = max(candidates, k)`` rows of ``b``: with
       ``embed="moment"`` (default) the ``c`` smallest moment bounds; ``"sliced"`` the
       ``c`` nearest by the sliced distance; ``"both"`` half from each (no repeats). Computed in row blocks of at most 2048 queries, so only a
       ``(2048, F_B)`` block exists at a time;
    3. **rerank**: exact :math:`W_p` (POT's network simplex, the solver of
       :func:`ot.emd2` [2]_) on the ``c`` candidates, keeping the ``k`` smallest. The
       candidates are solved in increasing order of their moment bound, 32 at a time; once
       the next bound exceeds the ``k``-th exact distance found so far, no remaining
       candidate can enter the top-k (its :math:`W_p` is at least its bound), so they are
       skipped (``prune``). The result is the one of solving all ``c``.

    With ``certify=True`` the result is the exact top-k whatever ``c`` is: after the
    rerank, every other column whose :func:`moment_lower_bound` is below the query's
    current ``k``-th exact distance is also solved, in increasing bound order, until the
    next bound is not smaller than the ``k``-th distance (a column with bound
    :math:`\ge d_k` has :math:`W_p \ge d_k` and cannot enter the top-k). ``candidates``
    equal to ``len(b)`` is the brute-force exact search.

    Parameters
    ----------
    a, b : FeatureDistributions
        Same reference space.
    k : int
        Neighbours per query.
    candidates : int, optional
        ``c``, the exact solves per query before certification; default
        :data:`DEFAULT_CANDIDATES`, tuned so that recall@1 against exact is
        :math:`\ge 0.99` on the quick zoo (``benchmarks/bench_semantic.py``).
    certify : bool
        Make the result exact (extra solves where the moment bound cannot exclude a
        column).
    embed : {"moment", "sliced", "both"}
        Where the candidates come from (stage 2). On real quick-zoo features the moment
        bound finds the exact nearest feature more often than the sliced distance at every
        measured ``c`` (see :data:`DEFAULT_CANDIDATES`): the sliced :math:`SW_2` of
        concentrated distributions in 64 dimensions ranks near neighbours poorly.
    p : {1, 2}
        Order of the Wasserstein distance.
    n_projections, n_quantiles, seed : int
        The sliced embedding of stage 1.
    block : int
        Queries reranked per step; with ``client``, the queries of one Dask task.
    progress : bool
        Progress bar over the queries (over the tasks, with ``client``).
    client : dask.distributed.Client or str, optional
        Run on a Dask cluster (a ``Client``, ``"local:N"`` or a scheduler address), one
        task per block of ``block`` query features. ``a`` and ``b`` are scattered to the
        workers once. Every stage treats each query on its own (the sliced directions
        come from ``seed``), so the blocks' results are the rows of the one-process
        result, exactly.
    retries : int, optional
        With ``client``: retries of a block that raised (default
        :data:`featmatch._dask.RETRIES`).
    prune : bool
        Skip the candidates that the moment bound excludes (stage 3); ``False`` solves all
        ``c`` (same result, for checking). On clustered synthetic features (benchmark P6)
        about 60 of 384 candidates per query are solved; on real quick-zoo features the
        bound is looser and most are.
    threads : int, optional
        Threads for the exact solves of stage 3 (the solver releases the GIL); default: the
        free CPUs (:func:`featmatch._threads.fitted_thread_count`). On a Dask cluster each
        task uses one thread: the workers' tasks are the parallelism there.

    Returns
    -------
    idx : (F_A, k) int64
        Rows of ``b`` (``b.feature_ids[idx]`` gives SAE feature ids), nearest first;
        ``-1`` pads when ``len(b) < k``.
    dist : (F_A, k) float64
        Exact :math:`W_p`; ``inf`` pads.

    Notes
    -----
    Cost: one sliced embedding per side (:math:`O(F N L \log N)`), one blocked product
    :math:`O(F_A F_B L Q)`, and :math:`F_A c` exact solves of :math:`O(N^3)` each.
    """
    _check_pair(a, b)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    c_req = DEFAULT_CANDIDATES if candidates is None else int(candidates)
    if c_req < 1:
        raise ValueError(f"candidates must be >= 1, got {c_req}")
    FA, FB = len(a), len(b)
    idx = np.full((FA, k), -1, dtype=np.int64)
    dist = np.full((FA, k), np.inf)
    if embed not in ("sliced", "moment", "both"):
        raise ValueError(f"embed must be 'sliced', 'moment' or 'both', got {embed!r}")
    if FA == 0 or FB == 0:
        return idx, dist
    c = min(max(c_req, k), FB)
    if client is not None:
        opts = dict(
            candidates=candidates,
            certify=certify,
            embed=embed,
            p=p,
            n_projections=n_projections,
            n_quantiles=n_quantiles,
            seed=seed,
            block=block,
            prune=prune,
        )
        return _nearest_distributed(a, b, k, opts, client=client, progress=progress, retries=retries)
    if c < FB:
        c_sl = c if embed == "sliced" else (0 if embed == "moment" else (c + 1) // 2)
        if c_sl:
            theta = _ot.random_directions(n_projections, a.k, seed)
            ea = _ot.quantile_embedding(a.coords, a.weights, theta, n_quantiles)
            eb = _ot.quantile_embedding(b.coords, b.weights, theta, n_quantiles)
            cand = _ot.sliced_topc(ea, eb, c_sl, p=2)
            del ea, eb
        else:
            cand = np.zeros((FA, 0), dtype=np.int64)
        if c_sl < c:  # the rest from the moment bound, in increasing bound order, without repeats
            out = np.empty((FA, c), dtype=np.int64)
            for start in range(0, FA, 2048):
                rows = np.arange(start, min(FA, start + 2048))
                lbm = moment_lower_bound(a, b, rows, p=p)
                top = np.argpartition(lbm, c - 1, axis=1)[:, :c]
                top = np.take_along_axis(
                    top, np.argsort(np.take_along_axis(lbm, top, 1), 1, kind="stable"), 1
                )
                for r, i in enumerate(rows):
                    extra = top[r][~np.isin(top[r], cand[i])][: c - c_sl]
                    out[i] = np.concatenate([cand[i], extra])
            cand = out
    else:
        cand = None
    sup_b = [b.support(j) for j in range(FB)]
    kk = min(k, FB)
    from tqdm.auto import tqdm

    def solve(i: int, cols: np.ndarray) -> np.ndarray:
        xa, wa = a.support(i)
        return np.fromiter(
            (_ot.pair_cost(xa, wa, *sup_b[j], p=p) for j in cols), dtype=np.float64, count=len(cols)
        )

    def excluded(lb: np.ndarray | float, kth: float) -> np.ndarray | bool:
        """Bounds that put a column out of the top-k: W_p >= bound > k-th distance (with float slack)."""
        return lb > kth * (1.0 + _BOUND_SLACK)

    def rerank(i: int, lb_row: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``kk`` of query ``i``: its candidates, then (certify) the uncertain rest."""
        cols = cand[i] if cand is not None else np.arange(FB)
        if not (prune and kk < len(cols)) or lb_row is None:  # nothing to skip: solve them all
            d = solve(i, cols)
        else:
            # candidates in increasing bound order, in chunks; once the bound of the next one
            # exceeds the k-th exact distance so far, neither it nor any later one can enter the
            # top-k: the result is that of solving every candidate, with fewer solves
            cols = cols[np.argsort(lb_row[cols], kind="stable")]
            parts: list[np.ndarray] = []
            n_done, kth = 0, np.inf
            for s in range(0, len(cols), 32):
                if n_done >= kk and excluded(lb_row[cols[s]], kth):
                    break
                parts.append(solve(i, cols[s : s + 32]))
                n_done += len(parts[-1])
                if n_done >= kk:
                    kth = float(np.partition(np.concatenate(parts), kk - 1)[kk - 1])
            cols, d = cols[:n_done], np.concatenate(parts)
        if certify and lb_row is not None and len(cols) < FB:
            done = np.zeros(FB, dtype=bool)
            done[cols] = True
            kth = np.partition(d, kk - 1)[kk - 1]
            rest = np.flatnonzero(~done & ~excluded(lb_row, kth))
            rest = rest[np.argsort(lb_row[rest], kind="stable")]
            extra_c, extra_d = [], []
            for s in range(0, len(rest), 32):
                chunk = rest[s : s + 32]
                chunk = chunk[~excluded(lb_row[chunk], kth)]
                if not len(chunk):
                    break
                dd = solve(i, chunk)
                extra_c.append(chunk)
                extra_d.append(dd)
                kth = min(kth, float(np.partition(np.concatenate([d, *extra_d]), kk - 1)[kk - 1]))
            if extra_c:
                cols = np.concatenate([cols, *extra_c])
                d = np.concatenate([d, *extra_d])
        order = np.lexsort((cols, d))[:kk]  # by distance, ties to the smaller row
        return cols[order], d[order]

    # The solver releases the GIL (emd2_cost), so queries are reranked on `threads` threads;
    # each query's result depends on that query alone, so the output is the same for any count.
    if threads is None:  # measuring the free CPUs takes 0.2 s: not worth it for a small search
        threads = fitted_thread_count() if FA * c >= 4096 else 1
    n_threads = max(1, int(threads))
    pool = ThreadPoolExecutor(n_threads) if n_threads > 1 else None
    try:
        with tqdm(total=FA, desc=f"nearest W{p}", disable=not progress, mininterval=1.0) as bar:
            for start in range(0, FA, block):
                rows = np.arange(start, min(FA, start + block))
                # the bounds are needed to skip candidates (only when k < c) and to certify
                need_lb = (prune and kk < c) or (certify and c < FB)
                lb = moment_lower_bound(a, b, rows, p=p) if need_lb else None
                args = [(int(i), None if lb is None else lb[r]) for r, i in enumerate(rows)]
                results = pool.map(lambda t: rerank(*t), args) if pool else (rerank(*t) for t in args)
                for i, (cols, d) in zip(rows, results, strict=True):
                    idx[i, :kk] = cols
                    dist[i, :kk] = d
                bar.update(len(rows))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return idx, dist


def _nearest_block(
    a: FeatureDistributions, b: FeatureDistributions, rows: np.ndarray, k: int, opts: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Dask task: :func:`nearest` for the query rows ``rows`` of ``a``, on one thread."""
    return nearest(a.subset(rows), b, k, **opts, threads=1)


def _nearest_distributed(
    a: FeatureDistributions,
    b: FeatureDistributions,
    k: int,
    opts: dict[str, Any],
    *,
    client: Any,
    progress: bool,
    retries: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    from featmatch._dask import RETRIES, get_client, run_tasks

    c = get_client(client)
    fa, fb = c.scatter([a, b], broadcast=True, hash=False)
    step = max(1, int(opts["block"]))
    blocks = [np.arange(s, min(len(a), s + step)) for s in range(0, len(a), step)]
    parts = run_tasks(
        c,
        _nearest_block,
        [(fa, fb, rows, k, opts) for rows in blocks],
        desc=f"nearest W{opts['p']}",
        progress=progress,
        retries=RETRIES if retries is None else retries,
    )
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def semantic_match(
    a: FeatureDistributions,
    b: FeatureDistributions,
    method: str = "exact",
    mode: str = "assignment",
    k: int = 1,
    *,
    distances: np.ndarray | None = None,
    candidates: int | np.ndarray | None = None,
    max_cost: float | None = None,
    p: int = 2,
    reg: float = 0.05,
    n_projections: int = 256,
    n_quantiles: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> Matching:
    r"""Match the features of ``a`` to those of ``b`` by semantic (Wasserstein) distance.

    ``mode="assignment"`` solves the linear assignment problem
    :math:`\min_\pi \sum_i D_{i\pi(i)}` (one-to-one; rectangular allowed) with scipy's
    exact solver (:func:`featmatch.matching.assign`, i.e. scipy's
    :func:`~scipy.optimize.linear_sum_assignment`); pruned pairs (``+inf``) are forbidden, and a row
    whose only options are pruned stays unmatched. ``mode="topk"`` is one-to-many: each
    feature of ``a`` gets its ``k`` nearest features of ``b`` (many-to-one allowed); the
    returned ``perm`` is the top-1 and ``meta["topk_ids"]`` / ``meta["topk_cost"]``
    hold the ``k`` candidates (feature ids / distances, ``-1`` / ``inf`` padding).

    Parameters
    ----------
    a, b : FeatureDistributions
        Same reference space.
    method : {"exact", "sinkhorn", "sliced"}
        Distance (see :func:`distance_matrix`), ignored when ``distances`` is given.
    mode : {"assignment", "topk"}
    k : int
        Number of candidates in ``"topk"`` mode.
    distances : (F_A, F_B) array, optional
        A precomputed :func:`distance_matrix` for ``a`` and ``b``.
    candidates : int or (F_A, F_B) bool mask, optional
        With ``method="exact"`` and an int ``c``, the distances come from
        :func:`nearest` (``c`` moment-bound candidates per feature reranked by exact
        :math:`W_p`; no ``F_A × F_B`` array is built): ``"topk"`` keeps the ``k`` nearest,
        ``"assignment"`` solves the one-to-one problem on the ``c`` exact candidates of
        each row (dense up to ``4096²`` entries, else scipy's sparse
        :func:`~scipy.sparse.csgraph.min_weight_full_bipartite_matching`). Otherwise
        passed to :func:`distance_matrix`.
    p, reg, n_projections, n_quantiles, seed, progress
        Passed to :func:`distance_matrix` (or :func:`nearest`).
    max_cost : float, optional
        Leave a feature unmatched when its matched distance exceeds this.

    Returns
    -------
    featmatch.matching.Matching
        In the SAEs' full feature index space: ``perm`` has length ``a.n_features``
        (``-1`` for empty/unmatched features), values are feature ids of ``b``,
        ``n_b = b.n_features``, ``cost`` is the distance (NaN where unmatched).
    """
    if mode not in ("assignment", "topk"):
        raise ValueError(f"mode must be 'assignment' or 'topk', got {mode!r}")
    _check_pair(a, b)
    use_nearest = (
        distances is None
        and method == "exact"
        and isinstance(candidates, (int, np.integer))
        and not isinstance(candidates, bool)
    )
    if use_nearest:
        return _semantic_match_nearest(
            a,
            b,
            mode,
            k,
            int(candidates),
            max_cost=max_cost,
            p=p,
            n_projections=n_projections,
            n_quantiles=n_quantiles,
            seed=seed,
            progress=progress,
        )
    if distances is None:
        D = distance_matrix(
            a,
            b,
            method,
            p=p,
            reg=reg,
            n_projections=n_projections,
            n_quantiles=n_quantiles,
            candidates=candidates,
            seed=seed,
            progress=progress,
        )
    else:
        D = np.asarray(distances, dtype=np.float64)
        if D.shape != (len(a), len(b)):
            raise ValueError(f"distances must have shape {(len(a), len(b))}, got {D.shape}")
    if np.isnan(D).any():
        raise ValueError("distances contain NaN")
    meta: dict[str, Any] = {
        "method": f"semantic_ot:{method}" if distances is None else "semantic_ot:precomputed",
        "mode": mode,
        "p": p,
        "space_id": a.space_id,
        "layer_a": a.layer,
        "layer_b": b.layer,
        "candidates": candidates if isinstance(candidates, (int, type(None))) else "mask",
        "empty_a": a.empty.tolist(),
        "empty_b": b.empty.tolist(),
    }
    if method == "sinkhorn":
        meta["reg"] = reg
    if method == "sliced" or candidates is not None:
        meta.update(n_projections=n_projections, n_quantiles=n_quantiles, seed=seed)
    perm = np.full(a.n_features, -1, dtype=np.int64)
    cost = np.full(a.n_features, np.nan)
    if mode == "assignment":
        from featmatch.matching._matching import assign

        finite = np.isfinite(D)
        if finite.any():
            # pruned (+inf) pairs get a cost larger than any full assignment of finite
            # pairs, so they are used only when a row has no finite option left; such
            # rows are then reported unmatched
            big = (float(D[finite].max(initial=0.0)) + 1.0) * (min(D.shape) + 1)
            col_of_row, _ = assign(np.where(finite, D, big))
            rows = np.flatnonzero(col_of_row >= 0)
            cols = col_of_row[rows]
            ok = finite[rows, cols]
            rows, cols = rows[ok], cols[ok]
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
        vals = D[rows, cols]
    else:
        idx, dist = topk_from_distances(D, k)
        has = idx[:, 0] >= 0
        rows, cols, vals = np.flatnonzero(has), idx[has, 0], dist[has, 0]
        ids = np.where(idx >= 0, b.feature_ids[np.maximum(idx, 0)], -1)
        full_ids = np.full((a.n_features, k), -1, dtype=np.int64)
        full_cost = np.full((a.n_features, k), np.inf)
        full_ids[a.feature_ids] = ids
        full_cost[a.feature_ids] = dist
        meta.update(k=k, topk_ids=full_ids.tolist(), topk_cost=full_cost.tolist())
    if max_cost is not None:
        keep = vals <= max_cost
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        meta["max_cost"] = max_cost
    perm[a.feature_ids[rows]] = b.feature_ids[cols]
    cost[a.feature_ids[rows]] = vals
    return _matching_cls()(perm=perm, cost=cost, n_b=int(b.n_features), meta=meta)


def _semantic_match_nearest(
    a: FeatureDistributions,
    b: FeatureDistributions,
    mode: str,
    k: int,
    candidates: int,
    *,
    max_cost: float | None,
    p: int,
    n_projections: int,
    n_quantiles: int,
    seed: int,
    progress: bool,
) -> Matching:
    """:func:`semantic_match` on the sparse exact neighbours of :func:`nearest` (no F×F array)."""
    kk = max(k, 1) if mode == "topk" else max(candidates, 1)
    idx, dist = nearest(
        a,
        b,
        kk,
        candidates=candidates,
        p=p,
        n_projections=n_projections,
        n_quantiles=n_quantiles,
        seed=seed,
        progress=progress,
    )
    meta: dict[str, Any] = {
        "method": "semantic_ot:exact",
        "search": "nearest",
        "mode": mode,
        "p": p,
        "space_id": a.space_id,
        "layer_a": a.layer,
        "layer_b": b.layer,
        "candidates": candidates,
        "n_projections": n_projections,
        "n_quantiles": n_quantiles,
        "seed": seed,
        "empty_a": a.empty.tolist(),
        "empty_b": b.empty.tolist(),
    }
    perm = np.full(a.n_features, -1, dtype=np.int64)
    cost = np.full(a.n_features, np.nan)
    if mode == "assignment":
        from featmatch.matching.baselines import candidate_assignment

        rows, cols = candidate_assignment(idx, np.where(idx >= 0, dist, 0.0), len(b))
        hit = idx[rows] == cols[:, None]  # the matched column's slot among the row's candidates
        vals = np.where(hit.any(1), dist[rows, hit.argmax(1)], np.inf)
    else:
        has = idx[:, 0] >= 0
        rows, cols, vals = np.flatnonzero(has), idx[has, 0], dist[has, 0]
        k_ids = np.where(idx[:, :k] >= 0, b.feature_ids[np.maximum(idx[:, :k], 0)], -1)
        full_ids = np.full((a.n_features, k), -1, dtype=np.int64)
        full_cost = np.full((a.n_features, k), np.inf)
        full_ids[a.feature_ids] = k_ids
        full_cost[a.feature_ids] = dist[:, :k]
        meta.update(k=k, topk_ids=full_ids.tolist(), topk_cost=full_cost.tolist())
    if max_cost is not None:
        keep = vals <= max_cost
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        meta["max_cost"] = max_cost
    perm[a.feature_ids[rows]] = b.feature_ids[cols]
    cost[a.feature_ids[rows]] = vals
    return _matching_cls()(perm=perm, cost=cost, n_b=int(b.n_features), meta=meta)


def decoder_cosine_match(sae_a: Any, sae_b: Any, *, block: int = 2048) -> Matching:
    r"""Feature Flow baseline [5]_: top-1 decoder cosine, many-to-one allowed.

    .. math::

        \pi(i) = \arg\max_j \frac{\langle W^A_{\mathrm{dec}}[i], W^B_{\mathrm{dec}}[j]\rangle}
        {\|W^A_{\mathrm{dec}}[i]\|\,\|W^B_{\mathrm{dec}}[j]\|}, \qquad
        \mathrm{cost}_i = 1 - \cos(\cdot).

    Decoder rows are compared directly: the cosine is invariant to the positive per-feature
    scaling of folding (Eq. 4 of [6]_), so folding does not change this match. The one
    implementation is :func:`featmatch.matching.baselines.top1_cosine_matching`; this name
    keeps the semantic chapter's ``meta`` (``method="decoder_cosine"``).

    Parameters
    ----------
    sae_a, sae_b : SAE, SAEWeights or (F, d) array
        Anything with a ``W_dec`` of shape ``(F, d)``, or the matrix itself.
    block : int
        Rows of ``A`` per matrix product.

    Returns
    -------
    featmatch.matching.Matching
    """
    from featmatch.matching.baselines import top1_cosine_matching

    meta = {"method": "decoder_cosine", "mode": "top1", "many_to_one": True}
    return top1_cosine_matching(sae_a, sae_b, block=block, meta=meta)


def sae_match(sae_a: Any, sae_b: Any, **kwargs: Any) -> Matching:
    """SAE Match baseline [6]_: :func:`featmatch.matching.match` (same ``Matching`` type)."""
    from featmatch.matching._matching import match

    return match(sae_a, sae_b, **kwargs)


# --------------------------------------------------------------------------------------
# Approximation quality
# --------------------------------------------------------------------------------------


def approximation_report(
    a: FeatureDistributions,
    b: FeatureDistributions,
    methods: Sequence[str | tuple[str, dict[str, Any]]] = ("sliced", "sinkhorn"),
    n_pairs: int = 500,
    *,
    p: int = 2,
    seed: int = 0,
    n_rows: int = 0,
    recall_at: int = 10,
    progress: bool = False,
) -> pd.DataFrame:
    r"""Compare approximate distances with the exact :math:`W_p` on a sample of pairs.

    ``n_pairs`` distinct ``(i, j)`` pairs are drawn uniformly (seeded); the exact
    distance :math:`W` and each approximation :math:`\hat W` are computed on them.

    Parameters
    ----------
    a, b : FeatureDistributions
        Same reference space.
    methods : sequence
        Method names or ``(name, kwargs)`` tuples, e.g.
        ``[("sliced", {"n_projections": 256}), ("sinkhorn", {"reg": 0.01})]``.
    n_pairs : int
        Number of pairs (capped at ``len(a) * len(b)``).
    p : {1, 2}
        Order of the distances.
    seed : int
        Seed of the pair sample.
    n_rows : int
        If positive, also draw ``n_rows`` rows of ``a`` and compute their distances to
        *every* feature of ``b`` (``n_rows * len(b)`` exact solves) to score nearest
        neighbours: ``top1_agreement`` (same nearest feature as exact) and
        ``recall_at_c`` (the exact nearest feature is among the approximation's
        ``recall_at`` nearest, i.e. what candidate pruning needs).
    recall_at : int
        ``c`` of ``recall_at_c``.
    progress : bool
        Progress bars.

    Returns
    -------
    pandas.DataFrame
        One row per method: ``spearman`` (rank correlation with exact), ``pearson``,
        ``rel_error_{mean,median,p95}`` of :math:`|\hat W - W|/W`, ``scale`` (the
        least-squares :math:`s` in :math:`W \approx s\hat W`; about :math:`\sqrt{k}`
        for sliced), ``scaled_rel_error_{mean,median}`` after that scale,
        ``seconds_per_pair`` and ``exact_seconds_per_pair``; with ``n_rows``, also
        ``top1_agreement`` and ``recall_at_c`` (and ``c``).
    """
    import pandas as pd
    from scipy.stats import pearsonr, spearmanr

    _check_pair(a, b)
    total = len(a) * len(b)
    if total == 0:
        raise ValueError("no pairs: one of the sets is empty")
    n = min(int(n_pairs), total)
    rng = np.random.default_rng(seed)
    flat = rng.choice(total, size=n, replace=False)
    pairs = np.stack([flat // len(b), flat % len(b)], 1)
    t0 = time.perf_counter()
    exact = pair_distances(a, b, pairs, "exact", p=p, progress=progress)
    t_exact = (time.perf_counter() - t0) / n
    if n_rows > 0:
        nr = min(int(n_rows), len(a))
        sel = np.sort(rng.choice(len(a), size=nr, replace=False))
        row_pairs = np.stack([np.repeat(sel, len(b)), np.tile(np.arange(len(b)), nr)], 1)
        exact_rows = pair_distances(a, b, row_pairs, "exact", p=p, progress=progress).reshape(nr, len(b))
        c = min(int(recall_at), len(b))
    rows = []
    for spec in methods:
        name, kw = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        if name == "sliced":
            kw.setdefault("seed", seed)
        t0 = time.perf_counter()
        approx = pair_distances(a, b, pairs, name, p=p, progress=progress, **kw)
        dt = (time.perf_counter() - t0) / n
        pos = exact > 1e-12
        rel = np.abs(approx[pos] - exact[pos]) / exact[pos]
        denom = float(approx @ approx)
        scale = float(approx @ exact) / denom if denom > 0 else float("nan")
        srel = np.abs(scale * approx[pos] - exact[pos]) / exact[pos]
        const = np.ptp(approx) == 0 or np.ptp(exact) == 0
        nn: dict[str, Any] = {}
        if n_rows > 0:
            approx_rows = pair_distances(a, b, row_pairs, name, p=p, progress=progress, **kw).reshape(
                nr, len(b)
            )
            best = exact_rows.argmin(1)
            top_c = np.argsort(approx_rows, axis=1, kind="stable")[:, :c]
            nn = {
                "top1_agreement": float((approx_rows.argmin(1) == best).mean()),
                "recall_at_c": float((top_c == best[:, None]).any(1).mean()),
                "c": c,
            }
        rows.append(
            {
                "method": name,
                "params": ", ".join(f"{k}={v}" for k, v in sorted(kw.items())),
                "p": p,
                "n_pairs": n,
                "spearman": float("nan") if const else float(spearmanr(approx, exact).statistic),
                "pearson": float("nan") if const else float(pearsonr(approx, exact).statistic),
                "rel_error_mean": float(rel.mean()) if rel.size else float("nan"),
                "rel_error_median": float(np.median(rel)) if rel.size else float("nan"),
                "rel_error_p95": float(np.quantile(rel, 0.95)) if rel.size else float("nan"),
                "scale": scale,
                "scaled_rel_error_mean": float(srel.mean()) if srel.size else float("nan"),
                "scaled_rel_error_median": float(np.median(srel)) if srel.size else float("nan"),
                "seconds_per_pair": dt,
                "exact_seconds_per_pair": t_exact,
                **nn,
            }
        )
    return pd.DataFrame(rows)
