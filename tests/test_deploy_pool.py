"""deploy/inference-pool: the InferencePool validates offline against the CRD's schema
and names this service; the gateway attachments route to it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
POOL_DIR = ROOT / "deploy" / "inference-pool"
SCHEMA = json.loads((ROOT / "tests" / "support" / "schemas" / "inferencepool-v1.json").read_text())


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def inference_pool() -> dict[str, Any]:
    (pool,) = [
        d for d in documents(POOL_DIR / "inferencepool.yaml") if d["kind"] == "InferencePool"
    ]
    return pool


def test_the_inference_pool_validates_against_the_crd_schema() -> None:
    jsonschema.validate(inference_pool(), SCHEMA)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda spec: spec.pop("endpointPickerRef"),
        lambda spec: spec["endpointPickerRef"].pop("port"),
        lambda spec: spec["targetPorts"].clear(),
        lambda spec: spec.update(extra=1),
        lambda spec: spec["endpointPickerRef"].update(failureMode="Sometimes"),
    ],
)
def test_the_schema_check_catches_a_broken_pool(spoil: Any) -> None:
    pool = copy.deepcopy(inference_pool())
    spoil(pool["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, SCHEMA)


def test_the_pool_names_this_service_and_selects_the_model_servers() -> None:
    spec = inference_pool()["spec"]
    (service,) = documents(ROOT / "deploy" / "kubernetes" / "service.yaml")
    ports = {p["port"] for p in service["spec"]["ports"]}
    assert spec["endpointPickerRef"]["name"] == service["metadata"]["name"]
    assert spec["endpointPickerRef"]["port"]["number"] in ports
    assert spec["endpointPickerRef"]["failureMode"] == "FailClose"


@pytest.mark.parametrize("name", ["envoy-gateway.yaml", "istio.yaml"])
def test_gateway_attachments_route_to_the_pool(name: str) -> None:
    route = next(d for d in documents(POOL_DIR / name) if d["kind"] == "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert backend["group"] == "inference.networking.k8s.io"
    assert backend["kind"] == "InferencePool"
    assert backend["name"] == inference_pool()["metadata"]["name"]


def test_the_pool_role_reads_what_the_watches_read() -> None:
    (role,) = [d for d in documents(POOL_DIR / "inferencepool.yaml") if d["kind"] == "Role"]
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert granted >= {
        ("inference.networking.k8s.io", "inferencepools"),
        ("", "pods"),
        ("inference.networking.x-k8s.io", "inferenceobjectives"),
    }
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role["rules"])


def test_core_kinds_in_the_pool_manifests_validate() -> None:
    for path in sorted(POOL_DIR.glob("*.yaml")):
        for document in documents(path):
            if document["apiVersion"].startswith(("rbac.", "v1")):
                kubernetes_validate.validate(
                    document, kubernetes_validate.latest_version(), strict=True
                )
