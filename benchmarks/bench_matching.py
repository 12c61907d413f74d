"""Benchmark: exact SAE Match at real SAE widths (issue 8).

Every configuration runs in its own subprocess (clean peak RSS, read from
``resource.getrusage``) on the same synthetic planted pair, regenerated from its seed:

* ``floor``  one blocked float32 product ``X_A X_B^T`` (torch, same threads, same row
  blocks as the matcher): any exact method must look at every pair once, so this is the
  CPU floor every time is quoted against;
* ``dense``  the baseline as a user writes it: a numpy float64 cost matrix
  ``(|a|^2 + |b|^2 - 2 A B^T) / D`` (in place, to keep its memory at one matrix) and
  ``scipy.optimize.linear_sum_assignment``; for shapes where that matrix does not fit,
  only its memory estimate is printed;
* ``sparse`` ``featmatch.matching.sparse_match`` (one blocked pass with top-k candidates, fixed
  mutual-best pairs, the remaining core solved densely and exactly, duals and an optimality
  certificate over all pairs; scipy's import is done outside the timed region, as for
  ``dense``).

Planted pairs (decoder-like feature vectors, metric "mse"): A has unit directions with
norms log-uniform in [0.5, 2]; B holds a random permutation of 90% of A's features, each
rescaled by a factor log-uniform in [0.8, 1.25] plus Gaussian noise of 30% of its norm,
and 10% fresh features of its own (so 10% of each side has no partner). The vectors are
the (F, d) rows that SAE Match compares with ``on="decoder"``; ``on="both"`` doubles D and
the floor alike.

Agreement: the dense baseline's float64 cost matrix is also used to score the sparse
assignment, so ``rel. gap`` is ``(C64[sparse] - C64[dense]) / C64[dense]`` on the same
numbers (0 when both found the same optimum; the issue asks for <= 1e-6).

Usage::

    python benchmarks/bench_matching.py            # 16k, 65k, 24,576x768, stack
    python benchmarks/bench_matching.py --quick    # small shapes, a few seconds
    python benchmarks/bench_matching.py --only 16k --no-stack
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (F, d)
SHAPES = {"gpt2": (24576, 768), "16k": (16384, 2304), "65k": (65536, 2304)}
QUICK_SHAPES = {"2k": (2048, 256), "4k": (4096, 512), "3k-gpt2": (3072, 192)}
DENSE_LIMIT_BYTES = 12e9  # the baseline's float64 matrix (plus LSA) must fit in this
UNMATCHED = 0.10
NOISE = 0.30


# --------------------------------------------------------------------------------------
# Planted data (featmatch.synthetic, shared with the tests)
# --------------------------------------------------------------------------------------


def user_dense_cost(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The dense baseline's mse cost matrix, as a user writes it: numpy float64, (F_A, F_B).

    Shared by ``bench_regimes.py``, so that both benchmarks compare against the same baseline.
    """
    a64 = a.numpy().astype(np.float64)
    b64 = b.numpy().astype(np.float64)
    c = a64 @ b64.T
    c *= -2.0
    c += (a64**2).sum(1)[:, None]
    c += (b64**2).sum(1)[None, :]
    c /= a64.shape[1]
    return c


def planted_pair(f: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A planted pair ``(x_a, x_b, truth)`` (:func:`featmatch.synthetic.planted_vectors`)."""
    from featmatch.synthetic import planted_vectors

    return planted_vectors(f, d, seed, unmatched=UNMATCHED, noise=NOISE)


def planted_chain(n_layers: int, f: int, d: int, seed: int = 0):
    """``n_layers`` planted SAEWeights (:func:`featmatch.synthetic.planted_weights_chain`)."""
    from featmatch.synthetic import planted_weights_chain

    return planted_weights_chain(n_layers, f, d, seed, unmatched=UNMATCHED, noise=NOISE)


# --------------------------------------------------------------------------------------
# Workers (one per subprocess)
# --------------------------------------------------------------------------------------


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def worker(kind: str, f: int, d: int, seed: int, workdir: Path, k: int | None = None) -> dict:
    from featmatch.matching import default_block_size, sparse_match

    res: dict = {"kind": kind, "F": f, "d": d}
    if kind == "stack":
        from featmatch.matching import match_stack

        n_layers = int(os.environ.get("BENCH_STACK_LAYERS", "26"))
        t = time.perf_counter()
        ms = match_stack(
            planted_chain(n_layers, f, d, seed),
            on="decoder",
            fold=False,
            solver="sparse",
            progress=True,
            **({"k": k} if k else {}),
        )
        res.update(
            seconds=time.perf_counter() - t,
            pairs=len(ms),
            certified=all(m.meta["solver_info"]["certified"] for m in ms),
            fallbacks=sum(m.meta["solver_info"]["fallback"] is not None for m in ms),
            pair_seconds=[m.meta["seconds"] for m in ms],
            peak_rss_gb=_peak_rss_gb(),
        )
        return res
    a, b, truth = planted_pair(f, d, seed)
    res["rss_after_data_gb"] = _peak_rss_gb()
    # best of `repeats` (the usual estimator on a noisy machine, as timeit's); floor and sparse
    # alike, the dense baseline once (it takes minutes)
    repeats = int(os.environ.get("BENCH_REPEATS", "0")) or (3 if float(f) * f * d < 2e12 else 1)
    if kind == "floor":
        bs = default_block_size(f, f)
        bt = b.T.contiguous()
        buf = torch.empty(bs, f)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            for i0 in range(0, f, bs):
                torch.mm(a[i0 : i0 + bs], bt, out=buf[: min(bs, f - i0)])
            runs.append(time.perf_counter() - t)
        res["seconds"], res["seconds_all"] = min(runs), runs
    elif kind == "sparse":
        # import outside the timed region, as the dense worker does for linear_sum_assignment
        import scipy.optimize  # noqa: F401
        import scipy.sparse.csgraph  # noqa: F401

        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            perm, cost, info = sparse_match(a, b, metric="mse", return_info=True, **({"k": k} if k else {}))
            runs.append(time.perf_counter() - t)
        res["seconds"], res["seconds_all"] = min(runs), runs
        res["total_cost"] = float(np.nansum(cost))
        res["info"] = info.as_dict()
        has = truth >= 0
        res["truth_recovered"] = float((perm[has] == truth[has]).mean())
        np.save(workdir / f"perm_{f}_{d}.npy", perm)
    elif kind == "dense":
        from scipy.optimize import linear_sum_assignment

        t = time.perf_counter()
        c = user_dense_cost(a, b)
        t_cost = time.perf_counter() - t
        rows, cols = linear_sum_assignment(c)
        res["seconds"] = time.perf_counter() - t
        res["seconds_cost_matrix"] = t_cost
        res["total_cost"] = float(c[rows, cols].sum())
        sp = workdir / f"perm_{f}_{d}.npy"
        if sp.exists():
            perm = np.load(sp)
            ok = perm >= 0
            res["sparse_total_on_dense_costs"] = float(c[np.flatnonzero(ok), perm[ok]].sum())
            res["same_perm"] = bool(np.array_equal(perm[rows], cols))
    res["peak_rss_gb"] = _peak_rss_gb()
    return res


def run_sub(
    kind: str, f: int, d: int, seed: int, workdir: Path, k: int | None, timeout: float = 7200
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--F",
        str(f),
        "--d",
        str(d),
        "--seed",
        str(seed),
        "--workdir",
        str(workdir),
    ]
    if k:
        cmd += ["--k", str(k)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"kind": kind, "F": f, "d": d, "error": (out.stderr or out.stdout)[-800:]}


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--only", nargs="*", help="shape names to run (16k 65k gpt2)")
    p.add_argument("--no-stack", action="store_true")
    p.add_argument(
        "--stack-layers", type=int, default=None, help="layers in the stack benchmark (default 26)"
    )
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker")
    p.add_argument("--F", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.F, args.d, args.seed, Path(args.workdir), args.k)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.only:
        shapes = {k: v for k, v in shapes.items() if k in args.only}
    stack_layers = args.stack_layers or (4 if args.quick else 26)
    stack_shape = (1024, 256) if args.quick else (16384, 2304)
    threads = torch.get_num_threads()
    lines = [
        f"# featmatch matching benchmark ({'quick' if args.quick else 'full'})",
        "",
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs; metric mse; planted pairs "
        f"({int(UNMATCHED * 100)}% unmatched per side, noise {NOISE:.0%}, scale 0.8-1.25); seed {args.seed}.",
        "Each configuration runs in its own subprocess, one after the other, on a shared machine. floor and "
        "sparse are the best of 3 runs where F*F*d < 2e12 (else 1); dense runs once.",
        "",
        "| shape F x d | floor s | sparse s | sparse / floor | dense s | dense / sparse | rel. gap | same perm "
        "| peak RSS sparse GB | peak RSS dense GB | certified (path, rounds, core, weak pairs, rows rechecked, fallback) | truth recovered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    details = []
    with tempfile.TemporaryDirectory(prefix="featmatch-bench-") as tmp:
        work = Path(tmp)
        for name, (f, d) in shapes.items():
            fl = run_sub("floor", f, d, args.seed, work, args.k)
            sp = run_sub("sparse", f, d, args.seed, work, args.k)
            dense_bytes = 8.0 * f * f
            if dense_bytes <= DENSE_LIMIT_BYTES:
                de = run_sub("dense", f, d, args.seed, work, args.k)
            else:
                de = {"skipped": True}
            details.append({"name": name, "floor": fl, "sparse": sp, "dense": de})
            info = sp.get("info", {})
            ratio_floor = sp.get("seconds", np.nan) / fl.get("seconds", np.nan)
            speedup = de.get("seconds", np.nan) / sp.get("seconds", np.nan) if "seconds" in de else None
            gap = None
            if "sparse_total_on_dense_costs" in de:
                gap = (de["sparse_total_on_dense_costs"] - de["total_cost"]) / abs(de["total_cost"])
            dense_s = (
                _fmt(de.get("seconds"))
                if "seconds" in de
                else (
                    f"not run (needs ≥ {dense_bytes / 1e9:.0f} GB for the float64 matrix)"
                    if de.get("skipped")
                    else "error"
                )
            )
            cert = (
                (
                    f"{info.get('certified')} ({info.get('path')}, {info.get('rounds')} rounds, core "
                    f"{max(info.get('core_rows') or [0])} rows by {info.get('core_solver') or '-'}, "
                    f"{info.get('weak_moved', 0)} weak pairs moved, {sum(info.get('rows_rechecked', []))} rechecked, "
                    f"fallback {info.get('fallback')})"
                )
                if info
                else f"error: {sp.get('error', '')[-200:]}"
            )
            row = (
                f"| {name}: {f:,} x {d} | {_fmt(fl.get('seconds'))} | {_fmt(sp.get('seconds'))} | "
                f"{_fmt(ratio_floor)} | {dense_s} | {_fmt(speedup)} | {_fmt(gap, '.1e')} | {de.get('same_perm', '—')} | "
                f"{_fmt(sp.get('peak_rss_gb'))} | {_fmt(de.get('peak_rss_gb'))} | {cert} | "
                f"{_fmt(sp.get('truth_recovered'), '.3f')} |"
            )
            lines.append(row)
            print(row, flush=True)
        if not args.no_stack:
            f, d = stack_shape
            os.environ["BENCH_STACK_LAYERS"] = str(stack_layers)
            fl = run_sub("floor", f, d, args.seed, work, args.k)
            st = run_sub("stack", f, d, args.seed, work, args.k, timeout=6 * 3600)
            details.append({"name": "stack", "floor": fl, "stack": st})
            lines += [
                "",
                "| stack | pairs | total s | matcher s (sum over pairs) | per pair s | per pair / floor | peak RSS GB | all certified | fallbacks |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            if "seconds" in st:
                matcher = float(sum(st["pair_seconds"]))
                per = matcher / max(st["pairs"], 1)
                row = (
                    f"| {stack_layers} SAEs of {f:,} x {d} (decoder rows) | {st['pairs']} | {st['seconds']:.1f} | "
                    f"{matcher:.1f} | {per:.2f} | {per / fl['seconds']:.2f} | {st['peak_rss_gb']:.2f} | {st['certified']} | "
                    f"{st['fallbacks']} |"
                )
            else:
                row = f"| stack | error: {st.get('error', '')[-300:]} |"
            lines.append(row)
            print("\n".join(lines[-3:]), flush=True)
    lines += [
        "",
        "Columns: *floor* = one blocked float32 product F x d by d x F; *sparse* = `featmatch.matching.sparse_match` "
        "end to end (candidates, fixed pairs + dense exact core, duals, certificate); *path* `core` = the fast "
        "path certified, `sparse` = the general LAPJVsp loop ran; *core* = rows solved densely; *dense* = numpy float64 cost matrix + scipy "
        "`linear_sum_assignment`; *rel. gap* = the sparse assignment's cost minus the dense optimum, on the dense "
        "float64 costs, relative; *truth recovered* = share of planted partners found.",
    ]
    print("DETAILS " + json.dumps(details), flush=True)
    print("TABLE_BEGIN\n" + "\n".join(lines) + "\nTABLE_END", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
