"""The Endpoint Picker Protocol answer, spoken to by a real gRPC client: the destination
in header and envoy.lb metadata alike, the gateway's subset hint, 503 when nothing is
eligible, and the served endpoint taking over the request's accounting."""

from typing import Any

import pytest
from google.protobuf import struct_pb2

from extproc.service import epp
from extproc.service.app import Service
from tests.service.conftest import OpenPool
from tests.support.extproc_client import (
    duplex_headers,
    eventually,
    immediate_headers,
    request_body,
    response_headers,
    set_headers,
)
from tests.support.pool_endpoint import PoolEndpoint


@pytest.fixture
async def pool_service(open_pool: OpenPool) -> tuple[Service, Any]:
    return await open_pool(picker="round-robin")


def with_subset(message: Any, subset: list[str] | str) -> Any:
    hint = struct_pb2.Struct()
    if isinstance(subset, str):
        hint.fields[epp.SUBSET_KEY].string_value = subset
    else:
        hint.fields[epp.SUBSET_KEY].list_value.extend(subset)
    message.metadata_context.filter_metadata[epp.SUBSET_NAMESPACE].CopyFrom(hint)
    return message


def destination(answer: Any) -> tuple[str, str]:
    """(header value, envoy.lb metadata value) of a dispatched answer."""
    lb = answer.dynamic_metadata.fields[epp.LB_NAMESPACE].struct_value
    return set_headers(answer)[epp.DESTINATION_HEADER], lb.fields[
        epp.DESTINATION_HEADER
    ].string_value


async def open_request(stub: Any, headers: Any) -> tuple[Any, Any]:
    stream = stub.Process()
    await stream.write(headers)
    await stream.write(request_body(b'{"model": "m", "prompt": "hi"}', end_of_stream=True))
    return stream, await stream.read()


def in_flight(service: Service) -> dict[str, int]:
    assert service.pool is not None
    return {e.address: e.in_flight for e in service.pool.status().endpoints}


@pytest.mark.parametrize(("fallbacks", "named"), [(0, 1), (2, 3)])
async def test_header_and_metadata_name_the_same_endpoints_primary_first(
    open_pool: OpenPool, endpoints: list[PoolEndpoint], fallbacks: int, named: int
) -> None:
    # One endpoint unless fallbacks are asked for: ORIGINAL_DST parses one ip:port.
    addresses = {e.address for e in endpoints}
    service, stub = await open_pool(picker="round-robin", fallbacks=fallbacks)
    primaries = []
    streams = []
    for _ in range(6):
        stream, answer = await open_request(stub, duplex_headers("a"))
        header, metadata = destination(answer)
        assert header == metadata
        listed = header.split(",")
        assert len(listed) == named
        assert len(set(listed)) == len(listed)
        assert set(listed) <= addresses
        primaries.append(listed[0])
        streams.append(stream)
    assert set(primaries) == addresses  # round robin: the primary is the pick
    assert sum(in_flight(service).values()) == 6
    for stream in streams:
        stream.cancel()
    await eventually(lambda: sum(in_flight(service).values()) == 0)


@pytest.mark.parametrize("form", ["list", "comma-string"])
async def test_the_subset_hint_limits_the_pick(
    pool_service: tuple[Service, Any], endpoints: list[PoolEndpoint], form: str
) -> None:
    _, stub = pool_service
    allowed = [endpoints[0].address, endpoints[2].address]
    hint: list[str] | str = allowed if form == "list" else ",".join(allowed)
    for _ in range(6):
        stream, answer = await open_request(stub, with_subset(duplex_headers("a"), hint))
        header, _ = destination(answer)
        assert set(header.split(",")) <= set(allowed)
        stream.cancel()


@pytest.mark.parametrize(
    "hint",
    [
        ["10.0.0.1:80", " 10.0.0.2 ", "::1", "[fd00::2]", "", "[fd00::3]:80"],
        "10.0.0.1:80, 10.0.0.2,,::1,[fd00::2],[fd00::3]:80",
    ],
)
def test_subset_hint_forms_read_as_upstream_filters_them(hint: list[str] | str) -> None:
    # ip:port kept as given; a bare IP in the form the pool gives an endpoint's host.
    read = epp.subset_hint(with_subset(duplex_headers("a"), hint))
    assert read == {"10.0.0.1:80", "10.0.0.2", "[::1]", "[fd00::2]", "[fd00::3]:80"}


async def test_a_bare_ip_subset_allows_that_endpoint_on_any_port(
    pool_service: tuple[Service, Any], endpoints: list[PoolEndpoint]
) -> None:
    # All three endpoints share 127.0.0.1: a bare IP allows each of them.
    _, stub = pool_service
    picked = set()
    for _ in range(6):
        stream, answer = await open_request(stub, with_subset(duplex_headers("a"), "127.0.0.1"))
        picked.add(destination(answer)[0])
        stream.cancel()
    assert picked == {e.address for e in endpoints}


@pytest.mark.parametrize("subset", [[], ["10.9.9.9:80"], ["127.0.0.2"]])
async def test_an_empty_or_ineligible_subset_is_answered_503(
    pool_service: tuple[Service, Any], subset: list[str]
) -> None:
    service, stub = pool_service
    stream, answer = await open_request(stub, with_subset(duplex_headers("a"), subset))
    assert answer.immediate_response.status.code == 503
    assert immediate_headers(answer)["x-workload-dropped-reason"] == "no-endpoint"
    assert b"no_eligible_endpoint" in answer.immediate_response.body
    stream.cancel()
    await eventually(lambda: service.reader.get("a").metrics.active_requests == 0)  # type: ignore[union-attr]


async def test_the_served_endpoint_takes_over_the_request(
    pool_service: tuple[Service, Any], endpoints: list[PoolEndpoint]
) -> None:
    service, stub = pool_service
    stream, answer = await open_request(stub, duplex_headers("a"))
    primary = destination(answer)[0].split(",")[0]
    other = next(e.address for e in endpoints if e.address != primary)
    report = response_headers(end_of_stream=False)
    served = report.metadata_context.filter_metadata[epp.LB_NAMESPACE]
    served.fields[epp.SERVED_KEY].string_value = other
    await stream.read()  # the echoed body
    await stream.write(report)
    await stream.read()
    await eventually(lambda: in_flight(service)[other] == 1 and in_flight(service)[primary] == 0)
    stream.cancel()
    await eventually(lambda: sum(in_flight(service).values()) == 0)
