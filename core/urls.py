"""Service URLs: which two name the same service (a token goes only where it belongs), how an
https service's certificate is checked, and that credentials never cross a network in clear."""

from __future__ import annotations

import ipaddress
import os
import ssl
from urllib.parse import urlsplit

from .errors import ConfigError


def tls_context(url: str, ca_file: str | None = None) -> ssl.SSLContext | None:
    """How an https:// service's certificate is verified (always verified: no opt-out): against
    ``ca_file``, else the system CA bundle. None for http:// (loopback or explicitly allowed)."""
    if not url.startswith("https://"):
        return None
    return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()


def same_service(a: str, b: str) -> bool:
    """Whether two URLs name the same service: scheme and host compared without case, default
    ports made explicit, a trailing slash ignored. ``localhost`` and ``127.0.0.1`` differ (no
    name resolution: a token is sent only where it visibly belongs)."""
    key = service_key(a)
    return key is not None and key == service_key(b)


def service_key(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of a service URL, or None if it is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80), parts.path.rstrip("/")


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str) -> None:
    """Refuse to send credentials over plain http beyond this host, unless explicitly allowed
    (``TETHER_ALLOW_INSECURE_HTTP=1``, for a network you trust, e.g. a test cluster)."""
    parts = urlsplit(url)
    if parts.scheme == "http" and not _loopback(parts.hostname) and os.environ.get("TETHER_ALLOW_INSECURE_HTTP") != "1":
        raise ConfigError(
            f"refusing to send credentials over plain http to {url}: tokens would cross the network "
            "unencrypted. Use an https:// URL (tether service start --tls-cert ... --tls-key ...), or set "
            "TETHER_ALLOW_INSECURE_HTTP=1 if this network is trusted"
        )


__all__ = ["check_transport", "same_service", "service_key", "tls_context"]
