"""An endpoint's authentication policy: which identities may send it tasks, by domain and by
how recently they signed in (Globus Compute's ``authentication_policy``, high-assurance
endpoints).

The endpoint's administrator writes it in config.yaml::

    authentication_policy:
      allowed_domains: [example.org]   # identities must be user@example.org (or a subdomain)
      max_session_age_s: 3600          # and must have signed in within the last hour

``tether endpoint start`` hands it to the service with the endpoint's policy; the service
checks every submission against it before a task reaches the endpoint (the submitter's Globus
identity and the time of its last sign-in come from introspecting their token with its
session information). A user with only a token of this service's own has no identity provider
to vouch for either, and is refused where a policy asks for one. Refusals say what is asked and
what to do (sign in again, with an identity from the right domain).
"""

from __future__ import annotations

import time
from typing import Any

from tether.protocol import ErrorCode

#: an identity as the policy sees it: (Globus username, time of its last sign-in or None)
Identity = tuple[str, float | None]


def refusal(endpoint_id: str, policy: dict[str, Any] | None, identity: Identity | None) -> tuple[ErrorCode, str] | None:
    """Why ``identity`` may not send tasks to ``endpoint_id`` under ``policy``, or None."""
    if not policy:
        return None
    domains = [d.lower().lstrip("@") for d in policy.get("allowed_domains") or []]
    max_age = policy.get("max_session_age_s")
    if not domains and not max_age:
        return None
    asks = []
    if domains:
        asks.append(f"an identity from {' or '.join(domains)}")
    if max_age:
        asks.append(f"a sign-in within the last {max_age:g} s")
    wanted = f"endpoint {endpoint_id} requires {' and '.join(asks)}"
    if identity is None:
        return ErrorCode.NOT_ADMITTED, (f"{wanted}; you are signed in with a token of this service, which no identity "
                                        "provider vouches for: sign in with Globus ('tether login')")
    username, auth_time = identity
    domain = username.rpartition("@")[2].lower() if "@" in username else ""
    if domains and not any(domain == d or domain.endswith("." + d) for d in domains):
        return ErrorCode.NOT_ADMITTED, (f"{wanted}; your identity is {username!r}: sign in with an identity from "
                                        f"{' or '.join(domains)}")
    if max_age:
        age = None if auth_time is None else time.time() - auth_time
        if age is None or age > max_age:
            when = "your session does not say when you signed in" if age is None else \
                f"you signed in {age:.0f} s ago"
            return ErrorCode.NOT_ADMITTED, f"{wanted}; {when}: sign in again ('tether login') and resubmit"
    return None


__all__ = ["Identity", "refusal"]
