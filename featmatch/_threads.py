"""How many threads torch may use: the CPUs this process may run on that are free now.

Why: torch's intra-op pool (OpenMP) splits every large operation across its threads and
waits at a barrier for the slowest. On a shared machine, a thread whose core is taken by
another process is descheduled for whole time slices, and every barrier waits for it: with
two threads on two cores and one core busy elsewhere, training one quick-zoo SAE took
6-7x as long as on a quiet machine (issue 17). One thread per *free* core avoids the
wait; a passive OpenMP wait policy (``OMP_WAIT_POLICY=PASSIVE``) only stops the waiting
threads from spinning, it does not make the barrier wait shorter, and it must be set
before torch loads its OpenMP runtime, which a library cannot promise
(``benchmarks/bench_contention.py`` measures both).

The policy, :func:`fitted_thread_count`:

* start from the CPUs the process may run on, ``os.sched_getaffinity(0)`` (a container,
  ``taskset`` or a cgroup cpuset may allow fewer than ``os.cpu_count()``);
* keep those whose utilisation over a short sample (``psutil.cpu_percent``) is below
  :data:`BUSY_PERCENT`;
* use that many threads, at least one; ``FEATMATCH_THREADS=N`` overrides it.

:func:`fitted_threads` applies it around a block (or a function, as a decorator) and
restores torch's previous setting afterwards. Zoo training (per SAE) and the activation
statistics pass use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["BUSY_PERCENT", "THREADS_ENV", "available_cpus", "fitted_thread_count", "fitted_threads"]

#: A CPU busier than this (percent, over the sample) counts as taken by another process.
BUSY_PERCENT = 50.0
#: Environment variable that fixes the thread count (a positive integer).
THREADS_ENV = "FEATMATCH_THREADS"


def available_cpus() -> list[int]:
    """The CPUs this process may run on (``os.sched_getaffinity``; all CPUs where it does not exist)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def fitted_thread_count(sample_seconds: float = 0.2, busy_percent: float = BUSY_PERCENT) -> int:
    """Threads for torch: the available CPUs (:func:`available_cpus`) that are not busy now.

    Parameters
    ----------
    sample_seconds : float
        How long to measure per-CPU utilisation (``psutil.cpu_percent(interval=...)``).
    busy_percent : float
        A CPU at or above this utilisation is counted as taken.

    Returns
    -------
    int
        ``$FEATMATCH_THREADS`` if set, else the number of available CPUs below
        ``busy_percent``, at least 1.

    Raises
    ------
    ValueError
        If ``$FEATMATCH_THREADS`` is not a positive integer.
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {env!r}")
        return int(env)
    cpus = available_cpus()
    import psutil  # declared dependency (pyproject.toml)

    load = psutil.cpu_percent(interval=sample_seconds, percpu=True)
    free = [c for c in cpus if c < len(load) and load[c] < busy_percent]
    return max(1, len(free))


@contextlib.contextmanager
def fitted_threads(sample_seconds: float = 0.2) -> Iterator[int]:
    """Run a block (or, as ``@fitted_threads()``, a function) with :func:`fitted_thread_count` torch threads.

    Yields the thread count; torch's previous count is restored on exit.

    Examples
    --------
    >>> with fitted_threads() as n:           # doctest: +SKIP
    ...     trainer.fit()
    """
    import torch

    before = torch.get_num_threads()
    n = fitted_thread_count(sample_seconds)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
