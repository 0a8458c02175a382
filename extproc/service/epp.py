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
- The data plane reports the endpoint that served the request in
  `metadata_context` namespace `envoy.lb`, key
  `x-gateway-destination-endpoint-served`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"


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
    return frozenset(_subset_entry(item.strip()) for item in items if item.strip())


def _subset_entry(item: str) -> str:
    """ "ip:port" as given; a bare IP as the pool writes an endpoint's host (IPv6
    bracketed), so it matches that endpoint on any port."""
    try:
        ip = ipaddress.ip_address(item.strip("[]"))
    except ValueError:
        return item
    return f"[{ip}]" if ip.version == 6 else str(ip)


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
