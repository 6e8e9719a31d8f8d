"""Where Tether keeps its state and how the client finds the service.

``TETHER_HOME`` (default ``~/.tether``) holds everything, so tests and several users on one
machine never collide. The service is found from an explicit argument, else the environment
(``TETHER_SERVICE_URL`` + ``TETHER_TOKEN``), else ``$TETHER_HOME/service.json``, which
``tether service start`` writes with mode 0600. A token is a pair with the URL it was issued
for, and is only ever sent there (see :func:`find_service`).
"""

from __future__ import annotations

import json
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .home import service_file
from .urls import check_transport, same_service, service_key, tls_context

__all__ = ["ServiceInfo", "find_service"]


@dataclass(frozen=True)
class ServiceInfo:
    url: str
    token: str
    #: a CA bundle that signs the service's certificate, when it is not in the system's (a
    #: private CA or a self-signed certificate); None: the system CA bundle
    ca_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        return tls_context(self.url, self.ca_file)

    @property
    def ws_url(self) -> str:
        if self.url.startswith("https://"):
            return "wss://" + self.url[len("https://"):]
        if self.url.startswith("http://"):
            return "ws://" + self.url[len("http://"):]
        raise ConfigError(f"service URL {self.url!r} must start with http:// or https://")


def _read_service_file(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read service file ({exc}); restart 'tether service start'") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a service file (a JSON object with url and token); "
                          f"restart 'tether service start'")
    return data


def _private(path: Path) -> bool:
    """Written by this user and by nobody else (so nobody else chose the URL in it)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def find_service(service: str | None = None, token: str | None = None) -> ServiceInfo:
    """Resolve the service URL and the token to send it, never sending a token to a service it
    was not issued for.

    The URL is ``service``, else ``TETHER_SERVICE_URL``, else the ``url`` of
    ``$TETHER_HOME/service.json``. The token is ``token`` when given (the caller chose it).
    Otherwise it comes only from a source that pairs a token with *that same* URL
    (see :func:`same_service`):

    - ``TETHER_SERVICE_URL`` + ``TETHER_TOKEN``;
    - service.json's ``url`` + ``token``;
    - ``TETHER_TOKEN`` set *without* ``TETHER_SERVICE_URL`` is taken as a token for service.json's
      ``url`` (it overrides the file's token), and only if that file is private to this user:
      owned by us and writable by nobody else, so nobody else picked where it goes.

    So ``service=OTHER_URL`` without ``token=`` never sends the file's or the environment's token
    to OTHER_URL: a URL from a notebook, a workflow file or a colleague's example cannot collect
    the user's credentials. That case is a :class:`ConfigError` saying how to give a token.
    """
    env_url = os.environ.get("TETHER_SERVICE_URL") or None
    env_token = os.environ.get("TETHER_TOKEN") or None
    path = service_file()
    data = _read_service_file(path) if not (service and token) else {}
    file_url = data.get("url") if isinstance(data.get("url"), str) else None
    file_token = data.get("token") if isinstance(data.get("token"), str) else None

    url = service or env_url or file_url
    if not url:
        raise ConfigError(
            "no Tether service configured: pass Executor(service=URL), set TETHER_SERVICE_URL and "
            f"TETHER_TOKEN, or run 'tether service start' (which writes {path})"
        )
    if service_key(url) is None:
        raise ConfigError(f"service URL {url!r} must be http:// or https:// followed by a host, "
                          f"e.g. http://127.0.0.1:8421")
    tok = token
    if not tok and env_url and env_token and same_service(env_url, url):
        tok = env_token
    if not tok and file_url and same_service(file_url, url):
        if env_token and not env_url:
            if not _private(path):
                raise ConfigError(
                    f"TETHER_TOKEN is set without TETHER_SERVICE_URL, and {path} (url {file_url}) is not "
                    f"private to you (another user owns it or may write it), so the token is not sent "
                    f"there; set TETHER_SERVICE_URL to the service the token belongs to"
                )
            tok = env_token
        else:
            tok = file_token
    if not tok:  # a Globus login for exactly this service ('tether login')
        from .login import login_token

        tok = login_token(url)
    if not tok:
        raise ConfigError(_no_token_message(url, env_url, env_token, file_url, path))
    check_transport(url)
    ca_file = os.environ.get("TETHER_CA_FILE") or None
    if ca_file is None and file_url and same_service(file_url, url) and isinstance(data.get("ca_file"), str):
        ca_file = data["ca_file"]
    return ServiceInfo(url.rstrip("/"), tok, ca_file)


def _no_token_message(url: str, env_url: str | None, env_token: str | None, file_url: str | None,
                      path: Path) -> str:
    known = []
    if env_url and env_token:
        known.append(f"TETHER_TOKEN belongs to TETHER_SERVICE_URL={env_url}")
    elif env_token:
        known.append(f"TETHER_TOKEN belongs to the service in {path}" + (f" ({file_url})" if file_url else ""))
    if file_url:
        known.append(f"{path} holds a token for {file_url}")
    why = f" ({'; '.join(known)}; a token is only sent to the service it belongs to)" if known else ""
    return (f"no token for the service {url}{why}: pass token=... (Executor(..., service=URL, token=...), "
            f"Client(URL, token=...)), set TETHER_TOKEN together with TETHER_SERVICE_URL={url}, or, for a "
            f"service that accepts Globus Auth, 'tether login --service {url} ...'")
