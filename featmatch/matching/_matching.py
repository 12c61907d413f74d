"""Data-free SAE Match: feature costs from SAE parameters, exact assignment, composition.

SAE Match (Balagansky et al. 2025) pairs the features of two SAEs, A and B, by solving the
linear assignment problem (LAP) on the distance between their (folded) parameters:

.. math::

    P^{(A\\to B)} = \\arg\\min_{P \\in \\mathcal P_F}
        \\sum_{i=1}^{F} \\big\\| v^{A}_{i} - (P\\, V^{B})_{i} \\big\\|^2
      = \\arg\\max_{P \\in \\mathcal P_F} \\big\\langle P,\\ V^{A} {V^{B}}^{\\top} \\big\\rangle_F
    \\qquad \\text{(Eq. 3)}

where row :math:`v_i` of :math:`V` is feature *i*'s parameter vector: its decoder row
:math:`W_{dec}[i]`, its encoder column :math:`W_{enc}[:, i]`, both concatenated, and
optionally its encoder bias, each taken after threshold folding (Eq. 4, see
:func:`featmatch.saes.fold`). featmatch solves the LAP on the full cost matrix, so it
needs no reduction to inner products; note that such a reduction is only exact for
square problems. For a rectangular pair (:math:`F_A < F_B`) not every column is used, so
the column-norm term :math:`\\|v^B_j\\|^2` changes the optimum and only the row-constant
term :math:`\\|v^A_i\\|^2` may be dropped.

Definitions featmatch adds (the paper leaves them open):

* ``metric="mse"`` is the *mean* squared difference over the D concatenated coordinates,
  :math:`C_{ij} = \\|v^A_i - v^B_j\\|^2 / D`; ``"cosine"`` is :math:`1 - \\cos(v^A_i, v^B_j)`
  (a zero vector has cosine 0 with everything).
* ``include_b_enc`` appends the *effective* encoder bias
  :math:`b_{enc} - b_{dec} W_{enc}` when the SAE subtracts ``b_dec`` from its input
  (SAELens ``apply_b_dec_to_input``), so the bias means the same thing for every SAE.
* Unmatched features: after the exact assignment, pairs whose cost is above a threshold
  (``unmatched_above``) or above the ``unmatched_quantile`` of the assigned costs are
  marked ``-1``. For :math:`F_A > F_B` the :math:`F_A - F_B` rows left without a column are
  ``-1`` as well.

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656. Eq. 3 (matching), Eq. 4 (folding),
   Sec. 3.2 (composition).
.. [2] S. Ainsworth, J. Hayase, S. Srinivasa. "Git Re-Basin." ICLR 2023 (weight matching as a LAP).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featmatch._io import _json_default, atomic_write_json
from featmatch.matching import _lap
from featmatch.matching._costs import (
    METRICS,
    ONS,
    SOLVERS,
    Metric,
    On,
    Solver,
    assign,
    check_option,
    cost_matrix,
    feature_vectors,
)
from featmatch.saes._sae import SAEWeights, check_same_d_in, weights

if TYPE_CHECKING:
    import pandas as pd
    from sae_lens import SAE

__all__ = [
    "Matching",
    "MatchingFileError",
    "match",
    "compose",
    "end_hooks",
    "paths",
]

FORMAT = "featmatch.matching"
FORMAT_VERSION = 2  # one JSON file, arrays embedded (base64 .npz)
LEGACY_VERSION = 1  # JSON header + sibling <stem>.<sha12>.npz; still read


class MatchingFileError(ValueError):
    """A matching file is unreadable, corrupt, of another format, or its arrays do not match it."""


# --------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Matching:
    """A (partial) map from the features of SAE A to the features of SAE B.

    Attributes
    ----------
    perm : (F_A,) np.ndarray of int64
        ``perm[i]`` is the feature of B matched to feature *i* of A, or -1 if unmatched.
    cost : (F_A,) np.ndarray of float64
        Cost of each pair; NaN where unmatched (forced on construction).
    n_b : int
        Number of features of B.
    meta : dict
        Settings used and provenance (JSON-serialisable).
    """

    perm: np.ndarray
    cost: np.ndarray
    n_b: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        perm = np.asarray(self.perm)
        if perm.ndim != 1 or (perm.size and not np.issubdtype(perm.dtype, np.integer)):
            raise ValueError(f"Matching.perm must be a 1-D integer array, got {perm.dtype} {perm.shape}")
        self.perm = perm.astype(np.int64, copy=True)
        self.cost = np.asarray(self.cost, dtype=np.float64).copy()
        if self.cost.shape != self.perm.shape:
            raise ValueError(f"Matching.cost has shape {self.cost.shape}, perm has {self.perm.shape}")
        self.n_b = int(self.n_b)
        if self.n_b < 0:
            raise ValueError(f"Matching.n_b must be >= 0, got {self.n_b}")
        if self.perm.size and (self.perm.min() < -1 or self.perm.max() >= self.n_b):
            raise ValueError(
                f"Matching.perm values must lie in [-1, {self.n_b}); got [{self.perm.min()}, {self.perm.max()}]"
            )
        self.cost[self.perm < 0] = np.nan
        self.meta = dict(self.meta)

    # -- views ---------------------------------------------------------------------
    @property
    def n_a(self) -> int:
        """Number of features of A."""
        return int(self.perm.shape[0])

    @property
    def matched(self) -> np.ndarray:
        """(F_A,) bool mask of matched features of A."""
        return self.perm >= 0

    @property
    def n_matched(self) -> int:
        """Number of matched features."""
        return int(self.matched.sum())

    @property
    def total_cost(self) -> float:
        """Sum of the costs of the matched pairs."""
        return float(self.cost[self.matched].sum())

    @property
    def is_injective(self) -> bool:
        """Whether no feature of B is used twice (true for every LAP solution)."""
        used = self.perm[self.matched]
        return bool(np.unique(used).size == used.size)

    def __repr__(self) -> str:
        return f"Matching(n_a={self.n_a}, n_b={self.n_b}, n_matched={self.n_matched}, total_cost={self.total_cost:.6g})"

    def inverse(self) -> Matching:
        """The map from B back to A (unmatched features of B get -1).

        Raises
        ------
        ValueError
            If the matching is not injective (e.g. a many-to-one top-1 match).
        """
        if not self.is_injective:
            raise ValueError("cannot invert a matching that maps several features of A to one feature of B")
        inv = np.full(self.n_b, -1, dtype=np.int64)
        cost = np.full(self.n_b, np.nan, dtype=np.float64)
        idx = np.flatnonzero(self.matched)
        inv[self.perm[idx]] = idx
        cost[self.perm[idx]] = self.cost[idx]
        return Matching(perm=inv, cost=cost, n_b=self.n_a, meta={"inverse_of": self.meta})

    def to_frame(self) -> pd.DataFrame:
        """One row per feature of A: ``feature_a``, ``feature_b`` (-1 if unmatched), ``cost``, ``matched``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "feature_a": np.arange(self.n_a),
                "feature_b": self.perm,
                "cost": self.cost,
                "matched": self.matched,
            }
        )

    # -- persistence ---------------------------------------------------------------
    @staticmethod
    def _meta_path(path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix == ".npz":
            raise ValueError(f"{path}: a matching is one JSON file (arrays embedded); give a .json path")
        return path

    @staticmethod
    def is_matching_file(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a file featmatch wrote as a matching (any format version).

        It is one when it parses as a JSON object whose ``"format"`` is
        ``"featmatch.matching"``. :meth:`save` replaces only such files (unless forced).
        """
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                if not fh.read(64).lstrip().startswith(b"{"):  # not JSON: no need to read it all
                    return False
                fh.seek(0)
                header = json.loads(fh.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(header, dict) and header.get("format") == FORMAT

    @staticmethod
    def arrays_file(meta_path: str | os.PathLike) -> Path | None:
        """The sibling array file of a matching in the old two-file format (version 1).

        Version 1 files were a JSON header naming a sibling ``<stem>.<sha12>.npz``; version
        2 files (written by :meth:`save` now) embed the arrays and have none, so this
        returns ``None`` for them, as for an unreadable file. featmatch never deletes the
        file returned: a copied header may name another matching's arrays.
        """
        meta_path = Path(meta_path)
        try:
            name = json.loads(meta_path.read_text(encoding="utf-8"))["arrays"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            return None
        return meta_path.parent / name

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the matching to ONE JSON file: metadata plus the arrays, embedded.

        The file holds ``format``/``version`` markers, ``n_a``, ``n_b``, ``n_matched``,
        ``meta``, and the arrays ``perm`` and ``cost`` as an ``.npz`` archive, base64
        encoded (``arrays_npz_base64``), with its SHA-256 (``arrays_sha256``). It is written
        to a temporary file in the same folder and renamed over ``path``
        (:func:`featmatch._io.atomic_save`): a reader sees the old file or the new one,
        never a mix, concurrent saves cannot orphan anything, and an interrupted save
        leaves the previous file (or nothing). No other file is read, written or deleted;
        the array file an old (version 1) matching at ``path`` names is left in place.

        Parameters
        ----------
        path : str or path
            Target file (conventionally ``.json``; ``.npz`` is refused).
        force : bool, default False
            Replace ``path`` even if it exists and is not a featmatch matching. Without it
            only matchings (:meth:`is_matching_file`) are replaced.

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        FileExistsError
            ``path`` exists and is not a featmatch matching (and ``force`` is False).
        IsADirectoryError
            ``path`` is a directory.
        TypeError
            ``meta`` is not JSON-serialisable (nothing is written).
        """
        meta_path = self._meta_path(path)
        if meta_path.is_dir():
            raise IsADirectoryError(f"{meta_path} is a directory; give a file path for the matching")
        if not force and meta_path.exists() and not self.is_matching_file(meta_path):
            raise FileExistsError(
                f"{meta_path} exists and is not a featmatch matching; refusing to overwrite it "
                "(force=True / --force replaces it)"
            )
        buf = io.BytesIO()
        np.savez(buf, perm=self.perm, cost=self.cost)
        data = buf.getvalue()
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "n_matched": self.n_matched,
            "meta": self.meta,
            "arrays_sha256": hashlib.sha256(data).hexdigest(),
            "arrays_npz_base64": base64.b64encode(data).decode("ascii"),
        }
        json.dumps(header, default=_json_default)  # fail before writing anything if meta is not serialisable
        atomic_write_json(meta_path, header, sort_keys=False)  # markers first, arrays last
        return meta_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Matching:
        """Read a matching written by :meth:`save` (or by the old two-file format, version 1).

        Raises
        ------
        FileNotFoundError
            If the file (or, for version 1, its array file) is missing.
        MatchingFileError
            (a ``ValueError``) naming the file if it is unreadable, corrupt, truncated, of
            another format, or the arrays do not match the metadata (checksum, shapes, ranges).
        """
        meta_path = cls._meta_path(path)
        if meta_path.is_dir():
            raise MatchingFileError(f"{meta_path}: is a directory, not a matching file")
        if not meta_path.is_file():
            raise FileNotFoundError(f"matching file not found: {meta_path}")
        try:
            header = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MatchingFileError(
                f"{meta_path}: not a readable matching file (corrupt or partial JSON: {exc})"
            ) from exc
        except OSError as exc:
            raise MatchingFileError(f"{meta_path}: cannot read matching file ({exc})") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise MatchingFileError(f"{meta_path}: not a featmatch matching file (missing format {FORMAT!r})")
        version = header.get("version")
        if version not in (LEGACY_VERSION, FORMAT_VERSION):
            raise MatchingFileError(f"{meta_path}: unsupported matching file version {version!r}")
        try:
            n_a, n_b = int(header["n_a"]), int(header["n_b"])
            sha = str(header["arrays_sha256"])
            meta = dict(header.get("meta") or {})
            arrays = str(header["arrays" if version == LEGACY_VERSION else "arrays_npz_base64"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MatchingFileError(f"{meta_path}: matching metadata lacks or garbles {exc}") from exc
        if version == LEGACY_VERSION:
            source, data = cls._legacy_arrays(meta_path, arrays, sha)
        else:
            source = meta_path
            try:
                data = base64.b64decode(arrays, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MatchingFileError(f"{meta_path}: corrupt embedded arrays (bad base64: {exc})") from exc
            if hashlib.sha256(data).hexdigest() != sha:
                raise MatchingFileError(
                    f"{meta_path}: embedded arrays do not match their checksum (corrupt or edited file)"
                )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                perm, cost = z["perm"], z["cost"]
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
            raise MatchingFileError(
                f"{source}: corrupt matching arrays ({type(exc).__name__}: {exc})"
            ) from exc
        if perm.shape != (n_a,) or cost.shape != (n_a,):
            raise MatchingFileError(
                f"{source}: arrays have shapes {perm.shape}, {cost.shape}; metadata says n_a={n_a}"
            )
        try:
            return cls(perm=perm, cost=cost, n_b=n_b, meta=meta)
        except ValueError as exc:
            raise MatchingFileError(f"{source}: invalid matching ({exc})") from exc

    @staticmethod
    def _legacy_arrays(meta_path: Path, arrays: str, sha: str) -> tuple[Path, bytes]:
        """The checked bytes of a version-1 matching's sibling ``.npz`` (and its path)."""
        if not arrays or Path(arrays).name != arrays or arrays in (".", ".."):
            raise MatchingFileError(
                f"{meta_path}: bad array file name {arrays!r} (must be a file next to the metadata)"
            )
        npz_path = meta_path.parent / arrays
        if not npz_path.is_file():
            raise FileNotFoundError(f"array file of matching {meta_path} not found: {npz_path}")
        data = npz_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise MatchingFileError(
                f"{npz_path}: array file does not match its metadata {meta_path.name} (checksum differs; "
                "partial write or files from different runs)"
            )
        return npz_path, data


# --------------------------------------------------------------------------------------
# match / compose / paths
# --------------------------------------------------------------------------------------


def check_match_options(
    *,
    on: Any = "both",
    metric: Any = "mse",
    solver: Any = "auto",
    unmatched_above: Any = None,
    unmatched_quantile: Any = None,
    block_size: Any = None,
    k: Any = None,
    max_rounds: Any = None,
) -> None:
    """Validate the options of :func:`match` and :func:`featmatch.matching.match_stack`.

    Both call this one function first, so a bad option is rejected by both, before any
    work, with the same message. ``None`` means "not given" for the optional ones.

    Raises
    ------
    ValueError
        Naming the option: ``on``, ``metric`` or ``solver`` not one of the allowed values;
        both ``unmatched_above`` and ``unmatched_quantile``; ``unmatched_quantile`` outside
        [0, 1] (or NaN); ``unmatched_above`` not finite; ``block_size``, ``k`` or
        ``max_rounds`` below 1.
    """
    check_option("on", on, ONS)
    check_option("metric", metric, METRICS)
    check_option("solver", solver, SOLVERS)
    if unmatched_above is not None and unmatched_quantile is not None:
        raise ValueError("give at most one of unmatched_above and unmatched_quantile")
    if unmatched_quantile is not None and not (0.0 <= float(unmatched_quantile) <= 1.0):
        raise ValueError(f"unmatched_quantile must lie in [0, 1], got {unmatched_quantile}")
    if unmatched_above is not None and not np.isfinite(unmatched_above):
        raise ValueError(f"unmatched_above must be finite, got {unmatched_above}")
    for name, value in (("block_size", block_size), ("k", k), ("max_rounds", max_rounds)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _mark_unmatched(
    perm: np.ndarray, cost: np.ndarray, unmatched_above: float | None, unmatched_quantile: float | None
) -> float | None:
    """Set ``perm = -1`` (in place) where the assigned cost exceeds the threshold; return it."""
    assigned = perm >= 0
    if unmatched_quantile is not None:
        if not assigned.any():
            return None
        threshold = float(np.quantile(cost[assigned], unmatched_quantile))
    elif unmatched_above is not None:
        threshold = float(unmatched_above)
    else:
        return None
    drop = assigned & (cost > threshold)
    perm[drop] = -1
    cost[drop] = np.nan
    return threshold


def match_meta(
    wa: SAEWeights,
    wb: SAEWeights,
    *,
    on: str,
    metric: str,
    fold: bool,
    include_b_enc: bool,
    solver: str,
    unmatched_above: float | None,
    unmatched_quantile: float | None,
    threshold: float | None,
    seconds: float,
    solver_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta`` of a SAE Match :class:`Matching` (one place for :func:`match` and ``match_stack``).

    Parameters
    ----------
    wa, wb : SAEWeights
        The two SAEs.
    on, metric, fold, include_b_enc, unmatched_above, unmatched_quantile
        The options used.
    solver : str
        The solver that ran (``"dense"`` or ``"sparse"``, never ``"auto"``).
    threshold : float or None
        The unmatched threshold actually applied.
    seconds : float
        Wall time.
    solver_info : dict, optional
        :meth:`SparseMatchInfo.as_dict`, stored under ``"solver_info"`` when given.

    Returns
    -------
    dict
        JSON-serialisable.
    """
    meta: dict[str, Any] = {
        "method": "sae_match",
        "on": on,
        "metric": metric,
        "fold": bool(fold),
        "include_b_enc": bool(include_b_enc),
        "solver": solver,
        "unmatched_above": None if unmatched_above is None else float(unmatched_above),
        "unmatched_quantile": None if unmatched_quantile is None else float(unmatched_quantile),
        "unmatched_threshold": threshold,
        "n_a": wa.d_sae,
        "n_b": wb.d_sae,
        "d_in": wa.d_in,
        "hook_a": wa.hook_name,
        "hook_b": wb.hook_name,
        "architecture_a": wa.architecture,
        "architecture_b": wb.architecture,
        "folded_a": bool(fold and wa.threshold is not None),
        "folded_b": bool(fold and wb.threshold is not None),
        "seconds": round(seconds, 4),
    }
    if solver_info is not None:
        meta["solver_info"] = solver_info
    return meta


def match(
    sae_a: SAE | SAEWeights,
    sae_b: SAE | SAEWeights,
    on: On = "both",
    metric: Metric = "mse",
    fold: bool = True,
    include_b_enc: bool = False,
    solver: Solver = "auto",
    unmatched_above: float | None = None,
    unmatched_quantile: float | None = None,
    *,
    block_size: int = 2048,
    k: int | None = None,
    device: str | None = None,
    unmatched_mode: str = "solve",
) -> Matching:
    """Match the features of SAE A to those of SAE B (SAE Match, Balagansky et al. 2025).

    Solves the LAP of Eq. 3 exactly on the cost of :func:`featmatch.matching.cost_matrix`:

    .. math::

        \\pi^\\star = \\arg\\min_{\\pi} \\sum_i C_{i\\pi(i)}, \\qquad
        C_{ij} = \\tfrac{1}{D}\\|v^A_i - v^B_j\\|^2 \\ \\text{(mse)}\\ \\text{ or }\\
                 1 - \\cos(v^A_i, v^B_j),

    with :math:`v` the (folded, Eq. 4) feature vectors of
    :func:`featmatch.matching.feature_vectors`. Square and rectangular pairs are supported;
    when :math:`F_A > F_B` the extra rows are -1.

    Parameters
    ----------
    sae_a, sae_b : sae_lens.SAE or SAEWeights
        SAEs on hidden states of the same width.
    on : {"encoder", "decoder", "both"}
        Parameters compared. The paper's main runs use both (Sec. 4).
    metric : {"mse", "cosine"}
    fold : bool
        Fold thresholds first (Eq. 4). No-op for SAEs without a threshold.
    include_b_enc : bool
        Also compare the (effective, folded) encoder bias.
    solver : {"auto", "dense", "sparse"}
        ``"dense"``: scipy ``linear_sum_assignment`` on the full matrix. ``"sparse"``:
        :func:`featmatch.matching.sparse_match` on the (F, D) feature vectors (exact, with an
        optimality certificate, without the full matrix). ``"auto"`` is sparse where it is
        measured faster, :math:`F_A F_B >` ``featmatch.matching._lap.AUTO_SPARSE_ABOVE`` (2,048 x 3,072 cells,
        see ``docs/benchmarks.md``), or where the dense float64 matrix would take more than
        25% of the available RAM (:func:`featmatch.matching.auto_solver`); else dense. On the
        sparse route, when a sample of 256 rows predicts a rectangular core above
        ``_lap.AUTO_DENSE_CORE_SHARE`` (40 %) of the rows, the whole problem is solved densely
        (``sparse_match(auto_dense_share=...)``, issue 18).
    unmatched_above : float, optional
        Every feature of A may stay unmatched (-1) at this fixed cost :math:`\\lambda` (finite).
        With ``unmatched_mode="solve"`` (default) the thresholded problem is solved as such,
        exactly: :math:`\\min_M \\sum_{(i,j)\\in M} C_{ij} + \\lambda (F_A - |M|)` over partial
        matchings (:func:`featmatch.matching._lap.threshold_match` for the sparse solver,
        :func:`featmatch.matching._lap.threshold_assign` on the dense matrix); every kept
        pair costs less than :math:`\\lambda`. Its optimum is the full assignment's on
        :math:`\\min(C, \\lambda)` and never worse than masking the full permutation (see
        ``threshold_match``); the two pair sets can differ. ``unmatched_mode="mask"`` is the
        behaviour before issue 18: solve the full permutation, then mark its pairs above
        :math:`\\lambda` unmatched (kept pairs then cost :math:`\\le \\lambda`).
    unmatched_quantile : float in [0, 1], optional
        Mark assigned pairs with cost above this quantile of the assigned costs as
        unmatched (e.g. 0.9 drops the 10% worst). Exclusive with ``unmatched_above``. The
        quantile is of the full permutation's costs, so this always masks that permutation
        (``unmatched_mode`` does not apply).
    block_size : int
        Rows per block of the dense cost computation (the sparse solver sizes its own
        blocks, :func:`featmatch.matching.default_block_size`).
    k, device : optional
        Passed to the sparse solver (candidates per row, >= 1; where the product runs).
    unmatched_mode : {"solve", "mask"}
        How ``unmatched_above`` is applied (see there).

    Returns
    -------
    Matching
        With the settings, sizes, hooks and timing in ``meta`` (``unmatched_threshold`` is
        the cost threshold actually applied).

    Raises
    ------
    ValueError
        On a ``d_in`` mismatch, NaN/Inf weights, :math:`\\theta \\le 0`, or bad options
        (:func:`check_match_options`).

    Examples
    --------
    >>> m = match(sae_a, sae_b)                                   # doctest: +SKIP
    >>> m.perm[:5], m.n_matched                                   # doctest: +SKIP
    """
    check_match_options(
        on=on,
        metric=metric,
        solver=solver,
        unmatched_above=unmatched_above,
        unmatched_quantile=unmatched_quantile,
        block_size=block_size,
        k=k,
    )
    check_option("unmatched_mode", unmatched_mode, ("solve", "mask"))
    wa, wb = weights(sae_a, side="A", fold=fold), weights(sae_b, side="B", fold=fold)
    check_same_d_in(wa, wb)

    t0 = time.perf_counter()
    resolved = _lap.auto_solver(wa.d_sae, wb.d_sae) if solver == "auto" else solver
    # the thresholded problem solved as such (issue 18): only pairs cheaper than the threshold
    thresholded = unmatched_above is not None and unmatched_mode == "solve"
    solver_info = None
    if resolved == "dense":
        cost = cost_matrix(
            wa, wb, on=on, metric=metric, fold=fold, include_b_enc=include_b_enc, block_size=block_size
        )
        perm, pair_cost = _lap.threshold_assign(cost, unmatched_above) if thresholded else assign(cost)
        del cost
    else:
        xa = feature_vectors(wa, on=on, fold=fold, include_b_enc=include_b_enc)
        xb = feature_vectors(wb, on=on, fold=fold, include_b_enc=include_b_enc)
        opts = {key: val for key, val in (("k", k), ("device", device)) if val is not None}
        if thresholded:
            perm, pair_cost, info = _lap.threshold_match(
                xa, xb, float(unmatched_above), metric=metric, return_info=True, **opts
            )
            solver_info = info.as_dict()
        else:
            if solver == "auto":  # switch to dense when the first pass predicts a large rectangular core
                opts["auto_dense_share"] = _lap.AUTO_DENSE_CORE_SHARE
            perm, pair_cost = _lap.sparse_match(xa, xb, metric=metric, **opts)
        perm = np.asarray(perm, dtype=np.int64).copy()
        pair_cost = np.asarray(pair_cost, dtype=np.float64).copy()
    if thresholded:
        threshold = float(unmatched_above)
    else:
        threshold = _mark_unmatched(perm, pair_cost, unmatched_above, unmatched_quantile)
    meta = match_meta(
        wa,
        wb,
        on=on,
        metric=metric,
        fold=fold,
        include_b_enc=include_b_enc,
        solver=resolved,
        unmatched_above=unmatched_above,
        unmatched_quantile=unmatched_quantile,
        threshold=threshold,
        seconds=time.perf_counter() - t0,
        solver_info=solver_info,
    )
    if unmatched_above is not None:
        meta["unmatched_mode"] = unmatched_mode
    return Matching(perm=perm, cost=pair_cost, n_b=wb.d_sae, meta=meta)


def end_hooks(m: Matching) -> tuple[str | None, str | None]:
    """The hooks a matching starts from and maps into, read from its metadata.

    Follows composed (``meta["composed"]``) and inverted (``meta["inverse_of"]``) matchings;
    ``None`` where the metadata does not say (a matching built from raw arrays).
    """
    meta = m.meta if isinstance(m, Matching) else m
    if not isinstance(meta, dict):
        return None, None
    if "composed" in meta and meta["composed"]:
        parts = meta["composed"]
        return end_hooks(parts[0])[0], end_hooks(parts[-1])[1]
    if "inverse_of" in meta:
        a, b = end_hooks(meta["inverse_of"])
        return b, a
    return meta.get("hook_a"), meta.get("hook_b")


def compose(m_ab: Matching, m_bc: Matching, *, force: bool = False) -> Matching:
    """Compose two matchings, :math:`P^{(A\\to C)} \\approx P^{(B\\to C)} P^{(A\\to B)}` (Sec. 3.2).

    ``perm_ac[i] = m_bc.perm[m_ab.perm[i]]``; -1 propagates (a feature unmatched at either
    step is unmatched). The composed cost is the sum of the two step costs (a path cost,
    not the direct A→C cost; NaN where unmatched).

    The two must chain: the first maps into as many features as the second starts from,
    and, where both metadata name their hooks (:func:`end_hooks`), the first ends at the
    hook the second starts from. ``compose(m_15_16, m_14_15)`` or ``compose(m, m)`` is
    refused.

    Parameters
    ----------
    m_ab, m_bc : Matching
    force : bool, default False
        Compose although the hooks do not chain (the widths must still agree).

    Raises
    ------
    ValueError
        If the matchings do not chain; the message says why in one line.
    """
    if m_ab.n_b != m_bc.n_a:
        raise ValueError(
            f"cannot compose: the first matching maps into {m_ab.n_b} features, the second starts from {m_bc.n_a}"
        )
    end_ab, start_bc = end_hooks(m_ab)[1], end_hooks(m_bc)[0]
    if not force and end_ab is not None and start_bc is not None and end_ab != start_bc:
        raise ValueError(
            f"cannot compose: the first matching ends at {end_ab}, the second starts from {start_bc} "
            "(give them in chain order; force=True / --force composes anyway)"
        )
    ok = m_ab.perm >= 0
    perm = np.full(m_ab.n_a, -1, dtype=np.int64)
    perm[ok] = m_bc.perm[m_ab.perm[ok]]
    cost = np.full(m_ab.n_a, np.nan, dtype=np.float64)
    cost[ok] = m_ab.cost[ok] + m_bc.cost[m_ab.perm[ok]]
    return Matching(perm=perm, cost=cost, n_b=m_bc.n_b, meta={"composed": [m_ab.meta, m_bc.meta]})


def paths(
    matchings: Sequence[Matching], start_features: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Follow features through a chain of matchings (layer t → t+1 → ...).

    Parameters
    ----------
    matchings : sequence of Matching
        ``matchings[k]`` maps layer *k*'s features to layer *k+1*'s.
    start_features : (n,) int array-like, optional
        Features of the first layer; all of them by default.

    Returns
    -------
    (n, len(matchings) + 1) np.ndarray of int64
        Column *k* holds each path's feature at layer *k*; -1 from the first unmatched step on.
    """
    matchings = list(matchings)
    for k in range(len(matchings) - 1):
        if matchings[k].n_b != matchings[k + 1].n_a:
            raise ValueError(
                f"matchings {k} and {k + 1} do not chain: {matchings[k].n_b} features vs {matchings[k + 1].n_a}"
            )
    if start_features is None:
        if not matchings:
            raise ValueError("paths needs start_features when no matchings are given")
        start = np.arange(matchings[0].n_a, dtype=np.int64)
    else:
        start = np.asarray(start_features)
        if start.ndim != 1 or (start.size and not np.issubdtype(start.dtype, np.integer)):
            raise ValueError(f"start_features must be a 1-D integer array, got {start.dtype} {start.shape}")
        start = start.astype(np.int64)
        if matchings and start.size and (start.min() < 0 or start.max() >= matchings[0].n_a):
            raise ValueError(f"start_features must lie in [0, {matchings[0].n_a})")
    out = np.full((start.size, len(matchings) + 1), -1, dtype=np.int64)
    out[:, 0] = start
    cur = start
    for k, m in enumerate(matchings):
        ok = cur >= 0
        nxt = np.full_like(cur, -1)
        nxt[ok] = m.perm[cur[ok]]
        out[:, k + 1] = nxt
        cur = nxt
    return out
