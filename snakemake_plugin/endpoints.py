"""Is an endpoint fit to run Snakemake jobs? Asked once per endpoint, before its first job.

Each job runs ``python -m snakemake`` on the endpoint, so the endpoint's environment needs
Snakemake, at a version that understands the arguments this side writes. The endpoint reports
its installed versions in its heartbeats; the service keeps the last report.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from snakemake_interface_common.exceptions import WorkflowError

from tether import Client
from tether.errors import AuthError, TetherError, UnknownEndpoint
from tether.versions import Needed, differences


@dataclass(frozen=True)
class EndpointReport:
    """The outcome of a check: a name for messages and the warnings to show (errors raise)."""

    endpoint_id: str
    name: str
    online: bool
    warnings: tuple[str, ...] = ()


#: a job command written by one Snakemake is understood by another of the same minor version
NEEDED = (Needed("snakemake", parts=2),)


def check_endpoint(client: Client, endpoint_id: str, local_snakemake: str | None = None) -> EndpointReport:
    """Raise :class:`WorkflowError` in words if jobs cannot run on ``endpoint_id``.

    Errors: the endpoint is unknown (or not yours), the service refuses the token or cannot be
    reached, the endpoint has no Snakemake, or its Snakemake differs in major.minor version from
    this one (the job command line differs between such versions). A different patch version and
    an offline endpoint (its jobs wait for it) are warnings.
    """
    local_snakemake = local_snakemake or version("snakemake")
    try:
        info: dict[str, Any] = client.get_endpoint(endpoint_id)
    except UnknownEndpoint:
        raise WorkflowError(
            f"Tether endpoint {endpoint_id} does not exist at {client.info.url}, or is not yours: "
            f"'tether endpoint list' shows the endpoints you can use"
        ) from None
    except AuthError as exc:
        raise WorkflowError(f"the Tether service at {client.info.url} refused the token: {exc}") from None
    except TetherError as exc:
        raise WorkflowError(f"cannot ask the Tether service about endpoint {endpoint_id}: {exc}") from None
    name = info.get("name") or endpoint_id
    online = bool(info.get("online"))
    versions = (info.get("status") or {}).get("versions") or {}
    label = f"Tether endpoint {name} ({endpoint_id})"
    warnings = []
    if not online:
        warnings.append(f"{label} is offline: its jobs wait until it connects "
                        f"('tether endpoint start {name}' on its host)")
    if not versions:
        warnings.append(f"{label} has not reported its versions yet, so its Snakemake could not be checked")
        return EndpointReport(endpoint_id, name, online, tuple(warnings))
    for difference in differences(NEEDED, versions, {"snakemake": local_snakemake}):
        remote = difference.there
        if remote is None:
            raise WorkflowError(
                f"{label} has no Snakemake in its environment, and every job runs 'python -m snakemake' there. "
                f"Install it next to the endpoint (pip install 'snakemake=={local_snakemake}') and restart it "
                f"('tether endpoint restart {name}')"
            )
        if difference.breaking:
            raise WorkflowError(
                f"{label} runs Snakemake {remote} but this workflow runs Snakemake {local_snakemake}: a job "
                f"command written by one is not understood by the other. Install the same version on both sides "
                f"(pip install 'snakemake=={local_snakemake}' next to the endpoint, then 'tether endpoint "
                f"restart {name}')"
            )
        warnings.append(f"{label} runs Snakemake {remote}, this workflow {local_snakemake}; "
                        f"the same version on both sides is safest")
    return EndpointReport(endpoint_id, name, online, tuple(warnings))
