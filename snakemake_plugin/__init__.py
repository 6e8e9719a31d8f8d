"""Snakemake executor plugin for Tether: ``snakemake --executor tether --tether-endpoint-id ID``.

Every job becomes one Tether task that runs Snakemake's own job command (``python -m snakemake
--target-jobs ...``, from ``format_job_exec``) under bash on the endpoint, in the workflow
directory (shared file system, the usual HPC case) or in the task's sandbox (no shared file
system: inputs and outputs go through a Snakemake storage plugin). The endpoint only makes
outbound connections, so Snakemake can run on a laptop and drive a firewalled cluster, and rules
can go to different endpoints through ``resources: tether_endpoint_id=...``.

The plugin is glue: :mod:`.submission` reads a job's resources, :mod:`.endpoints` checks an
endpoint before its first job, :mod:`.remote` is what runs on the endpoint; the Tether client
does the rest (batching, pushed results, cancellation of running processes).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings, SharedFSUsage

from .settings import ExecutorSettings

# Every ``snakemake`` process imports every installed executor plugin, each remote job's too, so
# Tether itself (~0.1 s of imports) is imported only by the process that uses this executor: in
# __post_init__ and the methods below.
if TYPE_CHECKING:
    import tether
    from tether.shell import ShellResult

    from .submission import Submission

#: lines of the job's stdout and stderr kept in its log file (and in the task's result)
SNIPPET_LINES = 1000
#: lines of stderr shown in the error message of a failed job
ERROR_TAIL_LINES = 30


common_settings = CommonSettings(
    non_local_exec=True,
    # shared FS by default; --shared-fs-usage none + a default storage provider works without one
    implies_no_shared_fs=False,
    # without a shared FS the sources travel through the default storage provider
    job_deploy_sources=True,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    # the endpoint does not inherit this process's environment: --envvars travel in the command
    pass_envvar_declarations_to_cmd=True,
    # no pip install on every job: the storage plugin is installed next to the endpoint (docs)
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=0,
    # without a shared FS and without a storage provider, jobs carry their files (staging.py)
    can_transfer_local_files=True,
)


class Executor(RemoteExecutor):
    """Submits each job as a Tether task; finished tasks wake the status loop (no polling)."""

    def __init__(self, workflow: Any, logger: Any):
        # set before super().__init__, which starts the status loop that uses them
        self._status_loop: asyncio.AbstractEventLoop | None = None
        self._status_event: asyncio.Event | None = None
        self._cancelling = False
        super().__init__(workflow, logger)

    def __post_init__(self) -> None:
        import cloudpickle

        import tether

        from . import remote, warm
        from .staging import Staging
        from .submission import parse_user_endpoint_config

        # the endpoint runs the job function without this plugin installed: ship its modules by value
        cloudpickle.register_pickle_by_value(remote)
        cloudpickle.register_pickle_by_value(warm)
        settings: ExecutorSettings = self.workflow.executor_settings or ExecutorSettings()
        self._settings = settings
        self._default_uec = parse_user_endpoint_config(settings.user_endpoint_config,
                                                       "--tether-user-endpoint-config")
        try:
            self._client = tether.Client(service=settings.service, token=settings.token)
        except tether.TetherError as exc:
            raise WorkflowError(f"Tether: {exc}") from None
        # one task group per run: 'tether' tools and the dashboard show a run's tasks together
        self._group = str(uuid.uuid4())
        self._executors: dict[str, tether.Executor] = {}
        self._checked: dict[str, Exception | None] = {}
        self._checked_lock = threading.Lock()
        self._snakemake_version = version("snakemake")
        self._log_dir = Path(".snakemake", "tether_logs")
        self._staging = Staging()
        if settings.endpoint_id:  # fail before the first job, not at it
            self._endpoint_ready(settings.endpoint_id)
        self.logger.info(f"Tether: jobs run as tasks of group {self._group} on {self._client.info.url}")

    # --- submission --------------------------------------------------------------------------
    def get_python_executable(self) -> str:
        from . import remote

        # the endpoint's interpreter (it has Snakemake), whatever its path, followed by "-m snakemake"
        # in the command: it runs Snakemake through remote.SNAKEMAKE_MAIN (a second faster per job)
        return f'"${remote.PYTHON_VAR}" -c "${remote.MAIN_VAR}"'

    def run_job(self, job: JobExecutorInterface) -> None:
        from tether import TetherError

        from .submission import submission_for

        what = f"group {job.groupid}" if job.is_group() else f"rule {job.name}"
        try:
            sub = submission_for(what, job.resources, self._settings.endpoint_id, self._default_uec)
            self._endpoint_ready(sub.endpoint_id)
            future, products, logs = self._submit(job, sub)
        except (WorkflowError, TetherError) as exc:
            self.report_job_error(SubmittedJobInfo(job), msg=f"{exc}\n")
            return
        future.add_done_callback(self._on_done)
        info = SubmittedJobInfo(job, external_jobid=future.task_id, aux={"future": future, "submission": sub,
                                                                         "products": products, "logs": logs})
        self.report_job_submission(info)

    def _submit(self, job: JobExecutorInterface,
                sub: Submission) -> tuple[tether.TetherFuture, list[str] | None, list[str] | None]:
        """Submit the job's task; also what it brings back (its products and logs), when this plugin
        moves its files."""
        from . import remote

        storage = self.workflow.storage_settings
        shared_io = SharedFSUsage.INPUT_OUTPUT in storage.shared_fs_usage
        cmd = self.format_job_exec(job)
        if not job.is_group():
            # one job to run: which scheduler picks it cannot change what runs, and the default
            # (ILP) starts a solver process in every job (~20 ms of a trivial job's ~60 on the
            # endpoint). The last --scheduler given wins; nothing follows the general args here.
            cmd = f"{cmd} --scheduler greedy"
        self.logger.debug(f"Tether job command: {cmd}")
        warm_key = None if self._settings.cold_start else str(self.workflow.main_snakefile)
        names: list[str] = []
        products = logs = None
        if SharedFSUsage.SOURCES not in storage.shared_fs_usage:
            names += self._staging.sources(self.workflow, self.logger.warning)
        if not shared_io and not storage.default_storage_provider:  # this plugin moves the files
            local = [str(f) for f in job.input if not getattr(f, "is_storage", False)]
            names += [f for f in local if os.path.exists(f)] if job.is_group() else local
            # every member's files: Snakemake checks a group's intermediate outputs too
            members = list(job.jobs) if job.is_group() else [job]
            products = [str(f) for j in members for f in j.products(include_logfiles=False)
                        if not getattr(f, "is_storage", False)]
            logs = [str(f) for j in members for f in j.log]
        files = self._staging.files_for(f"rule {job.name}", names) if names else None
        args = (cmd, os.getcwd() if shared_io else None, sub.walltime, sub.mpi, SNIPPET_LINES, warm_key, files,
                products, logs)
        future = self._executor(sub.endpoint_id).submit_task(
            remote.run_snakemake_job, args, resource_specification=sub.resource_specification,
            user_endpoint_config=sub.user_endpoint_config)
        return future, products, logs

    def _executor(self, endpoint_id: str) -> tether.Executor:
        import tether

        ex = self._executors.get(endpoint_id)
        if ex is None:
            ex = self._executors[endpoint_id] = tether.Executor(
                endpoint_id, service=self._client.info.url, token=self._client.info.token,
                task_group_id=self._group)
        return ex

    def _endpoint_ready(self, endpoint_id: str) -> None:
        """Check an endpoint once (first use); raise the same error for each of its jobs."""
        from .endpoints import check_endpoint

        with self._checked_lock:
            if endpoint_id not in self._checked:
                try:
                    report = check_endpoint(self._client, endpoint_id, self._snakemake_version)
                except WorkflowError as exc:
                    self._checked[endpoint_id] = exc
                else:
                    self._checked[endpoint_id] = None
                    for text in report.warnings:
                        self.logger.warning(f"Tether: {text}")
            error = self._checked[endpoint_id]
        if error is not None:
            raise error

    def _on_done(self, _: Future | None) -> None:
        """A task finished (on the client's connection thread): wake the status loop."""
        loop, event = self._status_loop, self._status_event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the status loop has ended
                pass

    # --- status ------------------------------------------------------------------------------
    async def check_active_jobs(
        self, active_jobs: list[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        if self._status_event is None:  # first round, on the status loop's own thread
            self._status_event = asyncio.Event()
            self._status_loop = asyncio.get_running_loop()
        for info in active_jobs:
            future: tether.TetherFuture = info.aux["future"]
            if not future.done():
                yield info
            else:
                self._report(info, future)

    def _report(self, info: SubmittedJobInfo, future: tether.TetherFuture) -> None:
        from tether import TaskCancelled, TaskFailed
        from tether.shell import TIMEOUT_NAME

        try:
            result: ShellResult = future.result()
            if isinstance(result, tuple):  # (result, files) without a shared file system
                result, files = result
                aux = info.aux
                self._staging.write_back([*aux["products"], *aux["logs"]], files, os.getcwd())
        except TaskCancelled:
            if not self._cancelling:  # cancelled by someone else (the REST API, another process)
                self.report_job_error(info, msg=f"Tether task {future.task_id} was cancelled.\n")
            return
        except Exception as exc:  # noqa: BLE001 - the task failed on the endpoint: say why, in its words
            log = self._write_log(info, None, exc)  # with the remote traceback, if any
            why = f"{exc.remote_type}: {exc.remote_message}" if isinstance(exc, TaskFailed) else str(exc)
            self.report_job_error(info, msg=f"Tether task {future.task_id} failed: {why}\n", aux_logs=[str(log)])
            return
        log = self._write_log(info, result, None)
        if result.returncode == 0:
            self.report_job_success(info)
            return
        sub: Submission = info.aux["submission"]
        if result.exception_name == TIMEOUT_NAME:
            head = (f"The job was killed at its walltime of {sub.walltime:g} s (resources: runtime="
                    f"{info.job.resources.get('runtime')} min) on Tether endpoint {sub.endpoint_id}.")
        else:
            head = f"The job exited with code {result.returncode} on Tether endpoint {sub.endpoint_id}."
        tail = "".join(result.stderr.splitlines(keepends=True)[-ERROR_TAIL_LINES:]).rstrip()
        msg = f"{head}\nLast lines of its stderr:\n{tail}\n" if tail else f"{head} Its stderr was empty.\n"
        self.report_job_error(info, msg=msg, aux_logs=[str(log)])

    def _write_log(self, info: SubmittedJobInfo, result: ShellResult | None, exc: BaseException | None) -> Path:
        """The job's output as the endpoint captured it, where a Snakemake user looks for it."""
        job = info.job
        name = f"group_{job.groupid}" if job.is_group() else f"rule_{job.name}"
        path = self._log_dir / name / f"{job.jobid}-{info.external_jobid}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        if result is not None:
            text = (f"# Tether task {info.external_jobid}: exit code {result.returncode}\n"
                    f"# command: {result.cmd}\n--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}")
        else:
            text = f"# Tether task {info.external_jobid} failed\n{exc}\n"
        path.write_text(text)
        return path

    async def sleep(self) -> None:
        """Until a task finishes (pushed by the service), or the status interval passes."""
        timeout = max(float(self.next_seconds_between_status_checks or 0), 0.5)
        event = self._status_event
        if event is None:
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        event.clear()  # before the next check_active_jobs, which sees every task done by now

    # --- cancellation and shutdown -----------------------------------------------------------
    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        """Ctrl-C: kill the jobs on their endpoints, and make sure the service heard it before we exit.

        The work runs in a thread of its own, so a second Ctrl-C (users press it again) interrupts
        only the wait here; the interpreter still finishes the thread before it exits.
        """
        futures = [info.aux["future"] for info in active_jobs if info.aux and "future" in info.aux]
        if not futures:
            return
        self._cancelling = True
        worker = threading.Thread(target=self._cancel, args=(futures,), name="tether-cancel")
        worker.start()
        worker.join()

    def _cancel(self, futures: list[tether.TetherFuture]) -> None:
        from tether import TetherError

        for future in futures:
            future.cancel()  # local state now, and a cancel frame on the connection
        for future in futures:  # the frame may not leave before the process exits: confirm over REST
            try:
                self._client.cancel_task(future.task_id)
            except TetherError as exc:
                self.logger.warning(f"Tether: could not cancel task {future.task_id}: {exc}")
        self.logger.info(f"Tether: cancelled {len(futures)} job(s) on their endpoints")

    def shutdown(self) -> None:
        with self.lock:
            self.wait = False
        self._on_done(None)  # the status loop may be waiting in sleep(): let it see wait=False now
        super().shutdown()
        for ex in self._executors.values():
            ex.shutdown(wait=False)
        self._client.close()
        summary = self._staging.summary()
        if summary:
            self.logger.info(summary)


__all__ = ["Executor", "ExecutorSettings", "common_settings"]
