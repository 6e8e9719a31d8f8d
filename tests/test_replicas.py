"""Several service replicas behind one URL (PostgreSQL + RabbitMQ + haproxy), as in production.

A task submitted through one replica reaches its endpoint on another, and its states and
result come back; cancels, stops and presence cross replicas too. Then the failures an
operator lives with: a replica SIGKILLed mid-batch, PostgreSQL restarted, RabbitMQ restarted.
Each time every future resolves exactly once with the right value.

Mandatory under CI (which has all three); elsewhere these skip and say what is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tether import Client, Executor
from tether.errors import TaskCancelled, TaskFailed, UnknownEndpoint

import helpers
from conftest import multi_user_missing, tether_cli, wait_for
from replicas import Replicas, missing

MISSING = missing()
pytestmark = [pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"), reason=str(MISSING)),
              pytest.mark.timeout(300)]


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    group = Replicas(tmp_path, n=2)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
def bus_replicas(tmp_path: Path) -> Iterator[Replicas]:
    """Replicas that advertise no URL: a client stays on the replica it connected to, and every
    task for an endpoint held by the other crosses through the broker, both ways."""
    group = Replicas(tmp_path, n=2, advertise=False)
    try:
        yield group
    finally:
        group.close()


def _events(replicas: Replicas, i: int, *names: str) -> float:
    """The sum of replica ``i``'s task-event counters ``names`` on /metrics (0 if none yet)."""
    text = httpx.get(replicas.url(i) + "/metrics", timeout=10).text
    total = 0.0
    for name in names:
        prefix = f'tether_task_events_total{{event="{name}"}}'
        total += sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix))
    return total


def _count_results(futures: list) -> Counter:
    """How many times each future was resolved (a done callback runs once per resolution)."""
    seen: Counter = Counter()
    for f in futures:
        f.add_done_callback(lambda fut: seen.update([fut.task_id]))
    return seen


def _stored_successes(group: Replicas) -> int:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={group.dbname}") as conn:
        return conn.execute("SELECT count(*) FROM tasks WHERE state = 'success'").fetchone()[0]


@contextlib.contextmanager
def _batch_in_flight(replicas: Replicas, name: str, n: int) -> Iterator[tuple[Executor, list]]:
    """An endpoint on replica 1, a client on replica 0, ``n`` short tasks submitted, some done."""
    endpoint_id = replicas.start_endpoint(name, replicas.url(1))
    wait_for(lambda: replicas.holder_of(endpoint_id) == 1, what="the endpoint to connect to replica 1")
    with Executor(endpoint_id=endpoint_id, service=replicas.url(0), token=replicas.token) as ex:
        futures = [ex.submit(helpers.sleep_then, 0.01, i) for i in range(n)]
        wait_for(lambda: sum(f.done() for f in futures) >= 50, timeout=120, what="some results")
        yield ex, futures


def test_tasks_states_cancels_stops_and_presence_cross_replicas(bus_replicas: Replicas) -> None:
    replicas = bus_replicas
    endpoint_id = replicas.start_endpoint("far", replicas.url(1))
    wait_for(lambda: replicas.holder_of(endpoint_id) == 1, what="the endpoint to connect to replica 1")
    with Client(replicas.url(0), replicas.token) as client:
        assert client.get_endpoint(endpoint_id)["online"] is True  # presence seen from the other replica
    with Executor(endpoint_id=endpoint_id, service=replicas.url(0), token=replicas.token) as ex:
        futures = [ex.submit(helpers.square, i) for i in range(300)]
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(300)]

        slow = ex.submit(helpers.sleep_then, 120, "never")
        wait_for(lambda: slow.state == "running", timeout=60, what="the running state to cross replicas")
        assert slow.cancel()
        with pytest.raises(TaskCancelled):
            slow.result(timeout=30)
        # the cancel reached the endpoint on the other replica and killed the worker: both of the
        # endpoint's workers are free again, so two sleeps of 1 s take ~1 s, not 120
        t0 = time.monotonic()
        assert [f.result(timeout=60) for f in [ex.submit(helpers.sleep_then, 1, i) for i in range(2)]] == [0, 1]
        assert time.monotonic() - t0 < 60

    # the news went through the broker, and each replica says so on /metrics
    for i, direction in ((0, "published"), (1, "received")):
        text = httpx.get(replicas.url(i) + "/metrics", timeout=10).text
        name = f'tether_bus_messages_total{{direction="{direction}"}}'
        line = next(x for x in text.splitlines() if x.startswith(name))
        assert float(line.split()[-1]) > 0, line

    daemon_pid = int((replicas.home / "endpoints" / "far" / "daemon.pid").read_text())
    with Client(replicas.url(0), replicas.token) as client:
        assert client.stop_endpoint(endpoint_id)["stop_sent"] is True
    wait_for(lambda: not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == "zombie",
             timeout=60, what="the endpoint on replica 1 to stop when asked through replica 0")
    with Client(replicas.url(0), replicas.token) as client:
        wait_for(lambda: client.get_endpoint(endpoint_id)["online"] is False, what="the endpoint to show offline")

    # deleted through replica 1, refused at once through replica 0, which had just read the
    # endpoint's row (a replica keeps rows of endpoints held elsewhere for a second): its insert
    # checks the endpoint again, so the next task is not stored for a deleted endpoint
    ex = Executor(endpoint_id=endpoint_id, service=replicas.url(0), token=replicas.token)
    try:
        waiting = ex.submit(helpers.square, 3)  # the endpoint is offline: stored, it waits
        wait_for(lambda: waiting.state == "waiting-for-endpoint", timeout=30, what="the task to wait for its endpoint")
        with Client(replicas.url(1), replicas.token) as client:
            client.delete_endpoint(endpoint_id)
        with pytest.raises(UnknownEndpoint, match="deleted"):
            ex.submit(helpers.square, 4).result(timeout=30)
        with pytest.raises(TaskFailed, match="deleted"):
            waiting.result(timeout=30)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)  # a task stored for a deleted endpoint would never end


#: what a replica counts when tasks reach it through the broker
BUS_TASKS = ("bus_offer_to", "bus_offer", "bus_refill")


def test_an_endpoints_tasks_go_to_the_replica_that_holds_it(replicas: Replicas) -> None:
    """The client connects to replica 0, the endpoint to replica 1: once the first
    acknowledgement names replica 1, tasks go there directly instead of crossing the broker, and
    replica 1 pushes their results on the same connection (its news of them to replica 0, where
    the client's first connection is, remains: a hint nobody waits for)."""
    endpoint_id = replicas.start_endpoint("near", replicas.url(1))
    wait_for(lambda: replicas.holder_of(endpoint_id) == 1, what="the endpoint to connect to replica 1")
    with Executor(endpoint_id=endpoint_id, service=replicas.url(0), token=replicas.token) as ex:
        assert ex.submit(helpers.square, 2).result(timeout=60) == 4  # its acknowledgement names replica 1
        tasks_before = _events(replicas, 1, *BUS_TASKS)
        assert [ex.submit(helpers.square, i).result(timeout=60) for i in range(20)] == [i * i for i in range(20)]
        futures = [ex.submit(helpers.square, i) for i in range(300)]
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(300)]
        assert _events(replicas, 1, *BUS_TASKS) == tasks_before  # no task reached replica 1 through the broker
        # a cancel right after the submission follows it on the same (direct) connection: the
        # task never holds a worker, so both of the endpoint's workers are free at once
        for _ in range(2):
            doomed = ex.submit(helpers.sleep_then, 120, "never")
            assert doomed.cancel()
            with pytest.raises(TaskCancelled):
                doomed.result(timeout=30)
        t0 = time.monotonic()
        assert [f.result(timeout=60) for f in [ex.submit(helpers.sleep_then, 1, i) for i in range(2)]] == [0, 1]
        assert time.monotonic() - t0 < 30


def test_a_replica_advertising_an_unreachable_url_is_reached_through_the_broker(replicas: Replicas) -> None:
    """Replica 1 advertises a URL nobody listens on (a wrong ``advertise_url``): the client's
    direct connection fails, and tasks go through replica 0 and the broker as without one."""
    replicas.kill(1, signal.SIGTERM)
    from replicas import free_port

    replicas.advertise[1] = f"http://127.0.0.1:{free_port()}"
    replicas.start(1)
    endpoint_id = replicas.start_endpoint("astray", replicas.url(1))
    wait_for(lambda: replicas.holder_of(endpoint_id) == 1, what="the endpoint to connect to replica 1")
    with Executor(endpoint_id=endpoint_id, service=replicas.url(0), token=replicas.token) as ex:
        assert ex.submit(helpers.square, 2).result(timeout=60) == 4
        t0 = time.monotonic()
        assert [ex.submit(helpers.square, i).result(timeout=60) for i in range(20)] == [i * i for i in range(20)]
        assert time.monotonic() - t0 < 30  # a refused direct connection costs a refusal, not a timeout each
        futures = [ex.submit(helpers.square, i) for i in range(300)]
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(300)]
    assert _events(replicas, 1, *BUS_TASKS) > 0  # they crossed through the broker


def test_a_replica_killed_mid_batch_loses_nothing(replicas: Replicas) -> None:
    endpoint_id = replicas.start_endpoint("lb", replicas.lb_url)
    wait_for(lambda: replicas.holder_of(endpoint_id) is not None, what="the endpoint to connect")
    n = 1500
    with Executor(endpoint_id=endpoint_id, service=replicas.lb_url, token=replicas.token) as ex:
        futures = [ex.submit(helpers.sleep_then, 0.005, i) for i in range(n)]
        resolved = _count_results(futures)
        wait_for(lambda: sum(f.done() for f in futures) >= 200, timeout=120, what="some results")
        victim = replicas.holder_of(endpoint_id)
        done_before = sum(f.done() for f in futures)
        t_kill = time.monotonic()
        replicas.kill(victim, signal.SIGKILL)
        wait_for(lambda: sum(f.done() for f in futures) > done_before + 20, timeout=120,
                 what="results to flow again after the replica died")
        recovery = time.monotonic() - t_kill
        assert [f.result(timeout=180) for f in futures] == list(range(n))
    wait_for(lambda: len(resolved) == n, what="every done callback")
    assert set(resolved.values()) == {1}
    assert _stored_successes(replicas) == n
    survivor = 1 - victim
    assert replicas.holder_of(endpoint_id) == survivor
    print(f"\nreplica {victim} SIGKILLed with {done_before}/{n} done: results flowed again after {recovery:.2f} s")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None,
                    reason="restarting PostgreSQL needs root and pg_ctlcluster")
def test_a_postgres_restart_mid_batch_loses_nothing(replicas: Replicas) -> None:
    n = 600
    with _batch_in_flight(replicas, "pg", n) as (ex, futures):
        version = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True,
                                 check=True).stdout.split()[0]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                       capture_output=True, timeout=120)
        assert [f.result(timeout=180) for f in futures] == list(range(n))
        assert ex.submit(helpers.square, 9).result(timeout=60) == 81
    assert _stored_successes(replicas) == n + 1


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None or os.geteuid() != 0,
                    reason="restarting RabbitMQ needs root and rabbitmqctl")
def test_a_rabbitmq_restart_mid_batch_loses_nothing(replicas: Replicas) -> None:
    n = 600
    with _batch_in_flight(replicas, "mq", n) as (ex, futures):
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        more = [ex.submit(helpers.square, i) for i in range(100)]  # submitted while the broker is down
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        assert [f.result(timeout=180) for f in futures] == list(range(n))
        assert [f.result(timeout=180) for f in more] == [i * i for i in range(100)]
    assert _stored_successes(replicas) == n + 100


@pytest.mark.skipif(bool(multi_user_missing()) and not os.environ.get("CI"), reason=str(multi_user_missing()))
def test_a_multi_user_endpoint_on_one_replica_serves_a_user_on_another(replicas: Replicas) -> None:
    """The user's tasks go through replica 0; the multi-user endpoint is connected to replica 1:
    the start request, the user endpoint's tasks and the results all cross the bus."""
    import json
    import pwd

    import yaml

    try:
        pwd.getpwnam("tether_alice")
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "tether_alice"], check=True)
    env = replicas.endpoint_env(replicas.url(1))
    tether_cli(env, "endpoint", "configure", "cluster", "--multi-user", "--force")
    d = replicas.home / "endpoints" / "cluster"
    (d / "identity_mapping.json").write_text(json.dumps([{
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [{"source": "{username}", "match": "alice", "output": "tether_alice"}],
    }]))
    config = yaml.safe_load((d / "config.yaml").read_text())
    config.update(idle_timeout_s=30, heartbeat_s=1, allowed_users=["*"])
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "user_config_template.yaml.j2").write_text("engine:\n  type: process\n  workers: 1\nheartbeat_s: 1\n")
    alice = json.loads(tether_cli(replicas.env, "service", "user-add", "alice", "--json",
                                  "--db-url", replicas.db_url).stdout)["token"]
    endpoint_id = tether_cli(env, "endpoint", "start", "cluster", "--detach").stdout.strip().splitlines()[-1].strip()
    wait_for(lambda: replicas.holder_of(endpoint_id) == 1, what="the multi-user endpoint to connect to replica 1")

    with Executor(endpoint_id=endpoint_id, service=replicas.url(0), token=alice) as ex:
        info = ex.submit(helpers.who_am_i).result(timeout=120)
        assert info["uid"] == pwd.getpwnam("tether_alice").pw_uid and info["uid"] != 0
        assert [f.result(timeout=60) for f in [ex.submit(helpers.square, i) for i in range(20)]] == \
            [i * i for i in range(20)]
