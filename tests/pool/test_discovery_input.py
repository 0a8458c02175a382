"""Discovery input (issue 23 case 9): addresses Envoy cannot route are refused at start
with one line naming the setting; a name that resolves to nothing empties its share."""

import pytest
from pydantic import ValidationError

from extproc.clock import VirtualClock
from extproc.config import describe_error, load_settings
from extproc.pool.discovery import DnsDiscovery, resolve
from extproc.pool.scraper import EndpointScraper
from tests.pool.support import make_pool


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("endpoints", "::1:8000", "IPv6 in brackets"),
        ("endpoints", "[::1]:8000,10.0.0.1:80,fe80::1:80", "IPv6 in brackets"),
        ("endpoints_dns", "a..b:80", "not a DNS name"),
        ("endpoints_dns", "-a.example:80", "not a DNS name"),
        ("endpoints_dns", f"{'x' * 64}.example:80", "not a DNS name"),
        ("endpoints_dns", "::1:80", "IPv6 in brackets"),
    ],
)
def test_unroutable_discovery_input_is_one_line_naming_the_setting(
    flag: str, value: str, message: str
) -> None:
    with pytest.raises(ValidationError) as error:
        load_settings({flag: value}, use_env=False)
    line = describe_error(error.value)
    assert "\n" not in line
    assert f"--{flag.replace('_', '-')}" in line
    assert message in line


def test_good_discovery_input_is_accepted() -> None:
    settings = load_settings(
        {"endpoints": "[::1]:8000,127.0.0.1:8001", "endpoints_dns": "vllm.models.svc:8000"},
        use_env=False,
    )
    assert settings.endpoints == ["[::1]:8000", "127.0.0.1:8001"]


async def test_a_name_that_resolves_to_nothing_empties_its_share() -> None:
    """The real resolver: `.invalid` never resolves (RFC 6761), and getaddrinfo says so
    with gaierror EAI_NONAME -- the name has no records, which is not a failed lookup."""
    clock = VirtualClock()
    pool = make_pool(clock, [])
    answers: list[list[str] | Exception] = [["10.0.0.1"]]

    async def resolver(name: str, port: int) -> list[str]:
        answer = answers.pop(0) if answers else None
        if answer is None:
            return await resolve(name, port)
        if isinstance(answer, Exception):
            raise answer
        return answer

    dns = DnsDiscovery(pool, "nothing.invalid:8000", interval=3600, resolver=resolver)
    await dns.refresh()
    assert pool.addresses == ["10.0.0.1:8000"]
    answers.append(OSError("temporary failure"))
    await dns.refresh()
    assert pool.addresses == ["10.0.0.1:8000"]  # a failed lookup keeps the last set
    await dns.refresh()  # the real resolver: no such name
    assert pool.addresses == []


async def test_a_scrape_that_cannot_form_a_url_marks_the_endpoint_unreachable() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, ["::1:8000"], stale_after=1.0)  # as the old check let through
    scraper = EndpointScraper(pool, clock, 3600, "/metrics")
    await scraper.start()
    try:
        clock.advance(2.0)
        await scraper.scrape("::1:8000")
        endpoint = pool.endpoint("::1:8000")
        assert endpoint is not None
        assert not endpoint.ready(clock.now())
    finally:
        await scraper.stop()
