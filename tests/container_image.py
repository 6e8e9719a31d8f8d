"""A container image for the container tests and benchmark: ``FROM scratch`` and a marker file,
built locally with podman (no registry is reachable from CI), and the ``options`` that lend it
this host's system, this Python (the venv's interpreter lives under pyenv) and this checkout,
read-only. A task that reads the marker proves it runs in the image."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER_PATH = "/etc/tether-marker"


def host_mounts() -> list[str]:
    dirs = ["/usr", "/lib", "/lib64", "/bin", os.path.realpath(sys.base_prefix), sys.prefix, str(ROOT)]
    out: list[str] = []
    for d in dict.fromkeys(d for d in dirs if os.path.isdir(d)):
        out += ["--volume", f"{d}:{d}:ro"]
    return out


@contextlib.contextmanager
def marker_image(marker: str) -> Iterator[str]:
    """Build an image holding ``marker`` at MARKER_PATH; yield its tag; remove it after."""
    with tempfile.TemporaryDirectory(prefix="tether-image-") as context:
        (Path(context) / "marker").write_text(marker)
        # the accounts a real image has (Snakemake looks its user up)
        uid, gid = os.getuid(), os.getgid()
        (Path(context) / "passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\nuser:x:{uid}:{gid}::/tmp:/bin/sh\n")
        (Path(context) / "group").write_text(f"root:x:0:\nuser:x:{gid}:\n")
        (Path(context) / "Containerfile").write_text(
            f"FROM scratch\nCOPY marker {MARKER_PATH}\nCOPY passwd /etc/passwd\nCOPY group /etc/group\n")
        tag = f"localhost/tether-test-marker:{uuid.uuid4().hex[:8]}"
        subprocess.run(["podman", "build", "-q", "-t", tag, context], check=True, capture_output=True, timeout=120)
    try:
        yield tag
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, timeout=60)


def container_yaml(image: str, engine: str = "type: process\n  workers: 2", shared: str | None = None,
                   extra: tuple[str, ...] = ()) -> str:
    """An endpoint's config.yaml: ``engine`` (its lines under ``engine:``) with its workers in ``image``;
    ``shared``: a directory mounted read-write too (a workflow's, as a shared filesystem would be);
    ``extra``: more options for podman."""
    options = host_mounts() + (["--volume", f"{shared}:{shared}"] if shared else []) + list(extra)
    return f"""engine:
  {engine}
  container:
    type: podman
    image: {image}
    python: {sys.executable}
    options: [{", ".join(options)}]
heartbeat_s: 0.5
"""
