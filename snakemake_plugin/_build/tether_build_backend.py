"""The project's build backend: setuptools, plus one file in editable wheels.

Snakemake finds executor plugins by listing top-level packages with ``pkgutil.iter_modules()``.
An editable install (``pip install -e .``) serves our packages through setuptools' import hook,
which that listing does not see, so ``snakemake --executor tether`` would say the plugin is not
installed. An editable wheel built here therefore also carries a real
``snakemake_executor_plugin_tether/__init__.py`` in site-packages: Snakemake lists it, and on
import it loads the plugin from this source tree (so edits still take effect at once).
Regular wheels are setuptools' own, unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the whole PEP 517/660 interface)

PLUGIN = "snakemake_executor_plugin_tether"
SOURCE = Path(__file__).resolve().parents[1]  # snakemake_plugin/

SHIM = '''"""Editable install of tether: Snakemake lists this package; its code is in {source}."""
import importlib.util
import sys

_spec = importlib.util.spec_from_file_location(
    __name__, {init!r}, submodule_search_locations=[{source!r}])
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _add_shim(wheel: Path) -> None:
    """Rewrite the wheel with the shim package added and listed in RECORD."""
    shim_name = f"{PLUGIN}/__init__.py"
    shim = SHIM.format(source=str(SOURCE), init=str(SOURCE / "__init__.py")).encode()
    with zipfile.ZipFile(wheel) as zin:
        items = [(info, zin.read(info)) for info in zin.infolist()]
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in items:
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                lines.insert(0, _record_line(shim_name, shim))
                data = ("\n".join(lines) + "\n").encode()
            zout.writestr(info, data)
        zout.writestr(shim_name, shim)
    tmp.replace(wheel)


def build_editable(wheel_directory: str, config_settings: dict | None = None,
                   metadata_directory: str | None = None) -> str:
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_shim(Path(wheel_directory) / name)
    return name
