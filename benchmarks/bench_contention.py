"""Zoo training on a busy machine: one quick-profile SAE, quiet and beside a busy process.

Trains ONE SAE the way ``featmatch zoo build --profile quick`` trains each layer
(``featmatch.saes.zoo._train_sae``: sae-lens ``SAETrainer``, the quick profile's SAE and
trainer settings, width 1024 on SmolLM2-135M's d_model = 576), in a fresh subprocess per
run, and compares wall times:

* ``quiet/default``: nothing else started by the benchmark, torch's default thread count;
* ``busy/default``: a ``while True: pass`` process pinned to one CPU (``sched_setaffinity``)
  runs meanwhile, torch's default threads (the issue-17 situation: 6-7x slower);
* ``busy/passive``: the same, with ``OMP_WAIT_POLICY=PASSIVE`` set before torch loads;
* ``busy/fitted``: the same, inside :func:`featmatch._threads.fitted_threads` (threads =
  available CPUs that are free now), which ``featmatch.saes.zoo`` uses per SAE;
* ``quiet/fitted``: the policy on a quiet machine (it must not cost much there).

Ratios are to ``quiet/default`` (or to ``quiet/fitted`` when only the short runs are
asked for with ``--runs``); the target is ``busy/fitted <= 2``.

Differences from a real build (stated, for time): the activations are synthetic (Gaussian
with a decaying spectrum and a mean offset, float16 like the zoo's, ``--tokens`` rows,
default 75,000, half of the quick profile's 150k), so the run is ~half the quick profile's
~435 steps; gathering real activations needs minutes of SmolLM2 forwards and does not
change the arithmetic per step. No zoo cache is read or written.

The machine is shared: other people's processes add noise to every number, and the
"quiet" baseline is only as quiet as the machine was. The per-CPU load before each run is
printed with it.

Usage::

    python benchmarks/bench_contention.py [--tokens 75000] [--runs quiet/default busy/fitted ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

RUNS = ("quiet/default", "busy/default", "busy/passive", "busy/fitted", "quiet/fitted")


def child(tokens: int, policy: str, seed: int = 0) -> dict:
    """Train one quick-profile SAE on synthetic activations; return seconds and threads used."""
    import contextlib

    import torch

    from featmatch._threads import fitted_threads
    from featmatch.saes import zoo

    prof = zoo.get_profile("quick")
    _, d_model = zoo._model_shape(prof)
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -1.5, d_model)  # a decaying spectrum, like a residual stream
    x = (torch.randn(tokens, d_model, generator=g) * spectrum + 0.3).to(torch.float16)
    keep = torch.ones(tokens, dtype=torch.bool)
    ctx = fitted_threads() if policy == "fitted" else contextlib.nullcontext(torch.get_num_threads())
    with zoo._quiet_tqdm(True), ctx as n_threads:
        t0 = time.perf_counter()
        zoo._train_sae(prof, "main", 5, x, keep, d_model, seed)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "threads": int(n_threads)}


def _cpu_load() -> list[float]:
    import psutil

    return psutil.cpu_percent(interval=0.5, percpu=True)


def run(name: str, tokens: int) -> dict:
    """One run in a fresh interpreter (so OMP_WAIT_POLICY applies before torch loads)."""
    contention, policy = name.split("/")
    env = dict(os.environ)
    env.pop("FEATMATCH_THREADS", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    hog = None
    if contention == "busy":
        cpu = max(os.sched_getaffinity(0))
        hog = subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )
        time.sleep(1.0)  # let it show up in the CPU statistics
    try:
        load = _cpu_load()
        out = subprocess.run(
            [sys.executable, __file__, "--child", policy, "--tokens", str(tokens)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_before"] = load
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=75_000, help="training rows (quick profile: ~148k)")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS)
    p.add_argument("--child", choices=("default", "passive", "fitted"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.tokens, "default" if args.child == "passive" else args.child)))
        return 0
    import torch

    print(
        f"# bench_contention: one quick-profile SAE (d_model 576, width 1024), {args.tokens:,} synthetic rows; "
        f"{os.cpu_count()} CPUs, affinity {sorted(os.sched_getaffinity(0))}, torch {torch.__version__} "
        f"default threads {torch.get_num_threads()}; shared machine, one run each"
    )
    results = {}
    for name in args.runs:
        results[name] = r = run(name, args.tokens)
        load = " ".join(f"{x:.0f}%" for x in r["load_before"])
        print(f"{name:14s} {r['seconds']:7.1f} s  threads={r['threads']}  cpu load before: {load}", flush=True)
    base_name = next((n for n in ("quiet/default", "quiet/fitted") if n in results), None)
    if base_name:
        base = results[base_name]
        print(f"\n| run | seconds | threads | ratio to {base_name} |\n|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['seconds']:.1f} | {r['threads']} | {r['seconds'] / base['seconds']:.2f} |")
        if "busy/fitted" in results:
            ratio = results["busy/fitted"]["seconds"] / base["seconds"]
            print(f"\nbusy/fitted slowdown {ratio:.2f}x vs {base_name} (target <= 2x): {'met' if ratio <= 2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
