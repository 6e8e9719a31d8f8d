"""Main of a worker in a built environment (``python -m tether.endpoint.engines.environment_worker``).

Started by :mod:`tether.endpoint.engines.environment_pool` with another interpreter than the
daemon's, so not through multiprocessing (whose spawn hands the child the parent's ``sys.path``,
another Python's site-packages): the two pipe ends arrive as inherited file descriptors and the
rest as JSON on the command line. Then it is the process engine's worker, unchanged.
"""

from __future__ import annotations

import json
import sys
from multiprocessing.connection import Connection

from tether.endpoint.execute import Allowlist

from .worker import main as worker_main


def _methods(value: list[str] | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value)


def main(argv: list[str]) -> None:
    tasks_fd, results_fd, options = int(argv[0]), int(argv[1]), json.loads(argv[2])
    allowed = Allowlist(data=_methods(options["data_methods"]), functions=_methods(options["function_methods"]))
    worker_main((Connection(tasks_fd, writable=False), Connection(results_fd, readable=False)), allowed,
                options["engine_info"], options["python_sandbox"], None)


if __name__ == "__main__":
    main(sys.argv[1:])
