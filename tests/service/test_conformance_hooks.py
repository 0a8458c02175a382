"""The conformance suite's hooks (behind --conformance-test-hooks), spoken to by a real
gRPC client: `test-epp-endpoint-selection` restricts the pick as upstream's test filter
does, and the response headers' answer reports the endpoint that served."""

from __future__ import annotations

from typing import Any

from extproc.service import epp
from tests.service.conftest import OpenPool
from tests.service.test_epp import destination, open_request, with_subset
from tests.support.extproc_client import duplex_headers, eventually, response_headers
from tests.support.pool_endpoint import PoolEndpoint


def selecting(value: str) -> Any:
    message = duplex_headers("a")
    header = message.request_headers.headers.headers.add()
    header.key = epp.TEST_SELECTION_HEADER
    header.raw_value = value.encode()
    return message


async def picks(stub: Any, message: Any, times: int = 6) -> set[str]:
    picked = set()
    for _ in range(times):
        stream, answer = await open_request(stub, message)
        picked.add(destination(answer)[0])
        stream.cancel()
    return picked


async def served_report(stub: Any, lb: dict[str, str] | None) -> dict[str, str]:
    """The response headers' answer to a response that reports `lb` as envoy.lb."""
    stream, _ = await open_request(stub, duplex_headers("a"))
    await stream.read()  # the echoed body
    report = response_headers(end_of_stream=False)
    if lb is not None:
        namespace = report.metadata_context.filter_metadata[epp.LB_NAMESPACE]
        for key, value in lb.items():
            namespace.fields[key].string_value = value
    await stream.write(report)
    answer = await stream.read()
    stream.cancel()
    mutation = answer.response_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


async def test_with_the_hooks_the_header_selects_the_endpoint_and_the_served_one_is_reported(
    open_pool: OpenPool, endpoints: list[PoolEndpoint]
) -> None:
    service, stub = await open_pool(picker="round-robin", conformance_test_hooks=True)
    one, two = endpoints[1].address, endpoints[2].address
    assert await picks(stub, selecting(one)) == {one}
    assert await picks(stub, selecting(f" {one} , {two}")) == {one, two}
    # A bare IP: that endpoint on any port (all three share 127.0.0.1 here).
    assert await picks(stub, selecting("127.0.0.1")) == {e.address for e in endpoints}
    # The header wins over the gateway's subset hint, as upstream's filter runs after it.
    assert await picks(stub, with_subset(selecting(two), [one])) == {two}
    # Nothing matching: 429, as upstream answers a pick its filters left empty (the
    # suite's invalid-IP case expects it); the gateway's own empty subset stays 503.
    stream, answer = await open_request(stub, selecting("256.256.256.256"))
    assert answer.immediate_response.status.code == 429
    assert answer.immediate_response.body.startswith(b'{"error": "no_eligible_endpoint"')
    stream.cancel()
    stream, answer = await open_request(stub, with_subset(duplex_headers("a"), []))
    assert answer.immediate_response.status.code == 503
    stream.cancel()

    report = epp.SERVED_REPORT_HEADER
    assert (await served_report(stub, {epp.SERVED_KEY: two}))[report] == two
    missing = await served_report(stub, {"other": "x"})
    assert missing[report] == "fail: missing destination endpoint served metadata"
    assert (await served_report(stub, None))[report] == "fail: missing envoy lb metadata"
    await eventually(lambda: service.flow.in_flight == 0)


async def test_without_the_hooks_the_header_steers_nothing(
    open_pool: OpenPool, endpoints: list[PoolEndpoint]
) -> None:
    service, stub = await open_pool(picker="round-robin")
    assert await picks(stub, selecting(endpoints[1].address)) == {e.address for e in endpoints}
    assert await served_report(stub, {epp.SERVED_KEY: endpoints[2].address}) == {}
    await eventually(lambda: service.flow.in_flight == 0)
