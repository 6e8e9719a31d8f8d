"""Environments an endpoint builds for its tasks, with uv, and keeps in a cache on disk.

A task that asks for ``{"python": "3.12", "requirements": [...]}`` (see
:mod:`tether.environment`) runs in a virtual environment made of an interpreter of that minor
version found on this host and those requirements, plus Tether itself (its workers run there).
The administrator turns this on and bounds it in config.yaml's ``environments:``
(:class:`EnvironmentSettings`). Each environment lives in ``<cache_dir>/<key>/`` (the key is a
hash of the request): ``venv/``, ``build.log`` (uv's output) and ``environment.json`` (the
request, when and how long it took to build; written last, so a directory without it is a build
that did not finish and is built again). A directory's modification time is when a task last
used it; beyond ``max_bytes`` the least recently used are removed.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from tether.environment import EnvironmentRequest
from tether.errors import EnvironmentUnavailable

from .config import EndpointConfig

log = logging.getLogger("tether.endpoint.environments")

#: the file that marks a finished build (see the module's docstring)
MANIFEST = "environment.json"
BUILD_LOG = "build.log"

#: where interpreters are looked for when the administrator names none: pyenv's, uv's, the system's
DEFAULT_INTERPRETER_GLOBS = (
    "~/.pyenv/versions/{v}*/bin/python{v}",
    "~/.local/share/uv/python/cpython-{v}.*/bin/python{v}",
    "/usr/local/bin/python{v}",
    "/usr/bin/python{v}",
)


@dataclass
class EnvironmentSettings:
    """config.yaml's ``environments:`` (docs/endpoint-admin.md). Off unless ``enabled``."""

    enabled: bool = False
    #: the package index uv installs from (its default, PyPI, when unset); nothing else is used
    index_url: str | None = None
    cache_dir: str | None = None  # default: <endpoint dir>/environments
    max_bytes: int = 10 * 1024**3
    #: interpreters (paths or glob patterns) environments may be made from; unset: pyenv's, uv's, the system's
    interpreters: list[str] = field(default_factory=list)
    workers: int = 1  # worker processes per environment, started with its first task
    idle_timeout_s: float = 300.0  # an environment's workers stop when it has had no task this long
    build_timeout_s: float = 900.0
    uv: str | None = None  # the uv binary; default: the one beside this Python, or on PATH
    #: uv trusts the host's certificate store (a site's own CA, a proxy's), not only its bundled roots
    system_certs: bool = True

    @classmethod
    def from_config(cls, data: dict[str, Any] | None) -> EnvironmentSettings:
        return cls(**(data or {}))


@dataclass(frozen=True)
class CachedEnvironment:
    """An environment on disk, as ``tether endpoint status`` shows it."""

    key: str
    python: str
    requirements: list[str]
    size: int
    last_used: float
    build_s: float


def find_uv(configured: str | None = None) -> str | None:
    """The uv binary: the configured one, the one installed beside this interpreter (the
    ``environments`` extra), or one on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.exists() else shutil.which("uv")


#: what a copy of the checkout leaves out (see :func:`tether_source`)
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist", "site",
                                     ".pytest_cache", ".ruff_cache", ".mypy_cache", "node_modules")


def tether_source(scratch: Path) -> list[str]:
    """What uv installs so the environment runs this very Tether (its workers must speak the
    daemon's protocol): the checkout this code runs from, editable, when it runs from one (a
    copy of it, installed as it is now, when this user may not write there: building writes
    into the source tree, and a user endpoint runs as its user, not as the checkout's owner);
    else the file it was installed from; else this release from the index. ``scratch``: an empty
    directory of this build, for the copy."""
    import tether

    checkout = Path(tether.__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists() and (checkout / "endpoint").is_dir():
        if os.access(checkout, os.W_OK):
            return ["-e", str(checkout)]
        copy = scratch / "tether-source"
        shutil.copytree(checkout, copy, ignore=_NOT_SOURCE, symlinks=True)
        return [str(copy)]
    try:
        dist = distribution("tether")
    except PackageNotFoundError:
        return [f"tether=={tether.__version__}"]
    info = json.loads(dist.read_text("direct_url.json") or "{}")
    if str(info.get("url", "")).startswith("file://"):
        return [info["url"][len("file://"):]]
    return [f"tether=={dist.version}"]


def directory_size(path: Path) -> int:
    """Bytes under ``path`` (files counted once, symlinks not followed)."""
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


class EnvironmentCache:
    """Builds environments (once each, however many tasks wait for one), lists and evicts them."""

    def __init__(self, settings: EnvironmentSettings, default_dir: Path, config_path: str = "config.yaml"):
        self.settings = settings
        self.root = Path(os.path.expanduser(settings.cache_dir)) if settings.cache_dir else default_dir
        self.config_path = config_path
        self._builds: dict[str, asyncio.Future[Path]] = {}
        self._interpreters: dict[str, str | None] = {}

    # --- where things are ---------------------------------------------------------------------
    def directory(self, key: str) -> Path:
        return self.root / key

    def python(self, key: str) -> Path:
        return self.directory(key) / "venv" / "bin" / "python"

    def is_built(self, key: str) -> bool:
        return (self.directory(key) / MANIFEST).exists()

    def touch(self, key: str) -> None:
        """Mark ``key`` used now (its directory's mtime orders eviction)."""
        try:
            os.utime(self.directory(key))
        except OSError:
            pass

    # --- interpreters -------------------------------------------------------------------------
    def find_interpreter(self, version: str) -> str | None:
        """An interpreter of minor version ``version`` this endpoint may use, or None."""
        if version not in self._interpreters:
            self._interpreters[version] = self._search(version)
        return self._interpreters[version]

    def _search(self, version: str) -> str | None:
        patterns = self.settings.interpreters or [p.format(v=version) for p in DEFAULT_INTERPRETER_GLOBS]
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.expanduser(pattern)), reverse=True):  # newest patch first
                if _python_version(path) == version:
                    return path
        return None

    # --- building -----------------------------------------------------------------------------
    async def ensure(self, request: EnvironmentRequest) -> Path:
        """The python of the environment for ``request``, built first if it is not in the
        cache; concurrent callers for the same request share one build. Raises
        :class:`EnvironmentUnavailable` with the reason (uv's own message when it failed)."""
        key = request.key()
        if self.is_built(key):
            self.touch(key)
            return self.python(key)
        build = self._builds.get(key)
        if build is None:
            build = self._builds[key] = asyncio.ensure_future(self._build(key, request))
            build.add_done_callback(lambda _f: self._builds.pop(key, None))
        return await asyncio.shield(build)

    async def _build(self, key: str, request: EnvironmentRequest) -> Path:
        interpreter = await asyncio.to_thread(self.find_interpreter, request.python)
        if interpreter is None:
            where = ", ".join(self.settings.interpreters) or "pyenv, uv-managed and system locations"
            raise EnvironmentUnavailable(
                f"this endpoint has no Python {request.python} interpreter (looked in {where}); its "
                f"administrator can install one or list it under environments: interpreters: in {self.config_path}")
        uv = find_uv(self.settings.uv)
        if uv is None:
            raise EnvironmentUnavailable(
                "this endpoint cannot build environments: uv is not installed there (its administrator "
                "can install it with pip install 'tether[environments]' or name it in environments: uv:)")
        where = self.directory(key)
        if where.exists():  # an unfinished build: start again
            await asyncio.to_thread(shutil.rmtree, where, True)
        where.mkdir(parents=True)
        venv = where / "venv"
        started = time.monotonic()
        index = ["--index-url", self.settings.index_url] if self.settings.index_url else []
        scratch = where / "scratch"
        scratch.mkdir()
        source = await asyncio.to_thread(tether_source, scratch)
        logfile = where / BUILD_LOG
        try:
            await self._run(logfile, [uv, "venv", "--no-project", "--python", interpreter, str(venv)])
            await self._run(logfile, [uv, "pip", "install", "--python", str(venv / "bin" / "python"), *index,
                                      *source, *request.requirements])
        except BaseException:  # the build log stays, for the administrator; the rest goes
            await asyncio.to_thread(shutil.rmtree, venv, True)
            raise
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        built_s = time.monotonic() - started
        manifest = {"python": request.python, "requirements": request.requirements, "interpreter": interpreter,
                    "built_at": time.time(), "build_s": round(built_s, 3)}
        (where / MANIFEST).write_text(json.dumps(manifest, indent=1))
        log.info("built environment %s (Python %s, %s) in %.1f s", key, request.python,
                 ", ".join(request.requirements) or "no requirements", built_s)
        return self.python(key)

    async def _run(self, logfile: Path, argv: list[str]) -> None:
        """Run one uv step, its output appended to the build log; a failure raises with uv's words."""
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env.setdefault("UV_NO_PROGRESS", "1")
        if self.settings.system_certs:  # both spellings: older uv reads UV_NATIVE_TLS
            env.setdefault("UV_SYSTEM_CERTS", "1")
            env.setdefault("UV_NATIVE_TLS", "1")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.settings.build_timeout_s)
        except asyncio.CancelledError:  # the endpoint is stopping: so does its build
            proc.kill()
            raise
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise EnvironmentUnavailable(
                f"building the environment took longer than {self.settings.build_timeout_s:.0f} s "
                f"(environments: build_timeout_s: in {self.config_path}); see {logfile}") from None
        text = out.decode(errors="replace")
        with logfile.open("a") as fh:
            fh.write(f"$ {' '.join(argv)}\n{text}\n")
        if proc.returncode != 0:
            raise EnvironmentUnavailable(f"building the environment failed: {argv[1]} {argv[2]} said:\n"
                                         f"{text.strip()}")

    def cancel_builds(self) -> None:
        """Stop the builds under way (the endpoint is stopping); an unfinished one is built again
        when next asked for."""
        for build in list(self._builds.values()):
            build.cancel()

    # --- what is cached -----------------------------------------------------------------------
    def entries(self) -> list[CachedEnvironment]:
        """Finished environments, most recently used first."""
        found = []
        for manifest in self.root.glob(f"*/{MANIFEST}"):
            try:
                info = json.loads(manifest.read_text())
                used = manifest.parent.stat().st_mtime
            except (OSError, ValueError):
                continue
            found.append(CachedEnvironment(manifest.parent.name, info.get("python", "?"),
                                           list(info.get("requirements", [])), directory_size(manifest.parent),
                                           used, float(info.get("build_s", 0.0))))
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def evict(self, in_use: set[str]) -> list[str]:
        """Remove the least recently used environments until the cache fits ``max_bytes``;
        those ``in_use`` (workers running there) stay. Returns the keys removed."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for entry in reversed(entries):  # least recently used first
            if total <= self.settings.max_bytes:
                break
            if entry.key in in_use:
                continue
            shutil.rmtree(self.directory(entry.key), ignore_errors=True)
            total -= entry.size
            removed.append(entry.key)
            log.info("evicted environment %s (%d bytes) to keep the cache under %d bytes", entry.key,
                     entry.size, self.settings.max_bytes)
        return removed


def _python_version(path: str) -> str | None:
    """The minor version of the interpreter at ``path`` (None when it does not run)."""
    try:
        out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cache_for(config: EndpointConfig) -> EnvironmentCache:
    """The cache of endpoint ``config`` (by default ``<endpoint dir>/environments``)."""
    settings = EnvironmentSettings.from_config(config.environments)
    return EnvironmentCache(settings, config.dir / "environments", str(config.dir / "config.yaml"))


def cached_environments(config: EndpointConfig) -> dict[str, Any]:
    """What ``tether endpoint status`` shows: whether environments are on, the cache, and each
    environment in it (most recently used first)."""
    cache = cache_for(config)
    entries = cache.entries() if cache.root.exists() else []
    return {"enabled": cache.settings.enabled, "cache_dir": str(cache.root),
            "max_bytes": cache.settings.max_bytes, "total_bytes": sum(e.size for e in entries),
            "cached": [{"key": e.key, "python": e.python, "requirements": e.requirements, "bytes": e.size,
                        "last_used": e.last_used, "build_s": e.build_s} for e in entries]}
