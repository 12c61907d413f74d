"""Benchmark of the Dask engine: a 26-SAE planted stack on 1 worker against 2 workers.

A stack of 26 planted JumpReLU SAEs (``featmatch.synthetic.planted_chain``, 4,096 features
on 512 dimensions, 10% without a partner, noise 0.3) is saved to folders, and
:func:`featmatch.match_stack` runs over its 25 adjacent pairs:

* **here**: in this process, one torch thread (the reference, and the result to match);
* **1 worker** and **2 workers**: ``LocalCluster(n_workers=N, threads_per_worker=1)``,
  one task per pair, each worker loading its two SAEs from their folders.

For each solver (``auto``, which picks the dense scipy solve at this size, and the
certified ``sparse`` one) it prints wall times, the speed-up of 2 workers over 1 (the
ceiling on this 2-core machine is 2x), and the overhead per pair task of the cluster
against the in-process run. A separate run of 400 no-op tasks gives the scheduler's own
round trip per task. Every distributed run's permutations are checked identical to the
in-process ones.

Run::

    python benchmarks/bench_distributed.py            # 26 SAEs
    python benchmarks/bench_distributed.py --quick    # 6 SAEs, 1,024 features
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import featmatch  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _noop(i: int) -> int:
    return i


def _warm() -> None:
    import sae_lens  # noqa: F401

    import featmatch.matching._stack  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--solvers", nargs="*", default=["auto", "sparse"])
    p.add_argument("--quick", action="store_true", help="6 SAEs of 1,024 features")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.features = 6, 1024

    import torch
    from distributed import Client, LocalCluster

    from featmatch._dask import run_tasks
    from featmatch.matching import match_stack
    from featmatch.synthetic import planted_chain

    torch.set_num_threads(1)  # the reference runs on one thread, as each worker does
    n_pairs = args.layers - 1
    with tempfile.TemporaryDirectory(prefix="featmatch-bench-") as tmp:
        t0 = time.perf_counter()
        saes, _ = planted_chain(
            n_layers=args.layers, d=args.d, f=args.features, no_partner=0.1, noise=0.3, seed=0
        )
        folders = []
        for i, sae in enumerate(saes):
            sae.save_model(Path(tmp) / f"sae{i:02d}")
            folders.append(str(Path(tmp) / f"sae{i:02d}"))
        del saes
        print(
            f"planted stack: {args.layers} SAEs of {args.features} x {args.d} in {time.perf_counter() - t0:.0f} s"
        )

        rows = []
        clusters = {}
        try:
            for n in (1, 2):
                cluster = LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
                )
                clusters[n] = (cluster, Client(cluster))
                clusters[n][1].run(_warm)  # every worker imports torch, sae-lens and featmatch first
            overhead = {}
            for n, (_, client) in clusters.items():
                run_tasks(client, _noop, [(i,) for i in range(20)], desc="warm", progress=False)
                t = time.perf_counter()
                run_tasks(client, _noop, [(i,) for i in range(400)], desc="noop", progress=False)
                overhead[n] = (time.perf_counter() - t) / 400
            for solver in args.solvers:
                t = time.perf_counter()
                ref = match_stack(folders, progress=False, solver=solver)
                t_here = time.perf_counter() - t
                times = {}
                for n, (_, client) in clusters.items():
                    t = time.perf_counter()
                    got = match_stack(folders, client=client, progress=False, solver=solver)
                    times[n] = time.perf_counter() - t
                    same = all(np.array_equal(a.perm, b.perm) for a, b in zip(ref, got, strict=True))
                    if not same:
                        raise SystemExit(
                            f"{solver}, {n} worker(s): permutations differ from the in-process run"
                        )
                rows.append(
                    {
                        "solver": f"{solver} ({ref[0].meta['solver']})",
                        "here": t_here,
                        "1": times[1],
                        "2": times[2],
                        "speedup": times[1] / times[2],
                        "per_task": (times[1] - t_here) / n_pairs,
                    }
                )
        finally:
            for cluster, client in clusters.values():
                client.close()
                cluster.close()

    print("TABLE_BEGIN")
    print(
        f"`match_stack` over a planted stack of {args.layers} SAEs ({n_pairs} adjacent pairs), "
        f"{args.features} features on {args.d} dimensions, saved to folders; one Dask task per pair, "
        f"each worker loading its two SAEs from their folders. `LocalCluster(threads_per_worker=1)`; "
        f"the in-process reference runs on 1 torch thread. Machine: {os.cpu_count()} CPUs. "
        "Permutations: identical to the in-process run in every distributed run (checked)."
    )
    print()
    print(
        "| solver | in process (s) | 1 worker (s) | 2 workers (s) | speed-up 2 vs 1 | cluster overhead per pair task (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['solver']} | {r['here']:.1f} | {r['1']:.1f} | {r['2']:.1f} | {r['speedup']:.2f}x | "
            f"{r['per_task']:+.2f} |"
        )
    print()
    print(
        f"Scheduler round trip of a no-op task (400 tasks): {overhead[1] * 1e3:.1f} ms on 1 worker, "
        f"{overhead[2] * 1e3:.1f} ms on 2 workers. The overhead per pair task above is "
        "(1-worker time - in-process time) / pairs: the scheduler, loading two SAEs from disk "
        "(the in-process run loads each SAE once and reuses it for two pairs), and sending the "
        "matching back."
    )
    print("TABLE_END")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
