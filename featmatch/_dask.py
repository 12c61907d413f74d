"""The distributed engine: featmatch's independent pieces of work as Dask tasks.

Three entry points take ``client=``: :func:`featmatch.matching.match_stack` (one task per
layer pair), :func:`featmatch.lm.activations.gather` (one task per corpus shard, whose
accumulators merge) and :func:`featmatch.semantic.nearest` (one task per block of query
features). With ``client=None`` (the default) none of this module runs and Dask need not
be installed.

Why Dask and not a home-made pool: interpretability groups already run it, and it connects
to everything they have through one object, a ``dask.distributed.Client``:

* a local cluster, ``Client(LocalCluster(n_workers=2, threads_per_worker=1))``, or the
  string ``"local:2"`` here;
* a SLURM or PBS allocation with ``dask-jobqueue`` (``SLURMCluster(...).scale(jobs=4)``);
* a multi-GPU box with ``dask-cuda``'s ``LocalCUDACluster()`` (one worker per GPU, each
  seeing its own device as ``cuda``).

It also brings the failure handling featmatch would otherwise have to write: a task lost
with its worker is recomputed on another one (the scheduler's ``allowed-failures``), and a
task that raises is retried ``retries`` times (:data:`RETRIES`).

Data movement. SAEs and the model are *loaded on the workers* from their source (a folder,
``release:sae_id``, a featmatch zoo release, or a model registry name): only the source
string and the name of its loader travel through the scheduler (:class:`Source`).
:func:`featmatch.saes.load_sae` and :func:`featmatch.lm.models.load_model` attach their
:class:`Source` to what they load (``featmatch_source``), so objects loaded by featmatch
are sent as their source. An object without a source (an SAE built in memory, say) is
pickled and sent once per worker with ``client.scatter``, directly from the client to the
workers, never inside a task. Each worker keeps what it loaded or unpickled in a small LRU
cache (:func:`worker_object`), so the tasks of one run that need the same SAE load it once
per worker.

Devices. Every worker task runs on the device of the worker it lands on
(:func:`worker_device`: ``cuda`` when the worker sees a GPU, else ``cpu``); nothing here
names a device.
"""

from __future__ import annotations

import atexit
import os
import pickle
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "EXTRA_HINT",
    "RETRIES",
    "Source",
    "get_client",
    "parse_scheduler",
    "run_tasks",
    "source_of",
    "to_workers",
    "total_threads",
    "worker_device",
    "worker_object",
]

#: How to install the optional dependencies.
EXTRA_HINT = "pip install 'featmatch[distributed]'"
#: Retries of a task that raised (a task lost with its worker is recomputed regardless).
RETRIES = 2
#: The attribute featmatch's loaders set on what they load: the source to reload it from.
SOURCE_ATTR = "featmatch_source"

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError(f"client= needs Dask distributed, which is not installed: {EXTRA_HINT}") from exc
    return distributed


def parse_scheduler(scheduler: str) -> tuple[str, int | str]:
    """Check a scheduler string: ``("local", n_workers)`` or ``("address", address)``.

    Parameters
    ----------
    scheduler : str
        ``"local:N"`` (a local cluster of ``N`` single-threaded worker processes) or the
        address of a running scheduler (``"tcp://host:8786"``, ``"host:8786"``).

    Raises
    ------
    ValueError
        An empty string, or ``local:`` without a positive integer.

    Examples
    --------
    >>> parse_scheduler("local:2")
    ('local', 2)
    >>> parse_scheduler("tcp://10.0.0.5:8786")
    ('address', 'tcp://10.0.0.5:8786')
    """
    s = str(scheduler).strip()
    if not s:
        raise ValueError("scheduler is empty: give 'local:N' or a scheduler address such as tcp://host:8786")
    if s.startswith("local"):
        _, _, n = s.partition(":")
        try:
            k = int(n)
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"scheduler {s!r}: write local:N with N >= 1 worker processes, e.g. local:2")
        return "local", k
    return "address", s


def get_client(client: Client | str | None) -> Client | None:
    """The ``dask.distributed.Client`` that ``client`` names (``None`` stays ``None``).

    A ``Client`` is returned as is. A string is resolved once per process and the client
    kept for later calls: ``"local:N"`` starts a ``LocalCluster(n_workers=N,
    threads_per_worker=1)`` (closed at interpreter exit), an address connects to a running
    scheduler.
    """
    if client is None:
        return None
    distributed = _distributed()
    if isinstance(client, distributed.Client):
        return client
    if not isinstance(client, str):
        raise TypeError(
            f"client must be a dask.distributed.Client, a scheduler string or None, got {type(client).__name__}"
        )
    kind, arg = parse_scheduler(client)
    key = f"{kind}:{arg}"
    with _clients_lock:
        c = _clients.get(key)
        if c is not None and c.status == "running":
            return c
        if kind == "local":
            cluster = distributed.LocalCluster(
                n_workers=int(arg), threads_per_worker=1, processes=True, dashboard_address=None
            )
            c = distributed.Client(cluster)
        else:
            c = distributed.Client(str(arg))
        _clients[key] = c
        return c


@atexit.register
def _close_clients() -> None:  # pragma: no cover - runs at interpreter exit
    for c in list(_clients.values()):
        try:
            cluster = getattr(c, "cluster", None)
            c.close()
            if cluster is not None:
                cluster.close()
        except Exception:
            pass
    _clients.clear()


def worker_device() -> str:
    """The torch device of the process this runs in: ``cuda`` if it sees a GPU, else ``cpu``.

    On a ``dask-cuda`` worker, ``CUDA_VISIBLE_DEVICES`` lists the worker's own GPU first,
    so ``cuda`` is that GPU.
    """
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Source:
    """How a worker loads an object itself: ``load(source, device=...)``.

    ``load`` is a module-level function (pickled by reference, so only its name travels)
    and ``source`` the string it takes. featmatch's loaders attach one to what they load as
    ``featmatch_source`` (:func:`featmatch.saes.load_sae`, :func:`featmatch.lm.models.load_model`):
    the object knows how to reload itself, and this module needs to know no loader.
    """

    load: Callable[..., Any]
    source: str

    def __str__(self) -> str:
        return self.source


def source_of(obj: Any) -> Source | None:
    """The :class:`Source` an object was loaded from, or ``None`` if it has none."""
    src = getattr(obj, SOURCE_ATTR, None)
    return src if isinstance(src, Source) else None


def to_workers(client: Client, objs: Sequence[Any], load: Callable[..., Any] | None = None) -> list[Any]:
    """What to send for each object: its :class:`Source`, or the object scattered to the workers.

    A string is a source for ``load`` (a ``TypeError`` without one). An object loaded by
    featmatch goes as its source; any other object is pickled (cloudpickle) and scattered
    to every worker once, directly, not through a task.
    """
    out: list[Any] = []
    for obj in objs:
        if isinstance(obj, (str, os.PathLike)):
            if load is None:
                raise TypeError(f"got the string {str(obj)!r} where a loaded object is expected")
            src: Source | None = Source(load, str(obj))
        else:
            src = source_of(obj)
        if src is not None:
            out.append(src)
        else:
            import cloudpickle  # a dependency of distributed

            # pickled by us: Dask's own torch serialiser turns a module's hook registries into
            # plain dicts, and TransformerLens then cannot add hooks to the copy; cloudpickle,
            # because SAELens keeps lambdas on its SAEs
            blob = _Blob(uuid.uuid4().hex, cloudpickle.dumps(obj))
            out.append(client.scatter(blob, broadcast=True, hash=False))
    return out


class _Blob:
    """A pickled object sent to the workers; each worker unpickles it once."""

    __slots__ = ("token", "data")

    def __init__(self, token: str, data: bytes):
        self.token, self.data = token, data

    def __getstate__(self) -> tuple[str, bytes]:
        return self.token, self.data

    def __setstate__(self, state: tuple[str, bytes]) -> None:
        self.token, self.data = state


#: Objects a worker keeps loaded between tasks (most recent last); ``$FEATMATCH_WORKER_CACHE``
#: sets how many (default 32: every SAE of a 30-layer statistics pass plus its model).
_cache: OrderedDict[Any, Any] = OrderedDict()
_cache_lock = threading.Lock()


def _cache_size() -> int:
    try:
        return max(1, int(os.environ.get("FEATMATCH_WORKER_CACHE", "32")))
    except ValueError:
        return 32


def _stamp(source: str) -> float:
    """A folder's cfg.json mtime, so a worker reloads a folder rewritten since it loaded it."""
    p = Path(source).expanduser()
    try:
        return (p / "cfg.json").stat().st_mtime if p.is_dir() else 0.0
    except OSError:
        return 0.0


def worker_object(item: Any, device: str | None = None) -> Any:
    """On a worker: the object an item of :func:`to_workers` stands for, loaded once per worker.

    A :class:`Source` is loaded with ``device`` (default :func:`worker_device`), a scattered
    object unpickled; both are kept in a per-process LRU cache. Anything else is returned
    as it is.
    """
    if isinstance(item, Source):
        dev = device or worker_device()
        key: Any = (item.load, item.source, dev, _stamp(item.source))
        make: Callable[[], Any] = lambda: item.load(item.source, device=dev)  # noqa: E731
    elif isinstance(item, _Blob):
        key, make = (item.token, device), lambda: _to_device(pickle.loads(item.data), device)
    else:
        return item
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    obj = make()
    with _cache_lock:
        _cache[key] = obj
        while len(_cache) > _cache_size():
            _cache.popitem(last=False)
    return obj


def _to_device(obj: Any, device: str | None) -> Any:
    if device is not None and hasattr(obj, "to") and hasattr(obj, "W_enc"):  # an SAE
        obj = obj.to(device)
    return obj


def run_tasks(
    client: Client,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    *,
    desc: str,
    progress: bool = True,
    retries: int = RETRIES,
) -> list[Any]:
    """Run ``fn(*a)`` for every ``a`` in ``args`` on the cluster; results in input order.

    Every task is submitted at once (the scheduler places them), with ``retries``. The
    results are collected as they finish, under one tqdm bar. If a task fails for good,
    or the caller is interrupted (Ctrl-C), the remaining tasks are cancelled and the
    exception is raised: nothing is returned, so nothing partial gets written.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    run = uuid.uuid4().hex[:8]
    name = getattr(fn, "__name__", "task").strip("_")
    futures = [
        client.submit(fn, *a, key=f"featmatch-{name}-{run}-{i}", retries=retries, pure=False)
        for i, a in enumerate(args)
    ]
    where = {f.key: i for i, f in enumerate(futures)}
    out: list[Any] = [None] * len(futures)
    bar = tqdm(total=len(futures), desc=desc, unit="task", disable=not progress)
    try:
        for fut in as_completed(futures):
            out[where[fut.key]] = fut.result()
            bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return out


def total_threads(client: Client) -> int:
    """Worker threads of the cluster now (at least 1)."""
    return max(1, sum(client.nthreads().values()))
