"""Benchmark of featmatch.semantic distances on two synthetic layers of SAE features.

Prints one table: the all-pairs sliced distance matrix (timed end to end), the exact and
entropic methods timed on a random sample of pairs and extrapolated to all pairs, exact
distances on sliced top-c candidates (pruning), and the approximation quality of the
sliced and entropic distances against exact on a sample.

Run::

    python benchmarks/bench_semantic.py                 # 4096 x 4096, N=48, k=64
    python benchmarks/bench_semantic.py --features 512  # quick

The synthetic features imitate real ones: token positions fall into hierarchical
clusters (topics x sub-topics) with a PCA-like decaying spectrum, and each feature fires
on 1-3 sub-topics of one topic with exponential activations.
"""

# %%
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import featmatch  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featmatch.semantic import (  # noqa: E402
    FeatureDistributions,
    ReferenceSpace,
    approximation_report,
    distance_matrix,
    pair_distances,
)

# %% parameters
DEFAULTS = dict(
    features=4096,
    n=48,
    k=64,
    positions=65536,
    projections=256,
    quantiles=16,
    exact_pairs=300,
    sinkhorn_pairs=40,
    candidates=4,
    quality_pairs=300,
    quality_rows=4,
    threads=2,
    seed=0,
)


# %%
def synthetic_layers(features: int, n: int, k: int, positions: int, seed: int = 0, seq_len: int = 128):
    """Two sets of ``features`` distributions in one clustered reference space."""
    rng = np.random.default_rng(seed)
    n_topics, n_sub = 16, 8
    scale = np.arange(1, k + 1) ** -0.5
    topics = rng.normal(size=(n_topics, k)) * 4 * scale
    centers = (topics[:, None] + rng.normal(size=(n_topics, n_sub, k)) * 1.5 * scale).reshape(-1, k)
    lab = rng.integers(len(centers), size=positions)
    lab[np.arange(positions) % seq_len == 0] = -1  # BOS: never sampled
    coords = np.zeros((positions, k), dtype=np.float32)
    ok = lab >= 0
    coords[ok] = centers[lab[ok]] + 0.5 * rng.normal(size=(ok.sum(), k)) * scale
    ref = ReferenceSpace(coords, seq_len, f"bench-synthetic-k{k}")
    members = [np.flatnonzero(lab == c) for c in range(len(centers))]
    total = 2 * features
    topic = rng.integers(n_topics, size=total)
    subs = rng.integers(n_sub, size=(total, 3))
    n_used = rng.integers(1, 4, size=total)
    which = rng.integers(0, 2**31, size=(total, n))
    slot = which % n_used[:, None]  # which of the feature's clusters each sample comes from
    cluster = topic[:, None] * n_sub + np.take_along_axis(subs, slot, 1)
    pos = np.empty((total, n), dtype=np.int64)
    for c in np.unique(cluster):
        m = cluster == c
        pos[m] = members[c][rng.integers(len(members[c]), size=m.sum())]
    fill = rng.integers(n // 2, n + 1, size=total)
    pos[np.arange(n)[None, :] >= fill[:, None]] = -1
    val = (rng.exponential(size=(total, n)) + 0.1).astype(np.float32)
    d = FeatureDistributions.from_samples(pos, val, ref)
    return d.subset(np.arange(features)), d.subset(np.arange(features, total)), ref


def _fmt_s(sec: float) -> str:
    if sec < 120:
        return f"{sec:8.2f} s"
    if sec < 7200:
        return f"{sec / 60:8.1f} min"
    return f"{sec / 3600:8.1f} h"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    t0 = time.perf_counter()
    a, b, _ = synthetic_layers(args.features, args.n, args.k, args.positions, args.seed)
    t_build = time.perf_counter() - t0
    FA, FB = len(a), len(b)
    all_pairs = FA * FB
    print(
        f"# featmatch.semantic benchmark: {FA} x {FB} features, N <= {args.n} samples, k = {args.k}, "
        f"torch threads = {args.threads}, cpu_count = {os.cpu_count()}"
    )
    print(f"# synthetic data built in {t_build:.1f} s")

    rows: list[tuple[str, str, str, str]] = []

    t0 = time.perf_counter()
    S = distance_matrix(
        a, b, "sliced", n_projections=args.projections, n_quantiles=args.quantiles, seed=args.seed
    )
    t_sliced = time.perf_counter() - t0
    assert S.shape == (FA, FB) and np.isfinite(S).all()
    rows.append(
        (
            f"sliced W2 (L={args.projections}, Q={args.quantiles})",
            "all pairs, measured",
            f"{t_sliced / all_pairs * 1e6:9.3f} us",
            _fmt_s(t_sliced),
        )
    )

    rng = np.random.default_rng(args.seed)
    sample = np.stack([rng.integers(FA, size=args.exact_pairs), rng.integers(FB, size=args.exact_pairs)], 1)
    t0 = time.perf_counter()
    pair_distances(a, b, sample, "exact")
    per = (time.perf_counter() - t0) / len(sample)
    rows.append(
        (
            "exact W2 (ot.emd2)",
            f"{len(sample)} pairs, extrapolated",
            f"{per * 1e3:9.3f} ms",
            _fmt_s(per * all_pairs),
        )
    )

    if args.sinkhorn_pairs:
        t0 = time.perf_counter()
        pair_distances(a, b, sample[: args.sinkhorn_pairs], "sinkhorn")
        per_s = (time.perf_counter() - t0) / args.sinkhorn_pairs
        rows.append(
            (
                "entropic W2 (ot.sinkhorn2 log, reg=0.05)",
                f"{args.sinkhorn_pairs} pairs, extrapolated",
                f"{per_s * 1e3:9.3f} ms",
                _fmt_s(per_s * all_pairs),
            )
        )

    if args.candidates:
        t0 = time.perf_counter()
        P = distance_matrix(
            a,
            b,
            "exact",
            candidates=args.candidates,
            n_projections=args.projections,
            n_quantiles=args.quantiles,
            seed=args.seed,
        )
        t_p = time.perf_counter() - t0
        n_c = int(np.isfinite(P).sum())
        rows.append(
            (
                f"sliced top-{args.candidates} + exact W2 (pruned)",
                f"{n_c} pairs, measured",
                f"{t_p / n_c * 1e3:9.3f} ms",
                _fmt_s(t_p),
            )
        )

    width = max(len(r[0]) for r in rows)
    print(f"\n{'method':<{width}}  {'how':<28}  {'per pair':>12}  {'all ' + str(all_pairs) + ' pairs':>16}")
    print("-" * (width + 64))
    for name, how, per_pair, total in rows:
        print(f"{name:<{width}}  {how:<28}  {per_pair:>12}  {total:>16}")
    print(
        f"\nsliced all-pairs within the 60 s budget: {'yes' if t_sliced <= 60 else 'NO'} ({t_sliced:.1f} s)"
    )

    if args.quality_pairs:
        rep = approximation_report(
            a,
            b,
            [
                ("sliced", {"n_projections": args.projections, "n_quantiles": args.quantiles}),
                ("sliced", {"n_projections": 64, "n_quantiles": args.quantiles}),
                ("sinkhorn", {"reg": 0.05}),
            ],
            n_pairs=args.quality_pairs,
            n_rows=args.quality_rows,
            recall_at=10,
            seed=args.seed,
        )
        cols = [
            "method",
            "params",
            "spearman",
            "rel_error_mean",
            "scale",
            "scaled_rel_error_mean",
            "top1_agreement",
            "recall_at_c",
        ]
        print(
            f"\n# approximation quality vs exact ({args.quality_pairs} random pairs; nearest neighbours of "
            f"{args.quality_rows} rows against all {FB}; recall_at_c with c=10)"
        )
        print(rep[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))


# %%
if __name__ == "__main__":
    main()
