"""The simulated prefix cache: whole blocks, chained by prefix, evicted LRU from the tail."""

from __future__ import annotations

import pytest

from extproc.tools.prefix_cache import PrefixCache


def words(n: int, tag: str = "w") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def test_hits_are_whole_blocks_of_a_shared_prefix() -> None:
    cache = PrefixCache(capacity=100, block_size=4)
    assert cache.cached_tokens(words(10)) == 0
    cache.insert(words(10))
    assert len(cache) == 2  # the partial third block is not kept
    assert cache.cached_tokens(words(10)) == 8
    assert cache.cached_tokens(words(6)) == 4
    assert cache.cached_tokens([*words(5), "other", *words(4, "x")]) == 4
    assert cache.cached_tokens(words(3)) == 0  # shorter than a block


def test_a_block_stands_for_its_whole_prefix() -> None:
    cache = PrefixCache(capacity=100, block_size=2)
    cache.insert(["a", "b", "c", "d"])
    # Same second block after a different first one: not a hit.
    assert cache.cached_tokens(["x", "y", "c", "d"]) == 0


def test_eviction_takes_the_least_recent_chain_from_its_tail() -> None:
    cache = PrefixCache(capacity=4, block_size=1)
    cache.insert(["a", "b", "c"])
    cache.insert(["x", "y"])  # five blocks: the oldest chain loses its tail "c"
    assert len(cache) == 4
    assert cache.cached_tokens(["x", "y"]) == 2
    assert cache.cached_tokens(["a", "b", "c"]) == 2  # a hit refreshes: "x y" is now oldest
    cache.insert(["p", "q"])  # so "x y" goes, tail first
    assert cache.cached_tokens(["a", "b"]) == 2
    assert cache.cached_tokens(["x", "y"]) == 0


def test_a_prompt_longer_than_the_cache_keeps_its_head() -> None:
    cache = PrefixCache(capacity=3, block_size=1)
    cache.insert(words(10))
    assert len(cache) == 3
    assert cache.cached_tokens(words(10)) == 3


def test_a_cache_of_no_blocks_caches_nothing() -> None:
    cache = PrefixCache(capacity=0)
    cache.insert(words(64))
    assert (len(cache), cache.cached_tokens(words(64))) == (0, 0)
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(capacity=1, block_size=0)
