"""The scored picker's scorers, each mapping the candidate endpoints to 0..1 (1 = best).

As GIE's default scheduling profile, weighted queue 2, KV-cache 2, prefix 3:
- queue: the estimated queue (`endpoints`: in flight + foreign - slots; in
  flight when stale), min-max normalised over the candidates -- the
  shortest queue scores 1, the longest 0, all equal all 1;
- kv-cache: 1 - KV-cache use; unknown (stale, not exported) scores 0.5, so
  an endpoint is neither chosen nor shunned for missing metrics;
- prefix: the fraction of the prompt's blocks that lead the endpoint's
  remembered prefixes (`prefix.PrefixCache.matched`); 0 without a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.pool.endpoints import Endpoint, Load
from extproc.pool.prefix import matched_each

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
            if weight < 0:
                raise ValueError(f"{name}: weight must be >= 0")
            weights[field] = weight
        if not any(weights.values()):
            raise ValueError("at least one scorer needs a positive weight")
        return cls(**weights)

    def text(self) -> str:
        return f"queue={self.queue:g},kv-cache={self.kv_cache:g},prefix={self.prefix:g}"


def queue_scores(loads: Sequence[Load]) -> list[float]:
    depths = [load.queue_depth for load in loads]
    low, high = min(depths), max(depths)
    if high == low:
        return [1.0] * len(depths)
    span = high - low
    return [(high - depth) / span for depth in depths]


def kv_cache_scores(loads: Sequence[Load]) -> list[float]:
    return [UNKNOWN_KV_SCORE if kv is None else 1.0 - kv if kv < 1.0 else 0.0 for _, kv, _ in loads]


def prefix_scores(endpoints: Sequence[Endpoint], hashes: tuple[int, ...]) -> list[float]:
    if not hashes:
        return [0.0] * len(endpoints)
    total = len(hashes)
    return [m / total for m in matched_each((e.prefix for e in endpoints), hashes)]
