"""Large-payload round trips: an identity task (argument in, the same bytes out) through Tether,
against a plain loopback echo of the same bytes and against Parsl HTEX and Dask LocalCluster.

Usage::

    python benchmarks/bench_payload.py [--sizes 1,100,1024] [--peer-max 100] [--repeat 3] [--json PATH]

Sizes are in MiB. ``loopback`` sends the bytes to a TCP echo server on 127.0.0.1 and reads
them back: the floor for moving them there and back on this host (Tether moves them four
times, client -> service -> endpoint and back, and each time through the service's disk).
``cat copy`` is the issue's yardstick: a file copied by ``cat`` into a local TCP socket and by
``cat`` out of it into another file, one way; ``vs cat`` is the speed of Tether's round trip
(the bytes go both ways) as a fraction of two such copies (issue 20 asks for >= 0.3 at 1 GiB),
each the median of ``--repeat`` runs (the first round trip, slower, is shown beside it).
Parsl and Dask run for sizes up to ``--peer-max`` MiB (they pickle whole payloads into
messages; a gibibyte costs them several copies in memory). The service's peak RSS (and its
growth) during Tether's runs is sampled too: it must stay flat, whatever the size; and the CPU
seconds of every Tether process per round trip, which other load on the host disturbs less
than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (needs the sys.path line above when run as a script)

MiB = 1024 * 1024
CHUNK = 1024 * 1024


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loopback_echo(data: bytes) -> float:
    """Seconds to send ``data`` to an echo server on 127.0.0.1 and receive it back."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            left = len(data)
            while left:
                piece = conn.recv(CHUNK)
                conn.sendall(piece)
                left -= len(piece)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    back = bytearray(len(data))
    view = memoryview(back)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        got = 0
        while got < len(data):
            got += sock.recv_into(view[got:], min(CHUNK, len(data) - got))
        sender.join()
    elapsed = time.perf_counter() - t0
    thread.join()
    server.close()
    assert back == data
    return elapsed


def cat_copy(data: bytes) -> float:
    """Seconds for ``cat FILE > socket`` on one side and ``cat < socket > FILE`` on the other,
    over 127.0.0.1: what copying the bytes once through a local socket costs with no program
    in the way (the source file is in the page cache, as Tether's first spill would be)."""
    with tempfile.TemporaryDirectory(prefix="bench-cat-") as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        src.write_bytes(data)
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        t0 = time.perf_counter()
        sender = subprocess.Popen(["bash", "-c", f'exec cat "$0" > /dev/tcp/127.0.0.1/{port}', str(src)])
        conn, _ = server.accept()
        with conn, open(dst, "wb") as out:
            receiver = subprocess.Popen(["cat"], stdin=conn.fileno(), stdout=out)
            conn.close()
            sender.wait()
            receiver.wait()
        elapsed = time.perf_counter() - t0
        server.close()
        assert dst.stat().st_size == len(data)
    return elapsed


def _round_trips(submit: Callable[..., Any], data: bytes, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` identity round trips, in order (one warm-up first, untimed)."""
    assert submit(peers.noop, b"warm").result(timeout=120) == b"warm"
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = submit(peers.noop, data).result(timeout=1200)
        times.append(time.perf_counter() - t0)
        assert len(out) == len(data) and out == data
        del out
    return times


class _CPUSeconds:
    """CPU seconds (user + system) spent by this process (the client), the service, the endpoint
    daemon and its workers: what a round trip costs whatever else the host is running (wall
    times on a shared machine are not), in all and per process, to see where it goes."""

    def __init__(self, service_pid: int, endpoint_pid: int | None):
        import psutil

        self.roles = [("client", psutil.Process()), ("service", psutil.Process(service_pid))]
        if endpoint_pid:
            self.roles.append(("endpoint", psutil.Process(endpoint_pid)))
        self.start = self._per_role()

    def _per_role(self) -> dict[str, float]:
        """Seconds per role: a process's children count with it (the endpoint's workers are
        ``workers``; each process once, whichever is whose child)."""
        seen: set[int] = set()
        spent: dict[str, float] = {}
        for role, process in self.roles:
            for i, p in enumerate([process, *process.children(recursive=True)]):
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                try:
                    times = p.cpu_times()
                except Exception:  # noqa: BLE001 - a worker that just ended
                    continue
                name = "workers" if role == "endpoint" and i else role
                spent[name] = spent.get(name, 0.0) + times.user + times.system
        return spent

    def spent(self) -> float:
        return sum(self.per_role().values())

    def per_role(self) -> dict[str, float]:
        now = self._per_role()
        return {role: now[role] - self.start.get(role, 0.0) for role in now}


class _PeakRSS:
    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss  # the peak is absolute
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def growth(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak - self.start


def run(sizes: list[int], peer_max: int, repeat: int, only: set[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"MiB": s} for s in sizes]
    payloads = {s: os.urandom(s * MiB) for s in sizes}
    for row in rows:
        row["loopback_s"] = statistics.median(loopback_echo(payloads[row["MiB"]]) for _ in range(repeat))
        row["cat_copy_s"] = statistics.median(cat_copy(payloads[row["MiB"]]) for _ in range(repeat))
    if "tether" in only:
        from tether import Executor
        from tether.local import local_stack

        peers._export_import_root()
        with local_stack(engine="process", workers=1) as stack, \
                Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                         progress=False) as ex:
            for row in rows:
                _log(f"tether: {row['MiB']} MiB")
                rss = _PeakRSS(stack.service_pid())
                rounds = repeat
                cpu = _CPUSeconds(stack.service_pid(), stack.endpoint_pid())
                times = _round_trips(ex.submit, payloads[row["MiB"]], rounds)
                # the median, as for the copies it is compared with; the first, whose processes
                # touch their memory for the first time, is the slowest: shown beside it
                row["tether_s"], row["tether_first_s"] = statistics.median(times), times[0]
                per_role = cpu.per_role()
                row["tether_cpu_s"] = round(sum(per_role.values()) / rounds, 2)  # the warm-up's share is negligible
                row["tether_cpu_by_process_s"] = {role: round(s / rounds, 2) for role, s in per_role.items()}
                row["service_rss_growth_MiB"] = round(rss.growth() / MiB, 1)
                row["service_rss_peak_MiB"] = round(rss.peak / MiB, 1)
    for name, factory in (("parsl_htex", peers.parsl_htex), ("dask_local", peers.dask_local)):
        if name not in only:
            continue
        try:
            with factory(1) as submit:
                for row in rows:
                    if row["MiB"] > peer_max:
                        continue
                    _log(f"{name}: {row['MiB']} MiB")
                    row[f"{name}_s"] = statistics.median(_round_trips(submit, payloads[row["MiB"]], repeat))
        except Exception as exc:  # noqa: BLE001 - a peer that is not installed or fails is reported, not fatal
            _log(f"{name} failed: {type(exc).__name__}: {exc}")
    return rows


def _cpu(row: dict[str, Any]) -> str:
    """The CPU seconds of a round trip, and of each process: '12.7 (client 2.8, service 6.0, ...)'."""
    if "tether_cpu_s" not in row:
        return "-"
    each = ", ".join(f"{role} {s}" for role, s in row.get("tether_cpu_by_process_s", {}).items())
    return f"{row['tether_cpu_s']} ({each})" if each else str(row["tether_cpu_s"])


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("MiB", "loopback s", "cat copy s", "tether s", "tether first s", "tether/loopback", "vs cat",
            "tether MiB/s", "tether CPU s",
            "service RSS +MiB", "service RSS peak MiB", "parsl s", "dask s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        tether = r.get("tether_s")

        def fmt(v: Any) -> str:
            return "-" if v is None else f"{v:.3f}"

        lines.append(" | ".join([
            str(r["MiB"]), fmt(r["loopback_s"]), fmt(r["cat_copy_s"]), fmt(tether), fmt(r.get("tether_first_s")),
            "-" if tether is None else f"{tether / r['loopback_s']:.1f}x",
            "-" if tether is None else f"{2 * r['cat_copy_s'] / tether:.2f}",
            "-" if tether is None else f"{r['MiB'] / tether:.0f}", _cpu(r),
            str(r.get("service_rss_growth_MiB", "-")), str(r.get("service_rss_peak_MiB", "-")),
            fmt(r.get("parsl_htex_s")), fmt(r.get("dask_local_s")),
        ]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,100,1024", help="payload sizes in MiB, comma-separated")
    parser.add_argument("--peer-max", type=int, default=100, help="largest size (MiB) run on Parsl and Dask")
    parser.add_argument("--repeat", type=int, default=3, help="round trips per size (the median is shown)")
    parser.add_argument("--only", default="tether,parsl_htex,dask_local")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = run([int(s) for s in args.sizes.split(",")], args.peer_max, args.repeat, set(args.only.split(",")))
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
