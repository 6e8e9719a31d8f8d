"""Who may still be connected, and who may send tasks where: revoked tokens and rotated
credentials close their connections; a multi-user endpoint's policy decides which users it
serves, on every submission and every connection, and a user it stops admitting loses their
user endpoints and their open tasks there, in words.

A layer of the relay (see ``relay.py``), kept apart because these are the trust rules: one
place to read to see what a revocation or a policy change does to live connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tether.protocol import CLOSE_AUTH_FAILED, CLOSE_CREDENTIAL_ROTATED, DEFAULT_PREFETCH, ErrorCode

from .async_store import AsyncStore
from .bus import LocalBus, RabbitBus
from .lifecycle import EndpointLifecycle
from .sessions import close_quietly

log = logging.getLogger("tether.service.relay")


def not_admitted_message(parent_id: str) -> str:
    """Why a user endpoint or task is refused once its owner is out of the parent's policy."""
    return (f"multi-user endpoint {parent_id} no longer admits you: its owner removed you from its allowed_users; "
            "ask them to add you again")


class Policy(EndpointLifecycle):
    """Credentials of live connections and multi-user endpoints' policies, enforced."""

    def __init__(self, db: AsyncStore, bus: LocalBus | RabbitBus | None = None, prefetch: int = DEFAULT_PREFETCH,
                 authenticator: Any = None):
        super().__init__(db, bus, prefetch)
        self.authenticator = authenticator  # service.auth.Authenticator: re-checks Globus tokens

    async def credential_loop(self, interval: float = 1.0) -> None:
        """Close connections whose token or endpoint credential was revoked or rotated, within
        ``interval`` seconds, even when that happened in another process (``tether service``)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.enforce_credentials()
            except Exception:  # noqa: BLE001 - checked again next time
                log.exception("checking credentials of open connections failed")

    async def enforce_credentials(self) -> None:
        # only the sessions asked about are judged: one that connected while the store answered
        # (an endpoint reconnecting, say) is not in the answer, and was checked when it connected
        clients = list(self.clients)
        if clients:
            valid = await self.db.valid_token_hashes([s.token_hash for s in clients])
            for session in [s for s in clients if s.token_hash not in valid and s in self.clients]:
                if self.authenticator is not None and await self.authenticator.still_valid_at_globus(session.token):
                    continue  # a Globus token (cached answer, re-asked when it expires)
                log.info("closing a connection of user %s: its token was revoked or rotated", session.user_id)
                self.clients.discard(session)
                await close_quietly(session, CLOSE_AUTH_FAILED, "token revoked or rotated; get a new one")
        endpoints = list(self.endpoints.values())
        if endpoints:
            valid_pairs = await self.db.valid_endpoint_secrets([(e.endpoint_id, e.secret_hash) for e in endpoints])
            for session in [e for e in endpoints if (e.endpoint_id, e.secret_hash) not in valid_pairs
                            and self.endpoints.get(e.endpoint_id) is e]:
                await self.disconnect_endpoint(session.endpoint_id, CLOSE_CREDENTIAL_ROTATED,
                                               "this endpoint's credential was replaced or revoked")

    async def admits(self, user_id: str, ep: dict[str, Any]) -> bool:
        """Whether a multi-user endpoint's policy lets ``user_id`` (or their name) send it tasks."""
        if not ep.get("multi_user") or not ep.get("policy"):
            return False
        policy = json.loads(ep["policy"])
        users = policy.get("users") or []
        return bool(policy.get("public")) or user_id in users or await self.db.user_name(user_id) in users

    async def parent_admits(self, child: dict[str, Any], parent: dict[str, Any] | None) -> bool:
        """Whether a user endpoint may still serve its owner: its multi-user endpoint exists and
        its owner is that endpoint's owner or admitted by its policy (asked on every submission
        and every connection, so removing a user from ``allowed_users`` holds on every path)."""
        return parent is not None and parent["deleted_at"] is None and (
            parent["owner_id"] == child["owner_id"] or await self.admits(child["owner_id"], parent))

    async def enforce_policy(self, parent_id: str) -> int:
        """After a multi-user endpoint's policy changed: the user endpoints of users it no longer
        admits lose their credential and their connection (the process exits), and their open
        tasks fail saying why. Returns how many user endpoints were stopped."""
        parent = await self.db.get_endpoint(parent_id)
        stopped = 0
        for child in await self.db.user_endpoints(parent_id):
            if await self.parent_admits(child, parent):
                continue
            stopped += 1
            await self.db.void_secret(child["id"])
            why = not_admitted_message(parent_id)
            error = {"type": "NotAdmitted", "code": ErrorCode.NOT_ADMITTED.value, "message": why}
            rows = await self._fail_open_tasks(child["id"], error)
            await self.disconnect_endpoint(child["id"], CLOSE_AUTH_FAILED, why)
            await self._announce_failed_tasks(rows, error)
            log.info("multi-user endpoint %s no longer admits %s: user endpoint %s stopped, %d open task(s) failed",
                     parent_id, child["owner_id"], child["id"], len(rows))
        return stopped
