"""Prefix affinity: which endpoint has most likely cached the start of this prompt.

Algorithm (GIE's approximate prefix scorer)
- The prompt is cut into fixed-size blocks of characters (64), at most 256 of
  them; block i's hash chains block i's text with hash i-1, so equal hashes
  mean (barring collisions) equal prefixes, not merely equal blocks.
- Each endpoint remembers, in a bounded LRU, the block hashes of prompts
  recently routed to it. A prompt's match on an endpoint is its longest
  prefix of blocks all remembered there.
- Recording touches a prompt's blocks last-to-first, so a prefix's first
  blocks are always the most recent and eviction trims chains from their
  tail: the remembered blocks of a chain stay a prefix of it. That makes
  "block k remembered" monotone in k, and the match a binary search:
  O(log B) lookups per endpoint, B <= 256.

Guarantees: bounded memory (`capacity` hashes per endpoint); a match never
exceeds what was routed there (an LRU may only forget). Hashes are Python's
salted `hash`, so they are private to this process -- as the LRUs are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

BLOCK_CHARS = 64
MAX_BLOCKS = 256


def block_hashes(
    prompt: str, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS
) -> tuple[int, ...]:
    """Chained hashes of the prompt's whole blocks, first block first."""
    end = min(len(prompt) // block_chars, max_blocks) * block_chars
    previous = 0
    # A comprehension with an assignment expression: the fastest pure-Python chain.
    return tuple(
        [
            previous := hash((previous, prompt[start : start + block_chars]))
            for start in range(0, end, block_chars)
        ]
    )


def matched_each(caches: Iterable[PrefixCache], hashes: tuple[int, ...]) -> list[int]:
    """`cache.matched(hashes)` for each cache: the pick's hot loop, inlined."""
    if not hashes:
        return [0 for _ in caches]
    first, last, count = hashes[0], hashes[-1], len(hashes)
    matches = []
    for cache in caches:
        blocks = cache._blocks
        if first not in blocks:
            matches.append(0)  # most endpoints: one lookup settles it
        elif last in blocks:
            matches.append(count)
        else:  # hashes[:low] remembered, hashes[high:] not
            low, high = 1, count - 1
            while low < high:
                middle = (low + high + 1) >> 1
                if hashes[middle - 1] in blocks:
                    low = middle
                else:
                    high = middle - 1
            matches.append(low)
    return matches


class PrefixCache:
    """One endpoint's recently routed block hashes, least recent first."""

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a prefix cache holds at least one block")
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def matched(self, hashes: tuple[int, ...]) -> int:
        """How many leading blocks of `hashes` are remembered here."""
        return matched_each((self,), hashes)[0]

    def record(self, hashes: tuple[int, ...]) -> None:
        """Remember a prompt routed here; its first blocks become the most recent."""
        blocks = self._blocks
        if blocks and hashes and next(reversed(blocks)) == hashes[0] and hashes[-1] in blocks:
            return  # this very prompt was the last one recorded: nothing to refresh
        for block in reversed(hashes):
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
