"""``tether.parsl``: run Parsl apps on a Tether endpoint.

::

    import parsl
    from parsl.config import Config
    from tether.parsl import TetherExecutor

    parsl.load(Config(executors=[TetherExecutor(endpoint_id=EP, label="hpc")]))

See ``docs/parsl.md``.
"""

from __future__ import annotations

from .executor import InvalidResourceSpecification, TetherExecutor, version_problems
from .kept import KeptProxy, resolve
from .monitoring import ResultRadio
from .remote import WorkingDirUnavailable
from .staging import TetherFileStaging

__all__ = ["InvalidResourceSpecification", "KeptProxy", "ResultRadio", "TetherExecutor", "TetherFileStaging",
           "WorkingDirUnavailable", "resolve", "version_problems"]
