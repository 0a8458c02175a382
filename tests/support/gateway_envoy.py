"""Envoy configs as the InferencePool gateways generate them for an endpoint picker.

Written from what Envoy AI Gateway's extension server builds for an InferencePool
(the route Envoy Gateway users take; kgateway's is alike, BUFFERED its default):
- the picker: a STRICT_DNS cluster, HTTP/2, TLS with no certificate verification;
- ext_proc: headers SEND, request and response bodies FULL_DUPLEX_STREAMED (or
  BUFFERED, the pool annotation `aigateway.envoyproxy.io/processing-body-mode:
  buffered`), trailers SEND, `message_timeout` 300 s, `failure_mode_allow` false,
  no `forward_rules`, no `metadata_options`;
- the pool: an ORIGINAL_DST cluster routing on the `x-gateway-destination-endpoint`
  header, which takes one `ip:port`.
One builder, so the styles differ only where the gateways do.
"""

from __future__ import annotations

from typing import Any

from extproc.service.epp import DESTINATION_HEADER

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def gateway_config(
    extproc_port: int, body_mode: str = "FULL_DUPLEX_STREAMED", **ext_proc_fields: Any
) -> dict[str, Any]:
    """Envoy on ephemeral ports in front of the picker on `extproc_port` (TLS, loopback),
    with `body_mode` for request and response bodies alike (`ext_proc_fields` set on the
    ext_proc filter beside what the gateways generate)."""
    ext_proc = {
        "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}},
        "failure_mode_allow": False,
        "message_timeout": "300s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": body_mode,
            "response_body_mode": body_mode,
            "request_trailer_mode": "SEND",
            "response_trailer_mode": "SEND",
        },
        **ext_proc_fields,
    }
    manager = {
        "@type": _HCM,
        "stat_prefix": "gateway",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "pool",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "pool", "timeout": "300s"}}
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {"@type": _EXT_PROC, **ext_proc},
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    picker = {
        "name": "picker",
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_ONLY",
        "connect_timeout": "10s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        # TLS, and no validation_context: the picker's certificate is not verified.
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TLS,
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        },
        "load_assignment": {
            "cluster_name": "picker",
            "endpoints": [{"lb_endpoints": [_endpoint("localhost", extproc_port)]}],
        },
    }
    pool = {
        "name": "pool",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [picker, pool],
        },
    }


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
