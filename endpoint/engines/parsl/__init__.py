"""The Parsl engines: ``htex`` (Parsl's HighThroughputExecutor) and ``mpi`` (Parsl's MPIExecutor).

Execution at scale is Parsl's: the engine builds the executor and the provider named in the
endpoint's YAML, starts it in the endpoint's engine host (``host.py``: a process of its own that
outlives the daemon, so a restart kills no task; ``hosted.py`` is the daemon's side), drives
block scaling with Parsl's own ``Strategy`` and hands every task to ``executor.submit`` as a call of
:func:`~.worker.run_in_worker`, a wrapper around :func:`tether.endpoint.execute.run_task`. So a
task behaves on a Parsl worker exactly as on the one-host engines (sandbox, ``TETHER_TASK_ID``,
task context, result record).

Nothing depends on the venv's ``bin`` being on ``PATH``: the worker pool and the interchange
are started as ``sys.executable -m parsl.executors.high_throughput.<module>``. Parsl's run
directory (submit scripts, block logs, interchange log) is ``$TETHER_HOME/endpoints/NAME/parsl/``.

**RUNNING.** HTEX never says when a task starts (its futures stay PENDING until done). The
wrapper therefore reports it: when it starts on a worker it sends one UDP datagram (task id,
pid, host, time; authenticated with an HMAC under a key that travels inside the task, over
HTEX's own CurveZMQ-encrypted channel) to a socket the engine opened on the address the
workers use to reach the interchange. The engine reports RUNNING on the first such datagram.
Datagrams may be dropped by a firewall between compute nodes and the endpoint host; then a
task goes straight from dispatched to its result, which is correct, only less detailed.

**Cancel.** HTEX has no way to withdraw a task once handed over, so:

- a task that has not started never runs: the engine writes a marker file
  ``parsl/control/TASK.cancel`` that the wrapper checks before it calls the function;
- a running task is killed when its worker runs on the endpoint's host (LocalProvider, or a
  batch job that landed on the same node): the worker process and all its descendants
  (including process groups they started, such as a ShellFunction's ``bash``) get SIGKILL;
  Parsl then restarts the worker. A running task on *another* host cannot be killed (HTEX has
  no remote kill); it runs to completion and its result is dropped.
- either way the client gets a cancelled result at once.

**Worker loss.** A worker or a whole manager that dies mid-task (Parsl's ``WorkerLost`` /
``ManagerLost``) fails that task with a message in words, or re-submits it up to the
endpoint's ``retries_on_worker_loss`` times. Parsl notices a dead worker within the executor's
``heartbeat_period`` (30 s by default) and a lost manager after ``heartbeat_threshold``.

One idea per module: ``worker.py`` runs inside Parsl's workers (and must stay cheap to import
there, so this package imports nothing here); ``config.py`` turns YAML into Parsl objects;
``engine.py`` is the lifecycle; ``cancel.py`` reaches tasks on workers; ``_compat.py`` is every
use of Parsl's private API, with the versions it was checked against; ``host.py``, ``hosted.py``
and ``hostwire.py`` are the engine host, the daemon's side of it and what they say.
"""
