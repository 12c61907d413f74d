"""Throughput of :func:`featmatch.lm.activations.gather` against the bare forward.

Runs on the real SmolLM2-135M (``featmatch.lm.models.load_model``) with one SAE per layer on
all 30 layers (width 1024) and a few adjacent layer pairs, and compares tokens/s of

* the bare forward: ``model(batch, stop_at_layer=30)`` under ``torch.no_grad()``, and
* ``gather(model, saes, tokens, pairs=..., cache=False, progress=False)``,

on the same tokens (batch 16 x 128). The two are timed alternately ``--repeats`` times
and the best run of each is compared (the machine is shared, so the minimum is the
least noisy estimate). The target is a ratio >= 0.75.

SAEs: the built zoo of ``--profile`` when its manifest exists (``--saes zoo``), else
random-but-realistic JumpReLU SAEs (``--saes random``): random unit encoder directions,
``b_dec`` = the mean residual, and per-feature thresholds set on a calibration batch so
that feature ``i`` fires at a rate drawn log-uniformly in [1e-3, 0.15] (L0 about 30,
close to the zoo's target sparsity).

Benchmark P7 (``--p7``): the statistics pass for two ``--p7-width`` (16,384) wide random
JumpReLU SAEs (layers 14 and 15) on SmolLM2 over 16k tokens, evaluating three matchings
(two random permutations and the top-1 decoder cosine) with ``gather(..., evaluate=...)``:
the feature-pair sums are kept for the matched pairs only. Prints the peak RSS of the
process (model included) and, beside it, the memory the dense ``pairs=`` path would need,
computed analytically (``coact`` int64 + ``prod_sum`` float64 = 16 bytes per feature pair,
plus the float32 ``F × F`` product of each batch): it is not run, because at this width it
would take more than the 3 GB target by itself.

Usage::

    python benchmarks/bench_activations.py [--batches 6] [--repeats 2] [--profile-top 25]
    python benchmarks/bench_activations.py --p7 [--p7-width 16384] [--p7-tokens 16384]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def realistic_saes(model, tokens: torch.Tensor, width: int, seed: int = 0, layers=None) -> dict:
    """JumpReLU SAEs with random directions and thresholds calibrated to realistic firing rates."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    layers = list(range(n_layers)) if layers is None else list(layers)
    hooks = [f"blocks.{L}.hook_resid_post" for L in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:8], names_filter=hooks, stop_at_layer=max(layers) + 1)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    saes = {}
    for L, hook in zip(layers, hooks, strict=True):
        x = cache[hook][:, 1:].reshape(-1, d)
        keep = x.norm(dim=1) < 10 * x.norm(dim=1).median()  # drop the rare outlier positions
        x = x[keep]
        cfg = JumpReLUSAEConfig(d_in=d, d_sae=width)
        cfg.metadata.hook_name = hook
        sae = JumpReLUSAE(cfg)
        W = torch.randn(d, width, generator=g)
        W /= W.norm(dim=0, keepdim=True)
        with torch.no_grad():
            sae.W_enc.copy_(W)
            sae.W_dec.copy_(W.T)
            sae.b_enc.zero_()
            sae.b_dec.copy_(x.mean(0))
            pre = (x - sae.b_dec) @ W
            rate = torch.from_numpy(np.exp(rng.uniform(np.log(1e-3), np.log(0.15), width))).float()
            srt = pre.sort(dim=0).values  # per-feature quantile (1 - rate) of the pre-activations
            idx = ((1 - rate) * (srt.shape[0] - 1)).long().clamp(0, srt.shape[0] - 1)
            sae.threshold.copy_(srt.gather(0, idx[None, :])[0].clamp_min(1e-3))
        saes[L] = sae
    return saes


def zoo_saes(profile: str, n_layers: int) -> dict | None:
    """Every layer's SAE of a built zoo profile, or None if any is missing (partial build)."""
    try:
        from featmatch.saes.zoo import load_zoo_sae

        return {L: load_zoo_sae(profile, L) for L in range(n_layers)}
    except Exception as exc:  # not built, partially built, or zoo module unavailable
        print(
            f"[bench] zoo '{profile}' not usable ({type(exc).__name__}: {str(exc)[:120]}); using random SAEs"
        )
        return None


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result): CPU time is steadier on a shared machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0, out


def bare_forward(model, tokens: torch.Tensor, batch: int, stop: int) -> None:
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch):
            model(tokens[s : s + batch], stop_at_layer=stop)


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def p7(args: argparse.Namespace) -> int:
    """Benchmark P7: the sparse-edge statistics pass at 16k width (see the module docstring)."""
    from featmatch.lm.activations import gather
    from featmatch.lm.corpus import token_batches
    from featmatch.lm.models import load_model
    from featmatch.matching.baselines import top1_cosine_perm

    F = args.p7_width
    model = load_model(args.model)
    model.eval()
    tokens = token_batches(model.tokenizer, args.p7_tokens, seq_len=args.seq_len, split="eval")
    saes = realistic_saes(model, tokens, F, layers=(14, 15))
    rng = np.random.default_rng(0)
    perm1, perm2 = rng.permutation(F), rng.permutation(F)
    cos1, _ = top1_cosine_perm(saes[14], saes[15])
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    stats = gather(
        model,
        saes,
        tokens,
        evaluate=[(14, 15, perm1), (14, 15, perm2), (14, 15, cos1)],
        n_samples=64,
        top_k=16,
        cache=False,
        progress=False,
        batch_size=args.batch_size,
    )
    dt = time.perf_counter() - t0
    rss = peak_rss_gb()
    n_edges = len(stats.pair_edges[(14, 15)][0])
    n_batch = args.batch_size * (args.seq_len - 1)
    dense_pair = 16 * F * F / 2**30
    dense_tmp = 2 * 4 * F * F / 2**30  # float32 results of the two per-batch products before accumulation
    acts = 2 * 2 * 4 * n_batch * F / 2**30  # dense activations + masks of the two layers in one batch
    print("TABLE_BEGIN")
    print(
        f"P7: statistics pass over {stats.n_tokens:,} positions (SmolLM2-135M, batch {args.batch_size} × "
        f"{args.seq_len}) for two {F:,}-wide random JumpReLU SAEs (layers 14, 15; L0 "
        f"{stats.l0(14):.0f} / {stats.l0(15):.0f}), evaluating three matchings ({n_edges:,} distinct "
        f"feature pairs). {dt:.0f} s wall.\n"
    )
    print("| path | peak RSS of the process | of which pair statistics | target |")
    print("|---|---|---|---|")
    print(
        f"| `evaluate=` (sparse edges, measured) | {rss:.2f} GB (model + SAEs before the pass: "
        f"{rss_before:.2f} GB) | {32 * n_edges / 2**20:.1f} MB (+ {acts:.2f} GB per-batch activations) | ≤ 3 GB |"
    )
    print(
        f"| `pairs=` (dense F × F, analytic, not run) | ≥ {rss_before + dense_pair + dense_tmp + acts:.2f} GB | "
        f"{dense_pair:.2f} GB (`coact` + `prod_sum`) + {dense_tmp:.2f} GB per-batch products | |"
    )
    print("TABLE_END")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=6, help="batches of 16 x 128 tokens")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--saes", choices=["auto", "zoo", "random"], default="auto")
    ap.add_argument("--profile", default="quick", help="zoo profile for --saes zoo/auto")
    ap.add_argument("--pairs", default="0-1,14-15,28-29")
    ap.add_argument("--no-fast-encode", action="store_true", help="always call sae.encode")
    ap.add_argument("--profile-top", type=int, default=0, help="cProfile one gather and print N rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--p7", action="store_true", help="run benchmark P7 only (sparse-edge pass at 16k width)")
    ap.add_argument("--p7-width", type=int, default=16384)
    ap.add_argument("--p7-tokens", type=int, default=16384)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.p7:
        return p7(args)
    from featmatch.lm.activations import gather
    from featmatch.lm.corpus import token_batches
    from featmatch.lm.models import load_model

    t0 = time.perf_counter()
    model = load_model(args.model)
    model.eval()
    n_layers = model.cfg.n_layers
    tokens = token_batches(
        model.tokenizer, args.batches * args.batch_size * args.seq_len, seq_len=args.seq_len, split="eval"
    )
    print(
        f"[bench] model {args.model}: {n_layers} layers, d_model {model.cfg.d_model}; "
        f"tokens {tuple(tokens.shape)}; load {time.perf_counter() - t0:.1f}s"
    )

    saes = zoo_saes(args.profile, n_layers) if args.saes in ("auto", "zoo") else None
    if saes is None:
        if args.saes == "zoo":
            return 1
        t0 = time.perf_counter()
        saes = realistic_saes(model, tokens, args.width)
        print(
            f"[bench] built {len(saes)} random JumpReLU SAEs (width {args.width}) in {time.perf_counter() - t0:.1f}s"
        )
    pairs = [tuple(int(x) for x in p.split("-")) for p in args.pairs.split(",") if p]
    kw = dict(
        pairs=pairs,
        cache=False,
        progress=False,
        batch_size=args.batch_size,
        fast_encode=not args.no_fast_encode,
    )

    # warm-up (allocator, first-call overheads) on one batch
    bare_forward(model, tokens[: args.batch_size], args.batch_size, n_layers)
    gather(model, saes, tokens[: args.batch_size], **kw)

    n_tok = tokens.numel()
    bare_w, bare_c, gat_w, gat_c = [], [], [], []
    stats = None
    for r in range(args.repeats):
        w, c, _ = timed(bare_forward, model, tokens, args.batch_size, n_layers)
        bare_w.append(w)
        bare_c.append(c)
        w, c, stats = timed(gather, model, saes, tokens, **kw)
        gat_w.append(w)
        gat_c.append(c)
        print(
            f"[bench] repeat {r}: bare {n_tok / bare_w[-1]:.0f} tok/s, gather {n_tok / gat_w[-1]:.0f} tok/s; "
            f"ratio wall {bare_w[-1] / gat_w[-1]:.3f}, cpu {bare_c[-1] / gat_c[-1]:.3f}",
            flush=True,
        )

    l0 = [stats.l0(L) for L in stats.layers]
    print(
        f"[bench] SAE L0 over layers: min {min(l0):.1f}, median {statistics.median(l0):.1f}, max {max(l0):.1f}"
    )
    ratio_wall = min(bare_w) / min(gat_w)
    ratio_cpu = min(bare_c) / min(gat_c)
    ratio_med = statistics.median(bare_w) / statistics.median(gat_w)
    print(
        f"bare forward (stop_at_layer={n_layers}): {n_tok / min(bare_w):8.0f} tok/s wall, "
        f"{n_tok / min(bare_c):8.0f} tok/CPU-s (best of {args.repeats}, {args.threads} threads)"
    )
    print(
        f"gather ({len(saes)} SAEs, {len(pairs)} pairs):     {n_tok / min(gat_w):8.0f} tok/s wall, "
        f"{n_tok / min(gat_c):8.0f} tok/CPU-s"
    )
    print(
        f"RATIO gather/bare = {ratio_wall:.3f} wall best-of, {ratio_med:.3f} wall median, {ratio_cpu:.3f} CPU time; "
        f"target >= 0.75: {'OK' if max(ratio_wall, ratio_cpu) >= 0.75 else 'BELOW TARGET'}"
    )

    if args.profile_top:
        prof = cProfile.Profile()
        prof.enable()
        gather(model, saes, tokens, **kw)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
