"""A simulated prefix cache: the part of a model server's KV cache that outlives requests.

Like vLLM's automatic prefix caching, a prompt is cut into blocks of
`block_size` tokens and each whole block is named by a hash of its tokens and
of the block before it, so a block's name stands for the entire prefix that
ends with it. A lookup walks the prompt's blocks from the start and stops at
the first one not cached: the answer is how many leading tokens need no
prefill. Inserting records every whole block of a prompt. At most `capacity`
blocks are kept; the least recently used goes first. A prompt's blocks are
refreshed from its last to its first, so a prefix's first block is always the
most recent of its chain and eviction eats chains from their tails (as vLLM's
free-block queue does) instead of cutting a chain at its head and leaving the
rest unreachable. A partial last block is never cached, as in vLLM.

Guarantees: a hit is always a true shared prefix of a prompt seen before
(hash collisions aside), a whole number of blocks, never more than the prompt;
memory is bounded by `capacity` block names. Not thread-safe: one event loop.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, capacity: int, block_size: int = 16) -> None:
        if capacity < 0 or block_size < 1:
            raise ValueError("capacity must be >= 0 and block_size >= 1")
        self.capacity = capacity
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_tokens(self, tokens: Sequence[str]) -> int:
        """How many leading tokens of `tokens` are cached; refreshes the blocks hit."""
        hits: list[bytes] = []
        for name in self._names(tokens):
            if name not in self._blocks:
                break
            hits.append(name)
        self._refresh(hits)
        return len(hits) * self.block_size

    def insert(self, tokens: Sequence[str]) -> None:
        self._refresh(self._names(tokens)[: self.capacity])
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def _refresh(self, chain: list[bytes]) -> None:
        for name in reversed(chain):
            self._blocks[name] = None
            self._blocks.move_to_end(name)

    def _names(self, tokens: Sequence[str]) -> list[bytes]:
        names: list[bytes] = []
        parent = b""
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            block = "\0".join(tokens[start : start + self.block_size]).encode()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            names.append(parent)
        return names
