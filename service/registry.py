"""Who and what is registered: users and their tokens, endpoints and their credentials, the
function bodies users submit. Queries of :class:`tether.service.store.Store` like the tasks'
(it inherits these), kept apart because they change for other reasons than the task path.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    and_,
    delete,
    func,
    select,
    tuple_,
    update,
)

from .database import Database, chunks, credential_hash
from .tables import endpoints, functions, tasks, users


class EndpointIdTaken(Exception):
    """The endpoint id exists (another owner's, or deleted): ids are never issued twice."""


class Registry(Database):
    """Users, endpoints and function bodies (see the module's docstring)."""

    # --- users -------------------------------------------------------------------------------
    def create_user(self, name: str, token: str | None = None) -> tuple[str, str]:
        """Create a user, or give an existing one a new token (the old one stops working at
        once); returns (user_id, token)."""
        token = token or secrets.token_urlsafe(32)
        with self._tx() as conn:
            row = conn.execute(select(users.c.id).where(users.c.name == name)).first()
            if row:
                conn.execute(update(users).where(users.c.id == row.id).values(token_hash=credential_hash(token)))
                return row.id, token
            user_id = str(uuid.uuid4())
            conn.execute(users.insert().values(id=user_id, name=name, token_hash=credential_hash(token),
                                               created_at=time.time()))
        return user_id, token

    def ensure_user(self, name: str, token: str | None = None) -> tuple[str, str | None]:
        """Create a user with ``token`` (or a new one) unless it exists; an existing user's token
        is never changed. Returns (user_id, the token if it is the user's current one, else None).

        For a database several service replicas share: a replica starting must not rotate a
        token that the others (and their clients) use."""
        with self._tx() as conn:
            row = conn.execute(select(users.c.id, users.c.token_hash).where(users.c.name == name)).first()
            if row:
                current = token is not None and secrets.compare_digest(row.token_hash, credential_hash(token))
                return row.id, token if current else None
        return self.create_user(name, token)

    def revoke_user_token(self, name: str) -> bool:
        """Revoke a user's token: every request and connection with it is refused (no new token
        until ``create_user`` issues one). False if there is no such user."""
        with self._tx() as conn:
            res = conn.execute(update(users).where(users.c.name == name).values(token_hash="revoked"))
        return bool(res.rowcount)

    def user_by_token(self, token: str) -> str | None:
        """The user a token belongs to. Not cached: a token rotated or revoked by
        ``tether service ...`` (another process, same database) is refused at once."""
        with self._tx() as conn:
            row = conn.execute(select(users.c.id).where(users.c.token_hash == credential_hash(token))).first()
        return row.id if row else None

    def user_for_identity(self, identity_id: str, username: str) -> str:
        """The service user of a Globus identity (made on first sight): its id is the identity
        id, its name the Globus username (suffixed if a local user already has that name)."""
        with self._tx() as conn:
            if conn.execute(select(users.c.id).where(users.c.id == identity_id)).first() is None:
                taken = conn.execute(select(users.c.id).where(users.c.name == username)).first() is not None
                name = f"{username}#{identity_id[:8]}" if taken else username
                conn.execute(users.insert().values(id=identity_id, name=name, token_hash="globus",
                                                   created_at=time.time()))
        return identity_id

    def valid_token_hashes(self, hashes: Iterable[str]) -> set[str]:
        """Which of these token hashes still authenticate someone (for open connections)."""
        wanted = list(set(hashes))
        out: set[str] = set()
        with self._tx() as conn:
            for chunk in chunks(wanted):
                out.update(r.token_hash for r in conn.execute(
                    select(users.c.token_hash).where(users.c.token_hash.in_(chunk))))
        return out

    def user_name(self, user_id: str) -> str | None:
        with self._tx() as conn:
            row = conn.execute(select(users.c.name).where(users.c.id == user_id)).first()
        return row.name if row else None

    # --- endpoints ---------------------------------------------------------------------------
    def register_endpoint(self, owner: str, name: str, endpoint_id: str | None = None,
                          multi_user: bool = False) -> tuple[str, str]:
        """Register a new endpoint (the service makes its id), or re-issue the credential of an
        endpoint the owner has (the old credential stops working).

        Raises KeyError for an id that does not exist and EndpointIdTaken for one that is
        another user's or deleted: an endpoint id is never handed to anyone else.
        """
        secret = secrets.token_urlsafe(32)
        with self._tx() as conn:
            if endpoint_id:
                row = conn.execute(select(endpoints).where(endpoints.c.id == endpoint_id)).first()
                if row is None:
                    raise KeyError(endpoint_id)
                if row.owner_id != owner or row.deleted_at is not None or row.parent_id is not None:
                    raise EndpointIdTaken(endpoint_id)
                conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                             .values(secret_hash=credential_hash(secret), name=name, multi_user=multi_user))
                return endpoint_id, secret
            endpoint_id = str(uuid.uuid4())
            conn.execute(endpoints.insert().values(
                id=endpoint_id, owner_id=owner, name=name, secret_hash=credential_hash(secret), created_at=time.time(),
                multi_user=multi_user))
        return endpoint_id, secret

    def set_policy(self, endpoint_id: str, policy: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id).values(policy=json.dumps(policy)))

    def user_endpoint_for(self, parent: dict[str, Any], user_id: str, user_name: str,
                          config: dict[str, Any] | None) -> str:
        """The id of the user endpoint that runs ``user_id``'s tasks with ``config`` on the
        multi-user endpoint ``parent`` (made on first use; one per user and config)."""
        canonical = json.dumps(config or {}, sort_keys=True, separators=(",", ":"))
        child_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"tether:{parent['id']}:{user_id}:{canonical}"))
        with self._tx():
            self._insert(endpoints, [{
                "id": child_id, "owner_id": user_id, "name": f"{parent['name']}.{user_name}"[:255],
                "secret_hash": "unset", "created_at": time.time(), "parent_id": parent["id"],
                "user_config": canonical,
            }])
        return child_id

    def new_secret(self, endpoint_id: str) -> str:
        """A fresh credential for an endpoint (the previous one stops working)."""
        secret = secrets.token_urlsafe(32)
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                         .values(secret_hash=credential_hash(secret)))
        return secret

    def void_secret(self, endpoint_id: str) -> None:
        """Make an endpoint's credential useless until a new one is issued (``new_secret``)."""
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id).values(secret_hash="revoked"))

    def set_local_user(self, endpoint_id: str, local_user: str) -> None:
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id).values(local_user=local_user))

    def user_endpoints(self, parent_id: str, owner: str | None = None) -> list[dict[str, Any]]:
        """The user endpoints of a multi-user endpoint (only ``owner``'s, when given)."""
        cond = and_(endpoints.c.parent_id == parent_id, endpoints.c.deleted_at.is_(None))
        if owner is not None:
            cond = and_(cond, endpoints.c.owner_id == owner)
        with self._tx() as conn:
            rows = conn.execute(select(endpoints).where(cond).order_by(endpoints.c.created_at)).all()
        return [dict(r._mapping) for r in rows]

    def endpoint_by_secret(self, endpoint_id: str, secret: str) -> dict[str, Any] | None:
        ep = self.get_endpoint(endpoint_id)
        if ep is None or ep["deleted_at"] is not None \
                or not secrets.compare_digest(ep["secret_hash"], credential_hash(secret)):
            return None
        return ep

    def valid_endpoint_secrets(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (endpoint id, secret hash) pairs still authenticate a live endpoint."""
        wanted = dict(pairs)
        out: set[tuple[str, str]] = set()
        with self._tx() as conn:
            for chunk in chunks(list(wanted)):
                for r in conn.execute(select(endpoints.c.id, endpoints.c.secret_hash)
                                      .where(and_(endpoints.c.id.in_(chunk), endpoints.c.deleted_at.is_(None)))):
                    out.add((r.id, r.secret_hash))
        return out

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any] | None:
        """An endpoint's row, deleted ones included (check ``deleted_at``)."""
        with self._tx() as conn:
            row = conn.execute(select(endpoints).where(endpoints.c.id == endpoint_id)).first()
        return dict(row._mapping) if row else None

    def list_endpoints(self, owner: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(endpoints).where(and_(endpoints.c.owner_id == owner, endpoints.c.deleted_at.is_(None),
                                             endpoints.c.parent_id.is_(None)))
                .order_by(endpoints.c.created_at)
            ).all()
        return [dict(r._mapping) for r in rows]

    def save_endpoint_status(self, endpoint_id: str, status: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                         .values(status=json.dumps(status), last_seen=time.time()))

    # --- functions ---------------------------------------------------------------------------
    def add_functions(self, owner: str, bodies: dict[str, bytes], quota: int | None = None) -> set[str]:
        """Keep function bodies under (owner, id); callers check that each id is its body's hash.

        Returns the ids refused because keeping them would take the owner past ``quota`` bytes
        of function bodies. The check and the insert are one transaction under the owner's lock,
        so concurrent registrations cannot overshoot. A body kept already is never refused: sent
        again, it only counts as registered now (``created_at``), which keeps it from the purge.
        """
        if not bodies:
            return set()
        now = time.time()
        refused: set[str] = set()
        with self._tx() as conn:
            if quota is not None:
                self.lock_owner(conn, owner, "functions")
                mine = functions.c.owner_id == owner
                kept = {r.id for r in conn.execute(select(functions.c.id).where(
                    and_(mine, functions.c.id.in_(list(bodies)))))}
                used = conn.execute(select(func.coalesce(func.sum(func.length(functions.c.body)), 0))
                                    .where(mine)).scalar_one()
                for fid, body in bodies.items():
                    if fid in kept:
                        continue
                    if used + len(body) > quota:
                        refused.add(fid)
                    else:
                        used += len(body)
            fresh = {fid: body for fid, body in bodies.items() if fid not in refused}
            if fresh:
                self._insert(functions, [{"owner_id": owner, "id": fid, "body": b, "created_at": now}
                                         for fid, b in fresh.items()])
                conn.execute(update(functions).where(and_(functions.c.owner_id == owner,
                                                          functions.c.id.in_(list(fresh)),
                                                          functions.c.created_at < now)).values(created_at=now))
        for fid, body in fresh.items():
            self._function_cache[(owner, fid)] = body
        return refused

    def purge_functions(self, retention_s: float) -> int:
        """Forget function bodies registered more than ``retention_s`` ago that no stored task
        names (a client sends a forgotten body again when the service says it does not know it)."""
        named = select(tasks.c.owner_id, tasks.c.function_id)
        with self._tx() as conn:
            res = conn.execute(delete(functions).where(and_(
                functions.c.created_at < time.time() - retention_s,
                tuple_(functions.c.owner_id, functions.c.id).not_in(named))))
        if res.rowcount:
            self._function_cache.clear()
        return res.rowcount or 0

    def get_function(self, owner: str, fid: str) -> bytes | None:
        body = self._function_cache.get((owner, fid))
        if body is None:
            with self._tx() as conn:
                row = conn.execute(
                    select(functions.c.body).where(and_(functions.c.owner_id == owner, functions.c.id == fid))
                ).first()
            if row is None:
                return None
            body = self._function_cache[(owner, fid)] = row.body
        return body
