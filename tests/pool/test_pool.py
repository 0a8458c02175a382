"""Endpoints, prefix hashing, scorers and pickers, on virtual time."""

from __future__ import annotations

import pytest

from extproc.clock import VirtualClock
from extproc.config import load_settings
from extproc.contracts import PickRequest
from extproc.pool.prefix import BlockHasher, PrefixCache
from extproc.pool.scorers import ScorerWeights
from tests.pool.support import feed, make_pool

E1, E2, E3 = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
block_hashes = BlockHasher()


def test_block_hashes_chain_so_equal_blocks_after_different_prefixes_differ() -> None:
    a = block_hashes("x" * 64 + "y" * 64)
    b = block_hashes("z" * 64 + "y" * 64)
    assert len(a) == 2
    assert a[1] != b[1]
    assert block_hashes("x" * 64 + "y" * 64 + "tail")[:2] == a  # partial block ignored
    assert len(block_hashes("a" * 64 * 300)) == 256
    assert block_hashes("short") == ()
    # Blocks are of bytes: a 2-byte character counts twice.
    assert len(block_hashes("\u00e9" * 64)) == 2
    assert block_hashes("\u00e9" * 64) != block_hashes("\u00e8" * 64)
    # JSON decodes "\ud800" to a lone surrogate, which strict UTF-8 refuses: hashed anyway.
    assert len(block_hashes("\ud800" * 64)) == 3


def test_prefix_cache_matches_the_longest_remembered_prefix() -> None:
    cache = PrefixCache(capacity=100)
    shared = "s" * 64 * 4
    cache.record(block_hashes(shared + "a" * 64 * 2))
    assert cache.matched(block_hashes(shared + "b" * 64 * 3)) == 4
    assert cache.matched(block_hashes(shared + "a" * 64 * 2)) == 6
    assert cache.matched(block_hashes("t" * 64 * 5)) == 0


def test_prefix_cache_is_bounded_and_evicts_chains_from_their_tail() -> None:
    cache = PrefixCache(capacity=4)
    old = block_hashes("o" * 64 * 3)
    cache.record(old)
    cache.record(block_hashes("n" * 64 * 2))
    assert len(cache) == 4
    assert cache.matched(old) == 2  # the tail block went first: still a prefix
    cache.record(block_hashes("m" * 64 * 4))
    assert cache.matched(old) == 0
    assert len(cache) == 4


def test_scorer_weights_parse_and_reject_nonsense() -> None:
    assert ScorerWeights.parse("queue=2,kv-cache=2,prefix=3") == ScorerWeights()
    assert ScorerWeights.parse("prefix=1") == ScorerWeights(0, 0, 1)
    for bad in ("queue", "speed=1", "queue=-1", "queue=x", "queue=0", "prefix=inf", "prefix=nan"):
        with pytest.raises(ValueError, match=r"NAME=WEIGHT|weight"):
            ScorerWeights.parse(bad)


def test_scored_picker_prefers_the_endpoint_holding_the_prefix() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2, E3])
    for address in (E1, E2, E3):
        feed(pool, clock, address, waiting=0, kv=0.1)
    prompt = "p" * 64 * 40
    first = pool.pick(PickRequest(prompt=prompt + "q1"))
    second = pool.pick(PickRequest(prompt=prompt + "q2"))
    assert second[0] == first[0]
    assert pool.endpoint(first[0]).prefix_hits == 1  # type: ignore[union-attr]


def test_scored_picker_leaves_a_loaded_prefix_holder_for_an_idle_endpoint() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2])
    feed(pool, clock, E1, waiting=0, kv=0.1)
    feed(pool, clock, E2, waiting=0, kv=0.1)
    prompt = "p" * 64 * 8
    holder = pool.pick(PickRequest(prompt=prompt))[0]
    other = E2 if holder == E1 else E1
    feed(pool, clock, holder, waiting=4, kv=0.75)  # busy; 1/8 of the prompt matches
    assert pool.pick(PickRequest(prompt=prompt[:64] + "z" * 64 * 7))[0] == other


def test_least_loaded_counts_credit_and_stale_endpoints_by_in_flight() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2], picker="least-loaded")
    feed(pool, clock, E1, waiting=1)
    feed(pool, clock, E2, waiting=0)
    assert pool.pick(None)[0] == E2  # 0 < 1
    assert pool.pick(None)[0] in (E1, E2)  # both 1 now (credit): a tie
    clock.advance(2.0)  # both stale: their in-flight counts decide
    counts = {a: pool.endpoint(a).in_flight for a in (E1, E2)}  # type: ignore[union-attr]
    fewer = min(counts, key=lambda a: counts[a])
    if counts[E1] != counts[E2]:
        assert pool.pick(None)[0] == fewer
    assert pool.has_room(None)  # stale never halts


def test_round_robin_cycles_in_address_order() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E3, E1, E2], picker="round-robin", fallbacks=2)
    picks = [pool.pick(None) for _ in range(4)]
    assert [p[0] for p in picks] == [E1, E2, E3, E1]
    assert picks[0] == (E1, E2, E3)
    assert make_pool(clock, [E3, E1, E2], picker="round-robin").pick(None) == (E1,)


def test_ties_break_at_random_with_the_injected_rng() -> None:
    def primaries(seed: int) -> list[str]:
        clock = VirtualClock()
        pool = make_pool(clock, [E1, E2, E3], weights="kv-cache=1", seed=seed)
        return [pool.pick(None)[0] for _ in range(30)]

    assert primaries(7) == primaries(7)
    assert set(primaries(7)) == {E1, E2, E3}


def test_saturated_and_ceiling_endpoints_have_no_room() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2], max_in_flight=1)
    feed(pool, clock, E1, waiting=0, kv=0.85)  # KV 0.85 / 0.8 >= 1
    assert pool.pick(None)[0] == E2
    assert not pool.has_room(None)  # E1 saturated, E2 at its ceiling
    assert pool.has_room(PickRequest(subset=frozenset({E1}))) is False
    feed(pool, clock, E1, waiting=0, kv=0.2)
    assert pool.pick(None)[0] == E1


def test_an_endpoint_whose_scrapes_cannot_connect_leaves_the_ready_set() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2], stale_after=1.0)
    endpoint = pool.endpoint(E1)
    assert endpoint is not None
    assert endpoint.fail_scrape(clock.now(), "refused", unreachable=True)
    assert not endpoint.fail_scrape(clock.now(), "refused", unreachable=True)
    assert endpoint.ready(clock.now())
    clock.advance(1.0)
    assert not endpoint.ready(clock.now())
    assert {pool.pick(None)[0] for _ in range(5)} == {E2}
    feed(pool, clock, E1, waiting=0)
    assert endpoint.ready(clock.now())


def test_settings_turn_picking_on_only_with_endpoints() -> None:
    assert not load_settings({}, use_env=False).endpoints_configured
    settings = load_settings({"endpoints": [f"{E1},{E2}", E3]}, use_env=False)
    assert settings.endpoints == [E1, E2, E3]
    assert settings.endpoints_configured
    for bad in ({"endpoints": ["host:80"]}, {"scorers": "speed=1"}, {"picker": "best"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            load_settings(bad, use_env=False)


def test_fallback_ties_break_at_random_with_the_injected_rng() -> None:
    # Identical endpoints: the fallbacks must not always favour the lowest addresses.
    addresses = [E1, E2, E3, "10.0.0.4:8000"]

    def fallbacks(seed: int) -> list[tuple[str, ...]]:
        clock = VirtualClock()
        pool = make_pool(clock, addresses, weights="kv-cache=1", seed=seed, fallbacks=2)
        return [pool.pick(None)[1:] for _ in range(40)]

    assert fallbacks(7) == fallbacks(7)
    assert {picked[0] for picked in fallbacks(7)} == set(addresses)
    assert all(len(set(picked)) == 2 for picked in fallbacks(7))


def test_a_pick_with_no_room_left_takes_the_best_candidate_rather_than_failing() -> None:
    # has_room and pick read the clock apart: by the pick no candidate may have room.
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2], max_in_flight=1)
    assert {pool.pick(None)[0], pool.pick(None)[0]} == {E1, E2}
    assert not pool.has_room(None)
    assert pool.pick(None)[0] in (E1, E2)
    endpoints = [pool.endpoint(address) for address in (E1, E2)]
    assert sum(endpoint.in_flight for endpoint in endpoints if endpoint) == 3


def test_a_pick_when_no_candidate_is_ready_any_more_takes_a_listed_one() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1])
    endpoint = pool.endpoint(E1)
    assert endpoint is not None
    endpoint.fail_scrape(clock.now(), "refused", unreachable=True)
    clock.advance(1.5)
    assert not endpoint.ready(clock.now())
    assert pool.pick(PickRequest(subset=frozenset({E1})))[0] == E1


def test_an_endpoint_leaving_the_pool_takes_its_staleness_timer_along() -> None:
    clock = VirtualClock()
    pool = make_pool(clock, [E1, E2])
    wakes: list[float] = []
    pool.bind(lambda: wakes.append(clock.now()), lambda: None)
    feed(pool, clock, E1, waiting=0)
    assert len(wakes) == 1
    pool.update("static", {E2: True})
    clock.advance(5.0)
    assert len(wakes) == 1  # E1's staleness wake was cancelled with it
    feed(pool, clock, E2, waiting=0)
    clock.advance(5.0)
    assert len(wakes) == 3  # a listed endpoint still wakes when its reading goes stale


@pytest.mark.parametrize(
    ("hint", "allowed"),
    [
        ({"10.0.0.1:8000"}, {"10.0.0.1:8000"}),  # ip:port: that port only
        ({"10.0.0.1"}, {"10.0.0.1:8000", "10.0.0.1:9000"}),  # bare IP: any port
        ({"10.0.0.1:9000", "10.0.0.2"}, {"10.0.0.1:9000", "10.0.0.2:8000"}),
        ({"[fd00::1]"}, {"[fd00::1]:8000"}),
        ({"10.0.0.1:7"}, set()),  # no such port
    ],
)
def test_a_subset_names_endpoints_by_ip_port_or_by_bare_ip(
    hint: set[str], allowed: set[str]
) -> None:
    clock = VirtualClock()
    addresses = ["10.0.0.1:8000", "10.0.0.1:9000", "10.0.0.2:8000", "[fd00::1]:8000"]
    pool = make_pool(clock, addresses, picker="round-robin")
    request = PickRequest(subset=frozenset(hint))
    if not allowed:
        assert pool.ineligible(request) is not None
        return
    assert pool.ineligible(request) is None
    assert {pool.pick(request)[0] for _ in range(8)} == allowed


def _tenant(n: int) -> str:
    return f"tenant {n} system prompt ".ljust(64 * 8, chr(ord("a") + n))


def test_new_tenants_spread_while_the_first_server_has_shown_no_slot_yet() -> None:
    """The cold start `make bench-vllm` measured: the first tenant's request runs long on
    one server before any first byte or scrape shows it running (its learnt slots 0);
    the other client's new tenants, one at a time, must not all pile onto the other."""
    for seed in range(1, 21):
        clock = VirtualClock()
        pool = make_pool(clock, [E1, E2], seed=seed)
        for address in (E1, E2):
            feed(pool, clock, address, waiting=0, running=0, kv=0.0)
        slow = pool.pick(PickRequest(prompt=_tenant(0)))[0]  # in flight throughout
        placed = {E1: 0, E2: 0}
        placed[slow] += 1
        for n in range(1, 7):
            address = pool.pick(PickRequest(prompt=_tenant(n)))[0]
            placed[address] += 1
            pool.on_first_byte(address, 0.1)
            pool.on_release(address)
            assert abs(placed[E1] - placed[E2]) <= 1, (seed, n, placed)


def test_a_newcomer_goes_where_fewer_other_tenants_prefixes_are_cached() -> None:
    for seed in range(1, 11):
        clock = VirtualClock()
        pool = make_pool(clock, [E1, E2], seed=seed)
        for address in (E1, E2):
            feed(pool, clock, address, waiting=0, running=0, kv=0.0)
        for n in range(3):
            pool.endpoint(E1).prefix.record(block_hashes(_tenant(n)))  # type: ignore[union-attr]
        pool.endpoint(E2).prefix.record(block_hashes(_tenant(3)))  # type: ignore[union-attr]
        assert pool.pick(PickRequest(prompt=_tenant(4)))[0] == E2, seed
        # ...while a tenant the busier cache holds still goes back to it.
        assert pool.pick(PickRequest(prompt=_tenant(1) + "next question"))[0] == E1, seed
