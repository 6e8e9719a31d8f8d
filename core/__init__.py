"""Tether: federated function execution for research computing.

The base package is the client: :class:`Executor` (a ``concurrent.futures.Executor`` that runs
on a remote endpoint), :class:`Client` (the REST API) and the typed errors.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Client
from .errors import (
    AuthError,
    ConfigError,
    EndpointOffline,
    EnvironmentUnavailable,
    InvalidEnvironment,
    InvalidResourceSpecification,
    PayloadTooLarge,
    QuotaExceeded,
    ResultLost,
    SerializationError,
    ServiceUnreachable,
    TaskCancelled,
    TaskFailed,
    TaskRejected,
    TetherError,
    UnknownEndpoint,
    VersionMismatch,
)
from .executor import Executor
from .futures import TetherFuture
from .refs import RemoteValue
from .shell import MPIFunction, ShellCommandFailed, ShellFunction, ShellResult

__all__ = [
    "AuthError",
    "Client",
    "ConfigError",
    "EndpointOffline",
    "EnvironmentUnavailable",
    "Executor",
    "InvalidEnvironment",
    "InvalidResourceSpecification",
    "MPIFunction",
    "PayloadTooLarge",
    "QuotaExceeded",
    "RemoteValue",
    "ResultLost",
    "ServiceUnreachable",
    "SerializationError",
    "ShellCommandFailed",
    "ShellFunction",
    "ShellResult",
    "TaskCancelled",
    "TaskFailed",
    "TaskRejected",
    "TetherError",
    "TetherFuture",
    "UnknownEndpoint",
    "VersionMismatch",
    "__version__",
]
