"""The Endpoint Picker Protocol (v1, Gateway API Inference Extension) on ext_proc messages.

- The answer names the chosen endpoints, primary first, as "ip:port,ip:port"
  in BOTH the request header `x-gateway-destination-endpoint` and the
  dynamic metadata namespace `envoy.lb`, key `x-gateway-destination-endpoint`.
- A gateway may restrict the pick: `metadata_context` namespace
  `envoy.lb.subset_hint`, key `x-gateway-destination-endpoint-subset`, a list
  of "ip:port" or bare IPs (a comma-separated string is read too); a bare IP
  allows that endpoint on any port, as upstream's filter reads it. An empty or
  unusable hint is an empty subset: nothing is eligible, and the request is
  answered 503.
- Conformance hooks (GIE's conformance suite; behind a flag, off by default): a
  request header `test-epp-endpoint-selection` ("ip" or "ip:port", comma
  separated) takes the place of the subset hint, read the same way (upstream's
  test filter runs after the subset one, so the header wins); the response
  headers' answer adds `x-conformance-test-served-endpoint`, the endpoint the
  data plane reports having served (or "fail: ..." naming what it did not
  report), as upstream's test picker does. Nothing matching is answered 429, as
  upstream answers a pick its filters leave empty (the suite's invalid-IP case).
- The data plane reports the endpoint that served the request in
  `metadata_context` namespace `envoy.lb`, key
  `x-gateway-destination-endpoint-served`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
TEST_SELECTION_HEADER = "test-epp-endpoint-selection"
SERVED_REPORT_HEADER = "x-conformance-test-served-endpoint"


def subset_hint(message: Any) -> frozenset[str] | None:
    """The endpoints this request may go to; None when the gateway sent no hint."""
    if not message.HasField("metadata_context"):
        return None
    namespaces = message.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in namespaces:
        return None
    fields = namespaces[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [v.string_value for v in value.list_value.values]
    elif kind == "string_value":
        items = value.string_value.split(",")
    else:
        items = []
    return _entries(items)


def _entries(items: list[str]) -> frozenset[str]:
    return frozenset(_subset_entry(item.strip()) for item in items if item.strip())


def _subset_entry(item: str) -> str:
    """ "ip:port" as given; a bare IP as the pool writes an endpoint's host (IPv6
    bracketed), so it matches that endpoint on any port."""
    try:
        ip = ipaddress.ip_address(item.strip("[]"))
    except ValueError:
        return item
    return f"[{ip}]" if ip.version == 6 else str(ip)


def test_selection(message: Any) -> frozenset[str] | None:
    """Conformance: the endpoints the `test-epp-endpoint-selection` header allows."""
    for header in message.request_headers.headers.headers:
        if header.key == TEST_SELECTION_HEADER:
            value = (header.raw_value or header.value.encode()).decode(errors="replace")
            return _entries(value.split(",")) or None
    return None


def served_report(message: Any) -> Any:
    """Conformance: the response headers' answer, naming the endpoint the data plane
    reports having served."""
    namespaces = message.metadata_context.filter_metadata
    if LB_NAMESPACE not in namespaces:
        served = "fail: missing envoy lb metadata"
    elif SERVED_KEY not in namespaces[LB_NAMESPACE].fields:
        served = "fail: missing destination endpoint served metadata"
    else:
        served = namespaces[LB_NAMESPACE].fields[SERVED_KEY].string_value
    response = pb.ProcessingResponse()
    option = response.response_headers.response.header_mutation.set_headers.add()
    option.header.key = SERVED_REPORT_HEADER
    option.header.raw_value = served.encode()
    return response


def served_endpoint(message: Any) -> str | None:
    """The endpoint the data plane reports having served the request, if it says."""
    if not message.HasField("metadata_context"):
        return None
    namespaces = message.metadata_context.filter_metadata
    if LB_NAMESPACE not in namespaces:
        return None
    fields = namespaces[LB_NAMESPACE].fields
    if SERVED_KEY not in fields:
        return None
    served: str = fields[SERVED_KEY].string_value
    return served.strip() or None


def destination_metadata(response: Any, value: str) -> None:
    """Put the destination into the answer's dynamic metadata (the header is set beside it)."""
    lb = response.dynamic_metadata.fields[LB_NAMESPACE].struct_value
    lb.fields[DESTINATION_HEADER].string_value = value
