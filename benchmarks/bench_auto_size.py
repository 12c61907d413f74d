"""Benchmark: where ``solver="auto"`` switches from dense to sparse (``AUTO_SPARSE_ABOVE``).

For problem sizes around the switch, the route ``solver="auto"`` takes on a sparse-sized
problem (``sparse_match``; on rectangles with ``auto_dense_share``, which may still send it to
the dense solver) against the dense baseline of ``bench_matching`` (numpy float64 cost +
scipy ``linear_sum_assignment``), medians of ``--repeat`` interleaved runs. Pairs: unrelated
Gaussian vectors ("random") and planted pairs (``featmatch.synthetic.planted_vectors``,
noise 0.8) with 0/10/40 % unpartnered features, unit vectors or norms spread over [0.5, 2].

    python benchmarks/bench_auto_size.py                 # the sizes of docs/benchmarks.md
    python benchmarks/bench_auto_size.py --sizes 2560x2560x768 --repeat 3

Prints one line per pair: sparse and dense seconds, their ratio, ``auto-dense`` when the
rectangular switch went dense, and which solver ``auto_solver`` picks at that size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = (
    "1024x1024x768",
    "1536x1536x768",
    "2048x2048x768",
    "2048x2048x128",
    "2304x2304x576",
    "2048x3072x768",
    "3072x2048x128",
    "2560x2560x128",
    "2560x2560x768",
)


def pairs(n: int, m: int, d: int):
    """The pairs of one size: random, then planted (unpartnered share, unit or spread)."""
    from featmatch.synthetic import planted_vectors

    g = torch.Generator().manual_seed(n)
    yield "random", torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    for unp in (0.0, 0.1, 0.4):
        for unit in (True, False):
            a, b, _ = planted_vectors(max(n, m), d, 0, unmatched=unp, noise=0.8, unit=unit)
            yield f"p{int(unp * 100)} {'unit' if unit else 'spread'}", a[:n].contiguous(), b[:m].contiguous()


def main(argv: list[str] | None = None) -> int:
    from bench_matching import user_dense_cost
    from scipy.optimize import linear_sum_assignment

    from featmatch.matching import auto_solver, sparse_match
    from featmatch.matching._lap import AUTO_DENSE_CORE_SHARE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=list(SIZES), help="F_AxF_Bxd")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeat} interleaved runs"
    )
    warm = torch.randn(512, 64)
    sparse_match(warm, warm.flip(0))
    for spec in args.sizes:
        n, m, d = (int(x) for x in spec.split("x"))
        pick = auto_solver(n, m)
        for name, a, b in pairs(n, m, d):
            share = AUTO_DENSE_CORE_SHARE if n != m else None
            ts, td = [], []
            info = None
            for _ in range(args.repeat):
                t = time.perf_counter()
                _, _, info = sparse_match(a, b, return_info=True, auto_dense_share=share)
                ts.append(time.perf_counter() - t)
                t = time.perf_counter()
                linear_sum_assignment(user_dense_cost(a, b))
                td.append(time.perf_counter() - t)
            s, dd = float(np.median(ts)), float(np.median(td))
            fb = info.fallback if info is not None and info.fallback else ""
            print(
                f"{spec:15s} {name:10s} sparse {s:7.3f} s  dense {dd:7.3f} s  sparse/dense {s / dd:5.2f} "
                f"{fb:10s} auto picks {pick}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
