"""Workers inside a container image: the ``container:`` key of an engine's configuration.

::

    engine:
      type: process            # or htex / mpi
      container:
        type: podman           # podman | docker | apptainer | singularity | custom
        image: docker.io/library/python:3.12
        options: [--volume, /data:/data]   # passed to the runtime as they are
        python: python3        # the image's interpreter, which must have tether installed

This module turns that mapping into the command that runs a worker's own command in the image;
the engines decide which command (the process engine's per-worker helper, Parsl's worker pool).
Tether adds what the workers need to reach the endpoint, and nothing else: the endpoint's
directory (task sandboxes, Parsl's control files) mounted at the same path, the host's network
and process table (so Parsl's interchange is reached at the address the endpoint knows, and a
cancelled task's worker is killed by the pid it reported), and the few variables the worker
reads. Machine setup (a runtime's cgroup manager, its ulimits) is the administrator's, in the
runtime's own configuration files or in ``options``.

``custom`` runs ``cmd``, a shell command with ``{command}`` where the worker's command goes (and
``{image}``, ``{endpoint_dir}`` if wanted), for runtimes and site wrappers Tether does not know
(``podman-hpc``, ``shifter``, a site script).
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from typing import Any

from tether.errors import ConfigError

#: runtime -> how to install it, for the message when it is missing
RUNTIMES: dict[str, str] = {
    "podman": "apt-get install podman (Debian/Ubuntu), dnf install podman (RHEL/Fedora)",
    "docker": "apt-get install docker.io (Debian/Ubuntu), or Docker Engine from docs.docker.com",
    "apptainer": "the apptainer package from apptainer.org (or your site's module: module load apptainer)",
    "singularity": "SingularityCE from sylabs.io (or your site's module: module load singularity)",
    "custom": "",
}
KEYS = {
    "type": f"the container runtime: {' | '.join(RUNTIMES)}",
    "image": "the image the workers run in (a name for podman/docker, a .sif file or URI for apptainer)",
    "options": "a list of extra arguments for the runtime's run/exec command",
    "python": "the image's Python, with tether installed (default: python3)",
    "cmd": "custom only: a shell command containing {command} (also {image}, {endpoint_dir})",
}
#: variables a worker reads, passed into the image when the endpoint has them
PASSED_ENV = ("TETHER_SPILL_DIR", "TETHER_PARSL_RUN", "TETHER_LOG_LEVEL", "PYTHONUNBUFFERED")
#: what Parsl's MPI mode reads to find a batch job's nodes (``mpi_resource_management``), passed
#: by name: podman and docker take the value from where the runtime starts (the job's node), if set
SCHEDULER_ENV = ("PBS_NODEFILE", "PBS_JOBID", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_NODELIST", "SLURM_JOB_NODELIST",
                 "SLURM_JOB_NUM_NODES", "LSB_JOBID", "LSB_HOSTS", "LSB_MCPU_HOSTS")


@dataclass(frozen=True)
class ContainerSpec:
    """A validated ``container:`` mapping."""

    type: str
    image: str | None
    options: tuple[str, ...] = ()
    python: str = "python3"
    cmd: str | None = None

    def wrap(self, argv: list[str], shared: list[str], *, interactive: bool = False) -> list[str]:
        """``argv`` run inside the image, with each directory in ``shared`` mounted at its own path.
        ``interactive``: keep stdin attached (the process engine's workers read their tasks there)."""
        if self.type == "custom":
            return ["/bin/sh", "-c", self.shell_command(shlex.join(argv), shared)]
        return [*self._runtime_args(shared, interactive), *argv]

    def shell_command(self, command: str, shared: list[str], *, template: bool = False) -> str:
        """The shell command that runs ``command`` (itself shell text) in the image. ``template``:
        ``command`` is a template that will be ``str.format``-ed (Parsl's launch command): braces
        of the runtime's part are doubled, so that they come out as given."""
        escape = (lambda text: text.replace("{", "{{").replace("}", "}}")) if template else (lambda text: text)
        if self.type != "custom":
            return escape(shlex.join(self._runtime_args(shared, False))) + " " + command
        named = {"{image}": shlex.quote(self.image or ""),
                 "{endpoint_dir}": shlex.quote(_outermost(shared)[0] if shared else "")}
        parts = str(self.cmd).split("{command}")
        for i, part in enumerate(parts):
            for key, value in named.items():
                part = part.replace(key, value)
            parts[i] = escape(part)
        return command.join(parts)

    def _runtime_args(self, shared: list[str], interactive: bool) -> list[str]:
        """The runtime's command up to and including the image."""
        shared = _outermost(shared)
        if self.type in ("apptainer", "singularity"):  # shares network, pids and environment already
            out = [self.type, "exec"]
            for d in shared:
                out += ["--bind", f"{d}:{d}"]
            return [*out, *self.options, str(self.image)]
        out = [self.type, "run", "--rm"]
        if interactive:
            out.append("-i")
        given = " ".join(self.options)
        if "--network" not in given and "--net=" not in given and "--net " not in given:
            out += ["--network", "host"]  # Parsl's interchange listens on the host's addresses
        if "--pid" not in given:
            out += ["--pid", "host"]  # cancel kills a worker by the pid it reports
        for d in shared:
            out += ["--volume", f"{d}:{d}"]
        for name in PASSED_ENV:
            if name in os.environ:
                out += ["--env", name]
        for name in SCHEDULER_ENV:
            out += ["--env", name]
        return [*out, *self.options, str(self.image)]

    def executable(self) -> str:
        """The program this spec runs first (checked to exist on a host that starts workers)."""
        if self.type == "custom":
            words = shlex.split(str(self.cmd))
            return words[0] if words else ""
        return self.type


def parse_container(spec: Any, source: str, where: str = "engine.container") -> ContainerSpec:
    """Check a ``container:`` mapping; every mistake is a ConfigError naming the key and the fix."""
    if isinstance(spec, str):
        raise ConfigError(f"{source}: {where}: must be a mapping like {{type: podman, image: NAME}}, not "
                          f"the string {spec!r}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: {where}: must be a mapping like {{type: podman, image: NAME}}, "
                          f"not {type(spec).__name__}")
    for key in spec:
        if key not in KEYS:
            raise ConfigError(f"{source}: {where}.{key}: unknown key. Allowed: "
                              + "; ".join(f"{k} ({v})" for k, v in KEYS.items()))
    kind = spec.get("type")
    if kind not in RUNTIMES:
        raise ConfigError(f"{source}: {where}.type: {kind!r} is not a container runtime Tether knows; "
                          f"choose one of {', '.join(RUNTIMES)} (custom: your own command in 'cmd')")
    image = spec.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ConfigError(f"{source}: {where}.image: must be a non-empty string naming the image, not {image!r}")
    if kind != "custom" and not image:
        raise ConfigError(f"{source}: {where}.image: missing; name the image the workers run in "
                          f"(for example image: docker.io/library/python:3.12)")
    options = spec.get("options", [])
    if isinstance(options, str):
        options = shlex.split(options)
    if not isinstance(options, list) or not all(isinstance(o, (str, int, float)) for o in options):
        raise ConfigError(f"{source}: {where}.options: must be a list of arguments for {kind}, "
                          f"like [--volume, /data:/data], not {options!r}")
    python = spec.get("python", "python3")
    if not isinstance(python, str) or not python.strip():
        raise ConfigError(f"{source}: {where}.python: must name the image's Python (a path or a command), "
                          f"not {python!r}")
    cmd = spec.get("cmd")
    if kind == "custom":
        if not isinstance(cmd, str) or "{command}" not in cmd:
            raise ConfigError(f"{source}: {where}.cmd: the custom type needs cmd, a shell command with "
                              f"{{command}} where the worker's command goes, like "
                              f"'podman-hpc run --rm -i {{image}} {{command}}'; got {cmd!r}")
    elif cmd is not None:
        raise ConfigError(f"{source}: {where}.cmd: only for type: custom; {kind} is run by Tether "
                          f"(put extra arguments in options)")
    return ContainerSpec(kind, image, tuple(str(o) for o in options), python, cmd)


def check_runtime(container: ContainerSpec, source: str, where: str = "engine.container") -> None:
    """The runtime must be installed where workers start (this host, for the process engine and
    Parsl's LocalProvider): say what to install when it is not."""
    program = container.executable()
    if program and (shutil.which(program) or (os.path.isabs(program) and os.access(program, os.X_OK))):
        return
    if container.type == "custom":
        raise ConfigError(f"{source}: {where}.cmd: {program!r} (the command's first word) is not found on "
                          f"this host's PATH; install it or give its full path")
    raise ConfigError(f"{source}: {where}.type: {container.type} is not installed on this host "
                      f"(no {program!r} on PATH); install it: {RUNTIMES[container.type]}; "
                      f"or choose another runtime")


def engine_container(engine: dict[str, Any]) -> ContainerSpec | None:
    """The engine's container, from its already validated configuration (None: no container)."""
    spec = engine.get("container")
    if not spec:
        return None
    return parse_container(spec, engine.get("_source", "engine config"))


def process_worker_command(engine: dict[str, Any]) -> list[str] | None:
    """The process engine's worker in the engine's image (see ``engines/container_worker.py``);
    None when the engine has no container."""
    container = engine_container(engine)
    if container is None:
        return None
    argv = [container.python, "-m", "tether.endpoint.engines.container_worker"]
    return container.wrap(argv, shared_dirs(engine), interactive=True)


def shared_dirs(engine: dict[str, Any]) -> list[str]:
    """Directories workers share with the daemon: the endpoint's (sandboxes, Parsl's run
    directory) and where large results are spilled."""
    dirs = [d for d in (engine.get("_endpoint_dir"), os.environ.get("TETHER_SPILL_DIR")) if d]
    for d in dirs:  # a runtime refuses to mount what does not exist
        os.makedirs(d, exist_ok=True)
    return dirs


def _outermost(dirs: list[str]) -> list[str]:
    """``dirs`` without those inside another (one mount covers them)."""
    real = sorted({os.path.realpath(d) for d in dirs if d})
    return [d for d in real if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in real)]
