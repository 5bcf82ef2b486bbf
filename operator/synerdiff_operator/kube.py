"""A thin dict-in, dict-out Kubernetes client over the official client's transport and auth.

Typed models of the official client would round-trip our dicts through generated classes; we only
need get/list/create/merge-patch on a handful of paths. Writes are merge patches (never PUT), so
there is no read-modify-write race and no resourceVersion to carry.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    import kopf

__all__ = ["ApiException", "Kube", "Ref", "connection_info", "load_configuration"]


@dataclass(frozen=True)
class Ref:
    """Where a resource lives in the API: ('apps/v1', 'deployments') or ('v1', 'pods')."""

    api_version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if subresource is not None:
            base += f"/{subresource}"
        return base


KIND_REFS: dict[str, Ref] = {
    "ConfigMap": Ref("v1", "configmaps"),
    "Service": Ref("v1", "services"),
    "Pod": Ref("v1", "pods"),
    "Secret": Ref("v1", "secrets"),
    "Event": Ref("v1", "events"),
    "PodDisruptionBudget": Ref("policy/v1", "poddisruptionbudgets"),
    "Deployment": Ref("apps/v1", "deployments"),
}


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account, else $KUBECONFIG (read now, not at import) or ~/.kube/config."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]  # unannotated in the kubernetes client
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=config)  # type: ignore[no-untyped-call]  # unannotated in the kubernetes client
    return config


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's view of the same credentials, so kopf and our client act as one identity."""
    import kopf

    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


def _field(obj: dict[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class Kube:
    def __init__(self, config: kubernetes.client.Configuration, timeout: float = 30.0) -> None:
        self._api = kubernetes.client.ApiClient(config)
        self._timeout = timeout

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]  # unannotated in the kubernetes client

    def _call(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None, content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(*request, _request_timeout=self._timeout)
        data = response.read()  # type: ignore[no-untyped-call]  # unannotated in the kubernetes client
        text = data.decode("utf-8") if data else ""
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=text, data=None)
        return json.loads(text) if text else None

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] | None = self._call("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def list(self, path: str, labels: dict[str, str] | None = None, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
        query = []
        if labels:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))))
        if fields:
            query.append(("fieldSelector", ",".join(f"{k}={v}" for k, v in sorted(fields.items()))))
        items: list[dict[str, Any]] = (self._call("GET", path, query=query or None) or {}).get("items") or []
        # Filter again locally: cheap, and correct even where the server ignores a selector.
        if labels:
            items = [i for i in items if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())]
        if fields:
            items = [i for i in items if all(_field(i, k) == v for k, v in fields.items())]
        return items

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self._call("POST", path, body)
        return created

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self._call("PATCH", path, body, content_type="application/merge-patch+json")
        return patched

    def delete(self, path: str) -> None:
        try:
            self._call("DELETE", path)
        except ApiException as exc:
            if exc.status != 404:
                raise
