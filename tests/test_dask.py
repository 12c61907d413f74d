"""featmatch._dask: scheduler strings, sources, and the task runner on a real local cluster."""

from __future__ import annotations

import os

import pytest
import torch
from _builders import jumprelu_sae

from featmatch import _dask
from featmatch.lm.models import load_model
from featmatch.saes._sae import load_sae
from featmatch.saes.zoo import load_zoo_sae


def test_parse_scheduler():
    assert _dask.parse_scheduler(" local:3 ") == ("local", 3)
    assert _dask.parse_scheduler("tcp://10.1.2.3:8786") == ("address", "tcp://10.1.2.3:8786")
    for bad in ("", "local", "local:0", "local:two"):
        with pytest.raises(ValueError, match="local:N|empty"):
            _dask.parse_scheduler(bad)


def test_get_client_passes_through_and_rejects_other_types(dask_client):
    assert _dask.get_client(None) is None
    assert _dask.get_client(dask_client) is dask_client
    with pytest.raises(TypeError, match="Client"):
        _dask.get_client(42)


def test_get_client_connects_to_an_address(dask_client):
    c = _dask.get_client(dask_client.scheduler.address)
    assert c is not dask_client and c.status == "running"
    assert c.submit(os.getpid).result() in dask_client.run(os.getpid).values()
    assert _dask.get_client(dask_client.scheduler.address) is c  # one client per address and process


def test_sources_of_what_featmatch_loads(tmp_path):
    name = "featmatch-smollm2-tiny:blocks.3.hook_resid_post"
    assert str(_dask.source_of(load_zoo_sae("tiny", 3))) == name
    assert _dask.source_of(load_sae(name)) == _dask.Source(load_sae, name)
    mem = jumprelu_sae()
    assert _dask.source_of(mem) is None  # built in memory: scattered instead
    mem.save_model(tmp_path / "x")
    assert str(_dask.source_of(load_sae(str(tmp_path / "x")))) == str((tmp_path / "x").resolve())
    assert _dask.source_of(load_model("smollm2-135m")) == _dask.Source(load_model, "smollm2-135m")
    with pytest.raises(TypeError, match="loaded object"):
        _dask.to_workers(None, ["a/folder"])  # a string needs a loader


def test_workers_load_sources_and_take_scattered_objects(dask_client):
    mem = jumprelu_sae(seed=5)
    items = _dask.to_workers(
        dask_client, ["featmatch-smollm2-tiny:blocks.3.hook_resid_post", mem], load=load_sae
    )
    assert items[0] == _dask.Source(load_sae, "featmatch-smollm2-tiny:blocks.3.hook_resid_post")
    assert not isinstance(items[1], _dask.Source)  # a future of the scattered SAE

    def width_and_device(item):
        sae = _dask.worker_object(item)
        return int(sae.cfg.d_sae), str(sae.W_enc.device), _dask.worker_device()

    got = _dask.run_tasks(dask_client, width_and_device, [(i,) for i in items], desc="t", progress=False)
    want_dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert [g[0] for g in got] == [128, int(mem.cfg.d_sae)]
    assert all(g[2] == want_dev for g in got)  # the device comes from the worker


def _fail_on(x, bad):
    if x == bad:
        raise ValueError(f"task {x} failed")
    return x * 10


def test_run_tasks_keeps_order_and_raises_the_task_error(dask_client):
    assert _dask.run_tasks(dask_client, _fail_on, [(i, -1) for i in range(7)], desc="t", progress=False) == [
        i * 10 for i in range(7)
    ]
    with pytest.raises(ValueError, match="task 3 failed"):
        _dask.run_tasks(
            dask_client, _fail_on, [(i, 3) for i in range(5)], desc="t", progress=False, retries=0
        )
