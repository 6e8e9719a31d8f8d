"""``tether.Client``: the service's REST API in Python (control plane only; tasks flow through
:class:`tether.Executor`)."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from .config import find_service
from .errors import AuthError, EndpointOffline, PayloadTooLarge, TetherError, UnknownEndpoint
from .protocol import blob_ref_of, kept_ref_of
from .serialize import deserialize, function_id


class Client:
    """Thin, typed wrapper over ``/v1``: every HTTP error becomes a Tether error in words."""

    def __init__(self, service: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.info = find_service(service, token)
        self._http = httpx.Client(
            base_url=self.info.url,
            headers={"Authorization": f"Bearer {self.info.token}"},
            timeout=timeout,
            trust_env=False,
            verify=self.info.ssl_context() or True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                hint = ("; its TLS certificate is not signed by a CA this client trusts: set TETHER_CA_FILE to the "
                        "CA bundle that signed it")
            raise TetherError(f"cannot reach the Tether service at {self.info.url}: {exc}{hint}") from exc
        if resp.status_code < 400:
            return resp.json()
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        if resp.status_code == 401:
            raise AuthError(str(detail))
        if resp.status_code == 413:
            raise PayloadTooLarge(str(detail))
        if resp.status_code == 404 and path.startswith("/v1/endpoints"):  # by route, not by message text
            raise UnknownEndpoint(str(detail))
        raise TetherError(f"{method} {path} failed ({resp.status_code}): {detail}")

    # identity
    def whoami(self) -> dict[str, Any]:
        return self._call("GET", "/v1/whoami")

    # endpoints
    def register_endpoint(self, name: str, endpoint_id: str | None = None, multi_user: bool = False) -> dict[str, str]:
        return self._call("POST", "/v1/endpoints", json={"name": name, "endpoint_id": endpoint_id,
                                                         "multi_user": multi_user})

    def set_endpoint_policy(self, endpoint_id: str, public: bool = False, users: list[str] | None = None,
                            user_config_schema: dict[str, Any] | None = None,
                            user_config_variables: list[str] | None = None,
                            authentication: dict[str, Any] | None = None) -> dict:
        """Who may send tasks to your endpoint. A multi-user endpoint: everyone (``public``) or
        these user names/ids, and what they may pass as ``user_endpoint_config`` (shown to them).
        Any endpoint: ``authentication`` (``allowed_domains``, ``max_session_age_s``)."""
        return self._call("PUT", f"/v1/endpoints/{endpoint_id}/policy", json={
            "public": public, "users": users or [], "user_config_schema": user_config_schema,
            "user_config_variables": user_config_variables or [], "authentication": authentication})

    def endpoint_user_config_schema(self, endpoint_id: str) -> dict[str, Any]:
        """What you may pass as ``user_endpoint_config`` to a multi-user endpoint you may use:
        ``{"endpoint_id", "schema" (JSON Schema, or None), "variables" (the template's)}``."""
        return self._call("GET", f"/v1/endpoints/{endpoint_id}/user_config_schema")

    def list_user_endpoints(self, endpoint_id: str) -> list[dict[str, Any]]:
        """User endpoint processes of a multi-user endpoint (all for its owner, yours otherwise)."""
        return self._call("GET", f"/v1/endpoints/{endpoint_id}/user_endpoints")

    def list_endpoints(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/endpoints")

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/endpoints/{endpoint_id}")

    def get_endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/endpoints/{endpoint_id}/status")

    def require_online(self, endpoint_id: str) -> dict[str, Any]:
        """Endpoint info, or :class:`EndpointOffline` if it is not connected right now."""
        info = self.get_endpoint(endpoint_id)
        if not info["online"]:
            raise EndpointOffline(f"endpoint {endpoint_id} ({info['name']}) is offline; start it with "
                                  f"'tether endpoint start {info['name']}'")
        return info

    def stop_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/endpoints/{endpoint_id}/stop")

    def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/endpoints/{endpoint_id}")

    # functions
    def register_function_body(self, body: bytes) -> str:
        return self._call("POST", "/v1/functions", json={"function": base64.b64encode(body).decode()})["function_id"]

    def register_function(self, fn: Any) -> str:
        from .serialize import serialize

        return self.register_function_body(serialize(fn))

    def function_exists(self, fid: str) -> bool:
        try:
            self._call("GET", f"/v1/functions/{fid}")
            return True
        except TetherError:
            return False

    # tasks
    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tasks/{task_id}")

    def get_result(self, task_id: str) -> Any:
        """The deserialized result of a finished task (raises if it failed or is not done)."""
        info = self.get_task(task_id)
        if info["state"] != "success":
            raise TetherError(f"task {task_id} is {info['state']}: {info.get('error')}")
        data = base64.b64decode(info["result"])
        if blob_ref_of(data) is not None or kept_ref_of(data) is not None:
            # a large result (a blob on the service, or kept on its endpoint): the client's
            # connection fetches it, downloads it and checks it
            from .connection import Connection

            return Connection.get(self.info).fetch_kept(task_id)
        return deserialize(data)

    def get_batch_status(self, task_ids: list[str]) -> dict[str, Any]:
        return self._call("POST", "/v1/batch_status", json={"task_ids": task_ids})

    def cancel_task(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/tasks/{task_id}/cancel")

    def get_task_group(self, group_id: str) -> list[dict[str, str]]:
        return self._call("GET", f"/v1/task_groups/{group_id}")["tasks"]


__all__ = ["Client", "function_id"]
