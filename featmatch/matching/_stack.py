"""``match_stack``: SAE Match over every adjacent pair of a stack of SAEs, sharing the prepared sides."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from featmatch.matching._costs import feature_vectors
from featmatch.matching._lap import _resolve_device, _Side, _sparse_match_sides, auto_solver
from featmatch.matching._matching import Matching, _mark_unmatched, check_match_options, match, match_meta
from featmatch.saes._sae import SAEWeights, check_same_d_in, weights

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["match_stack"]


def match_stack(
    saes: Iterable[SAE | SAEWeights | str],
    *,
    progress: bool = True,
    client: Any = None,
    retries: int | None = None,
    **match_kwargs: Any,
) -> list[Matching]:
    """Match every adjacent pair of a stack of SAEs: layer t to layer t+1, for all t.

    Equivalent to ``[match(saes[t], saes[t + 1], **match_kwargs) for t in ...]``, but with
    the sparse solver each SAE's feature vectors, squared norms and transposed copy are
    computed once and reused, first as the columns (B) of pair t-1 and then as the rows (A)
    of pair t. The stack is consumed lazily: an iterator or generator works, and only two
    SAEs are held at a time (so a 26-layer 16k stack does not need 26 SAEs in memory).

    With ``client``, the pairs run as Dask tasks, one per pair (:mod:`featmatch._dask`).
    Each task loads its two SAEs on the worker, from their source (a folder,
    ``release:sae_id``, a zoo release; SAEs loaded by :func:`featmatch.saes.load_sae`
    carry theirs), and runs this function on the pair with the same options, so the
    permutations are identical to the local run's; only ``meta["seconds"]`` differs. An
    SAE without a source is scattered to the workers once. The sparse solver runs on the
    worker's device (CUDA when the worker has a GPU) unless ``device`` is given.

    Parameters
    ----------
    saes : iterable of sae_lens.SAE, SAEWeights or str
        At least two SAEs on hidden states of the same width, in layer order. A string is
        loaded with :func:`featmatch.saes.load_sae` (on the workers, with ``client``).
    progress : bool
        Show a tqdm progress bar over the pairs.
    client : dask.distributed.Client or str, optional
        Run on a Dask cluster: a ``Client``, ``"local:N"`` or a scheduler address
        (:func:`featmatch._dask.get_client`). ``None`` (default) runs here.
    retries : int, optional
        With ``client``: retries of a pair that raised (default
        :data:`featmatch._dask.RETRIES`); a pair lost with its worker is recomputed anyway.
        No result is returned unless every pair succeeded.
    **match_kwargs
        As :func:`featmatch.matching.match`: ``on``, ``metric``, ``fold``,
        ``include_b_enc``, ``solver`` ("auto"/"dense"/"sparse"), ``unmatched_above`` (with
        ``unmatched_mode``, as in :func:`featmatch.matching.match`: by default the thresholded
        problem is solved as such, by ``match`` itself),
        ``unmatched_quantile``, ``block_size``, and for the sparse solver ``k``, ``device``,
        ``max_rounds``. Validated up front by the same code as :func:`~featmatch.matching.match`
        (:func:`~featmatch.matching._matching.check_match_options`), before the stack is read.

    Returns
    -------
    list of Matching
        ``len(saes) - 1`` matchings, ``matchings[t]`` from layer t to layer t+1. With the
        sparse solver, ``meta["solver_info"]`` holds :meth:`SparseMatchInfo.as_dict`.

    Raises
    ------
    ValueError
        Fewer than two SAEs, a ``d_in`` mismatch, or bad options (the same messages as
        :func:`~featmatch.matching.match`).
    TypeError
        Unknown options.
    """
    from tqdm.auto import tqdm

    opts = dict(match_kwargs)
    on = opts.pop("on", "both")
    metric = opts.pop("metric", "mse")
    fold = opts.pop("fold", True)
    include_b_enc = opts.pop("include_b_enc", False)
    solver = opts.pop("solver", "auto")
    unmatched_above = opts.pop("unmatched_above", None)
    unmatched_quantile = opts.pop("unmatched_quantile", None)
    unmatched_mode = opts.pop("unmatched_mode", "solve")
    block_size = opts.pop("block_size", None)
    k = opts.pop("k", 16)
    device = opts.pop("device", None)
    max_rounds = opts.pop("max_rounds", 8)
    if opts:
        raise TypeError(f"match_stack got unexpected options: {', '.join(sorted(opts))}")
    check_match_options(
        on=on,
        metric=metric,
        solver=solver,
        unmatched_above=unmatched_above,
        unmatched_quantile=unmatched_quantile,
        block_size=block_size,
        k=k,
        max_rounds=max_rounds,
    )
    if client is not None:
        return _match_stack_distributed(
            list(saes),
            client,
            progress=progress,
            retries=retries,
            opts=dict(
                on=on,
                metric=metric,
                fold=fold,
                include_b_enc=include_b_enc,
                solver=solver,
                unmatched_above=unmatched_above,
                unmatched_quantile=unmatched_quantile,
                unmatched_mode=unmatched_mode,
                block_size=block_size,
                k=k,
                device=device,
                max_rounds=max_rounds,
            ),
        )
    total = len(saes) - 1 if hasattr(saes, "__len__") else None  # type: ignore[arg-type]
    it = iter(_loaded(s) for s in saes)
    try:
        w_prev = weights(next(it))
    except StopIteration:
        raise ValueError("match_stack needs at least two SAEs, got 0") from None
    dev = _resolve_device(device)

    def side(w: SAEWeights) -> _Side:
        return _Side(feature_vectors(w, on=on, fold=fold, include_b_enc=include_b_enc), dev)

    out: list[Matching] = []
    bar = tqdm(total=total, desc="match_stack", disable=not progress, unit="pair")
    prev: _Side | None = None
    for sae in it:
        t0 = time.perf_counter()
        w = weights(sae)
        check_same_d_in(w_prev, w)
        use_sparse = solver == "sparse" or (
            solver == "auto" and auto_solver(w_prev.d_sae, w.d_sae) == "sparse"
        )
        # the thresholded problem (unmatched_above, solved as such) goes through match() itself,
        # so that match_stack and match give the same pairs for the same options
        thresholded = unmatched_above is not None and unmatched_mode == "solve"
        if not use_sparse or thresholded:
            kw: dict[str, Any] = {"block_size": block_size} if block_size is not None else {}
            if use_sparse:
                kw["k"] = k
                if device is not None:
                    kw["device"] = device
            out.append(
                match(
                    w_prev,
                    w,
                    on=on,
                    metric=metric,
                    fold=fold,
                    include_b_enc=include_b_enc,
                    solver="sparse" if use_sparse else "dense",
                    unmatched_above=unmatched_above,
                    unmatched_quantile=unmatched_quantile,
                    unmatched_mode=unmatched_mode,
                    **kw,
                )
            )
            prev = None
        else:
            if prev is None:
                prev = side(w_prev)
            nxt = side(w)
            perm, cost, info = _sparse_match_sides(
                prev, nxt, metric, int(k), block_size, int(max_rounds), 1e-12, True, None, t0
            )
            threshold = _mark_unmatched(perm, cost, unmatched_above, unmatched_quantile)
            meta = match_meta(
                w_prev,
                w,
                on=on,
                metric=metric,
                fold=fold,
                include_b_enc=include_b_enc,
                solver="sparse",
                unmatched_above=unmatched_above,
                unmatched_quantile=unmatched_quantile,
                threshold=threshold,
                seconds=time.perf_counter() - t0,
                solver_info=info.as_dict(),
            )
            out.append(Matching(perm=perm, cost=cost, n_b=w.d_sae, meta=meta))
            prev.release()
            prev = nxt
        w_prev = w
        bar.update(1)
    bar.close()
    if not out:
        raise ValueError("match_stack needs at least two SAEs, got 1")
    return out


def _loaded(sae: SAE | SAEWeights | str) -> SAE | SAEWeights:
    """A string is a source for :func:`featmatch.saes.load_sae`; anything else is the SAE."""
    if isinstance(sae, str):
        from featmatch.saes._sae import load_sae

        return load_sae(sae)
    return sae


def _pair_task(item_a: Any, item_b: Any, opts: dict[str, Any]) -> Matching:
    """One Dask task: match one layer pair on the worker, exactly as the local loop does."""
    from featmatch._dask import worker_object

    sae_a, sae_b = worker_object(item_a, "cpu"), worker_object(item_b, "cpu")  # weights() reads CPU tensors
    return match_stack([sae_a, sae_b], progress=False, **opts)[0]


def _match_stack_distributed(
    saes: list[Any], client: Any, *, progress: bool, retries: int | None, opts: dict[str, Any]
) -> list[Matching]:
    from featmatch._dask import RETRIES, get_client, run_tasks, to_workers
    from featmatch.saes._sae import load_sae

    if len(saes) < 2:
        raise ValueError(f"match_stack needs at least two SAEs, got {len(saes)}")
    c = get_client(client)
    items = to_workers(c, saes, load=load_sae)
    args = [(items[t], items[t + 1], opts) for t in range(len(items) - 1)]
    return run_tasks(
        c,
        _pair_task,
        args,
        desc="match_stack",
        progress=progress,
        retries=RETRIES if retries is None else retries,
    )
