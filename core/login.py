"""``tether login``: Globus Auth tokens for a service that accepts them, with globus-sdk's
native-app flow and its token storage.

A login is for one service URL: ``$TETHER_HOME/logins.json`` (0600) says which Globus client and
scope it used, and globus-sdk's JSON token storage (``$TETHER_HOME/globus_tokens.json``, 0600)
keeps the tokens. :func:`login_token` is what :func:`tether.config.find_service` asks when no
other token is paired with a URL; it refreshes an expired access token with the refresh token.
globus-sdk is imported only here, so the base install does not need it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from .errors import ConfigError
from .home import tether_home, write_secret
from .urls import same_service


def _logins_file() -> Any:
    return tether_home() / "logins.json"


def _storage() -> Any:
    from globus_sdk.token_storage import JSONTokenStorage

    return JSONTokenStorage(tether_home() / "globus_tokens.json")


def _read_logins() -> dict[str, dict[str, str]]:
    try:
        return json.loads(_logins_file().read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConfigError(f"{_logins_file()}: not valid JSON ({exc}); 'tether logout' and log in again") from None


def _auth_client(record: dict[str, str]) -> Any:
    import globus_sdk

    return globus_sdk.NativeAppAuthClient(record["client_id"], base_url=record.get("auth_url") or None)


def login(service_url: str, client_id: str, scope: str, ask_code: Callable[[str], str],
          auth_url: str | None = None) -> dict[str, Any]:
    """Run the native-app flow: show the authorization URL, take the code the user pastes, keep the
    tokens. Returns the token data for the service's scope."""
    try:
        import globus_sdk  # noqa: F401
    except ImportError:
        raise ConfigError("tether login needs globus-sdk: pip install 'tether[globus]'") from None
    record = {"client_id": client_id, "scope": scope, "auth_url": auth_url or ""}
    client = _auth_client(record)
    client.oauth2_start_flow(requested_scopes=scope, refresh_tokens=True)
    code = ask_code(client.oauth2_get_authorize_url()).strip()
    if not code:
        raise ConfigError("no authorization code given; run 'tether login' again")
    tokens = client.oauth2_exchange_code_for_tokens(code)
    data = _for_scope(tokens.by_resource_server, scope)
    if data is None:
        raise ConfigError(f"Globus Auth issued no token for scope {scope}; check --scope")
    storage = _storage()
    storage.store_token_response(tokens)
    logins = _read_logins()
    logins[service_url.rstrip("/")] = {**record, "resource_server": data["resource_server"]}
    write_secret(_logins_file(), json.dumps(logins, indent=2))
    return data


def _for_scope(by_resource_server: dict[str, Any], scope: str) -> dict[str, Any] | None:
    for resource_server, data in by_resource_server.items():
        if scope in str(data.get("scope", "")).split():
            return {**data, "resource_server": resource_server}
    return None


def _find(service_url: str) -> tuple[str, dict[str, str]] | None:
    for url, record in _read_logins().items():
        if same_service(url, service_url):
            return url, record
    return None


def login_token(service_url: str) -> str | None:
    """The access token of a login for this service (refreshed if it expired), or None."""
    if not _logins_file().exists():
        return None
    found = _find(service_url)
    if found is None:
        return None
    _, record = found
    storage = _storage()
    data = storage.get_token_data(record["resource_server"])
    if data is None:
        return None
    if data.expires_at_seconds > time.time() + 30:
        return data.access_token
    if not data.refresh_token:
        raise ConfigError(f"your Globus login for {service_url} has expired; run 'tether login' again")
    tokens = _auth_client(record).oauth2_refresh_token(data.refresh_token)
    storage.store_token_response(tokens)
    fresh = storage.get_token_data(record["resource_server"])
    return fresh.access_token if fresh else None


def logout(service_url: str) -> bool:
    """Revoke this service's tokens at Globus and forget them; False if there was no login."""
    found = _find(service_url)
    if found is None:
        return False
    url, record = found
    storage = _storage()
    data = storage.get_token_data(record["resource_server"])
    if data is not None:
        client = _auth_client(record)
        for token in (data.access_token, data.refresh_token):
            if token:
                client.oauth2_revoke_token(token)
        storage.remove_token_data(record["resource_server"])
    logins = _read_logins()
    logins.pop(url, None)
    write_secret(_logins_file(), json.dumps(logins, indent=2))
    return True
