"""match_stack on a real local Dask cluster: the same permutations as one process, also when a worker dies."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from featmatch.matching import match_stack
from featmatch.saes.zoo import load_zoo_sae
from featmatch.synthetic import planted_chain

TINY_LAYERS = range(6, 12)  # a 6-SAE stack of the tiny zoo (d_sae 128)


@pytest.fixture(scope="module")
def tiny_stack():
    return [load_zoo_sae("tiny", L) for L in TINY_LAYERS]


def _same(local, dist):
    assert len(local) == len(dist)
    for a, b in zip(local, dist, strict=True):
        np.testing.assert_array_equal(a.perm, b.perm)
        np.testing.assert_array_equal(a.cost, b.cost)
        assert a.meta["solver"] == b.meta["solver"]


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"solver": "sparse", "k": 8},
        {"unmatched_quantile": 0.8},
        {"unmatched_above": 0.05, "solver": "sparse"},
    ],
    ids=["auto", "sparse", "quantile", "thresholded-sparse"],
)
def test_identical_permutations_on_a_tiny_zoo_stack(dask_client, tiny_stack, opts):
    local = match_stack(tiny_stack, progress=False, **opts)
    dist = match_stack(tiny_stack, client=dask_client, progress=False, **opts)
    _same(local, dist)


def test_sources_are_loaded_on_the_workers(dask_client, tiny_stack):
    sources = [f"featmatch-smollm2-tiny:blocks.{L}.hook_resid_post" for L in TINY_LAYERS]
    _same(match_stack(tiny_stack, progress=False), match_stack(sources, client=dask_client, progress=False))


def test_bad_input_fails_before_any_task_and_names_the_problem(dask_client, tiny_stack):
    with pytest.raises(ValueError, match="at least two"):
        match_stack(tiny_stack[:1], client=dask_client)
    with pytest.raises(ValueError, match="solver"):
        match_stack(tiny_stack, client=dask_client, solver="fast")


def test_a_killed_worker_does_not_change_the_result(tmp_path):
    """SIGKILL one worker while it runs a pair: the pair is recomputed elsewhere, the result is the same.

    Its own cluster (the nanny restarts the killed worker; the shared cluster stays clean).
    The pairs are planted 1536-wide SAEs solved densely, so a pair lasts long enough to be
    killed in the middle of.
    """
    from distributed import Client, LocalCluster

    saes, _ = planted_chain(n_layers=7, d=64, f=1536, no_partner=0.3, noise=0.3, seed=3)
    folders = []
    for i, sae in enumerate(saes):
        sae.save_model(tmp_path / f"sae{i}")
        folders.append(str(tmp_path / f"sae{i}"))
    local = match_stack(folders, progress=False, solver="dense")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            pids = client.run(os.getpid)  # worker address -> pid
            killed: dict[str, object] = {}

            def kill_a_busy_worker():
                deadline = time.time() + 60
                while time.time() < deadline and not killed:
                    busy = {w: ts for w, ts in client.processing().items() if ts}
                    for w, ts in busy.items():
                        if any(str(t).startswith("featmatch-pair_task") for t in ts):
                            killed["tasks"] = list(ts)
                            os.kill(pids[w], signal.SIGKILL)
                            killed["worker"] = w
                            return
                    time.sleep(0.05)

            t = threading.Thread(target=kill_a_busy_worker, daemon=True)
            t.start()
            dist = match_stack(folders, client=client, progress=False, solver="dense")
            t.join(timeout=5)
    assert killed.get("worker"), "no worker was killed while running a pair: the test proved nothing"
    _same(local, dist)
