"""The ``featmatch`` command line.

::

    featmatch match A B [--on encoder|decoder|both] [--metric mse|cosine] [--no-fold] [--b-enc]
                        [--unmatched-quantile Q | --unmatched-above T] [--solver auto|dense|sparse]
                        --out FILE [--force]
    featmatch match-stack SAE SAE [SAE...] | --set NAME [--layers L0:L1]  [match options]
                        --out-dir DIR [--scheduler ADDRESS|local:N] [--force]
    featmatch compose M1 M2 --out FILE [--force]
    featmatch zoo build --profile P [--force]
    featmatch zoo info --profile P [--json]
    featmatch run-notebook NAME [-p KEY VALUE]... [--out DIR] [--list-params]

``A`` and ``B`` are SAE sources for :func:`featmatch.saes.load_sae`: a disk folder,
``release:sae_id`` (SAELens hub) or a featmatch zoo release. A matching is ONE JSON file
(arrays embedded), written atomically, so a failed or interrupted run leaves no partial
file; ``--out`` replaces an existing file only if featmatch wrote it as a matching (the
output says so), anything else only with ``--force``. ``zoo info`` verifies every recorded
checksum and exits 2 if a file is bad. Errors print one line
to stderr and exit with status 2 (130 on Ctrl-C); set ``FEATMATCH_DEBUG=1`` for the
traceback. All heavy imports happen inside the subcommands.

``--scheduler`` runs the work on a Dask cluster (``pip install 'featmatch[distributed]'``):
``local:N`` starts N local worker processes, an address connects to a running scheduler
(``dask-jobqueue`` on SLURM/PBS, ``dask-cuda`` on a multi-GPU box). ``match-stack`` runs
one task per layer pair, each worker loading its SAEs from their sources, and writes the
matchings only after every pair has succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]

EXIT_ERROR = 2
EXIT_INTERRUPT = 130


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``featmatch`` command."""
    from featmatch import __version__

    p = argparse.ArgumentParser(
        prog="featmatch", description="Match sparse-autoencoder features across layers (SAE Match)."
    )
    p.add_argument("--version", action="version", version=f"featmatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser("match", help="match the features of two SAEs and write a Matching")
    m.add_argument("sae_a", metavar="A", help="SAE folder, 'release:sae_id', or featmatch zoo release:sae_id")
    m.add_argument("sae_b", metavar="B", help="the second SAE (same forms as A)")
    _add_match_options(m)
    m.add_argument("--device", default="cpu", help="torch device for loading (default cpu)")
    m.add_argument("--scheduler", metavar="ADDRESS|local:N", default=None, help=SCHEDULER_HELP)
    m.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output file: one JSON file holding the metadata and the arrays; an existing file is "
        "replaced only if it is a featmatch matching",
    )
    m.add_argument(
        "--force", action="store_true", help="replace --out even if it is not a featmatch matching"
    )
    m.set_defaults(func=_cmd_match)

    ms = sub.add_parser(
        "match-stack",
        help="match every adjacent pair of a stack of SAEs (layer t to t+1) and write one matching per pair",
    )
    ms.add_argument(
        "saes",
        metavar="SAE",
        nargs="*",
        help="SAE sources in layer order (same forms as for match); or use --set and --layers",
    )
    ms.add_argument("--set", dest="sae_set", metavar="NAME", help="an SAE set (featmatch/saes/sae_sets.yaml)")
    ms.add_argument("--layers", metavar="L0:L1", help="with --set: the layers, as start:stop or a comma list")
    _add_match_options(ms)
    ms.add_argument("--scheduler", metavar="ADDRESS|local:N", default=None, help=SCHEDULER_HELP)
    ms.add_argument(
        "--out-dir",
        required=True,
        metavar="DIR",
        help="folder for the matchings, one JSON file per pair (pair_TT_UU.json); written only after "
        "every pair has succeeded",
    )
    ms.add_argument(
        "--force", action="store_true", help="replace files in --out-dir that are not featmatch matchings"
    )
    ms.set_defaults(func=_cmd_match_stack)

    c = sub.add_parser("compose", help="compose two matchings (A→B then B→C)")
    c.add_argument("m1", metavar="M1", help="matching A→B (JSON written by 'featmatch match')")
    c.add_argument("m2", metavar="M2", help="matching B→C")
    c.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output file (one JSON file); an existing file is replaced only if it is a featmatch matching",
    )
    c.add_argument(
        "--force",
        action="store_true",
        help="do it anyway: compose although M1 does not end where M2 starts, and replace --out "
        "even if it is not a featmatch matching",
    )
    c.set_defaults(func=_cmd_compose)

    sn = sub.add_parser("supernodes", help="propose supernodes for a circuit-tracer / Neuronpedia graph JSON")
    sn.add_argument("graph", metavar="GRAPH.json", help="attribution graph in circuit-tracer's JSON format")
    sn.add_argument(
        "--out", required=True, metavar="FILE", help="the graph with qParams.supernodes filled in"
    )
    sn.add_argument(
        "--n", type=int, default=None, help="clusters of feature nodes (default: --fraction of them)"
    )
    sn.add_argument(
        "--fraction", type=float, default=0.1, help="clusters per feature node when --n is not given"
    )
    sn.add_argument("--force", action="store_true", help="replace --out even if featmatch did not write it")
    sn.set_defaults(func=_cmd_supernodes)

    z = sub.add_parser("zoo", help="the locally trained SmolLM2 SAE zoo")
    zsub = z.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zsub.required = True
    zb = zsub.add_parser("build", help="train (or resume) the SAEs of a zoo profile")
    zb.add_argument("--profile", required=True, help="zoo profile (tiny, quick, full)")
    zb.add_argument("--force", action="store_true", help="retrain even if the SAEs exist")
    zb.set_defaults(func=_cmd_zoo_build)
    zi = zsub.add_parser("info", help="show a zoo profile's manifest and verify its files' checksums")
    zi.add_argument("--profile", required=True, help="zoo profile (tiny, quick, full)")
    zi.add_argument("--json", action="store_true", help="print the manifest as JSON")
    zi.set_defaults(func=_cmd_zoo_info)

    bp = sub.add_parser(
        "book-pages", help="write the book's generated pages (results at a glance, parameters)"
    )
    bp.add_argument(
        "--figures", default="book/notebooks/figures", help="folder of the chapters' *_claims.csv"
    )
    bp.add_argument("--out", default="book", help="the book's source folder")
    bp.set_defaults(func=_cmd_book_pages)

    r = sub.add_parser("run-notebook", help="execute a notebook of the book with parameters (papermill)")
    r.add_argument("name", help="notebook stem, number, short name, or 'all'")
    r.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="set a parameter",
    )
    r.add_argument(
        "--out", default="runs", metavar="DIR", help="folder for the executed notebooks (default runs)"
    )
    r.add_argument(
        "--list-params", action="store_true", help="print the notebook's parameters and defaults, run nothing"
    )
    r.set_defaults(func=_cmd_run_notebook)
    return p


SCHEDULER_HELP = (
    "run on a Dask cluster: the address of a running scheduler (tcp://host:8786) or local:N for a "
    "local cluster of N worker processes (needs pip install 'featmatch[distributed]')"
)


def _add_match_options(m: argparse.ArgumentParser) -> None:
    """The matching options ``match`` and ``match-stack`` share."""
    m.add_argument(
        "--on",
        choices=("encoder", "decoder", "both"),
        default="both",
        help="parameters compared (default both)",
    )
    m.add_argument("--metric", choices=("mse", "cosine"), default="mse", help="cost (default mse)")
    m.add_argument(
        "--no-fold", dest="fold", action="store_false", help="do not fold thresholds into the weights (Eq. 4)"
    )
    m.add_argument("--b-enc", dest="include_b_enc", action="store_true", help="also compare the encoder bias")
    group = m.add_mutually_exclusive_group()
    group.add_argument(
        "--unmatched-quantile", type=float, metavar="Q", help="mark pairs above this cost quantile unmatched"
    )
    group.add_argument(
        "--unmatched-above", type=float, metavar="T", help="mark pairs with cost above T unmatched"
    )
    m.add_argument(
        "--solver",
        choices=("auto", "dense", "sparse"),
        default="auto",
        help="assignment solver (default auto)",
    )


# --------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------


def _describe(sae: Any) -> str:
    from featmatch.saes._sae import weights

    w = weights(sae)
    return f"{w.architecture}, d_in={w.d_in}, F={w.d_sae}, hook={w.hook_name}"


def _summary(m: Any, seconds_load: float, seconds_match: float) -> list[str]:
    import numpy as np

    lines = [
        f"matched:  {m.n_matched} / {m.n_a} features of A ({m.n_b} in B, {m.n_a - m.n_matched} unmatched)",
    ]
    costs = m.cost[m.matched]
    if costs.size:
        qs = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
        vals = np.quantile(costs, qs)
        lines.append(
            "cost:     " + "  ".join(f"q{int(q * 100):d}={v:.4g}" for q, v in zip(qs, vals, strict=True))
        )
        lines.append(f"          total={m.total_cost:.6g}  mean={costs.mean():.4g}")
    thr = m.meta.get("unmatched_threshold")
    if thr is not None:
        lines.append(f"unmatched threshold: cost > {thr:.4g}")
    lines.append(f"time:     load {seconds_load:.2f} s, match {seconds_match:.2f} s")
    return lines


class SideError(ValueError):
    """Loading or checking SAE A or B failed; the message names the side and the source."""


def _load_side(side: str, source: str, device: str, fold: bool) -> Any:
    """Load and validate one SAE of ``featmatch match``; errors name the side and the source."""
    from featmatch.saes._sae import load_sae, weights

    try:
        sae = load_sae(source, device=device)
        weights(sae, side=side, fold=fold)  # NaN / theta <= 0 are reported here, naming the side
    except Exception as exc:  # noqa: BLE001 - every load failure becomes one line naming the side
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if not msg.startswith(f"SAE {side}"):
            msg = f"SAE {side}: {msg}"
        raise SideError(f"{msg} [{side} = {source}]") from exc
    return sae


def _write_matching(m: Any, out: str, force: bool) -> tuple[Any, str]:
    """Save ``m`` to ``out`` (see :meth:`Matching.save`); return the path and a note on what was there."""
    from pathlib import Path

    from featmatch.matching._matching import Matching

    target = Path(out)
    note = ""
    if target.is_file():
        if Matching.is_matching_file(target):
            note = " (replaced an earlier featmatch matching"
            legacy = Matching.arrays_file(target)
            if legacy is not None and legacy.exists():
                note += f"; its old array file {legacy.name} is no longer used and was left in place"
            note += ")"
        elif force:
            note = " (replaced an existing file that was not a featmatch matching: --force)"
    return m.save(target, force=force), note


def _cmd_match(args: argparse.Namespace) -> int:
    from featmatch.matching._matching import Matching

    if args.unmatched_quantile is not None and not 0.0 <= args.unmatched_quantile <= 1.0:
        raise ValueError(f"--unmatched-quantile must lie in [0, 1], got {args.unmatched_quantile}")
    _check_out(args.out, args.force, Matching)  # before minutes of work, not after
    opts = _match_opts(args)
    if args.scheduler:
        from featmatch._dask import get_client, run_tasks

        client = get_client(args.scheduler)
        (done,) = run_tasks(
            client, _match_task, [(args.sae_a, args.sae_b, args.device, opts)], desc="match", progress=False
        )
    else:
        done = _match_task(args.sae_a, args.sae_b, args.device, opts)
    m, desc_a, desc_b, t_load, t_match = done
    m.meta["source_a"] = args.sae_a
    m.meta["source_b"] = args.sae_b
    path, note = _write_matching(m, args.out, args.force)
    print(f"A:        {args.sae_a} ({desc_a})")
    print(f"B:        {args.sae_b} ({desc_b})")
    print(
        f"settings: on={args.on} metric={args.metric} fold={args.fold} b_enc={args.include_b_enc} "
        f"solver={m.meta.get('solver')}"
    )
    for line in _summary(m, t_load, t_match):
        print(line)
    print(f"wrote:    {path}{note}")
    return 0


def _match_opts(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        on=args.on,
        metric=args.metric,
        fold=args.fold,
        include_b_enc=args.include_b_enc,
        solver=args.solver,
        unmatched_above=args.unmatched_above,
        unmatched_quantile=args.unmatched_quantile,
    )


def _match_task(
    src_a: str, src_b: str, device: str, opts: dict[str, Any]
) -> tuple[Any, str, str, float, float]:
    """Load, check and match one pair: here, or as a Dask task on a worker (``--scheduler``)."""
    from featmatch.matching._matching import match

    t0 = time.perf_counter()
    sae_a = _load_side("A", src_a, device, opts["fold"])
    sae_b = _load_side("B", src_b, device, opts["fold"])
    t1 = time.perf_counter()
    m = match(sae_a, sae_b, **opts)
    return m, _describe(sae_a), _describe(sae_b), t1 - t0, time.perf_counter() - t1


def _stack_sources(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The SAE sources of ``match-stack`` and a label for each (its layer, or its position)."""
    if args.sae_set:
        if args.saes:
            raise ValueError("give SAE sources or --set with --layers, not both")
        from featmatch.saes._sae import sae_set

        s = sae_set(args.sae_set)
        layers = _parse_layers(args.layers) if args.layers else list(s.layers)
        return [s.source(L) for L in layers], [f"{L:02d}" for L in layers]
    if args.layers:
        raise ValueError("--layers needs --set")
    return list(args.saes), [f"{i:02d}" for i in range(len(args.saes))]


def _parse_layers(text: str) -> list[int]:
    """``"3:7"`` (start:stop) or ``"3,5,9"``."""
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return list(range(int(a), int(b)))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--layers {text!r}: write start:stop (e.g. 3:9) or a comma list (e.g. 3,5,9)"
        ) from None


def _cmd_match_stack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from featmatch.matching._matching import Matching
    from featmatch.matching._stack import match_stack

    if args.unmatched_quantile is not None and not 0.0 <= args.unmatched_quantile <= 1.0:
        raise ValueError(f"--unmatched-quantile must lie in [0, 1], got {args.unmatched_quantile}")
    sources, labels = _stack_sources(args)
    if len(sources) < 2:
        raise ValueError(f"match-stack needs at least two SAEs, got {len(sources)}")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out-dir {out_dir} exists and is not a folder")
    targets = [out_dir / f"pair_{labels[t]}_{labels[t + 1]}.json" for t in range(len(sources) - 1)]
    for target in targets:  # before minutes of work, not after
        _check_out(str(target), args.force, Matching)
    t0 = time.perf_counter()
    matchings = match_stack(sources, client=args.scheduler, progress=True, **_match_opts(args))
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    for t, (m, target) in enumerate(zip(matchings, targets, strict=True)):  # every pair succeeded
        m.meta["source_a"], m.meta["source_b"] = sources[t], sources[t + 1]
        path, note = _write_matching(m, str(target), args.force)
        print(
            f"{labels[t]} -> {labels[t + 1]}: matched {m.n_matched}/{m.n_a}, total cost {m.total_cost:.6g}; wrote {path}{note}"
        )
    where = f" on {args.scheduler}" if args.scheduler else ""
    print(f"{len(matchings)} pairs in {seconds:.1f} s{where}")
    return 0


def _cmd_compose(args: argparse.Namespace) -> int:
    from featmatch.matching._matching import Matching, compose

    _check_out(args.out, args.force, Matching)
    t0 = time.perf_counter()
    m = compose(Matching.load(args.m1), Matching.load(args.m2), force=args.force)
    m.meta["sources"] = [args.m1, args.m2]
    path, note = _write_matching(m, args.out, args.force)
    for line in _summary(m, 0.0, time.perf_counter() - t0):
        print(line)
    print(f"wrote:    {path}{note}")
    return 0


def _check_out(out: str, force: bool, matching_cls: Any) -> None:
    """Refuse a directory, or a file featmatch did not write (without ``--force``), up front."""
    from pathlib import Path

    target = Path(out)
    if target.is_dir():
        raise IsADirectoryError(
            f"--out {out} is a directory; give a file path (e.g. {target / 'matching.json'})"
        )
    if target.exists() and not force and not matching_cls.is_matching_file(target):
        raise FileExistsError(
            f"--out {out} exists and is not a featmatch matching; refusing to overwrite it (--force replaces it)"
        )


def _cmd_book_pages(args: argparse.Namespace) -> int:
    from featmatch.chapters.results import write_book_pages

    for path in write_book_pages(args.figures, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_supernodes(args: argparse.Namespace) -> int:
    from featmatch.circuits import group_graph_file

    path, out = group_graph_file(
        args.graph, args.out, n_supernodes=args.n, fraction=args.fraction, force=args.force
    )
    g = out["metadata"]["featmatch_grouping"]
    print(
        f"{g['n_feature_nodes']} feature nodes -> {g['n_clusters']} clusters by {g['distance']}; "
        f"{g['n_supernodes_written']} supernodes of 2+ members written to {path}"
    )
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from featmatch.saes import zoo

    path = zoo.build_zoo(profile=args.profile, force=args.force)
    print(f"zoo '{args.profile}' ready: {path}")
    return 0


def _cmd_zoo_info(args: argparse.Namespace) -> int:
    from featmatch.saes import zoo

    man = zoo.manifest(args.profile)
    bad = zoo.verify(args.profile)  # reads every recorded file: complete means "and intact"
    man["complete"] = bool(man.get("complete")) and not bad
    man["bad_files"] = bad
    if args.json:
        print(json.dumps(man, indent=2, sort_keys=True, default=str))
        return EXIT_ERROR if bad else 0
    print(f"zoo profile '{args.profile}'")
    for key, value in sorted(man.items()):
        if key == "bad_files":
            continue
        if isinstance(value, dict | list):
            print(f"  {key}: {len(value)} entries")
        else:
            print(f"  {key}: {value}")
    n_files = sum(len(e.get("files") or {}) for v in man.get("saes", {}).values() for e in v.values())
    if not bad:
        print(f"  verified: {n_files} files match their sha256 checksums")
        return 0
    print(
        f"  verified: {len(bad)} of {n_files} files are BAD; run `featmatch zoo build --profile {args.profile}`"
    )
    for path, problem in sorted(bad.items()):
        print(f"    BAD {path}: {problem}")
    return EXIT_ERROR


def _cmd_run_notebook(args: argparse.Namespace) -> int:
    from featmatch.chapters.run import (
        list_notebooks,
        notebook_parameters,
        parse_param,
        resolve_notebook,
        run_notebook,
    )

    if args.list_params:
        for nb in list_notebooks() if args.name == "all" else [resolve_notebook(args.name)]:
            print(f"{nb.stem}:")
            for key, spec in notebook_parameters(nb).items():
                print(f"  {key} = {spec['default']}" + (f"  # {spec['help']}" if spec["help"] else ""))
        return 0
    params = {key: parse_param(value) for key, value in args.param}
    for run in run_notebook(args.name, params, args.out):
        print(f"{run.name}: {run.output} ({run.seconds:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    if not isinstance(
        exc,
        ValueError
        | FileNotFoundError
        | FileExistsError
        | IsADirectoryError
        | NotImplementedError
        | ConnectionError,
    ):
        msg = f"{type(exc).__name__}: {msg}"
    return msg


def _exit_now(code: int) -> None:
    """Flush the standard streams and end the process with ``code``, skipping interpreter teardown.

    Used after Ctrl-C when featmatch runs as a program: every ``finally`` block has already
    run (the worker of a dense solve is reaped, temporary files are removed, outputs are
    written atomically or not at all), so nothing is left to clean up, while tearing down
    torch, sae-lens and a half-gigabyte cost matrix took seconds on a loaded machine.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``featmatch`` command; return the exit status (0 ok, 2 error, 130 interrupted).

    With ``argv=None`` (run as a program: the ``featmatch`` script, ``python -m featmatch.cli``)
    an interrupted run exits with status 130 at once (:func:`_exit_now`) instead of returning.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints usage + one line, exits 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("featmatch: interrupted", file=sys.stderr)
        if argv is None:  # run as a program: leave now (see _exit_now)
            _exit_now(EXIT_INTERRUPT)
        return EXIT_INTERRUPT
    except Exception as exc:  # noqa: BLE001 - the CLI reports every failure as one line
        if os.environ.get("FEATMATCH_DEBUG"):
            raise
        print(f"featmatch: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
