"""Read a running service's /metrics page as {(name, labels): value}."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from extproc.service.app import Service


async def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.admin_port}/metrics") as reply,
    ):
        assert reply.status == 200
        text = await reply.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples
