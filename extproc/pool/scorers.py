"""The scored picker's scorers, each mapping the candidate endpoints to 0..1 (1 = best).

As GIE's default scheduling profile, weighted queue 2, KV-cache 2, prefix 3:
- queue: the estimated queue (`endpoints`: in flight + foreign - slots,
  slots at least 1 unless the server was seen queueing; no foreign load
  when stale), min-max normalised over the candidates -- the
  shortest queue scores 1, the longest 0, all equal all 1;
- kv-cache: 1 - KV-cache use; unknown (stale, not exported) scores 0.5, so
  an endpoint is neither chosen nor shunned for missing metrics;
- prefix: the fraction of the prompt's blocks that lead the endpoint's
  remembered prefixes (`prefix.PrefixCache.matched`); 0 without a prompt.
  A prompt no endpoint holds any block of (a new tenant's) is scored by
  room in the remembered caches instead: 1 - the endpoint's remembered
  blocks / the most any candidate remembers (all equal: no effect). A
  newcomer thus goes where fewer other tenants' prefixes are cached rather
  than evict them; GIE scores it 0 everywhere, leaving it to the load
  scorers, which cannot tell a cache full of other prefixes from an empty
  one. A prompt matched anywhere, even by one block, scores as GIE's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.pool.endpoints import Endpoint, Load
from extproc.pool.prefix import matched_each, remembered_each

UNKNOWN_KV_SCORE = 0.5


@dataclass(frozen=True, slots=True)
class ScorerWeights:
    queue: float = 2.0
    kv_cache: float = 2.0
    prefix: float = 3.0

    @classmethod
    def parse(cls, text: str) -> ScorerWeights:
        """`queue=2,kv-cache=2,prefix=3`; scorers left out weigh 0."""
        names = {"queue": "queue", "kv-cache": "kv_cache", "prefix": "prefix"}
        weights = dict.fromkeys(names.values(), 0.0)
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            field = names.get(name.strip())
            if not sep or field is None:
                raise ValueError(f"expected NAME=WEIGHT with NAME one of {', '.join(names)}")
            try:
                weight = float(value)
            except ValueError:
                raise ValueError(f"{name}: weight {value!r} is not a number") from None
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"{name}: weight must be a finite number >= 0")
            weights[field] = weight
        if not any(weights.values()):
            raise ValueError("at least one scorer needs a positive weight")
        return cls(**weights)

    def text(self) -> str:
        return f"queue={self.queue:g},kv-cache={self.kv_cache:g},prefix={self.prefix:g}"


def weighted_scores(
    weights: ScorerWeights,
    endpoints: Sequence[Endpoint],
    loads: Sequence[Load],
    hashes: tuple[int, ...],
) -> list[float]:
    """Each endpoint's weighted sum of the three scores, in one pass (the pick's hot loop)."""
    wq, wk, wp = weights.queue, weights.kv_cache, weights.prefix
    depths = [load.queue_depth for load in loads]
    low, high = min(depths), max(depths)
    span = high - low
    # queue score (high - depth) / span, weighted: q_base - q_step * depth.
    q_step = wq / span if span else 0.0
    q_base = q_step * high if span else wq
    unknown_kv = wk * UNKNOWN_KV_SCORE
    if hashes and wp:
        p_step = wp / len(hashes)
        matches = matched_each((e.prefix for e in endpoints), hashes)
        rooms = None if max(matches) else _cache_rooms(endpoints, wp)
    else:
        p_step, matches, rooms = 0.0, [0] * len(loads), None
    scores = [
        q_base
        - q_step * depth
        + (unknown_kv if kv is None else wk * (1.0 - kv) if kv < 1.0 else 0.0)
        + p_step * match
        for (depth, kv, _), match in zip(loads, matches, strict=True)
    ]
    if rooms is not None:
        scores = [score + room for score, room in zip(scores, rooms, strict=True)]
    return scores


def _cache_rooms(endpoints: Sequence[Endpoint], weight: float) -> list[float] | None:
    """Each endpoint's room in its remembered cache, relative to the fullest, x `weight`;
    None when all are equal (it would add nothing)."""
    sizes = remembered_each(e.prefix for e in endpoints)
    most = max(sizes)
    if not most or min(sizes) == most:
        return None
    step = weight / most
    return [weight - step * size for size in sizes]
