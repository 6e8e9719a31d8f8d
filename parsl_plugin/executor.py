"""``TetherExecutor``: a Parsl executor whose workers are a Tether endpoint.

Thin glue over :class:`tether.Executor`, which does the work (batching, pushed results, remote
cancel, durable tasks). What is Parsl's stays Parsl's: the DataFlowKernel resolves dependencies,
retries and stages files; the app arrives here already wrapped by Parsl (bash apps by Parsl's
own ``remote_side_bash_executor``) and runs that way on the endpoint, so stdout/stderr files,
``walltime`` → ``AppTimeout``, exit codes → ``BashExitFailure`` and ``MissingOutputs`` are
Parsl's behaviour, not a re-implementation of it.

Per-app options (``parsl_resource_specification``, including ``user_endpoint_config``) travel
with each task through :meth:`tether.Executor.submit_task`: nothing shared is changed around a
submit, and a bad option fails that app alone. So do an app's files, by default
(``staging="tether"``, :mod:`tether.parsl.staging`): the endpoint need not see this machine's disk.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from parsl.data_provider.ftp import FTPInTaskStaging
from parsl.data_provider.http import HTTPInTaskStaging
from parsl.data_provider.staging import Staging
from parsl.executors.base import ParslExecutor
from parsl.executors.errors import InvalidResourceSpecification as ParslInvalidResourceSpecification

import tether
from tether import Client, EndpointOffline, TetherError, TetherFuture
from tether.config import find_service
from tether.resources import validate_resource_specification
from tether.versions import Needed, differences, installed

from .kept import kept_proxy, with_handles
from .monitoring import MonitoredResult, ResultRadio
from .remote import RemoteApp, RemoteOptions
from .staging import STAGING_KWARG, Landing, StagedResult, TetherFileStaging, outbound

log = logging.getLogger("tether.parsl")

#: the key of a ``parsl_resource_specification`` that carries a multi-user endpoint's template values
USER_ENDPOINT_CONFIG = "user_endpoint_config"
#: engines whose workers may start Parsl's resource monitor (a child process following the task's tree).
#: Not the process engine: its workers are daemonic multiprocessing processes, which may not have children.
_MONITORABLE_ENGINES = ("htex", "mpi")
#: seconds an endpoint's online state is trusted before ``require_online`` asks the service again
_ONLINE_TTL = 2.0
#: how an app's files reach the endpoint: through Tether, or by a file system both sides see
STAGING_MODES = ("tether", "shared")
#: threads that write the files apps send back (never the shared callback thread: a large file takes a while)
_LANDING_THREADS = 4


class InvalidResourceSpecification(tether.InvalidResourceSpecification, ParslInvalidResourceSpecification):
    """A resource specification Tether cannot honour: catchable as Parsl's error and as Tether's."""

    def __init__(self, message: str, invalid_keys: set[str] | None = None):
        tether.InvalidResourceSpecification.__init__(self, message)
        self.invalid_keys = set(invalid_keys or ())
        self.message = message

    def __str__(self) -> str:
        return self.message


class TetherExecutor(ParslExecutor):
    """Run Parsl apps (``python_app``, ``bash_app``, MPI apps) on a Tether endpoint.

    Args:
        endpoint_id: the endpoint apps run on.
        label: the executor's label, for ``@python_app(executors=[label])``.
        service, token: the Tether service; by default from ``TETHER_SERVICE_URL``/``TETHER_TOKEN``
            or ``$TETHER_HOME/service.json``, as for :class:`tether.Executor`.
        resource_specification: used for apps that give no ``parsl_resource_specification``
            (an app's own specification replaces it, as with Parsl's GlobusComputeExecutor).
        user_endpoint_config: template values for a multi-user endpoint, for apps that give none
            in ``parsl_resource_specification["user_endpoint_config"]``.
        working_dir: a directory *on the endpoint* where apps run (created if missing) and where
            Parsl's staging providers put files; relative paths in apps resolve there. Needs an
            endpoint engine that gives each task its own process (process, htex, mpi). Apps whose
            files travel through Tether run in ``<working_dir>/<task id>`` instead.
        staging: ``"tether"`` (default): an app's ``file`` Files (inputs, outputs) and its
            ``stdout``/``stderr`` paths travel through Tether, so the endpoint needs no view of this
            machine's files, and works as well when it has one; ``"shared"``: paths are used as
            they are, on the endpoint (a file system both sides see, as with Parsl's own executors).
        storage_access: Parsl staging providers; by default ``[TetherFileStaging(),
            HTTPInTaskStaging(), FTPInTaskStaging()]`` with ``staging="tether"`` and Parsl's default
            list with ``staging="shared"``.
        require_online: fail an app at once with :class:`tether.EndpointOffline` when the endpoint
            is offline; by default apps wait at the service until the endpoint connects.
        batch_size, batch_interval: the client's submission batching (see :class:`tether.Executor`).
    """

    def __init__(
        self,
        endpoint_id: str,
        label: str = "tether",
        *,
        service: str | None = None,
        token: str | None = None,
        resource_specification: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        working_dir: str | None = None,
        staging: str = "tether",
        storage_access: list[Staging] | None = None,
        require_online: bool = False,
        batch_size: int | None = None,
        batch_interval: float | None = None,
    ):
        super().__init__()
        if not isinstance(endpoint_id, str) or not endpoint_id:
            raise TypeError(f"TetherExecutor needs an endpoint_id string, not {endpoint_id!r}")
        if user_endpoint_config is not None and not isinstance(user_endpoint_config, dict):
            raise TypeError(f"user_endpoint_config must be a dict, not {type(user_endpoint_config).__name__}")
        if resource_specification:  # a typo in the Config fails when the Config is written
            try:
                validate_resource_specification(resource_specification)
            except tether.InvalidResourceSpecification as exc:
                raise InvalidResourceSpecification(str(exc), set(resource_specification)) from None
        if staging not in STAGING_MODES:
            raise ValueError(f"staging must be one of {', '.join(map(repr, STAGING_MODES))}, not {staging!r}: "
                             f"'tether' moves an app's files through Tether, 'shared' uses paths as they are on the "
                             f"endpoint")
        if storage_access is None and staging == "tether":
            storage_access = [TetherFileStaging(), HTTPInTaskStaging(), FTPInTaskStaging()]
        self.endpoint_id = endpoint_id
        self.label = label
        self.staging = staging
        self.service = service
        self._token = token
        self.resource_specification = dict(resource_specification or {})
        self.user_endpoint_config = user_endpoint_config
        self.working_dir = working_dir
        self.storage_access = storage_access
        self.require_online = require_online
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.remote_monitoring_radio = ResultRadio()
        #: what :meth:`start` found wrong with the endpoint (version mismatches, offline, unknown), in words
        self.endpoint_problems: list[str] = []
        self.engine: str | None = None
        self._executor: tether.Executor | None = None
        self._service_info: Any = None
        self._options = RemoteOptions()
        self._apps: OrderedDict[int, tuple[Any, RemoteApp]] = OrderedDict()
        self._apps_lock = threading.Lock()
        self._online: tuple[float, bool] = (0.0, False)
        self._landing: ThreadPoolExecutor | None = None
        self._landing_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the token
        return (f"TetherExecutor(endpoint_id={self.endpoint_id!r}, label={self.label!r}, "
                f"working_dir={self.working_dir!r}, staging={self.staging!r})")

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the service and check the endpoint, saying in words what will go wrong.

        Problems with the endpoint (unknown, offline, other Python or Parsl) are warnings here,
        not errors: one executor's endpoint must not stop a Config with other executors from
        loading; its apps then fail (or wait, if it is offline) one by one, with the reason.
        """
        self._service_info = find_service(self.service, self._token)
        self._executor = tether.Executor(self.endpoint_id, service=self._service_info.url,
                                         token=self._service_info.token, batch_size=self.batch_size,
                                         batch_interval=self.batch_interval)
        self._options = RemoteOptions(working_dir=self.working_dir,
                                      monitoring=self.remote_monitoring_radio.queue is not None)
        self._check_endpoint()

    def _client(self) -> Client:
        return Client(service=self._service_info.url, token=self._service_info.token)

    def _check_endpoint(self) -> None:
        try:
            with self._client() as client:
                info = client.get_endpoint(self.endpoint_id)
        except TetherError as exc:
            self._report(f"endpoint {self.endpoint_id} cannot be used: {exc}")
            return
        self._online = (time.monotonic(), bool(info.get("online")))
        status = info.get("status") or {}
        self.engine = (status.get("capacity") or {}).get("engine")
        if not info.get("online"):
            how = "apps fail at once (require_online=True)" if self.require_online else "apps wait until it connects"
            self._report(f"endpoint {self.endpoint_id} ({info.get('name')}) is offline: {how}")
        for problem in version_problems(client_versions(), status.get("versions") or {}, self.endpoint_id):
            self._report(problem)

    def _report(self, text: str) -> None:
        self.endpoint_problems.append(text)
        log.warning("%s: %s", self.label, text)
        warnings.warn(f"TetherExecutor {self.label!r}: {text}", RuntimeWarning, stacklevel=3)

    def shutdown(self) -> None:
        """Stop: tasks still queued or running on the endpoint are cancelled (their processes killed),
        as Parsl's HighThroughputExecutor stops its workers. Use ``Config(exit_mode="wait")`` or wait
        for the app futures to let them finish first."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._landing is not None:
            self._landing.shutdown(wait=False)
        super().shutdown()

    def monitor_resources(self) -> bool:
        """Whether Parsl's per-task resource monitor can run on this endpoint: on the Parsl engines
        (htex, mpi), whose workers are Parsl's own. Not on the thread engine (all tasks share one
        process: forking a monitor there is what Parsl's ThreadPoolExecutor avoids too), nor on the
        process engine (its daemonic workers may not start the monitor's process). Task states and
        try start/end times reach the monitoring database either way."""
        return self.engine in _MONITORABLE_ENGINES

    # --- submission ----------------------------------------------------------------------------
    def submit(self, func: Any, resource_specification: dict[str, Any], *args: Any, **kwargs: Any) -> Future:
        """Send one try of an app to the endpoint; the future carries the Tether task id."""
        if self._executor is None:
            raise RuntimeError(f"TetherExecutor {self.label!r} is not started (load it with parsl.load(Config(...)))")
        spec = dict(resource_specification or self.resource_specification or {})
        uec = spec.pop(USER_ENDPOINT_CONFIG, self.user_endpoint_config)
        if uec is not None and not isinstance(uec, dict):
            raise InvalidResourceSpecification(
                f"parsl_resource_specification[{USER_ENDPOINT_CONFIG!r}] must be a dict of template values, "
                f"not {type(uec).__name__}", {USER_ENDPOINT_CONFIG})
        if self.require_online:
            self._require_online()
        if args or kwargs:  # results kept on the endpoint go back to it as references
            args, kwargs = with_handles(args, kwargs)
        staged = outbound(self._file_stagings(), getattr(func, "__name__", "app"), args, kwargs,
                          streams=self.staging == "tether")
        landing = None
        if staged is not None:
            bundle, landing = staged
            kwargs = {**kwargs, STAGING_KWARG: bundle}
        try:
            fut = self._executor.submit_task(self._remote_app(func), args, kwargs,
                                             resource_specification=spec or None, user_endpoint_config=uec)
        except tether.InvalidResourceSpecification as exc:
            raise InvalidResourceSpecification(str(exc), set(spec)) from None
        fut.parsl_executor_task_id = fut.task_id  # type: ignore[attr-defined]
        if self._options.monitoring or landing is not None:
            radio = self.remote_monitoring_radio if self._options.monitoring else None
            return _SettledFuture(fut, radio, landing, self._landing_pool() if landing is not None else None)
        fut.kept_as = kept_proxy  # a result kept on the endpoint reaches the DFK as a lazy proxy
        return fut

    def _file_stagings(self) -> list[TetherFileStaging]:
        return [p for p in (self.storage_access or ()) if isinstance(p, TetherFileStaging)]

    def _landing_pool(self) -> ThreadPoolExecutor:
        with self._landing_lock:
            if self._landing is None:
                self._landing = ThreadPoolExecutor(_LANDING_THREADS,
                                                   thread_name_prefix=f"tether-parsl-{self.label}-files")
            return self._landing

    def _remote_app(self, func: Any) -> RemoteApp:
        """One RemoteApp per app function, so the client serializes (and the endpoint loads) it once."""
        key = id(func)
        with self._apps_lock:
            item = self._apps.get(key)
            if item is not None and item[0] is func:
                return item[1]
            app = RemoteApp(func, self._options)
            self._apps[key] = (func, app)  # the strong reference keeps id(func) from being reused
            if len(self._apps) > 256:
                self._apps.popitem(last=False)
            return app

    def _require_online(self) -> None:
        checked, online = self._online
        if time.monotonic() - checked > _ONLINE_TTL:
            with self._client() as client:
                info = client.get_endpoint(self.endpoint_id)
            online = bool(info.get("online"))
            self._online = (time.monotonic(), online)
        if not online:
            raise EndpointOffline(f"endpoint {self.endpoint_id} is offline and executor {self.label!r} has "
                                  f"require_online=True: start the endpoint ('tether endpoint start NAME')")

    # --- cancellation --------------------------------------------------------------------------
    def cancel(self, app_future: Any) -> bool:
        """Cancel an app's current try: a queued task never runs, a running one is killed on the endpoint.

        Parsl's ``AppFuture.cancel()`` is not implemented by Parsl, hence this method. The app then
        fails with :class:`tether.TaskCancelled` (a ``concurrent.futures.CancelledError``) and is not
        retried. Returns False when the app has not been launched here yet, or has finished.
        """
        record = getattr(app_future, "task_record", None)
        if not record or record.get("executor") != self.label:
            return False
        exec_fu = record.get("exec_fu")
        if exec_fu is None or exec_fu.done():
            return False
        # Parsl seam (checked with parsl 2024.x-2026.x): a try whose fail_cost exceeds Config.retries is
        # not retried; the DFK reads it in the done callback that cancel() runs synchronously.
        record["fail_cost"] = math.inf
        return bool(exec_fu.cancel())


class _SettledFuture(Future):
    """The future the DFK sees when a result carries more than the app's value: monitoring
    messages (handed to the DFK's monitoring) and files sent back (written here, off the shared
    callback thread, before this future resolves, so an output's DataFuture means the file exists).
    Task id, state and transitions are the Tether future's."""

    def __init__(self, inner: TetherFuture, radio: ResultRadio | None, landing: Landing | None,
                 pool: ThreadPoolExecutor | None):
        super().__init__()
        self.tether_future = inner
        self.parsl_executor_task_id = inner.task_id
        self._radio = radio
        self._landing = landing
        self._pool = pool
        inner.add_done_callback(self._schedule)

    def __getattr__(self, name: str) -> Any:  # task_id, state, transitions, ...
        if name.startswith("_") or name == "tether_future":
            raise AttributeError(name)
        return getattr(self.tether_future, name)

    def cancel(self) -> bool:
        return self.tether_future.cancel()

    def _schedule(self, inner: Future) -> None:
        if self._pool is not None:
            try:
                self._pool.submit(self._settle, inner)
                return
            except RuntimeError:  # the executor is shutting down: settle here
                pass
        self._settle(inner)

    def _settle(self, inner: Future) -> None:
        try:
            value = inner.result()
            if isinstance(value, MonitoredResult):
                if self._radio is not None:
                    self._radio.deliver(value.messages)
                value = value.value
            if isinstance(value, StagedResult):
                assert self._landing is not None
                value = self._landing.land(value)
        except BaseException as exc:  # noqa: BLE001 - the try's failure, handed to the DFK as it is
            self.set_exception(exc)
            return
        self.set_result(value)


# --- versions --------------------------------------------------------------------------------
#: what must agree between the two sides: Parsl's app wrappers are pickled here and unpickled
#: there, so both need the same Parsl; pickled code needs the same Python minor version
NEEDED = (Needed("python", required=False), Needed("parsl"))


def client_versions() -> dict[str, str]:
    """This side's Python and Parsl versions, in the endpoint heartbeat's format."""
    return installed(n.package for n in NEEDED)


def version_problems(client: dict[str, str], endpoint: dict[str, str], endpoint_id: str) -> list[str]:
    """What differs between the submitting side and the endpoint that breaks Parsl apps, in words.

    Parsl's wrappers are pickled here and unpickled there, so both sides need Parsl, and the same
    Parsl; pickled code needs the same Python minor version.
    """
    if not endpoint:
        return [f"endpoint {endpoint_id} has not reported its versions yet (never connected?): "
                f"Python and Parsl versions could not be compared"]
    problems = []
    for d in differences(NEEDED, endpoint, client):
        if d.package == "python":
            problems.append(f"endpoint {endpoint_id} runs Python {d.there} but this client runs Python {d.here}: "
                            f"apps pickled here will fail to load there; use the same Python minor version on both "
                            f"sides")
        elif d.there is None:
            problems.append(f"endpoint {endpoint_id} has no Parsl installed, and Parsl apps run Parsl's wrappers "
                            f"on the endpoint: install it there (pip install 'tether[endpoint,parsl]') and restart it")
        else:
            problems.append(f"endpoint {endpoint_id} runs Parsl {d.there} but this client runs Parsl {d.here}: "
                            f"Parsl's app wrappers may not load or behave the same there; install parsl=={d.here} "
                            f"on the endpoint (or this version here)")
    return problems
