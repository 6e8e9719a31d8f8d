"""YAML configuration files checked against a JSON Schema, with mistakes reported in words.

One place for what the endpoint's ``config.yaml`` and the service's ``service.yaml`` share: a
mistake reads ``<file>: <key>: <what is wrong>``, with close matches for a misspelt key, so an
operator fixes it without reading the schema. Needs ``pyyaml`` and ``jsonschema`` (the endpoint
and service extras), so only those packages import it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError


def key_path(error: jsonschema.ValidationError) -> str:
    """The dotted key an error is about (``tls.cert``), or ``(top level)``."""
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def close_matches(word: str, choices: list[str]) -> str:
    """`` (did you mean 'a' or 'b'?)`` for a misspelt word, or nothing."""
    close = difflib.get_close_matches(word, choices, n=2)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def explain(error: jsonschema.ValidationError) -> str:
    """One readable sentence for a jsonschema error, with 'did you mean' for unknown keys and values."""
    if error.validator == "additionalProperties":
        allowed = list((error.schema.get("properties") or {}).keys())
        extras = [k for k in error.instance if k not in allowed]
        parts = [f"unknown key {key!r}{close_matches(str(key), allowed)}" for key in extras]
        return "; ".join(parts) + f". Allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        choices = [str(e) for e in error.validator_value]
        return f"{error.instance!r} is not one of {', '.join(choices)}{close_matches(str(error.instance), choices)}"
    return error.message


def validate(data: Any, source: str, schema: dict[str, Any], what: str = "configuration") -> None:
    """Raise :class:`ConfigError` listing every problem of ``data`` (read from ``source``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must hold a YAML mapping (key: value lines), not {type(data).__name__}")
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"{source}: {key_path(e)}: {explain(e)}" for e in errors]
        raise ConfigError(f"invalid {what}\n  " + "\n  ".join(lines))


def load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a missing or malformed file is a :class:`ConfigError` naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
