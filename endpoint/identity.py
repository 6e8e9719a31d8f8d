"""Who runs a user's tasks: map a submitting identity to a local account, and refuse the
accounts no user code may run as.

The rules are the ``globus-identity-mapping`` format that Globus Connect Server and Globus
Compute administrators already write (expression rules, or an external program), read from
the multi-user endpoint's ``identity_mapping.json`` and re-read whenever that file changes.
The identity they see is ``{"id": <service user id>, "username": <service user name>}``.
"""

from __future__ import annotations

import json
import logging
import pwd
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("tether.endpoint.identity")


class MappingRefused(Exception):
    """The identity maps to no account this endpoint will run code as; the message says why."""


@dataclass(frozen=True)
class LocalAccount:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


#: accounts that stand for "no one" and must never own a user's work, whatever their uid
SPECIAL_ACCOUNTS = frozenset({"nobody", "nfsnobody", "nogroup"})
#: shells of accounts nobody may log in to
NOLOGIN_SHELLS = frozenset({"nologin", "false"})


class IdentityMapper:
    """The mapping rules of one file, reloaded when the file changes."""

    def __init__(self, path: Path, min_uid: int = 1000, max_uid: int = 60000, allow_nologin_shells: bool = False):
        self.path = path
        self.min_uid = min_uid
        self.max_uid = max_uid
        self.allow_nologin_shells = allow_nologin_shells
        self._stamp: tuple[int, int] | None = None
        self._mappers: list[Any] = []
        self._lock = threading.Lock()

    def _load(self) -> list[Any]:
        from globus_identity_mapping.loader import load_mappers

        try:
            stat = self.path.stat()
        except OSError as exc:
            raise MappingRefused(f"identity mapping file {self.path} cannot be read: {exc.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    documents = json.loads(self.path.read_text())
                    if isinstance(documents, dict):
                        documents = [documents]
                    self._mappers = load_mappers(documents)
                except Exception as exc:  # noqa: BLE001 - JSON or rule errors: refuse, in words
                    raise MappingRefused(f"identity mapping file {self.path} is invalid: {exc}") from None
                self._stamp = stamp
                log.info("loaded %d identity mapping rule set(s) from %s", len(self._mappers), self.path)
            return self._mappers

    def local_account(self, identity: dict[str, str]) -> LocalAccount:
        """The local account for ``identity``, or MappingRefused in words."""
        name = None
        for mapper in self._load():
            try:
                name = mapper.map_identity(identity)
            except Exception as exc:  # noqa: BLE001 - a rule or an external program failed
                raise MappingRefused(f"identity mapping failed for {identity.get('username')!r}: {exc}") from None
            if name:
                break
        if not name:
            raise MappingRefused(f"no local account is mapped to identity {identity.get('username')!r} "
                                 f"({identity.get('id')}); ask the endpoint's administrator to add a rule")
        return self.check_account(name)

    def check_account(self, name: str) -> LocalAccount:
        """Refuse root, accounts outside ``min_uid``..``max_uid`` (system accounts below, and
        ``nobody`` and other special accounts above), accounts that cannot log in (a no-login
        shell, unless the administrator allows them) and accounts that do not exist."""
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise MappingRefused(f"the identity maps to {name!r}, which is not an account on this host") from None
        if pw.pw_uid == 0 or pw.pw_gid == 0:
            raise MappingRefused(f"the identity maps to {name!r}, a privileged account; user code never runs as root")
        if pw.pw_uid < self.min_uid:
            raise MappingRefused(f"the identity maps to {name!r} (uid {pw.pw_uid}), under this endpoint's min_uid "
                                 f"{self.min_uid}: system accounts are refused")
        if pw.pw_name in SPECIAL_ACCOUNTS or pw.pw_uid > self.max_uid:
            raise MappingRefused(f"the identity maps to {name!r} (uid {pw.pw_uid}), a special account above this "
                                 f"endpoint's max_uid {self.max_uid} (such as nobody): it is refused")
        shell = pw.pw_shell or "/bin/sh"
        if not self.allow_nologin_shells and Path(shell).name in NOLOGIN_SHELLS:
            raise MappingRefused(f"the identity maps to {name!r}, whose shell {shell} does not allow logging in; "
                                 "such accounts are refused unless the administrator sets allow_nologin_shells: true")
        return LocalAccount(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell or "/bin/sh")


DEFAULT_MAPPING = [
    {
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [
            # the service's user name is the local account's name; edit to suit your site, e.g.
            # {"source": "{username}", "match": "(.*)@example\\.org", "output": "{0}"}
            {"source": "{username}", "match": "(.*)", "output": "{0}"},
        ],
    }
]
