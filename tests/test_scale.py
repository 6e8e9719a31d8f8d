"""A million no-op tasks queued for an offline endpoint: they all drain when it starts, the
endpoint never holds more than its window, and no process's memory grows with the count.

Slow (minutes): marked ``slow``, so the README's test command leaves it out; ``.ci/run`` runs it
(``pytest -m slow``), and so can you.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tether import Executor
from tether.local import local_stack

import helpers

MiB = 1024 * 1024
N = 1_000_000
WORKERS, PREFETCH = 2, 1000
MARK = 200_000  # RSS at this many results is the baseline the end is compared with


@dataclass
class RssSampler:
    """Samples the RSS of the client, the service, the endpoint and its workers in a thread,
    each sample tagged with how many results the client had checked by then."""

    pids: dict[str, int]
    endpoint_pid: int
    progress: list[int]  # progress[0]: results checked so far
    samples: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _rss(self) -> dict[str, int]:
        out = {}
        for name, pid in self.pids.items():
            try:
                out[name] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        try:
            workers = psutil.Process(self.endpoint_pid).children(recursive=True)
            out["workers"] = max((w.memory_info().rss for w in workers), default=0)  # the largest worker
        except psutil.Error:
            pass
        return out

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.samples.append((self.progress[0], self._rss()))

    def at(self, done: int) -> dict[str, int]:
        """The first sample taken with at least ``done`` results checked."""
        return next(rss for n, rss in self.samples if n >= done)

    def peak(self) -> dict[str, int]:
        peaks: dict[str, int] = {}
        for _, rss in self.samples:
            for name, value in rss.items():
                peaks[name] = max(peaks.get(name, 0), value)
        return peaks


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_million_queued_tasks_drain_with_flat_memory(tmp_path: Path) -> None:
    t_start = time.monotonic()
    with local_stack(tmp_path / "home", workers=WORKERS, service_args=("--prefetch", str(PREFETCH))) as stack:
        stack.stop_endpoint()
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            t0 = time.monotonic()
            futures = [ex.submit(helpers.square, i) for i in range(N)]
            submitted = time.monotonic() - t0
            last = futures[-1]
            deadline = time.monotonic() + 600
            while last.state != "waiting-for-endpoint":  # acknowledged by the service: stored
                assert time.monotonic() < deadline, "the backlog was not stored in time"
                time.sleep(0.1)
            stored = time.monotonic() - t0

            progress = [0]
            t1 = time.monotonic()
            stack.start_endpoint()
            endpoint_pid = stack.endpoint_pid()
            assert endpoint_pid is not None
            sampler = RssSampler({"client": os.getpid(), "service": stack.service_pid(), "endpoint": endpoint_pid},
                                 endpoint_pid, progress)
            thread = threading.Thread(target=sampler.run, name="rss-sampler", daemon=True)
            thread.start()
            try:
                # check every value as it comes and let go of its future, as a user streaming
                # results would: what the client still holds then is Tether's, not the test's
                for i in range(N):
                    assert futures[i].result(timeout=300) == i * i, i
                    futures[i] = None  # type: ignore[call-overload]
                    progress[0] = i + 1
            finally:
                sampler.stop.set()
                thread.join()
            drained = time.monotonic() - t1
            end = sampler._rss()
        stack.stop_endpoint()
        status = json.loads((stack.endpoint_dir() / "status.json").read_text())

    mark, peak = sampler.at(MARK), sampler.peak()
    growth = {name: end[name] - mark[name] for name in end if name in mark}
    print(f"\n{N:,} tasks: submitted in {submitted:.1f}s ({N / submitted:,.0f}/s), stored by {stored:.1f}s "
          f"({N / stored:,.0f}/s), drained in {drained:.1f}s ({N / drained:,.0f}/s); endpoint held at most "
          f"{status['peak_inflight']}; test took {time.monotonic() - t_start:.0f}s")
    print("RSS at 200k results / at the end / peak (MiB): " + ", ".join(
        f"{k} {mark.get(k, 0) / MiB:.0f}/{end.get(k, 0) / MiB:.0f}/{peak.get(k, 0) / MiB:.0f}" for k in end))
    assert 0 < status["peak_inflight"] <= WORKERS + PREFETCH, status
    # flat: nothing grows with the tasks run between the 200,000th result and the millionth (a
    # leak of 100 bytes per task would show as 80 MB here; the margins allow for allocator noise)
    limits = {"client": 48 * MiB, "service": 48 * MiB, "endpoint": 24 * MiB, "workers": 16 * MiB}
    for name, grown in growth.items():
        assert grown < limits[name], (name, {k: f"{v / MiB:.1f} MiB" for k, v in growth.items()})
