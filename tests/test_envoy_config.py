"""The bundled envoy/envoy.yaml: valid for the real Envoy, and consistent with the service."""

import re
import subprocess
from typing import Any

import yaml

from extproc.config import Settings
from extproc.service.app import HEALTH_SERVICES, HOLD_MARGIN
from tests.support.envoy import (
    BUNDLED_CONFIG,
    JWT_CONFIG,
    POOL_CONFIG,
    envoy_binary,
    ext_proc_filter,
    http_filter,
)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    assert match, duration
    return float(match.group(1))


def load() -> dict[str, Any]:
    return yaml.safe_load(BUNDLED_CONFIG.read_text())  # type: ignore[no-any-return]


def test_envoy_validates_the_bundled_config() -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(BUNDLED_CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


def test_processing_modes_let_the_service_see_completion_cheaply() -> None:
    mode = ext_proc_filter(load())["processing_mode"]
    assert mode["request_header_mode"] == "SEND"
    assert mode["response_trailer_mode"] == "SEND"  # keeps the stream open to the last byte
    assert mode["request_body_mode"] == mode["response_body_mode"] == "NONE"  # no per-chunk trips


def test_timeouts_cover_the_default_queue_timeout() -> None:
    config = load()
    ext_proc = ext_proc_filter(config)
    longest_hold = Settings().queue_timeout + HOLD_MARGIN
    assert seconds(ext_proc["max_message_timeout"]) >= longest_hold
    assert (
        seconds(ext_proc["message_timeout"]) < Settings().queue_timeout
    )  # a hung processor fails fast
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert seconds(manager["typed_config"]["stream_idle_timeout"]) > longest_hold


def test_circuit_breakers_fit_a_full_queue() -> None:
    for cluster in load()["static_resources"]["clusters"]:
        (thresholds,) = cluster["circuit_breakers"]["thresholds"]
        for key in ("max_requests", "max_pending_requests", "max_connections"):
            assert thresholds[key] >= Settings().max_queue, (cluster["name"], key)


def test_processor_cluster_speaks_http2() -> None:
    (cluster,) = [
        c for c in load()["static_resources"]["clusters"] if c["name"] == "workload_extproc"
    ]
    options = cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(options.values()))["explicit_http_config"]


def test_processor_is_health_checked_on_a_service_it_serves() -> None:
    (cluster,) = [
        c for c in load()["static_resources"]["clusters"] if c["name"] == "workload_extproc"
    ]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] in HEALTH_SERVICES


def test_envoy_validates_the_jwt_config() -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(JWT_CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_jwt_config_is_the_bundled_one_plus_identity() -> None:
    """envoy-jwt.yaml = envoy.yaml + header removal + jwt_authn + the identity header
    forwarded: nothing else may drift between the two."""
    jwt = yaml.safe_load(JWT_CONFIG.read_text())
    listener = jwt["static_resources"]["listeners"][0]
    filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    names = [f["name"] for f in filters]
    assert names[:2] == ["envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn"]
    removed = {m["remove"] for m in filters[0]["typed_config"]["mutations"]["request_mutations"]}
    assert removed == {"x-tenant-id", "x-gateway-inference-fairness-id"}
    (claim,) = http_filter(jwt, "envoy.filters.http.jwt_authn")["providers"]["gateway"][
        "claim_to_headers"
    ]
    assert claim["header_name"] == "x-tenant-id"
    patterns = ext_proc_filter(jwt)["forward_rules"]["allowed_headers"]["patterns"]
    assert {p["exact"] for p in patterns} == {"x-tenant-id", "x-workload-context"}
    del filters[:2]
    ext_proc_filter(jwt).pop("forward_rules")
    bundled = load()
    ext_proc_filter(bundled).pop("forward_rules")
    assert jwt == bundled


def test_envoy_validates_the_pool_config() -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(POOL_CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_pool_config_uses_the_modes_inference_gateways_set() -> None:
    config = yaml.safe_load(POOL_CONFIG.read_text())
    ext_proc = ext_proc_filter(config)
    assert ext_proc["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_header_mode": "SEND",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "response_trailer_mode": "SEND",
    }
    assert seconds(ext_proc["max_message_timeout"]) >= Settings().queue_timeout + HOLD_MARGIN
    forwarded = ext_proc["metadata_options"]["forwarding_namespaces"]["untyped"]
    assert {"envoy.lb.subset_hint", "envoy.lb"} <= set(forwarded)
    (pool,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "pool"]
    (policy,) = pool["load_balancing_policy"]["policies"]
    sources = policy["typed_extension_config"]["typed_config"]["override_host_sources"]
    assert sources[0] == {"header": "x-gateway-destination-endpoint"}
