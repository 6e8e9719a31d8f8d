"""A user endpoint's configuration: the administrator's Jinja template, rendered with the
values a user passed in ``user_endpoint_config`` after the administrator's JSON Schema
accepted them.

The template runs in Jinja's sandbox with undefined names as errors, and every value it prints
is written as a JSON scalar (valid YAML), so a value can never add keys, lines or YAML tags
of its own: ``"debug\\nengine: {type: thread}"`` stays one string. The rendered text is then
validated as an endpoint configuration like any other.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import jsonschema
from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment

from tether.errors import ConfigError

from .config import EndpointConfig, parse_config
from .identity import LocalAccount

#: variables the endpoint provides; a user's config may not set them
RESERVED = ("local_user", "local_uid", "local_home", "identity_id", "identity_username", "endpoint_name",
            "python_version")


class UserConfigRefused(Exception):
    """The user's config, or the template it is rendered with, is refused; the message says why."""


def _as_yaml_scalar(value: Any) -> str:
    """Every printed value as JSON: strings quoted and escaped, numbers and booleans as they are."""
    if isinstance(value, str | int | float | bool) or value is None:
        return json.dumps(value)
    return json.dumps(value, default=str)


_env = SandboxedEnvironment(undefined=StrictUndefined, finalize=_as_yaml_scalar, autoescape=False,
                            keep_trailing_newline=True)


def check_values(values: dict[str, Any], schema: dict[str, Any]) -> None:
    """Refuse values the administrator's schema does not allow (all problems in one message)."""
    clash = sorted(set(values) & set(RESERVED))
    if clash:
        raise UserConfigRefused(f"user_endpoint_config may not set {', '.join(clash)} (provided by the endpoint)")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(values), key=lambda e: list(e.path))
    if errors:
        parts = [f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors]
        allowed = sorted((schema.get("properties") or {}).keys())
        hint = (f" (allowed keys: {', '.join(allowed)}; 'tether endpoint show-config-schema ENDPOINT_ID' shows the "
                "whole schema)") if allowed else ""
        raise UserConfigRefused("user_endpoint_config refused by this endpoint's schema: " + "; ".join(parts) + hint)


def template_variables(template_text: str) -> list[str]:
    """The variables a user config template uses that a user may give (those the endpoint
    provides, such as ``local_user``, left out): what ``show-config-schema`` lists."""
    return sorted(meta.find_undeclared_variables(_env.parse(template_text)) - set(RESERVED))


def render(template_text: str, values: dict[str, Any], account: LocalAccount, identity: dict[str, str],
           endpoint_name: str) -> str:
    """The template rendered with the user's values and the reserved variables."""
    context = {**values, "local_user": account.name, "local_uid": account.uid, "local_home": account.home,
               "identity_id": identity.get("id", ""), "identity_username": identity.get("username", ""),
               "endpoint_name": endpoint_name, "python_version": platform.python_version()}
    try:
        return _env.from_string(template_text).render(context)
    except TemplateError as exc:
        raise UserConfigRefused(f"the endpoint's config template failed for this config: {exc}") from None


def user_endpoint_config(directory: Path, template_file: str, schema_file: str, values: dict[str, Any],
                         account: LocalAccount, identity: dict[str, str], endpoint_name: str,
                         user_endpoint_name: str) -> tuple[str, EndpointConfig]:
    """Check, render and validate: (the config text, the parsed config), or UserConfigRefused."""
    try:
        schema = json.loads((directory / schema_file).read_text())
        template_text = (directory / template_file).read_text()
    except (OSError, ValueError) as exc:
        raise UserConfigRefused(f"the endpoint's template or schema cannot be read: {exc}") from None
    check_values(values, schema)
    text = render(template_text, values, account, identity, endpoint_name)
    try:
        config = parse_config(user_endpoint_name, text, f"{template_file} rendered for {account.name}")
    except ConfigError as exc:
        raise UserConfigRefused(str(exc)) from None
    if config.multi_user:
        raise UserConfigRefused("a user endpoint's config may not itself be multi-user")
    return text, config


DEFAULT_TEMPLATE = """\
# The configuration of each user endpoint, rendered for every (user, user_endpoint_config).
# Values the user passes in user_endpoint_config are checked by user_config_schema.json first;
# every value inserted with double braces is written quoted, so a value cannot add keys or lines
# (Jinja reads this whole file, comments too: braces here would be rendered). Reserved variables:
# local_user, local_uid, local_home, identity_id, identity_username, endpoint_name, python_version.
engine:
  type: process
  workers: {{ workers | default(2) }}
heartbeat_s: 5
"""

DEFAULT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "workers": {"type": "integer", "minimum": 1, "maximum": 16},
    },
    "additionalProperties": False,
}
