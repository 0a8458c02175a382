"""The endpoint pool: the model servers discovered, and the pick among them.

Membership comes from one or more discovery sources (static, DNS,
Kubernetes); each reports the full set it sees, with readiness, and the pool
holds their union. An endpoint no source lists any more leaves the ready set
at once and the pool's books when its last request in flight completes, so
every count taken is given back.

A pick (`contracts.EndpointPool.pick`): the ready endpoints the request may
use are ranked by the picker (ties broken at random by the injected RNG, for
the primary and the fallbacks alike); the best one with room is the primary
and is charged the request; the next `fallbacks` best (0 unless configured:
a list routes only with override-host) are the fallbacks. A pick
never fails: `has_room` and `pick` read the clock apart, so should no
candidate have room (or be ready) at the pick's instant, the best ready one
(else the best listed one) is the primary -- one request over an endpoint's
room, never an exception in the middle of a dispatch. The prompt's block
hashes are then remembered on the primary, for the prefix scorer's next
picks.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from extproc.contracts import Clock, PickRequest, TimerHandle
from extproc.pool.endpoints import Endpoint, EndpointOptions, EndpointSnapshot
from extproc.pool.picker import Picker
from extproc.pool.prefix import BlockHasher

_NONE = float("-inf")
"""Marks a score out of the running (no room, already ranked); real scores are finite
(scrapes with NaN or infinity are refused: `capacity.saturation.parse_reading`)."""
_ROOM = operator.itemgetter(2)  # Load.room
STALE_MARGIN = 1e-6
"""A reading is fresh up to and including `stale_after`; the wake comes just past it."""


@dataclass(frozen=True, slots=True)
class PoolStatus:
    picker: str
    endpoints: tuple[EndpointSnapshot, ...]


def _nothing() -> None:
    pass


def _allowed(endpoint: Endpoint, subset: frozenset[str]) -> bool:
    """A subset names an endpoint by "ip:port", or by its bare IP (any port)."""
    return endpoint.address in subset or endpoint.host in subset


class EndpointPool:
    def __init__(
        self,
        clock: Clock,
        picker: Picker,
        options: EndpointOptions | None = None,
        *,
        rng: random.Random | None = None,
        hasher: BlockHasher | None = None,
        fallbacks: int = 0,
    ) -> None:
        self._clock = clock
        self._fallbacks = fallbacks
        self.picker = picker
        self.options = options or EndpointOptions()
        self._rng = rng or random.Random()
        self._hash = hasher or BlockHasher()
        self._endpoints: dict[str, Endpoint] = {}
        self._ordered: list[Endpoint] = []
        """The endpoints listed by some source, in address order (round robin's order)."""
        self._sources: dict[str, dict[str, bool]] = {}
        self._wake: Callable[[], None] = _nothing
        self._changed: Callable[[], None] = _nothing
        self._listeners: list[Callable[[], None]] = []
        self._stale_timers: dict[str, TimerHandle] = {}

    # -- membership -------------------------------------------------------

    def update(self, source: str, endpoints: Mapping[str, bool]) -> None:
        """`source` now sees exactly these endpoints ("ip:port" -> ready)."""
        self._sources[source] = dict(endpoints)
        listed: dict[str, bool] = {}
        for seen in self._sources.values():
            for address, ready in seen.items():
                listed[address] = listed.get(address, False) or ready
        for address, ready in listed.items():
            endpoint = self._endpoints.get(address)
            if endpoint is None:
                endpoint = self._endpoints[address] = Endpoint(address, self.options, self._clock)
            endpoint.discovered_ready = ready
        for address, endpoint in list(self._endpoints.items()):
            if address not in listed:
                self._drop_stale_timer(address)
                endpoint.discovered_ready = False
                if endpoint.in_flight == 0:
                    del self._endpoints[address]
        self._ordered = sorted(
            (self._endpoints[a] for a in listed), key=lambda endpoint: endpoint.address
        )
        for listener in self._listeners:
            listener()
        self._changed()

    def on_update(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every membership update (the scraper follows it)."""
        self._listeners.append(listener)

    def endpoint(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    @property
    def addresses(self) -> list[str]:
        """Every endpoint listed by some source, ready or not."""
        return [endpoint.address for endpoint in self._ordered]

    def membership_changed(self) -> None:
        """An endpoint's readiness changed outside `update` (its scrapes stopped connecting)."""
        self._changed()

    def wake(self) -> None:
        """Some endpoint may have room it lacked."""
        self._wake()

    def scraped(self, endpoint: Endpoint) -> None:
        """A scrape of `endpoint` landed: it may have room now, and will when it goes stale."""
        self._drop_stale_timer(endpoint.address)
        # Stale means "count in flight only", which may open room: wake at that instant.
        after = self.options.saturation.stale_after + STALE_MARGIN
        self._stale_timers[endpoint.address] = self._clock.call_later(after, self._wake)
        self._wake()

    def _drop_stale_timer(self, address: str) -> None:
        timer = self._stale_timers.pop(address, None)
        if timer is not None:
            timer.cancel()

    # -- contracts.EndpointPool -------------------------------------------

    def bind(self, wake: Callable[[], None], changed: Callable[[], None]) -> None:
        self._wake = wake
        self._changed = changed

    def ineligible(self, pick: PickRequest | None) -> str | None:
        subset = pick.subset if pick is not None else None
        if subset is not None and not subset:
            return "the subset hint lists no endpoint"
        if self._candidates(subset, self._clock.now()):
            return None
        if subset is None:
            return "no endpoint of the pool is ready"
        return f"none of the {len(subset)} endpoints in the subset hint is ready"

    def has_room(self, pick: PickRequest | None) -> bool:
        now = self._clock.now()
        subset = pick.subset if pick is not None else None
        return any(endpoint.has_room(now) for endpoint in self._candidates(subset, now))

    def pick(self, pick: PickRequest | None) -> tuple[str, ...]:
        now = self._clock.now()
        subset = pick.subset if pick is not None else None
        # Admitted by has_room a moment ago; see the module's note on a pick never failing.
        candidates = self._candidates(subset, now) or self._listed(subset)
        prompt = pick.prompt if pick is not None else None
        hashes = self._hash(prompt) if prompt else ()
        loads = [endpoint.load(now) for endpoint in candidates]
        scores = self.picker.scores(candidates, loads, hashes)
        if all(map(_ROOM, loads)):
            roomy = scores.copy()
        else:
            roomy = [
                score if load.room else _NONE for score, load in zip(scores, loads, strict=True)
            ]
            if max(roomy) == _NONE:
                roomy = scores.copy()
        chosen = self._best(roomy, 1)[0]
        primary = candidates[chosen]
        self.picker.picked(primary)
        primary.picked += 1
        if hashes:
            if primary.prefix.matched(hashes):
                primary.prefix_hits += 1
            primary.prefix.record(hashes)
        primary.on_dispatch()
        if not self._fallbacks:
            return (primary.address,)
        # Fallbacks: the next best, room or not (they are retries).
        rest = scores.copy()
        rest[chosen] = _NONE
        ranked = self._best(rest, min(self._fallbacks, len(rest) - 1))
        return (primary.address, *(candidates[i].address for i in ranked))

    def move(self, old: str, new: str, started: bool) -> bool:
        target = self._endpoints.get(new)
        if target is None:
            return False
        # Before its first byte it was never counted as started at `old`: releasing it
        # as started there would skew that endpoint's learnt slot count.
        self._release(old, started)
        target.on_dispatch()
        if started:
            target.server.started()  # it runs at `new`: count it started there too
        return True

    def on_first_byte(self, address: str, seconds: float) -> None:
        endpoint = self._endpoints.get(address)
        if endpoint is not None and endpoint.on_first_byte():
            self._wake()  # more slots than it knew: room without a completion

    def on_release(self, address: str, started: bool = True) -> None:
        self._release(address, started)

    def _release(self, address: str, started: bool = True) -> None:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            return
        endpoint.on_release(started)
        if endpoint.in_flight == 0 and not any(address in s for s in self._sources.values()):
            del self._endpoints[address]

    def _best(self, scores: list[float], wanted: int) -> list[int]:
        """The indices of the `wanted` best scores, best first, ties broken at random; at
        least `wanted` scores must be above `_NONE`. Consumes `scores`."""
        best: list[int] = []
        while len(best) < wanted:
            top = max(scores)
            tied = scores.count(top)
            if tied == 1:  # the common case: C-speed scans only
                taken = [scores.index(top)]
            else:
                group = [i for i, score in enumerate(scores) if score == top]
                taken = self._rng.sample(group, min(tied, wanted - len(best)))
            for i in taken:
                scores[i] = _NONE
            best += taken
        return best

    def _listed(self, subset: frozenset[str] | None) -> list[Endpoint]:
        return [e for e in self._ordered if subset is None or _allowed(e, subset)]

    def _candidates(self, subset: frozenset[str] | None, now: float) -> list[Endpoint]:
        if subset is None:
            # Reachable and discovered ready is the common case: no call needed to tell.
            return [
                e
                for e in self._ordered
                if e.discovered_ready and (e.unreachable_since is None or e.ready(now))
            ]
        return [e for e in self._ordered if _allowed(e, subset) and e.ready(now)]

    # -- reading ----------------------------------------------------------

    def status(self) -> PoolStatus:
        now = self._clock.now()
        return PoolStatus(
            self.picker.name, tuple(endpoint.snapshot(now) for endpoint in self._ordered)
        )
