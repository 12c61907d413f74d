"""Shared pytest set-up: headless matplotlib, no hub access, seeded builders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# the shared builders (_builders.py) are imported by name from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private FEATMATCH_CACHE for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FEATMATCH_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def dask_client():
    """A real local Dask cluster, 2 single-threaded worker processes, shared by the distributed tests.

    Workers are spawned processes: they inherit this environment (HF_HUB_OFFLINE, FEATMATCH_CACHE)
    and load models and SAEs from their sources, as on a real cluster.
    """
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    yield client
    from featmatch import _dask

    _dask._close_clients()  # clients the tests opened by address (get_client) go before the cluster
    client.close()
    cluster.close()
