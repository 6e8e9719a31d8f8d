"""The process engine's workers inside a container image: both halves of the hand-over.

A process-engine worker shares pipes and a lock in shared memory with the daemon (see
``process.py``), which cannot cross into a container. So a containerized worker is two
processes: the usual worker on the host (``worker.main``: the same queue, the same gate, the
same messages) with a :class:`ContainerRunner` in place of running the task itself, and, in the
image, :func:`main`, which runs each task it is handed on its stdin and answers on its stdout.
The runtime (``podman run -i``, ``apptainer exec``, ...) carries those two streams, so no
runtime needs sockets, shared memory or networking for it. A no-op task pays one more pipe
round trip than on the host; the host path is not touched (``runner`` is None there).

The container lives exactly as long as its host half: killing the host half's process group
(cancel, ``stop``) kills the runtime's client, which closes the container's stdin; :func:`main`
sees the hang-up, even in the middle of a task, and exits, and a ShellFunction's command dies
with it (its supervisor watches its worker, see ``tether.shell``).
"""

from __future__ import annotations

import collections
import os
import select
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from tether.endpoint.execute import Allowlist, TaskSpec, run_task
from tether.results import failure, pack

#: lines of the container's stderr quoted when it ends under a task
STDERR_LINES = 20


class ContainerExited(RuntimeError):
    """The container running the worker ended (or never started) while a task was handed to it."""


class ContainerRunner:
    """Runs tasks for ``worker.main`` in a container started with ``argv``; picklable (it travels
    to the spawned worker), the container itself is started there, by :meth:`start`."""

    def __init__(self, argv: list[str], settings: tuple[Allowlist | frozenset[str] | None, dict[str, Any] | None,
                                                         bool]) -> None:
        self.argv = argv
        self.settings = settings  # (allowed methods, engine info, python sandbox), the image's first message
        self.proc: subprocess.Popen[bytes] | None = None
        self.bodies: dict[str, bytes] = {}  # every function body seen: a restarted container needs them
        self.known: set[str] = set()  # functions the current container has

    def __getstate__(self) -> dict[str, Any]:
        return {"argv": self.argv, "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["argv"], state["settings"])  # type: ignore[misc]

    def start(self) -> None:
        """Start the container (at the worker's start: its start-up overlaps the first task's wait)."""
        self.known = set()
        self.relay: threading.Thread | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except OSError as exc:
            self.proc = None
            self.tail.append(f"cannot run {self.argv[0]!r}: {exc}")
            return
        self.relay = threading.Thread(target=self._relay_stderr, args=(self.proc, self.tail), daemon=True,
                                      name="tether-container-stderr")
        self.relay.start()
        self.tasks = Connection(os.dup(self.proc.stdin.fileno()), readable=False)  # type: ignore[union-attr]
        self.results = Connection(os.dup(self.proc.stdout.fileno()), writable=False)  # type: ignore[union-attr]
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.stdout.close()  # type: ignore[union-attr]
        try:
            self.tasks.send(self.settings)
        except OSError:
            pass  # it died at once: the first task says why

    @staticmethod
    def _relay_stderr(proc: subprocess.Popen[bytes], tail: collections.deque[str]) -> None:
        """The container's stderr (the task's prints, the runtime's errors) into the endpoint's log,
        its last lines kept for the message if the container ends."""
        for line in proc.stderr:  # type: ignore[union-attr]
            text = line.decode(errors="replace")
            tail.append(text.rstrip("\n"))
            sys.stderr.write(text)

    def __call__(self, task: TaskSpec) -> bytes:
        if task.function_body is not None:
            self.bodies[task.function_id] = task.function_body
        if self.proc is None or self.proc.poll() is not None:
            self._restart()
        body = None if task.function_id in self.known else self.bodies.get(task.function_id)
        try:
            self.tasks.send((task.id, task.function_id, body, task.payload, task.spec, task.sandbox, task.inputs))
            self.known.add(task.function_id)
            return self.results.recv_bytes()
        except (EOFError, OSError, AttributeError):
            return pack(failure(task.id, ContainerExited(self._why())))

    def _restart(self) -> None:
        if self.proc is not None:
            for conn in (self.tasks, self.results):
                conn.close()
        self.start()

    def _why(self) -> str:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if self.relay is not None:
                self.relay.join(timeout=5)  # its last words, which say why
        said = "\n".join(self.tail) or "(nothing on stderr)"
        return (f"the worker's container ended (exit code {code}) before this task's result; its last "
                f"output:\n{said}\nThe command was: {' '.join(self.argv)}")


def _exit_on_hangup() -> None:
    """The host half is gone (killed on cancel or stop): end now, even in the middle of a task."""
    poller = select.poll()
    poller.register(0, 0)  # no events asked: poll reports only a hang-up or an error
    while True:
        if poller.poll():
            os._exit(0)


def main() -> None:
    """In the image: run the tasks that arrive on stdin, answer each with its packed result on stdout."""
    answers = os.dup(1)
    os.dup2(2, 1)  # a task's print must not land in the answers
    tasks = Connection(os.dup(0), writable=False)
    results = Connection(answers, readable=False)
    threading.Thread(target=_exit_on_hangup, name="tether-container-watcher", daemon=True).start()
    try:
        allowed_methods, engine_info, python_sandbox = tasks.recv()
        while True:
            task = TaskSpec(*tasks.recv())
            results.send_bytes(pack(run_task(task, allowed_methods, chdir=python_sandbox, engine=engine_info)))
    except (EOFError, OSError):
        os._exit(0)


if __name__ == "__main__":
    main()
