"""Benchmark of :func:`featmatch.semantic.nearest`: recall against exact W2, time and memory.

Two parts (each prints a Markdown table between ``TABLE_BEGIN`` / ``TABLE_END``):

* ``--real`` (default): real quick-zoo features built the way chapter 04 builds them (train
  split, reference space ``layer:mid`` with PCA 64, 32 samples per feature). For ``--queries``
  features of layer A the exact W2 to **every** feature of layer B is computed by brute force
  (``ot.emd2``), and ``nearest`` is scored by recall@1 and recall@10 for a sweep of candidate
  counts ``c``; the certified mode (``certify=True``) is checked against the brute force.
* ``--p6``: benchmark P6, ``--features`` × ``--features`` synthetic features (N = 48 support
  points, k = 64 dimensions, the clustered generator of ``bench_semantic.py``), top-10
  neighbours of every feature; wall time and peak RSS of the whole search, then recall@1 and
  recall@10 on ``--queries`` sampled queries against the exact top-10 (the certified search,
  exact by construction; ``--brute``: all-pairs ``ot.emd2``).

Run::

    python benchmarks/bench_nearest.py --real --queries 512
    python benchmarks/bench_nearest.py --p6 --features 16384 --queries 512
    python benchmarks/bench_nearest.py --quick      # both, small
    python benchmarks/bench_nearest.py --decide --client local:2   # recall@1 on every feature, exact CI
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

try:
    import featmatch  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from featmatch._threads import fitted_thread_count  # noqa: E402
from featmatch.semantic import DEFAULT_CANDIDATES, FeatureDistributions, nearest, pair_distances  # noqa: E402


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def exact_rows(a: FeatureDistributions, b: FeatureDistributions, rows: np.ndarray) -> np.ndarray:
    """Brute-force exact W2 from each of ``rows`` of ``a`` to every feature of ``b``."""
    pairs = np.stack([np.repeat(rows, len(b)), np.tile(np.arange(len(b)), len(rows))], 1)
    return pair_distances(a, b, pairs, "exact").reshape(len(rows), len(b))


def recall(idx: np.ndarray, exact: np.ndarray, k: int) -> tuple[float, float]:
    """recall@1 (same nearest, ties to exact distance allowed) and recall@k (overlap share)."""
    best = exact.min(1)
    got1 = np.take_along_axis(exact, np.maximum(idx[:, :1], 0), 1)[:, 0]
    r1 = float(np.mean(np.isclose(got1, best, rtol=1e-9, atol=1e-12)))
    truth = np.argsort(exact, axis=1, kind="stable")[:, :k]
    rk = float(np.mean([len(set(t) & set(i)) / k for t, i in zip(truth, idx[:, :k], strict=True)]))
    return r1, rk


def real_part(args: argparse.Namespace) -> None:
    la, lb = args.pair
    d = _quick_zoo_distributions([la, lb])
    a, b = d[la], d[lb]
    rng = np.random.default_rng(0)
    q = np.sort(rng.choice(len(a), size=min(args.queries, len(a)), replace=False))
    aq = a.subset(q)
    t0 = time.perf_counter()
    ex = exact_rows(a, b, q)
    t_exact = time.perf_counter() - t0
    rows = []
    for c in args.sweep:
        t0 = time.perf_counter()
        idx, _ = nearest(aq, b, k=10, candidates=c, embed=args.embed)
        dt = time.perf_counter() - t0
        r1, r10 = recall(idx, ex, 10)
        rows.append((f"{args.embed}, c={c}", r1, r10, dt))
    t0 = time.perf_counter()
    idx, dist = nearest(aq, b, k=10, candidates=10, certify=True)
    dt = time.perf_counter() - t0
    r1, r10 = recall(idx, ex, 10)
    same = bool(np.allclose(dist, np.sort(ex, 1)[:, :10], rtol=1e-9, atol=1e-12))
    rows.append(("certified (c=10)", r1, r10, dt))
    print("TABLE_BEGIN")
    print(
        f"Real quick-zoo features, layers {la}→{lb}: {len(q)} queries of {len(a)} against all {len(b)} "
        f"features (PCA 64, ≤32 samples). Exact all-pairs by brute force: {len(q) * len(b):,} `ot.emd2` "
        f"in {t_exact:.0f} s ({t_exact / (len(q) * len(b)) * 1e6:.0f} µs each). Certified top-10 equal to "
        f"brute force: {same}.\n"
    )
    print("| search | recall@1 | recall@10 | seconds | speed-up vs all-pairs |")
    print("|---|---|---|---|---|")
    for name, r1, r10, dt in rows:
        print(f"| {name} | {r1:.4f} | {r10:.4f} | {dt:.1f} | {t_exact / dt:.1f}× |")
    print("TABLE_END")


def _quick_zoo_distributions(layers: list[int]) -> dict:
    """Chapter 04's feature distributions of the quick zoo at ``layers`` (train split, layer:mid, PCA 64)."""
    from featmatch.chapters import semantic_ot as R
    from featmatch.chapters.setup import load_setup
    from featmatch.lm.activations import gather
    from featmatch.lm.corpus import token_batches

    setup = load_setup(
        "smollm2-135m", "featmatch-smollm2-quick", layers=layers, n_tokens=16384, seed=0, profile="quick"
    )
    tokens_fit = token_batches(
        setup.tokenizer, n_tokens=16384, seq_len=int(setup.tokens.shape[1]), split="train", seed=0
    )
    stats = gather(setup.model, setup.saes, tokens_fit, n_samples=32, seed=0, progress=False)
    n_layers = int(setup.model.cfg.n_layers)
    spec = dict(list(R.comparison_spaces("layer:mid", 64, n_layers).items())[:1])
    ref = next(iter(R.reference_spaces(setup.model, tokens_fit, spec).values()))
    return R.feature_distributions(stats, ref, tuple(layers), n=32, seed=0)


def decide_part(args: argparse.Namespace) -> None:
    """recall@1 of the uncertified search on every feature of several layer pairs, with an exact CI.

    The truth is the certified search (``certify=True``: exact by construction, and equal to
    brute-force ``ot.emd2`` in tests/semantic/test_nearest.py), so every feature of A can be a
    query. The interval is Clopper–Pearson's exact binomial 95 % interval over queries.
    """
    from scipy.stats import binomtest

    pairs = [tuple(args.pairs[i : i + 2]) for i in range(0, len(args.pairs), 2)]
    layers = sorted({L for p in pairs for L in p})
    d = _quick_zoo_distributions(layers)
    client = args.client
    hits: dict[int, list[np.ndarray]] = {c: [] for c in args.sweep}
    secs: dict[int, float] = dict.fromkeys(args.sweep, 0.0)
    t_cert, n_q = 0.0, 0
    for la, lb in pairs:
        a, b = d[la], d[lb]
        q = (
            np.arange(len(a))
            if args.queries <= 0
            else np.sort(
                np.random.default_rng(0).choice(len(a), size=min(args.queries, len(a)), replace=False)
            )
        )
        aq = a.subset(q)
        t0 = time.perf_counter()
        _, ex_d = nearest(aq, b, k=10, candidates=10, certify=True, client=client, block=64)
        t_cert += time.perf_counter() - t0
        n_q += len(q)
        for c in args.sweep:
            t0 = time.perf_counter()
            _, dist = nearest(aq, b, k=10, candidates=c, client=client, block=64)
            secs[c] += time.perf_counter() - t0
            hits[c].append(np.isclose(dist[:, 0], ex_d[:, 0], rtol=1e-9, atol=1e-12))
    print("TABLE_BEGIN")
    where = f"on a Dask cluster ({client})" if client else "in one process"
    print(
        f"recall@1 of `nearest` (moment-bound candidates, exact rerank) on {n_q} query features of the quick "
        f"zoo, layer pairs {', '.join(f'{a}→{b}' for a, b in pairs)} (every feature of A; chapter 04's "
        f"distributions: train split, layer:mid, PCA 64, ≤32 samples), against the certified exact search "
        f"({t_cert:.0f} s), {where}. CI: Clopper–Pearson exact 95 %.\n"
    )
    print("| candidates c | hits / queries | recall@1 | 95 % CI | seconds | decides recall@1 ≥ 0.99? |")
    print("|---|---|---|---|---|---|")
    for c in args.sweep:
        h = np.concatenate(hits[c])
        k, n = int(h.sum()), int(h.size)
        ci = binomtest(k, n).proportion_ci(method="exact")
        verdict = "yes, held" if ci.low >= 0.99 else ("yes, failed" if ci.high < 0.99 else "no")
        print(
            f"| {c} | {k} / {n} | {k / n:.4f} | [{ci.low:.4f}, {ci.high:.4f}] | {secs[c]:.0f} | {verdict} |"
        )
    print("TABLE_END")


def p6_part(args: argparse.Namespace) -> None:
    from bench_semantic import synthetic_layers

    F = args.features
    a, b, _ = synthetic_layers(F, 48, 64, positions=max(65536, 4 * F), seed=0)
    rss0 = peak_rss_gb()
    t0 = time.perf_counter()
    # nearest's own default (the free CPUs), fixed here so the table reports what the search used
    threads = None if args.client else fitted_thread_count()
    idx, dist = nearest(
        a, b, k=10, candidates=args.candidates, embed=args.embed, client=args.client, threads=threads
    )
    t_all = time.perf_counter() - t0
    rss = peak_rss_gb()
    rng = np.random.default_rng(1)
    q = np.sort(rng.choice(F, size=min(args.queries, F), replace=False))
    t0 = time.perf_counter()
    if args.no_exact:
        ex = None
    elif (
        not args.brute
    ):  # the certified search is exact (tests/semantic/test_nearest.py); its distances stand in
        ex_i, ex_d = nearest(a.subset(q), b, k=10, candidates=10, certify=True, client=args.client)
        ex = np.full((len(q), F), np.inf)  # recall() reads only the exact top-10 of each query
        np.put_along_axis(ex, ex_i, ex_d, axis=1)
    else:
        ex = exact_rows(a, b, q)
    t_ex = time.perf_counter() - t0
    print("TABLE_BEGIN")
    print(
        f"P6: {F:,} × {F:,} synthetic features (≤48 support points, k = 64), top-10 of every feature, "
        f"c = {args.candidates or DEFAULT_CANDIDATES} candidates. Peak RSS before the search {rss0:.2f} GB (data).\n"
    )
    print("| quantity | value | target |")
    print("|---|---|---|")
    print(f"| wall time, all {F:,} queries | {t_all:.0f} s | ≤ 600 s |")
    where = (
        f" (client only; the search ran on {args.client})"
        if args.client
        else f" (the whole search: one process, {threads} threads)"
    )
    print(f"| peak RSS of the process{where} | {rss:.2f} GB | ≤ 4 GB |")
    if ex is not None:
        r1, r10 = recall(idx[q], ex, 10)
        print(f"| recall@1 on {len(q)} queries vs the exact top-10 | {r1:.4f} | ≥ 0.99 |")
        print(f"| recall@10 on {len(q)} queries | {r10:.4f} | |")
        how = f"brute force ({len(q) * F:,} emd2)" if args.brute else "certified search (exact)"
        print(f"| exact reference for those queries: {how} | {t_ex:.0f} s | |")
    print("TABLE_END")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", action="store_true")
    p.add_argument("--p6", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--pair", type=int, nargs=2, default=(14, 29))
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--sweep", type=int, nargs="*", default=[10, 16, 32, 64, 128])
    p.add_argument("--features", type=int, default=16384)
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--no-exact", action="store_true")
    p.add_argument(
        "--brute",
        action="store_true",
        help="P6's exact reference by brute-force ot.emd2 over all columns (default: the certified search, exact)",
    )
    p.add_argument("--embed", default="moment", choices=["moment", "sliced", "both"], help="candidate source")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decide", action="store_true", help="recall@1 on every feature of --pairs, exact CI")
    p.add_argument("--pairs", type=int, nargs="*", default=[14, 15, 14, 29])
    p.add_argument(
        "--client",
        default=None,
        help="Dask scheduler for the searches (local:N or an address); with --p6 the certified search "
        "replaces brute force as the exact reference",
    )
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.queries, args.features, args.sweep = 64, 1024, [16, 64]
    if args.decide:
        if args.sweep == [10, 16, 32, 64, 128]:
            args.sweep = [192, 384]
        if args.queries == 512:
            args.queries = 0  # every feature
        decide_part(args)
        return
    if not (args.real or args.p6):
        args.real = args.p6 = True
    if args.real:
        real_part(args)
    if args.p6:
        p6_part(args)


if __name__ == "__main__":
    main()
