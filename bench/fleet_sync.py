"""Fleet sync cost against the number of workloads the fleet knows (issue #16.5).

4 replicas share one local redis-server that knows 100,000 workloads; each
round every replica records 10 new requests (so 10 workloads change per
replica) and syncs. Reported per steady-state sync: wall time seen by the
replica (round trip, script, reply parsing), the script's time inside Redis
(`INFO commandstats`: Redis runs nothing else meanwhile) and the reply's bytes
(`total_net_output_bytes`).

    .venv/bin/python bench/fleet_sync.py [--workloads N] [--rounds R]

Against another tree (e.g. the code before a change):
`git archive main extproc | tar -x -C /tmp/before` then
`PYTHONPATH=/tmp/before:. .venv/bin/python bench/fleet_sync.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: see above

from redis import asyncio as aioredis

from extproc.clock import SystemClock
from extproc.fleet.registry import SharedWorkloadRegistry
from extproc.fleet.sync import FleetOptions, FleetSync, LeasedCapacity
from extproc.registry.memory import InMemoryWorkloadRegistry
from tests.support.redis_server import RedisServer


class Replica:
    def __init__(self, url: str, workloads: int) -> None:
        clock = SystemClock()
        local = InMemoryWorkloadRegistry(clock, max_workloads=2 * workloads)
        self.registry = SharedWorkloadRegistry(local, clock, stale_after=5.0)
        capacity = LeasedCapacity(64, clock, 5.0)
        self.fleet = FleetSync(
            self.registry,
            # A long interval only for its socket timeout (5 x): seeding is one huge sync.
            FleetOptions(url=url, prefix="bench", interval=2.0, lease=10.0),
            lambda: (8, 8),
            capacity,
        )

    def new(self, workload: str) -> None:
        self.registry.increment_active(workload)
        self.registry.decrement_active(workload)


async def stats(redis: aioredis.Redis) -> tuple[int, float]:
    """(bytes Redis has sent, microseconds spent in EVALSHA) so far."""
    info = await redis.info("all")
    usec = float(info.get("cmdstat_evalsha", {}).get("usec", 0))
    return int(info["total_net_output_bytes"]), usec


async def main(workloads: int, rounds: int, replicas: int) -> dict[str, float]:
    server = RedisServer()
    await server.start()
    direct = aioredis.Redis.from_url(server.url)
    fleet = [Replica(server.url, workloads) for _ in range(replicas)]
    try:
        for n in range(workloads):  # the fleet learns every workload
            fleet[n % replicas].new(f"w{n}")
        for replica in fleet:  # each replica's first sync hands over its share of them
            assert await replica.fleet.sync()
        for replica in fleet:  # and each has seen everything once
            assert await replica.fleet.sync()
        rng = random.Random(1)
        overhead = (await stats(direct))[0] - (await stats(direct))[0]
        times, redis_us, sizes = [], [], []
        for _ in range(rounds):
            for replica in fleet:
                for _ in range(10):
                    replica.new(f"w{rng.randrange(workloads)}")
                sent_before, usec_before = await stats(direct)
                started = time.perf_counter()
                assert await replica.fleet.sync()
                times.append(time.perf_counter() - started)
                sent_after, usec_after = await stats(direct)
                sizes.append(sent_after - sent_before + overhead)
                redis_us.append(usec_after - usec_before)
        return {
            "workloads": workloads,
            "replicas": replicas,
            "syncs": len(times),
            "sync_ms_median": round(statistics.median(times) * 1000, 2),
            "sync_ms_max": round(max(times) * 1000, 2),
            "redis_ms_median": round(statistics.median(redis_us) / 1000, 2),
            "reply_bytes_median": int(statistics.median(sizes)),
        }
    finally:
        for replica in fleet:
            await replica.fleet.stop()
        await direct.aclose()
        await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.workloads, args.rounds, args.replicas))))
