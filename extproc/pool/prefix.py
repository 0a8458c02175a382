"""Prefix affinity: which endpoint has most likely cached the start of this prompt.

Algorithm (GIE's approximate prefix scorer)
- The prompt's UTF-8 bytes are cut into fixed-size blocks (64 bytes, about
  16 tokens: vLLM's block), at most 256 of them; block i's hash chains block
  i's bytes with hash i-1, so equal hashes mean (barring collisions) equal
  prefixes, not merely equal blocks.
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

import struct
from collections import OrderedDict
from collections.abc import Iterable

BLOCK_BYTES = 64
MAX_BLOCKS = 256


class BlockHasher:
    """Chained hashes of a prompt's whole blocks, first block first."""

    __slots__ = ("_block_bytes", "_max_blocks", "_splitters")

    def __init__(self, block_bytes: int = BLOCK_BYTES, max_blocks: int = MAX_BLOCKS) -> None:
        self._block_bytes = block_bytes
        self._max_blocks = max_blocks
        # One struct per block count: it cuts all the blocks in one C call, about 8x
        # cheaper than slicing them one by one (measured: 5 us against 45 us for 256).
        self._splitters: dict[int, struct.Struct] = {}

    def __call__(self, prompt: str) -> tuple[int, ...]:
        size = self._block_bytes
        # surrogatepass: JSON may decode to lone surrogates, which strict UTF-8 refuses.
        data = prompt[: size * self._max_blocks].encode("utf-8", "surrogatepass")
        count = min(len(data) // size, self._max_blocks)
        splitter = self._splitters.get(count)
        if splitter is None:
            splitter = self._splitters[count] = struct.Struct(f"{size}s" * count)
        previous = 0
        return tuple([previous := hash((previous, block)) for block in splitter.unpack_from(data)])


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


def remembered_each(caches: Iterable[PrefixCache]) -> list[int]:
    """`len(cache)` for each cache, in the pick's hot loop (no method call per cache)."""
    return [len(cache._blocks) for cache in caches]


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
