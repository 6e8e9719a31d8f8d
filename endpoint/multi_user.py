"""The multi-user endpoint: one administrator deployment; each user's tasks run in a user
endpoint process under that user's own local account.

It never runs user code itself. When the service asks for a user endpoint (the first task of
an identity with a given ``user_endpoint_config``), it

1. maps the identity to a local account (``identity.py``; root and system accounts refused),
2. checks the user's values against the administrator's schema and renders the template
   (``user_config.py``), and validates the result as an endpoint configuration,
3. starts ``python -m tether.endpoint.user_endpoint`` as that account (its groups, a new
   session, umask 077, the account's HOME), handing it the rendered configuration and a
   credential scoped to that one user endpoint on a pipe, never in argv or the environment.

Any refusal reaches the submitting user as their task's error. User endpoints stop by
themselves when idle (``idle_timeout_s``) and are started again on demand; all of them stop
when the multi-user endpoint stops. Every start, refusal, stop and task event is a line of
``audit.log`` (JSON, readable only by the administrator).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tether.protocol import Audit, StartUserEndpoint, UserEndpointFailed, UserEndpointStarted, encode
from tether.results import failure

from . import pam
from .config import EndpointConfig
from .daemon import EndpointDaemon
from .engines.base import OnResult, TaskSpec
from .identity import IdentityMapper, LocalAccount, MappingRefused
from .user_config import UserConfigRefused, user_endpoint_config
from .user_logs import UserLog, keep_output, open_private, tail

log = logging.getLogger("tether.endpoint.multi_user")

#: what a user endpoint's environment starts from (nothing else of root's environment is passed)
_PASSED_ENV = ("LANG", "LC_ALL", "TZ", "PYTHONUNBUFFERED", "TETHER_LOG_FORMAT")


class TooManyUserEndpoints(Exception):
    """An identity asked for one more user endpoint than this endpoint runs for one user."""


@dataclass
class UserEndpoint:
    """A running user endpoint process, and whose it is."""

    endpoint_id: str
    identity: dict[str, str]
    account: LocalAccount
    proc: subprocess.Popen[bytes]
    started: float
    output_fd: int  # the reading end of its stdout/stderr pipe, until ``output`` owns it
    output: UserLog | None = None


class NoEngine:
    """A multi-user endpoint's engine: it runs nothing (tasks go to user endpoints)."""

    def __init__(self, daemon: MultiUserDaemon, on_result: OnResult):
        self.daemon = daemon
        self.on_result = on_result

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def detach(self) -> None: ...

    def adopted(self) -> set[str]:
        return set()

    def results_kept(self, ids: list[str]) -> None: ...

    def submit(self, task: TaskSpec) -> None:  # the service never dispatches tasks here
        self.on_result(failure(task.id, PermissionError("a multi-user endpoint runs no tasks itself")))

    def cancel(self, task_id: str) -> None: ...

    def capacity(self) -> dict[str, Any]:
        return {"engine": "multi-user", "workers_total": 0, "workers_idle": 0, "tasks_queued": 0,
                "tasks_running": 0, "user_endpoints": len(self.daemon.children)}


class MultiUserDaemon(EndpointDaemon):
    def __init__(self, config: EndpointConfig, credential: dict[str, str]):
        super().__init__(config, credential)
        self.children: dict[str, UserEndpoint] = {}
        self._starting: Counter[str] = Counter()  # identity id -> user endpoints being started
        self.ca_file = credential.get("ca_file")
        self.mapper = IdentityMapper(self.dir / config.identity_mapping, config.min_uid, config.max_uid,
                                     config.allow_nologin_shells)
        self.logs_dir = self.dir / "user_endpoints"
        self.logs_dir.mkdir(mode=0o700, exist_ok=True)
        self._audit_file: TextIO = open_private(self.dir / config.audit_log, text=True)

    def _make_engine(self) -> Any:
        return NoEngine(self, self._on_result)

    async def run(self) -> int:
        if os.geteuid() != 0:
            log.warning("not running as root: user endpoints can only run as this account (%d)", os.geteuid())
        reaper = asyncio.create_task(self._reap())
        try:
            return await super().run()
        finally:
            reaper.cancel()
            self._audit_file.close()

    # --- frames from the service --------------------------------------------------------------
    def _on_frame(self, msg: Any) -> None:
        if isinstance(msg, StartUserEndpoint):
            asyncio.ensure_future(self._start(msg))
        elif isinstance(msg, Audit):
            for user_endpoint_id, task_id, state, ts in msg.events:
                child = self.children.get(user_endpoint_id)
                self.audit("task", ts=ts, user_endpoint_id=user_endpoint_id, task_id=task_id, state=state,
                           **(_who(child) if child else {}))
        else:
            super()._on_frame(msg)

    async def _start(self, msg: StartUserEndpoint) -> None:
        identity = {"id": msg.identity.id, "username": msg.identity.username}
        old = self.children.pop(msg.user_endpoint_id, None)
        if old is not None:  # the service issued a new credential: the old process cannot use it
            _terminate(old.proc)
            self.audit("stopped", user_endpoint_id=msg.user_endpoint_id, exit_code=old.proc.poll(),
                       reason="replaced by a new start", **_who(old))
        # counted from the check until it is among the children (or refused): starts that
        # overlap see each other, so one identity never gets more than its share
        self._starting[identity["id"]] += 1
        try:
            self._check_room(identity)
            child = await asyncio.get_running_loop().run_in_executor(
                None, self._spawn, msg.user_endpoint_id, identity, msg.config, msg.secret)
            try:
                child.output = await keep_output(child.output_fd, self._log_path(msg.user_endpoint_id),
                                                 self.config.user_log_max_bytes, self.config.user_log_bytes_per_s)
            except OSError:
                _terminate(child.proc)  # a process whose output nobody reads would block on it
                raise
            self.children[msg.user_endpoint_id] = child
        except (MappingRefused, UserConfigRefused, TooManyUserEndpoints, OSError) as exc:
            message = str(exc) if not isinstance(exc, OSError) else f"cannot start the process: {exc}"
            self.audit("refused", user_endpoint_id=msg.user_endpoint_id, identity=identity["username"],
                       identity_id=identity["id"], reason=message)
            log.warning("user endpoint %s for %s refused: %s", msg.user_endpoint_id, identity["username"], message)
            await self._send(encode(UserEndpointFailed(user_endpoint_id=msg.user_endpoint_id, message=message)))
            return
        finally:
            self._starting[identity["id"]] -= 1
            if not self._starting[identity["id"]]:
                del self._starting[identity["id"]]
        self.audit("started", user_endpoint_id=msg.user_endpoint_id, pid=child.proc.pid, **_who(child))
        await self._send(encode(UserEndpointStarted(user_endpoint_id=msg.user_endpoint_id,
                                                    local_user=child.account.name, uid=child.account.uid)))

    def _check_room(self, identity: dict[str, str]) -> None:
        """One identity runs at most ``max_user_endpoints_per_user`` user endpoints at once (each
        distinct ``user_endpoint_config`` is one): processes on this host are shared by all."""
        limit = self.config.max_user_endpoints_per_user
        running = self._starting[identity["id"]] - 1 + sum(  # this start is among those counted
            1 for c in self.children.values() if c.identity["id"] == identity["id"])
        if running >= limit:
            raise TooManyUserEndpoints(
                f"you have {running} user endpoints running here, and this endpoint allows {limit} per user: use "
                f"fewer distinct user_endpoint_config values, or wait until one has been idle for "
                f"{self.config.idle_timeout_s:g} s and stops")

    # --- starting a user endpoint (blocking: runs in a thread) ---------------------------------
    def _spawn(self, user_endpoint_id: str, identity: dict[str, str], values: dict[str, Any],
               secret: str) -> UserEndpoint:
        account = self.mapper.local_account(identity)
        if os.geteuid() != 0 and account.uid != os.geteuid():
            raise MappingRefused(f"the identity maps to {account.name!r}, but this multi-user endpoint does not run "
                                 "as root and can only start user endpoints as its own account")
        pam_service = self.config.pam.get("service", pam.DEFAULT_SERVICE) if self.config.pam.get("enabled") else None
        if pam_service is not None:
            pam.check_account(account.name, pam_service)  # an expired or locked account starts nothing
        name = f"u-{user_endpoint_id}"
        text, config = user_endpoint_config(self.dir, self.config.user_config_template,
                                            self.config.user_config_schema, values, account, identity,
                                            self.config.name, name)
        start_doc = {
            "endpoint_id": user_endpoint_id, "secret": secret, "service_url": self.service_url, "name": name,
            "ca_file": self.ca_file,
            "config_yaml": text, "idle_exit_s": self.config.idle_timeout_s, "local_user": account.name,
        }
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.update({"HOME": account.home, "USER": account.name, "LOGNAME": account.name, "SHELL": account.shell,
                    "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
                    "TETHER_HOME": str(Path(account.home) / ".tether")})
        argv = [sys.executable, "-m", "tether.endpoint.user_endpoint"]
        switch: dict[str, Any] = {}
        if os.geteuid() == 0 and pam_service is not None:  # the launcher opens the session, then becomes the user
            argv = pam.launcher_argv(pam_service, account.name, argv)
        elif os.geteuid() == 0:
            switch = {"user": account.uid, "group": account.gid,
                      "extra_groups": os.getgrouplist(account.name, account.gid)}
        # its output goes into a pipe that this process reads into a capped log (user_logs.py)
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE,
                stdout=write_fd, stderr=subprocess.STDOUT, env=env, cwd=account.home if Path(account.home).is_dir()
                else "/", umask=0o077, start_new_session=True, close_fds=True, **switch)
        except OSError:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(start_doc).encode())  # the credential goes on the pipe, nowhere else
            proc.stdin.close()
        except OSError:
            _terminate(proc)
            os.close(read_fd)
            raise
        log.info("started user endpoint %s for %s as %s (uid %d, pid %d)", user_endpoint_id, identity["username"],
                 account.name, account.uid, proc.pid)
        return UserEndpoint(user_endpoint_id, identity, account, proc, time.time(), read_fd)

    def _log_path(self, user_endpoint_id: str) -> Path:
        return self.logs_dir / f"{user_endpoint_id}.log"

    # --- lifecycle of user endpoints ----------------------------------------------------------
    async def _reap(self) -> None:
        """Notice user endpoints that ended (idle, crashed); a crash fails their waiting tasks."""
        while True:
            await asyncio.sleep(0.5)
            for user_endpoint_id, child in list(self.children.items()):
                code = child.proc.poll()
                if code is None:
                    continue
                del self.children[user_endpoint_id]
                self.audit("stopped", user_endpoint_id=user_endpoint_id, exit_code=code, **_who(child))
                if code != 0:
                    if child.output is not None:  # its last lines may still be in the pipe
                        await asyncio.wait([child.output.closed], timeout=1.0)
                    last = tail(self._log_path(user_endpoint_id))
                    await self._send(encode(UserEndpointFailed(
                        user_endpoint_id=user_endpoint_id,
                        message=f"the user endpoint exited with code {code}: {last}")))

    async def _before_stop(self) -> None:
        children, self.children = list(self.children.values()), {}
        for child in children:
            _terminate(child.proc)
        deadline = time.monotonic() + 10
        for child in children:
            while child.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if child.proc.poll() is None:
                _terminate(child.proc, signal.SIGKILL)
            self.audit("stopped", user_endpoint_id=child.endpoint_id, exit_code=child.proc.poll(), **_who(child))

    def audit(self, event: str, **fields: Any) -> None:
        """One JSON line per event: when, what, who (identity, local user, uid), which task."""
        fields.setdefault("ts", time.time())
        self._audit_file.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
        self._audit_file.flush()


def _who(child: UserEndpoint) -> dict[str, Any]:
    return {"identity": child.identity["username"], "identity_id": child.identity["id"],
            "local_user": child.account.name, "uid": child.account.uid}


def _terminate(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)  # its own session: the whole group (workers, commands) goes
    except (ProcessLookupError, PermissionError):
        pass

