"""The plugin's settings: ``--tether-*`` options, each also an environment variable ``SNAKEMAKE_TETHER_*``.

No ``from __future__ import annotations`` here: Snakemake reads the field types at run time and
understands ``typing.Optional``, not ``str | None``.
"""

from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

OptionalStr = Optional[str]  # noqa: UP007, UP045 - see the module docstring


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    """``--tether-*`` options (each also an environment variable ``SNAKEMAKE_TETHER_*``)."""

    endpoint_id: OptionalStr = field(
        default=None,
        metadata={
            "help": "The Tether endpoint that runs the jobs ('tether endpoint list' shows yours). A rule can "
            "choose another with resources: tether_endpoint_id=\"ID\".",
            "env_var": True,
            "required": False,
        },
    )
    service: OptionalStr = field(
        default=None,
        metadata={
            "help": "URL of the Tether service (default: $TETHER_SERVICE_URL, else the local service recorded "
            "in $TETHER_HOME/service.json).",
            "env_var": True,
            "required": False,
        },
    )
    token: OptionalStr = field(
        default=None,
        metadata={
            "help": "Token for the Tether service (default: $TETHER_TOKEN, else $TETHER_HOME/service.json). "
            "Prefer the environment variable to keep it out of the process list.",
            "env_var": True,
            "required": False,
        },
    )
    user_endpoint_config: OptionalStr = field(
        default=None,
        metadata={
            "help": "A JSON object of values for a multi-user endpoint's config template, e.g. "
            "'{\"partition\": \"debug\", \"account\": \"abc\"}'. A rule can give its own with "
            "resources: tether_user_endpoint_config='{...}'.",
            "env_var": True,
            "required": False,
        },
    )
    cold_start: bool = field(
        default=False,
        metadata={
            "help": "Start every job in a new Python interpreter on the endpoint, as Snakemake's cluster executors "
            "do, instead of in a fork of a warm runner that has Snakemake imported already (about a second "
            "slower per job; for comparison, or if a job misbehaves only when warm).",
            "env_var": True,
            "required": False,
        },
    )
