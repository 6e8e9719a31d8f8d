"""Replicas: no-op throughput, p50/p99 and recovery from a SIGKILL on SQLite, PostgreSQL, and
PostgreSQL + RabbitMQ with 1-3 replicas, with 10 and 100 endpoints.

    python benchmarks/bench_replicas.py [--endpoints 10,100] [--tasks 1000 | --tasks-per-endpoint 50]
                                        [--clients 3] [--n-latency 200] [--kill-tasks 1000] [--db-threads 4]
                                        [--only a,b,c,d,e] [--through-haproxy] [--bus-only] [--json PATH] [--quick]

A fast check: ``python benchmarks/bench_replicas.py --quick``; figures and what they mean are in
``docs/benchmarks.md`` (Replicas). Needs ``pip install -e '.[test,bench]'`` (psycopg, aio-pika,
pytest for the test harness), PostgreSQL on 127.0.0.1:5432 (trust), RabbitMQ on 127.0.0.1:5672 (guest) and haproxy, as
``tests/test_replicas.py`` does; each configuration gets a fresh database, dropped after.

Five configurations, measured one after the other with the same workload, for each endpoint count:

    a  the embedded default: ``tether service start`` on SQLite, one process
    b  one service on PostgreSQL, no broker
    c  PostgreSQL + RabbitMQ, 1 replica behind haproxy
    d  the same, 2 replicas
    e  the same, 3 replicas

Workload: ``--endpoints`` real endpoint daemons (thread engine, one worker each) run in one
"farm" process, as in ``bench_scale.py``; in (c)-(e) they connect through haproxy, as in
production (so they fail over when a replica dies), and haproxy spreads them over the replicas.
``--clients`` client processes (the same number in every configuration, so only the service side
changes) connect directly to replica ``j % n``; together they submit ``--tasks`` no-ops (or
``--tasks-per-endpoint`` to every endpoint) at once and wait for every result: tasks/s is all
tasks over first submission to last result. The latency is ``--n-latency`` sequential round
trips from this process, connected to replica 0, to an endpoint held by another replica when
there are two or more. Each replica advertises its own URL (``--advertise-url``), so a client
sends an endpoint's tasks over a direct connection to the replica holding it once the first
acknowledgement named it (docs/deploy.md); with ``--bus-only`` replicas advertise nothing, and
every task whose endpoint is held by another replica crosses through the broker, both ways.

Then (c)-(e) lose a replica: ``--kill-tasks`` no-ops are submitted through haproxy, and once a
fifth are done the replica holding the most endpoints is SIGKILLed (with one replica, it is
started again at once, as a supervisor would). Reported: the time from the kill until the first
result of a task whose endpoint was on that replica, tasks never resolved (lost) and resolved
twice (duplicated).

Ratios are to (a) and to (c), among runs with as many endpoints. During the throughput phase the
benchmark adds up the CPU time of each kind of process (replicas, PostgreSQL, RabbitMQ, haproxy,
endpoints, clients) and of the whole machine, and names what limited the run: on this project's
2-core machine every process shares two cores, so more replicas cannot add capacity here; what
the figures can show is that a replica costs nothing (tasks/s / c near 1). ``--through-haproxy``
sends the clients through the balancer too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))  # the Replicas harness of tests/test_replicas.py

import peers  # noqa: E402  (needs the sys.path lines above when run as a script)

#: configuration key -> (label, database, replicas behind haproxy: None for a lone service)
CONFIGS: dict[str, tuple[str, str, int | None]] = {
    "a": ("SQLite, 1 process (embedded default)", "sqlite", None),
    "b": ("PostgreSQL, 1 process", "postgres", None),
    "c": ("PostgreSQL + RabbitMQ, 1 replica", "postgres", 1),
    "d": ("PostgreSQL + RabbitMQ, 2 replicas", "postgres", 2),
    "e": ("PostgreSQL + RabbitMQ, 3 replicas", "postgres", 3),
}

#: Every endpoint daemon in one process (saves ~50 MB per endpoint); each registers with the
#: service URL given for it, keeps its own credential, spool and WebSocket.
FARM = r"""
import asyncio, json, sys
from tether.endpoint.config import load_config, write_default_config
from tether.endpoint.credential import read_credential
from tether.endpoint.daemon import EndpointDaemon
from tether.endpoint.manage import ensure_registered

urls, token = json.loads(sys.argv[1]), sys.argv[2]
names = [f"farm-{i:03d}" for i in range(len(urls))]
for name, url in zip(names, urls):
    write_default_config(name, "thread", 1)
    ensure_registered(name, service=url, token=token)
print(json.dumps([read_credential(load_config(n).dir)["endpoint_id"] for n in names]), flush=True)

async def main():
    daemons = [EndpointDaemon(load_config(n), read_credential(load_config(n).dir)) for n in names]
    await asyncio.gather(*(d.run() for d in daemons))

asyncio.run(main())
"""

Result = dict[str, Any]


def _log(msg: str) -> None:
    """Progress goes to stderr so stdout stays just the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- client processes


def client_main(spec_json: str) -> int:
    """A client process: warm up, say ``ready``, wait for ``go`` on stdin, run its share, report.

    Separate processes because one Python client saturates its own GIL before a service does;
    the same number of them runs in every configuration.
    """
    import cloudpickle

    from tether import Executor
    from tether.connection import Connection

    cloudpickle.register_pickle_by_value(peers)  # the farm cannot import benchmarks/peers.py
    spec = json.loads(spec_json)
    executors = [Executor(endpoint_id=e, service=spec["url"], token=spec["token"]) for e in spec["endpoints"]]
    try:
        warm = [ex.submit(peers.noop, -1) for ex in executors]  # every endpoint reached once, connection open
        for f in warm:
            f.result(timeout=300)
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        t0 = time.time()
        futures = [(r, ex.submit(peers.noop, r)) for r in spec["rounds"] for ex in executors]
        wrong = sum(f.result(timeout=1800) != r for r, f in futures)
        t1 = time.time()
        print(json.dumps({"t0": t0, "t1": t1, "n": len(futures), "wrong": wrong}), flush=True)
        return 0
    finally:
        for ex in executors:
            ex.shutdown(wait=False)
        Connection.close_all()


# --------------------------------------------------------------------------- one configuration


@dataclass
class Children:
    """Processes this benchmark started itself (farm, clients): each in its own process group,
    so one ``killpg`` ends it and whatever it started; :meth:`stop_all` runs on every exit path."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
        """Start ``cmd``: stdout is ours to read, stderr (its warnings) goes to ``log``, scanned after."""
        with open(log, "ab") as err:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.procs.clear()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for a lone service (b), dropped after."""
    import psycopg

    from replicas import PG_DSN, PG_URL

    name = f"tether_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG_URL}/{name}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Service:
    """Where clients and endpoints connect, whatever is behind: ``urls[k]`` is replica ``k``."""

    urls: list[str]
    token: str
    logs: list[Path]
    replicas: int
    holder_of: Any = None  # endpoint id -> replica index, where the database says so
    group: Any = None  # the Replicas harness (c-e): to SIGKILL and restart a replica
    endpoint_urls: list[str] | None = None  # where endpoints connect (c-e: haproxy, as in production)


@contextlib.contextmanager
def start_service(key: str, root: Path, args: argparse.Namespace) -> Iterator[Service]:
    """Start configuration ``key`` in ``root``; stop every process of it (and drop its database) after."""
    _label, database, n = CONFIGS[key]
    if n is None:
        from tether.local import LocalStack

        with contextlib.ExitStack() as cleanup:
            service_args: tuple[str, ...] = ()
            if database == "postgres":
                url = cleanup.enter_context(postgres_database())
                service_args = ("--db-url", url, "--db-threads", str(args.db_threads))
            home = root / "service"
            env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
            env["TETHER_HOME"] = str(home)
            stack = LocalStack(home=home, env=env, service_args=service_args)
            cleanup.callback(stack.stop_service)
            stack.start_service()
            yield Service([stack.service_url], stack.token, [home / "service.log"], 1)
        return
    from replicas import Replicas

    group = Replicas(root, n=n, db_threads=args.db_threads, log_level="warning", advertise=not args.bus_only)
    try:
        urls = [group.lb_url] * n if args.through_haproxy else [group.url(i) for i in range(n)]
        # endpoints connect through haproxy, as in production: when a replica is SIGKILLed they
        # reconnect to a live one (connected to a replica's own port they would wait for it)
        endpoint_urls = [group.lb_url] * n if args.kill else urls
        yield Service(urls, group.token, [root / f"replica-{i}.log" for i in range(n)], n, group.holder_of, group,
                      endpoint_urls)
    finally:
        group.close()


def run_config(key: str, args: argparse.Namespace) -> Result:
    """Measure one configuration: endpoints online, latency, then throughput; always tear down."""
    from tether import Client, Executor
    from tether.connection import Connection

    label, _database, n = CONFIGS[key]
    result: Result = {"config": key, "label": label, "replicas": n or 1, "endpoints": args.endpoints, "error": None,
                      "log_problems": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-replicas-{key}-") as tmp:
        root = Path(tmp)
        children = Children()
        service = None
        try:
            with start_service(key, root, args) as service:
                try:
                    _measure(key, service, root, children, args, result, Client, Executor)
                finally:
                    children.stop_all()
                    Connection.close_all()
        except Exception as exc:  # report, and go on with the next configuration
            result["error"] = f"{type(exc).__name__}: {exc}"
            _log(f"[{key}] FAILED:\n{traceback.format_exc()}")
        finally:
            children.stop_all()
            if service is not None:
                result["log_problems"] = _log_problems(service.logs)
    result["wall_s"] = time.perf_counter() - t_start
    return result



def _bench_env(root: Path) -> dict[str, str]:
    """The environment of a benchmark's children: no service of the caller's, homes under ``root``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN")}
    env.update(TETHER_HOME=str(root / "farm"), TETHER_LOG_LEVEL="WARNING")
    return env


def start_farm(children: Children, service: Service, env: dict[str, str], root: Path, urls: list[str],
               label: str) -> tuple[Any, list[str]]:
    """Start the endpoint farm (one endpoint per URL of ``urls``) and wait until every endpoint
    is online: (the farm's process, the endpoints' ids in ``urls``' order)."""
    from tether import Client

    farm = children.start([sys.executable, "-c", FARM, json.dumps(urls), service.token], env, root / "farm.log")
    line = farm.stdout.readline() if farm.stdout else ""
    if not line:
        raise RuntimeError(f"[{label}] the endpoint farm exited ({farm.wait()}) before registering")
    ids: list[str] = json.loads(line)
    with Client(service.urls[0], service.token) as client:
        while sum(e["online"] for e in client.list_endpoints()) < len(urls):
            if farm.poll() is not None:
                raise RuntimeError(f"[{label}] the endpoint farm exited ({farm.returncode})")
            time.sleep(0.1)
    return farm, ids

def _measure(key: str, service: Service, root: Path, children: Children, args: argparse.Namespace,
             result: Result, Client: Any, Executor: Any) -> None:  # noqa: N803 - classes passed in
    """The measurement of :func:`run_config`, with its processes already in place."""
    n = service.replicas
    _log(f"[{key}] service up ({n} replica(s)); starting {args.endpoints} endpoints")
    env = _bench_env(root)
    endpoint_urls = [(service.endpoint_urls or service.urls)[i % n] for i in range(args.endpoints)]
    t0 = time.perf_counter()
    service.logs.append(root / "farm.log")
    farm, endpoint_ids = start_farm(children, service, env, root, endpoint_urls, key)
    result["online_s"] = time.perf_counter() - t0
    _log(f"[{key}] {args.endpoints} endpoints online in {result['online_s']:.1f}s; starting {args.clients} clients")

    clients = []
    for j in range(args.clients):
        spec = {"url": service.urls[j % n], "token": service.token, "endpoints": endpoint_ids,
                "rounds": [r for r in range(args.tasks_per_endpoint) if r % args.clients == j]}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_client", json.dumps(spec)]
        clients.append(children.start(cmd, {**env, "TETHER_HOME": str(root / f"client-{j}")}, root / f"client-{j}.log"))
        service.logs.append(root / f"client-{j}.log")
    for j, proc in enumerate(clients):
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"client {j} exited ({proc.wait()}) before its warm-up finished")

    target = endpoint_ids[1 % len(endpoint_ids)]
    if service.holder_of is not None and n > 1:  # the round trips cross replicas: an endpoint not on r0
        target = next((e for e in endpoint_ids if service.holder_of(e) not in (0, None)), target)
    if service.holder_of is not None:
        client_side = "client via haproxy" if args.through_haproxy else "client on r0"
        holder = service.holder_of(target)
        steered = n > 1 and holder not in (0, None) and not args.bus_only
        result["latency_path"] = (f"{client_side} -> endpoint on r{holder}"
                                  + (f" (tasks sent to r{holder} directly)" if steered else ""))
    _log(f"[{key}] clients warm; latency n={args.n_latency} ({result.get('latency_path', 'one service')})")
    with Executor(endpoint_id=target, service=service.urls[0], token=service.token) as ex:
        result["latency"] = peers.measure_latency(ex.submit, n=args.n_latency, warmup=args.warmup_latency)
    _log(f"[{key}] p50 {result['latency']['p50_ms']:.2f} ms; throughput, "
         f"{args.endpoints * args.tasks_per_endpoint:,} tasks")

    usage = CpuUsage(service, farm, clients)
    for proc in clients:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    reports = []
    for j, proc in enumerate(clients):
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise RuntimeError(f"client {j} exited ({proc.wait()}) without a result")
        reports.append(json.loads(line))
    tasks = sum(r["n"] for r in reports)
    seconds = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
    result["throughput"] = {"n": tasks, "seconds": seconds, "tasks_per_s": tasks / seconds,
                            "wrong": sum(r["wrong"] for r in reports)}
    result["cpu"] = usage.shares()
    _log(f"[{key}] {tasks / seconds:,.0f} tasks/s, {result['throughput']['wrong']} wrong; "
         f"{limiting_resource(result['cpu'])}")
    if args.kill and service.group is not None:
        result["kill"] = kill_a_replica(service, endpoint_ids, args)
        k = result["kill"]
        _log(f"[{key}] SIGKILL r{k['victim']}: flowing again after {k['recover_s']:.2f} s, {k['lost']} lost, "
             f"{k['duplicated']} duplicated")
    _log(f"[{key}] stopping")


class CpuUsage:
    """CPU seconds spent by each kind of process between its creation and :meth:`shares`: what
    the throughput phase cost, and so which resource limits it on this machine."""

    def __init__(self, service: Service, farm: subprocess.Popen[str], clients: list[subprocess.Popen[str]]):
        import psutil

        group = service.group
        replica_pids = [p.pid for p in group.procs if p is not None] if group is not None else []
        if group is None:  # a lone service: the process listening on its port
            replica_pids = [c.pid for c in psutil.net_connections("tcp")
                            if c.status == "LISTEN" and c.laddr and c.pid
                            and f":{c.laddr.port}" in service.urls[0]][:1]
        self.kinds: dict[str, list[Any]] = {
            "replicas": [psutil.Process(pid) for pid in replica_pids],
            "endpoints": [psutil.Process(farm.pid)],
            "clients": [psutil.Process(c.pid) for c in clients],
            "postgres (all databases)": [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"],
            "rabbitmq": [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"],
            "haproxy": [psutil.Process(group.lb.pid)] if group is not None and group.lb is not None else [],
        }
        self.start = {kind: self._seconds(procs) for kind, procs in self.kinds.items()}
        self.busy0 = self._machine_busy()
        self.t0 = time.monotonic()

    @staticmethod
    def _seconds(procs: list[Any]) -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(Exception):  # gone meanwhile
                times = proc.cpu_times()
                total += times.user + times.system + sum(c.cpu_times().user + c.cpu_times().system
                                                         for c in proc.children(recursive=True))
        return total

    @staticmethod
    def _machine_busy() -> float:
        import psutil

        t = psutil.cpu_times()  # guest time is counted in user already
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def shares(self) -> dict[str, float]:
        """Cores used by each kind (1.0 = one core busy all along), and the machine's in all."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        out = {kind: (self._seconds(procs) - self.start[kind]) / wall for kind, procs in self.kinds.items()}
        # /proc/stat ticks are coarse (and this VM's run slightly fast): over a short phase the
        # machine's figure can pass its core count; it is clamped there
        out["machine"] = min((self._machine_busy() - self.busy0) / wall, float(os.cpu_count() or 1))
        out["cores"] = float(os.cpu_count() or 1)
        return out


def limiting_resource(cpu: dict[str, float]) -> str:
    """What limited the throughput, in words: the CPU when the machine's cores were busy (and
    who used them), else waiting (commits, round trips) rather than computing."""
    kinds = {k: v for k, v in cpu.items() if k not in ("machine", "cores")}
    top = sorted(kinds.items(), key=lambda kv: -kv[1])
    used = ", ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.05)
    others = max(0.0, cpu["machine"] - sum(kinds.values()))
    if cpu["machine"] >= 0.85 * cpu["cores"]:
        return (f"limited by CPU: {cpu['machine']:.2f} of {cpu['cores']:.0f} cores busy ({used}; "
                f"other processes {others:.2f})")
    return (f"not CPU-bound ({cpu['machine']:.2f} of {cpu['cores']:.0f} cores busy: {used}; other processes "
            f"{others:.2f}): waiting on commits and round trips")


def kill_a_replica(service: Service, endpoint_ids: list[str], args: argparse.Namespace) -> Result:
    """SIGKILL the replica holding the most endpoints mid-batch (with one replica: restart it at
    once, as systemd would) and see what users see: how long until results of its endpoints
    flow again, and whether any task is lost or resolved twice.

    The client connects through haproxy, as the endpoints do: a client or endpoint of the dead
    replica reconnects to a live one (or to the restarted one).
    """
    from collections import Counter

    from tether import Executor

    group = service.group
    holders = {e: group.holder_of(e) for e in endpoint_ids}
    counts = Counter(h for h in holders.values() if h is not None)
    victim = counts.most_common(1)[0][0] if counts else 0
    on_victim = {e for e, h in holders.items() if h == victim}
    per_endpoint = max(1, args.kill_tasks // len(endpoint_ids))
    executors = {e: Executor(endpoint_id=e, service=group.lb_url, token=service.token) for e in endpoint_ids}
    resolved: Counter[str] = Counter()
    done_at: dict[str, float] = {}

    def on_done(fut: Any) -> None:
        resolved[fut.task_id] += 1
        done_at.setdefault(fut.task_id, time.monotonic())

    try:
        futures = []
        for r in range(per_endpoint):
            for e, ex in executors.items():
                fut = ex.submit(peers.noop, r)
                fut.add_done_callback(on_done)
                futures.append((e, r, fut))
        deadline = time.monotonic() + 300
        while sum(f.done() for _, _, f in futures) < len(futures) // 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        t_kill = time.monotonic()
        group.kill(victim, signal.SIGKILL)
        if service.replicas == 1:
            group.start(victim)  # the only replica: back as fast as a supervisor restarts it
        pending_on_victim = [f for e, _, f in futures if e in on_victim and not f.done()]
        wrong = lost = 0
        for _e, r, fut in futures:
            try:
                wrong += fut.result(timeout=300) != r
            except Exception:  # noqa: BLE001 - a future that never resolves is a lost task
                lost += 1
        t_all = time.monotonic()
        time.sleep(0.2)  # a second resolution would come with the first's frame or just after
        after = sorted(done_at[f.task_id] for f in pending_on_victim if f.task_id in done_at)
        return {"victim": victim, "replicas": service.replicas, "tasks": len(futures),
                "pending_on_victim": len(pending_on_victim),
                "recover_s": (after[0] - t_kill) if after else float("nan"),
                "all_done_s": t_all - t_kill, "lost": lost, "wrong": wrong,
                "duplicated": sum(c - 1 for c in resolved.values() if c > 1)}
    finally:
        for ex in executors.values():
            ex.shutdown(wait=False)


#: what marks a log line worth reporting: service errors, and the endpoints' and clients' own
#: words for a lost connection or a refused credential
PROBLEM_WORDS = ("ERROR", "Traceback", "CRITICAL", "Exception", "database error", "rejected", "connection to service")


def _log_problems(logs: list[Path]) -> list[str]:
    """Lines of the service logs that say something went wrong (the benchmark is also a check)."""
    problems = []
    for path in logs:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if any(word in line for word in PROBLEM_WORDS):
                    problems.append(f"{path.name}: {line.strip()[:300]}")
    return problems


# --------------------------------------------------------------------------- paired latency


def paired_latency(args: argparse.Namespace) -> list[Result]:
    """Every configuration of ``--only`` up at once (and, for 2-3 replicas, the same without
    direct connections: ``--bus-only``), then ``--n-latency`` rounds of one sequential round trip
    to each in turn: the load other processes put on the machine falls on all of them alike, so
    their p50 ratios hold within the run (a p50 measured a minute later, in the next
    configuration, moved 2-3x with that load alone).

    Each configuration's client connects to replica 0 and sends to an endpoint held by another
    replica (as the sequential benchmark does); endpoints connect to the replicas directly."""
    from tether import Executor
    from tether.connection import Connection

    variants: list[tuple[str, str, bool]] = []  # (label, configuration, bus only)
    for key in args.configs:
        replicas = CONFIGS[key][2]
        variants.append((key, key, args.bus_only))
        if replicas and replicas > 1 and not args.bus_only:
            variants.append((f"{key} --bus-only", key, True))
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        targets: dict[str, Any] = {}
        for label, key, bus_only in variants:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-paired-{key}-")))
            variant_args = argparse.Namespace(**{**vars(args), "bus_only": bus_only, "kill": False})
            service = stack.enter_context(start_service(key, root, variant_args))
            children = Children()
            stack.callback(children.stop_all)
            n = service.replicas
            urls = [service.urls[i % n] for i in range(args.endpoints)]
            _, ids = start_farm(children, service, _bench_env(root), root, urls, label)
            target = ids[1 % len(ids)]
            if service.holder_of is not None and n > 1:
                target = next((e for e in ids if service.holder_of(e) not in (0, None)), target)
            ex = Executor(endpoint_id=target, service=service.urls[0], token=service.token)
            stack.callback(ex.shutdown, wait=False)
            for i in range(args.warmup_latency):
                ex.submit(peers.noop, i).result(timeout=peers.TASK_TIMEOUT_S)
            targets[label] = ex
            _log(f"[paired] {label}: {args.endpoints} endpoints online, warm")
        stack.callback(Connection.close_all)
        samples: dict[str, list[float]] = {label: [] for label in targets}
        for i in range(args.n_latency):
            for label, ex in targets.items():
                t0 = time.perf_counter()
                if ex.submit(peers.noop, i).result(timeout=peers.TASK_TIMEOUT_S) != i:
                    raise RuntimeError(f"[{label}] noop({i}) returned a wrong value")
                samples[label].append((time.perf_counter() - t0) * 1000.0)
        for label, key, _bus_only in variants:
            s = sorted(samples[label])
            results.append({"config": label, "endpoints": args.endpoints, "replicas": CONFIGS[key][2] or 1,
                            "p50_ms": s[len(s) // 2], "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))]})
    base = next((r for r in results if r["config"] == "c"), None)
    for r in results:
        r["p50_vs_c"] = r["p50_ms"] / base["p50_ms"] if base else None
    return results


# --------------------------------------------------------------------------- report


def add_ratios(results: list[Result]) -> None:
    """Ratios to the embedded default (a) and to one replica (c), among runs with as many endpoints."""
    def ratio(r: Result, base: Result | None, kind: str, key: str) -> float | None:
        if base and r.get(kind) and base.get(kind):
            return r[kind][key] / base[kind][key]
        return None

    for r in results:
        peers_ = [b for b in results if b["endpoints"] == r["endpoints"] and not b["error"]]
        a = next((b for b in peers_ if b["config"] == "a"), None)
        c = next((b for b in peers_ if b["config"] == "c"), None)
        r["p50_ratio"], r["tps_ratio"] = ratio(r, a, "latency", "p50_ms"), ratio(r, a, "throughput", "tasks_per_s")
        r["p50_vs_c"], r["tps_vs_c"] = ratio(r, c, "latency", "p50_ms"), ratio(r, c, "throughput", "tasks_per_s")


HEADERS = ["config", "endpoints", "p50 ms", "p99 ms", "tasks/s", "tasks/s / a", "tasks/s / c", "p50 / c",
           "SIGKILL: recover s", "lost", "dup", "cores busy (replicas, postgres)"]


def _rows(results: list[Result]) -> list[list[str]]:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None or value != value else format(value, spec)

    rows = []
    for r in results:
        lat, thr, kill, cpu = r.get("latency") or {}, r.get("throughput") or {}, r.get("kill") or {}, r.get("cpu")
        name = f"{r['config']}: {r['label']}" + (f" (FAILED: {r['error']})" if r["error"] else "")
        if thr.get("wrong") or kill.get("wrong"):
            name += f" ({thr.get('wrong', 0) + kill.get('wrong', 0)} WRONG)"
        busy = "-" if not cpu else (f"{cpu['machine']:.2f}/{cpu['cores']:.0f} "
                                    f"({cpu['replicas']:.2f}, {cpu['postgres (all databases)']:.2f})")
        rows.append([name, str(r["endpoints"]), fmt(lat.get("p50_ms"), ".2f"), fmt(lat.get("p99_ms"), ".2f"),
                     fmt(thr.get("tasks_per_s"), ",.0f"), fmt(r["tps_ratio"], ".2f"), fmt(r["tps_vs_c"], ".2f"),
                     fmt(r["p50_vs_c"], ".2f"), fmt(kill.get("recover_s"), ".2f"),
                     str(kill["lost"]) if kill else "-", str(kill["duplicated"]) if kill else "-", busy])
    return rows


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    """Render with rich when installed, else as aligned plain text; then what limited each run."""
    title = (f"no-op tasks: {args.tasks or args.tasks_per_endpoint} {'in all' if args.tasks else 'per endpoint'}, "
             f"{args.clients} clients, latency n={args.n_latency} "
             f"({os.cpu_count()} CPUs, clients {'through haproxy' if args.through_haproxy else 'direct to replicas'}"
             f"{', endpoints through haproxy' if args.kill else ''}"
             f"{', no direct connections: cross-replica tasks through the broker' if args.bus_only else ''})")
    rows = _rows(results)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADERS)]
        print(title)
        for line in [HEADERS, ["-" * w for w in widths], *rows]:
            cells = zip(line, widths, strict=True)
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
    else:
        table = Table(title=title)
        for i, h in enumerate(HEADERS):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=220).print(table)
    print("What limited each run (cores busy during the throughput phase, by kind of process):")
    for r in results:
        if r.get("cpu"):
            print(f"  {r['config']} ({r['endpoints']} endpoints): {limiting_resource(r['cpu'])}")
    print(f"All of it shares this machine's {os.cpu_count()} cores: replicas, PostgreSQL, RabbitMQ, haproxy, the "
          "endpoints and the clients. A second replica adds no core here; what it can show is that replicas "
          "cost nothing (tasks/s / c near 1), not that they add capacity.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoints", default="10,100",
                   help="endpoint daemons (thread engine, 1 worker each); a comma list runs each count")
    p.add_argument("--tasks-per-endpoint", type=int, default=50, help="throughput: no-ops sent to each endpoint")
    p.add_argument("--tasks", type=int, default=1000,
                   help="throughput: this many no-ops in all, whatever the endpoint count (0: --tasks-per-endpoint)")
    p.add_argument("--clients", type=int, default=3, help="client processes, spread over the replicas")
    p.add_argument("--n-latency", type=int, default=200, help="timed sequential round trips")
    p.add_argument("--warmup-latency", type=int, default=20)
    p.add_argument("--db-threads", type=int, default=4, help="PostgreSQL: store threads per replica")
    p.add_argument("--only", default="a,b,c,d,e", help="configurations to run, of: " + ",".join(CONFIGS))
    p.add_argument("--through-haproxy", action="store_true",
                   help="(c)-(e): endpoints and clients connect through haproxy, not to a replica directly")
    p.add_argument("--bus-only", action="store_true",
                   help="(c)-(e): replicas advertise no URL, so clients stay on their replica and tasks for "
                        "endpoints held elsewhere cross through the broker (the path before direct connections)")
    p.add_argument("--paired-latency", action="store_true",
                   help="latency only: every configuration of --only up at once (2-3 replicas also with "
                        "--bus-only), round trips to each in turn, so their ratios share the machine's load")
    p.add_argument("--kill-tasks", type=int, default=1000,
                   help="(c)-(e): tasks in flight when a replica is SIGKILLed (0: no kill)")
    p.add_argument("--quick", action="store_true", help="a fast check: 10 endpoints, 10 tasks each, 50 round trips")
    p.add_argument("--json", metavar="PATH", help="also write raw figures as JSON")
    p.add_argument("--_client", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.endpoints, args.tasks, args.n_latency, args.warmup_latency = "10", 100, 50, 10
        args.kill_tasks = min(args.kill_tasks, 200)
    args.endpoint_counts = [int(x) for x in str(args.endpoints).split(",") if x.strip()]
    args.per_endpoint = {n: max(1, args.tasks // n) if args.tasks else args.tasks_per_endpoint
                         for n in args.endpoint_counts}
    args.kill = args.kill_tasks > 0
    args.configs = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if min(args.endpoint_counts) < 2:
        p.error("--endpoints must be at least 2 (the latency goes to endpoint 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM becomes SystemExit, so every `finally` below stops what it started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args._client:
        return client_main(args._client)
    import cloudpickle

    from replicas import missing

    cloudpickle.register_pickle_by_value(peers)  # the farm's workers cannot import benchmarks/peers.py
    if any(CONFIGS[c][1] == "postgres" for c in args.configs) and (why := missing()):
        print(f"cannot run the PostgreSQL configurations: {why}", file=sys.stderr)
        return 2
    if args.paired_latency:
        paired = []
        for count in args.endpoint_counts:
            args.endpoints = count
            paired.extend(paired_latency(args))
        print(f"sequential no-op round trips, n={args.n_latency} per configuration, interleaved one by one "
              "(client on r0, endpoint on another replica when there are several)")
        for r in paired:
            ratio = "-" if r["p50_vs_c"] is None else f"{r['p50_vs_c']:.2f}"
            print(f"  {r['config']:<14} {r['endpoints']:>4} endpoints  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  p50 / c {ratio}")
        if args.json:
            Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "paired": paired}, indent=2) + "\n")
        return 0
    results = []
    for count in args.endpoint_counts:
        args.endpoints, args.tasks_per_endpoint = count, args.per_endpoint[count]
        results.extend(run_config(key, args) for key in args.configs)
    add_ratios(results)
    print_table(results, args)
    for r in results:
        for line in r["log_problems"][:20]:
            print(f"  log ({r['config']}): {line}")
    if args.json:
        meta = {"argv": sys.argv[1:], "python": sys.version.split()[0], "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "unix_time": time.time()}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    failed = any(r["error"] or (r.get("throughput") or {}).get("wrong")
                 or any((r.get("kill") or {}).get(k) for k in ("lost", "duplicated", "wrong")) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
