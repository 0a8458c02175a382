"""A pool on virtual time, its endpoints fed readings by hand."""

from __future__ import annotations

import random

from extproc.capacity.saturation import Reading, SaturationOptions
from extproc.clock import VirtualClock
from extproc.pool.endpoints import EndpointOptions
from extproc.pool.picker import make_picker
from extproc.pool.pool import EndpointPool
from extproc.pool.scorers import ScorerWeights


def make_pool(
    clock: VirtualClock,
    addresses: list[str],
    *,
    picker: str = "scored",
    weights: str = "queue=2,kv-cache=2,prefix=3",
    max_in_flight: int = 0,
    seed: int = 1,
    stale_after: float = 1.0,
    fallbacks: int = 0,
) -> EndpointPool:
    options = EndpointOptions(
        saturation=SaturationOptions(stale_after=stale_after),
        max_in_flight=max_in_flight,
    )
    pool = EndpointPool(
        clock,
        make_picker(picker, ScorerWeights.parse(weights)),
        options,
        rng=random.Random(seed),
        fallbacks=fallbacks,
    )
    pool.update("static", dict.fromkeys(addresses, True))
    return pool


def feed(
    pool: EndpointPool,
    clock: VirtualClock,
    address: str,
    *,
    waiting: float,
    kv: float | None = None,
    running: float | None = None,
) -> None:
    """A scrape of `address` that said this, now."""
    endpoint = pool.endpoint(address)
    assert endpoint is not None
    endpoint.begin_scrape()
    endpoint.end_scrape(Reading(waiting, kv, running))
    pool.scraped(endpoint)
