"""Dask on Tether: a real ``distributed`` Client drives ``TetherCluster`` against real service and
endpoint processes. Proxy mode runs every task through the service; worker mode starts real
``dask worker`` processes as endpoint tasks (on the one-node Slurm too, in CI)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import dask
import dask.array as da
import dask.bag as db
import pytest

distributed = pytest.importorskip("distributed", reason="the Dask plugin needs pip install 'tether[dask]'")
dd = pytest.importorskip("dask.dataframe", reason="dask.dataframe needs pandas (pip install 'tether[dask]')")

from distributed import Client, get_worker, wait  # noqa: E402

from tether import Client as TetherClient  # noqa: E402
from tether import EndpointOffline, UnknownEndpoint, VersionMismatch  # noqa: E402
from tether.dask import TetherCluster, check_versions  # noqa: E402
from tether.local import LocalStack  # noqa: E402
from tether.protocol import Hello, Welcome  # noqa: E402

import helpers  # noqa: E402
from conftest import pid_alive, wait_for  # noqa: E402
from rogue import raw_endpoint  # noqa: E402

# functions below run on the endpoint, which cannot import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def cluster_for(stack: LocalStack, **kwargs: object) -> TetherCluster:
    return TetherCluster(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token, **kwargs)


@pytest.fixture(scope="module")
def proxy(stack: LocalStack) -> Iterator[tuple[TetherCluster, Client]]:
    with cluster_for(stack) as cluster, Client(cluster) as client:
        yield cluster, client


# --- proxy mode ----------------------------------------------------------------------------------

def where() -> tuple[str | None, int]:
    """Runs on the endpoint in proxy mode: a Tether task id and the endpoint worker's pid."""
    return os.environ.get("TETHER_TASK_ID"), os.getpid()


def test_issue_session_runs_on_the_endpoint(proxy: tuple[TetherCluster, Client]) -> None:
    cluster, client = proxy
    task_id, pid = client.submit(where).result(timeout=30)
    assert task_id and pid != os.getpid()  # it ran as a Tether task, in an endpoint process

    assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
    assert client.gather(client.map(pow, range(100), [2] * 100))[-1] == 99 ** 2
    assert dask.delayed(sum)([dask.delayed(abs)(-i) for i in range(10)]).compute() == 45
    assert float(da.ones((2000, 2000), chunks=500).sum().compute()) == 4e6
    assert db.from_sequence(range(100), npartitions=4).map(lambda x: x * 2).sum().compute() == 9900

    df = dd.from_dict({"k": [i % 7 for i in range(10_000)], "x": range(10_000)}, npartitions=8)
    assert df.groupby("k").x.sum().compute().to_dict() == {k: sum(range(k, 10_000, 7)) for k in range(7)}
    indexed = df.set_index("x").compute()
    assert list(indexed.index) == list(range(10_000))
    counts = cluster.proxy_worker.endpoint_executor.counts
    assert counts["endpoint"] > 100


def test_p2p_shuffle_and_merge_run_their_worker_bound_steps_on_the_proxy(proxy) -> None:
    """P2P shuffles need the worker object; those steps run on the proxy, the rest on the endpoint."""
    cluster, client = proxy
    counts = cluster.proxy_worker.endpoint_executor.counts
    before_local, before_remote = counts["local"], counts["endpoint"]
    left = dd.from_dict({"k": [i % 50 for i in range(5_000)], "x": range(5_000)}, npartitions=6)
    right = dd.from_dict({"k": list(range(50)), "name": [f"n{i}" for i in range(50)]}, npartitions=3)
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        shuffled = left.shuffle("k").compute()
        merged = left.merge(right, on="k", how="inner", shuffle_method="p2p").compute()
        sorted_by_x = left.set_index("x", shuffle_method="p2p").compute()
    assert sorted(shuffled.x) == list(range(5_000))
    assert len(merged) == 5_000 and set(merged.name) == {f"n{i}" for i in range(50)}
    assert (merged.name == "n" + merged.k.astype(str)).all()
    assert list(sorted_by_x.index) == list(range(5_000))
    assert counts["local"] > before_local, "P2P transfer/unpack tasks should run on the proxy worker"
    assert counts["endpoint"] > before_remote


def test_remote_exception_arrives_as_its_own_type(proxy) -> None:
    _, client = proxy
    with pytest.raises(helpers.CustomError, match="from the endpoint"):
        client.submit(helpers.raise_custom, "from the endpoint").result(timeout=30)
    with pytest.raises(ZeroDivisionError):
        client.submit(lambda: 1 / 0, pure=False).result(timeout=30)
    # and a graph that depends on a failed task fails with it
    bad = client.submit(lambda: 1 / 0, pure=False)
    with pytest.raises(ZeroDivisionError):
        client.submit(lambda x: x + 1, bad).result(timeout=30)


def test_futures_depending_on_futures(proxy) -> None:
    _, client = proxy
    a = client.submit(helpers.square, 3)
    b = client.submit(helpers.add, a, 1)
    c = client.submit(helpers.add, a, b)
    assert c.result(timeout=30) == 9 + 10
    total = client.submit(sum, client.map(helpers.square, range(20)))
    assert total.result(timeout=30) == sum(i * i for i in range(20))


def test_a_thousand_small_tasks(proxy) -> None:
    _, client = proxy
    t0 = time.monotonic()
    futures = client.map(helpers.square, range(1_000), pure=False)
    assert client.gather(futures) == [i * i for i in range(1_000)]
    print(f"\n1,000 tasks through TetherCluster (proxy): {1000 / (time.monotonic() - t0):.0f} tasks/s")


def rendezvous(mine: str, theirs: str, timeout: float) -> int:
    """Finishes only if the other task runs at the same time (each waits for the other's file)."""
    Path(mine).write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout
    while not Path(theirs).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the other task never ran alongside this one")
        time.sleep(0.01)
    return os.getpid()


def test_concurrency_follows_the_endpoint_capacity(proxy, stack: LocalStack, tmp_path: Path) -> None:
    cluster, client = proxy
    workers_total = TetherClient(stack.service_url, stack.token).get_endpoint(stack.endpoint_id)["status"][
        "capacity"]["workers_total"]
    assert workers_total == 2
    threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    assert threads == cluster.concurrency == cluster.oversubscribe * workers_total  # not this machine's core count
    assert cluster.oversubscribe == 4
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pids = client.gather([client.submit(rendezvous, a, b, 20), client.submit(rendezvous, b, a, 20)])
    assert len(set(pids)) == 2 and os.getpid() not in pids  # two endpoint workers at once


def test_cancel_kills_the_task_on_the_endpoint(proxy, tmp_path: Path) -> None:
    _, client = proxy
    marker = tmp_path / "started"
    fut = client.submit(helpers.touch_then_sleep, str(marker), 60, pure=False)
    wait_for(marker.exists, timeout=30, what="the task to start on the endpoint")
    pid, child = map(int, marker.read_text().split())
    client.cancel(fut)
    wait_for(lambda: not pid_alive(pid) and not pid_alive(child), timeout=20,
             what="the endpoint to kill the cancelled task's process and its child")
    assert fut.cancelled()
    # the cluster goes on: the endpoint worker slot is free again
    assert client.submit(helpers.square, 7, pure=False).result(timeout=30) == 49


def uses_worker() -> str:
    return get_worker().name


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


def test_tasks_that_need_a_worker_run_on_the_proxy(proxy) -> None:
    cluster, client = proxy
    counts = cluster.proxy_worker.endpoint_executor.counts
    before = counts["fallback"]
    assert client.submit(uses_worker, pure=False).result(timeout=30) == "tether-proxy"
    assert counts["fallback"] == before + 1  # tried on the endpoint, ran on the proxy
    with dask.annotate(executor="local"):
        assert dask.delayed(os.getpid)().compute() == os.getpid()
    counter = client.submit(Counter, actor=True).result(timeout=30)
    assert [counter.incr().result() for _ in range(3)] == [1, 2, 3]


def test_cluster_surface(proxy, stack: LocalStack) -> None:
    cluster, client = proxy
    text = repr(cluster)
    assert "TetherCluster" in text and "endpoint='local'" in text and stack.endpoint_id in text
    page = cluster._repr_html_()
    assert "Endpoint" in page and stack.endpoint_id in page and "2 total" in page
    logs = cluster.get_logs()
    assert "Scheduler" in logs and "versions match" in logs["Cluster"] and stack.endpoint_id in logs["Cluster"]
    assert cluster.dashboard_link is None or cluster.dashboard_link.startswith("http")
    with pytest.warns(UserWarning, match="endpoint's capacity"):
        cluster.scale(10)
    with pytest.warns(UserWarning, match="adapt"):
        cluster.adapt()
    assert len(client.scheduler_info()["workers"]) == 1


def test_asynchronous(stack: LocalStack) -> None:
    async def session() -> int:
        async with cluster_for(stack, asynchronous=True) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                return await client.submit(helpers.square, 12)

    assert asyncio.run(asyncio.wait_for(session(), 60)) == 144


def test_bad_input_and_unreachable_endpoints_fail_in_words(stack: LocalStack) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        cluster_for(stack, mode="bogus")
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        cluster_for(stack, concurrency=0)
    with pytest.raises(ValueError, match="n_workers is for mode='workers'"):
        cluster_for(stack, n_workers=2)
    with pytest.raises(ValueError, match="lifetime must be"):
        cluster_for(stack, mode="workers", lifetime="soon")
    with pytest.raises(UnknownEndpoint):
        TetherCluster(endpoint_id=str(uuid.uuid4()), service=stack.service_url, token=stack.token)
    ghost = TetherClient(stack.service_url, stack.token).register_endpoint("ghost")
    t0 = time.monotonic()
    with pytest.raises(EndpointOffline, match="offline"):
        TetherCluster(endpoint_id=ghost["endpoint_id"], service=stack.service_url, token=stack.token)
    assert time.monotonic() - t0 < 10


def test_version_mismatch_is_reported_before_any_task(stack: LocalStack) -> None:
    """A (scripted) endpoint that reports another distributed: the cluster refuses to start, in words."""
    cred = TetherClient(stack.service_url, stack.token).register_endpoint("old-dask")
    old = raw_endpoint(stack.service_url, cred["endpoint_id"], cred["secret"])
    try:
        py = ".".join(map(str, sys.version_info[:2]))
        old.send(Hello(versions={"python": py, "dask": "2023.1.0", "distributed": "2023.1.0"}))
        assert isinstance(old.recv(), Welcome)
        with pytest.raises(VersionMismatch, match=r"distributed .* here, 2023.1.0 on the endpoint"):
            TetherCluster(endpoint_id=cred["endpoint_id"], service=stack.service_url, token=stack.token)
    finally:
        old.close()
    with pytest.raises(VersionMismatch, match="no dask or distributed installed"):
        check_versions({"python": "3.11"}, "bare")


# --- worker mode ---------------------------------------------------------------------------------
# Real Dask workers unpickle tasks with Dask's own rules: module-level functions travel by
# reference (the module must be importable on the endpoint, as with any Dask cluster), lambdas by
# value. The tests' module is not importable there, so its functions are called through lambdas.

def worker_identity() -> dict:
    w = get_worker()
    return {"name": w.name, "pid": os.getpid(), "task": os.environ.get("TETHER_TASK_ID"),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


@pytest.mark.timeout(120)
def test_worker_mode_starts_real_workers_on_the_endpoint(stack: LocalStack) -> None:
    with cluster_for(stack, mode="workers", n_workers=1, lifetime=6, death_timeout=30) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        first = client.submit(lambda: worker_identity(), pure=False).result(timeout=30)
        assert first["pid"] != os.getpid() and first["task"]  # a dask worker started by a Tether task
        assert first["name"] in cluster.workers
        assert float(da.arange(1000, chunks=100).sum().compute()) == sum(range(1000))
        task = cluster.workers[first["name"]].task
        # its lifetime: the worker drains and exits; a successor replaces it on the endpoint
        wait_for(lambda: cluster.workers[first["name"]].task is not task, timeout=40,
                 what="the worker to reach its lifetime and be replaced")
        client.wait_for_workers(1, timeout=60)
        second = wait_for(lambda: (i := client.submit(lambda: worker_identity(), pure=False).result(timeout=30))["pid"]
                          != first["pid"] and i, timeout=40, what="the successor to take tasks")
        assert second["name"] == first["name"] and second["task"] != first["task"]
        last = cluster.workers[first["name"]].task
    # close() cancels the worker's task: the dask worker process is gone from the endpoint
    assert last.cancelled() or last.done()
    wait_for(lambda: not pid_alive(second["pid"]), timeout=20, what="the dask worker to stop on close()")


# --- worker mode on the real one-node Slurm (CI) ---------------------------------------------------

@pytest.mark.timeout(300)
def test_worker_mode_on_slurm(tmp_path: Path) -> None:
    from parsl_stack import engine_stack
    from slurm import SLURM_HTEX, require_slurm

    require_slurm()
    with engine_stack(tmp_path / "home", SLURM_HTEX) as slurm:
        with cluster_for(slurm, mode="workers", n_workers=1, worker_nthreads=2) as cluster, Client(cluster) as client:
            client.wait_for_workers(1, timeout=240)
            info = client.submit(lambda: worker_identity(), pure=False).result(timeout=60)
            assert info["slurm_job"], info  # the dask worker runs inside a Slurm pilot job
            futures = client.map(lambda x: x * x, range(200))
            wait(futures, timeout=60)
            assert client.gather(futures) == [i * i for i in range(200)]
            df = dd.from_dict({"k": [i % 5 for i in range(1000)], "x": range(1000)}, npartitions=4)
            assert df.groupby("k").x.sum().compute().sum() == sum(range(1000))


def _kept_on_endpoint(home: Path) -> int:
    d = home / "endpoints" / "local" / "results"
    return len(list(d.iterdir())) if d.exists() else 0


def _service_blob_bytes(home: Path) -> int:
    d = home / "service" / "blobs"
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file()) if d.exists() else 0


def test_persisted_data_stays_on_the_endpoint_and_only_results_come_back(fresh_stack: LocalStack) -> None:
    """Issue 20: persist() leaves large partitions on the endpoint (the proxy worker holds
    handles, the scheduler sees their real sizes), reductions run there, compute() fetches only
    what it returns, and releasing the keys frees the endpoint's memory."""
    np = pytest.importorskip("numpy")
    with cluster_for(fresh_stack) as cluster, Client(cluster) as client:
        x = da.random.RandomState(0).random((4 * 1536, 1024), chunks=(1536, 1024))  # 4 chunks of 12 MiB
        x = x.persist()
        wait(x)
        worker = cluster.proxy_worker
        assert worker is not None
        held = [worker.data[k] for k in worker.data.keys()]
        assert held and all(type(v).__name__ == "RemoteValue" for v in held), held
        sizes = client.run_on_scheduler(lambda dask_scheduler: sum(
            ts.nbytes for ts in dask_scheduler.tasks.values() if ts.state == "memory"))
        assert sizes >= 4 * 12 * 1024 * 1024, "the scheduler plans with the partitions' real sizes"
        assert _kept_on_endpoint(fresh_stack.home) == 4
        total, mean, top = dask.compute(x.sum(), x.mean(), x.max())
        assert _service_blob_bytes(fresh_stack.home) == 0, "no partition crossed the service"
        expected = x.compute()  # what the user asks for comes back, as its value
        assert isinstance(expected, np.ndarray) and expected.shape == (4 * 1536, 1024)
        assert np.isclose(float(total), float(expected.sum()))
        assert np.isclose(float(mean), float(expected.mean()))
        assert float(top) == float(expected.max())
        del x, held, expected
        wait_for(lambda: _kept_on_endpoint(fresh_stack.home) == 0, 60,
                 "the endpoint to free the partitions after their keys were released")
