"""Who a bearer token belongs to: the service's own tokens (``tether service user-add``), or
Globus Auth access tokens, validated by introspection with the service's own Globus client
credentials.

Globus identities become service users keyed by their Globus identity id (what a multi-user
endpoint's identity mapping sees, with the Globus username). Introspection is a network call:
it runs off the event loop, and its answer is cached briefly (``GLOBUS_CACHE_S``) so a busy
client does not cost one call per request; a token revoked at Globus stops working within that
time, open connections included (the relay re-checks them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .async_store import AsyncStore
from .authentication_policy import Identity
from .database import credential_hash

log = logging.getLogger("tether.service.auth")

GLOBUS_CACHE_S = 60.0
GLOBUS_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class GlobusSettings:
    client_id: str
    client_secret: str
    #: the scope a token must carry to be accepted (None: any token Globus issued for this client)
    required_scope: str | None = None
    #: Globus Auth's base URL (None: production); for a test or a non-production environment
    base_url: str | None = None

    @classmethod
    def from_files(cls, client_id: str, secret_file: str, required_scope: str | None = None,
                   base_url: str | None = None) -> GlobusSettings:
        """The client secret is read from a file (mode 0600), never from the command line."""
        path = Path(secret_file)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(f"{path} has mode {mode:04o}: others than its owner may read or change it, and it holds "
                             f"the Globus client secret; chmod 600 {path}")
        return cls(client_id, path.read_text().strip(), required_scope, base_url)


class Authenticator:
    """Bearer token -> service user id, or None."""

    def __init__(self, db: AsyncStore, globus: GlobusSettings | None = None):
        self.db = db
        self.globus = globus
        self._client: Any = None
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()  # token hash -> (user, valid until)
        #: token hash -> (Globus username, time of its session's last sign-in): what authentication
        #: policies check (per token: one user's tokens may come from older and newer sessions)
        self._identities: OrderedDict[str, Identity] = OrderedDict()

    async def user_for(self, token: str) -> str | None:
        user = await self.db.user_by_token(token)
        if user is not None or self.globus is None:
            return user
        return await self._globus_user(token)

    def identity_of(self, token: str) -> Identity | None:
        """The Globus identity behind ``token`` as last introspected (username, sign-in time), or
        None for a token of this service's own."""
        return self._identities.get(credential_hash(token)) if self.globus is not None else None

    async def still_valid_at_globus(self, token: str) -> bool:
        """For open connections whose token the store no longer (or never) knew: is it a Globus
        token that is still good (the cached answer, re-asked when it expired)?"""
        return self.globus is not None and await self._globus_user(token) is not None

    async def _globus_user(self, token: str) -> str | None:
        key = credential_hash(token)
        hit = self._cache.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, self._introspect, token)
        except Exception as exc:  # noqa: BLE001 - Globus unreachable: refuse, say so in the log
            log.warning("Globus Auth introspection failed: %s", exc)
            return None
        user = await self._accept(data)
        self._cache.pop(key, None)
        self._identities.pop(key, None)
        if user is not None:
            self._identities[key] = (str(data["username"]), _signed_in_at(data, str(data["sub"])))
            while len(self._identities) > GLOBUS_CACHE_SIZE:
                self._identities.popitem(last=False)
            valid_until = time.monotonic() + min(GLOBUS_CACHE_S, max(0.0, float(data.get("exp", 0)) - time.time()))
            self._cache[key] = (user, valid_until)
            while len(self._cache) > GLOBUS_CACHE_SIZE:
                self._cache.popitem(last=False)
        return user

    def _introspect(self, token: str) -> dict[str, Any]:
        if self._client is None:
            import globus_sdk

            assert self.globus is not None
            self._client = globus_sdk.ConfidentialAppAuthClient(self.globus.client_id, self.globus.client_secret,
                                                                base_url=self.globus.base_url)
        return dict(self._client.oauth2_token_introspect(token, include="session_info").data)

    async def _accept(self, data: dict[str, Any]) -> str | None:
        """The service user for an introspection answer, or None if the token must be refused."""
        assert self.globus is not None
        if not data.get("active"):
            return None
        if float(data.get("exp", 0)) <= time.time():
            return None
        scopes = str(data.get("scope", "")).split()
        if self.globus.required_scope and self.globus.required_scope not in scopes:
            log.info("refusing a Globus token without scope %s", self.globus.required_scope)
            return None
        identity, username = data.get("sub"), data.get("username")
        if not isinstance(identity, str) or not isinstance(username, str):
            return None
        return await self.db.user_for_identity(identity, username)


def _signed_in_at(data: dict[str, Any], identity: str) -> float | None:
    """When ``identity`` last signed in, from an introspection's ``session_info`` (None if it
    does not say): its own authentication, else the session's latest."""
    authentications = (data.get("session_info") or {}).get("authentications") or {}
    if not isinstance(authentications, dict):
        return None
    times = {k: v.get("auth_time") for k, v in authentications.items() if isinstance(v, dict)}
    chosen = times.get(identity) or max((t for t in times.values() if isinstance(t, int | float)), default=None)
    return float(chosen) if isinstance(chosen, int | float) else None
