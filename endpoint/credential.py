"""An endpoint's credential: how it names itself to the service, and a rotation picked up live.

``tether endpoint start`` registers the endpoint and writes ``credential.json`` (0600) in its
directory; ``tether endpoint rotate-credential`` writes a new one and the service closes the
old connection (code ``CLOSE_CREDENTIAL_ROTATED``). The daemon then re-reads the file instead
of giving up: the new secret arrives just after the close. A user endpoint gets its credential
on stdin and has no file; it never rotates.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tether.errors import ConfigError

FILE = "credential.json"


def read_credential(directory: Path) -> dict[str, str]:
    path = directory / FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: register the endpoint with 'tether endpoint start'") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


class Credential:
    """The endpoint's id and secret, and the directory a rotated secret appears in."""

    def __init__(self, directory: Path, fields: dict[str, str]):
        self.directory = directory
        self.endpoint_id = fields["endpoint_id"]
        self.secret = fields["secret"]

    def headers(self) -> dict[str, str]:
        """What the endpoint's WebSocket opens with."""
        return {"Authorization": f"Bearer {self.secret}", "X-Tether-Endpoint": self.endpoint_id}

    def reload(self) -> bool:
        """Take a credential rotated on disk; True if the secret changed."""
        try:
            fresh = read_credential(self.directory)
        except ConfigError:
            return False
        if fresh.get("endpoint_id") != self.endpoint_id or fresh.get("secret") in (None, self.secret):
            return False
        self.secret = fresh["secret"]
        return True

    async def rotated(self, patience: float) -> bool:
        """Wait up to ``patience`` seconds for a rotated credential; True once it is here."""
        deadline = time.monotonic() + patience
        while not self.reload():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True
