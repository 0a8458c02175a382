"""Endpoints from a Kubernetes InferencePool (inference.networking.k8s.io/v1), by list+watch.

Algorithm
- Read the InferencePool: its `spec.selector.matchLabels` and
  `spec.targetPorts[].number`. Every Pod the selector matches that is Ready
  (phase Running, condition Ready True, an IP, not being deleted) is one
  endpoint per target port, `podIP:port`; Pods not ready are listed as not
  ready, so requests already sent to them are still counted out.
- List the Pods, publish the whole set, then watch from the list's
  resourceVersion, publishing the set again after every event.
- The client library resumes a watch the server closed from the last
  version it saw. A 410 Gone (that version is too old) or any failure of the
  API server ends the watch; the loop then re-reads the InferencePool and
  re-lists, after a backoff (doubling, capped) when the failure was not a 410.
  A round whose list went through restarts the backoff from its first step:
  a watch that served for an hour and then dropped says nothing about the
  API server being down, so it must not inherit an earlier outage's delay.
  Meanwhile the last set published stays in force: an unreachable API server
  never empties the pool.

The InferenceObjectives of the pool (inference.networking.x-k8s.io/v1alpha2,
in the pool's namespace, `spec.poolRef` naming the pool, not being deleted)
are read the same way, with the same loop: list, publish the table (name ->
spec.priority), watch, publish it again after every event; on 410 or any
failure, list again (so a lost, cut or delayed watch ends with a table equal
to the API's state, and a duplicated event changes nothing: each event sets or
removes one object). Until the first list, and while the API server is unreachable, the
last table stays in force.

Client: lightkube (async, typed models, generic resources for CRDs, a small
dependency tree on httpx). Selector changes of the InferencePool take effect
at the next re-list.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import structlog
from lightkube import AsyncClient
from lightkube.core.client import LabelSelector
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from extproc.addresses import format_address
from extproc.objectives import ObjectiveTable
from extproc.pool.pool import EndpointPool
from extproc.tasks import cancel_and_wait

POOL_GROUP = "inference.networking.k8s.io"
InferencePool = create_namespaced_resource(POOL_GROUP, "v1", "InferencePool", "inferencepools")
InferenceObjective = create_namespaced_resource(
    "inference.networking.x-k8s.io", "v1alpha2", "InferenceObjective", "inferenceobjectives"
)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class PoolSpecError(ValueError):
    """The InferencePool lacks a selector or target ports this watcher can use."""


def pool_spec(pool: Any) -> tuple[dict[str, str], tuple[int, ...]]:
    """(matchLabels, target ports) of an InferencePool object."""
    spec = getattr(pool, "spec", None) or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    ports = tuple(int(p["number"]) for p in spec.get("targetPorts") or [])
    if not labels or not ports:
        raise PoolSpecError("the InferencePool needs spec.selector.matchLabels and targetPorts")
    return {str(k): str(v) for k, v in labels.items()}, ports


def pod_ready(pod: Pod) -> bool:
    status, metadata = pod.status, pod.metadata
    if status is None or not status.podIP or status.phase != "Running":
        return False
    if metadata is not None and metadata.deletionTimestamp is not None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def _name(obj: Any) -> str:
    return (obj.metadata.name if obj.metadata else None) or ""


def objective_priority(objective: Any, pool_name: str) -> tuple[bool, int | None]:
    """(whether this InferenceObjective counts for pool `pool_name`, its priority). One
    being deleted no longer counts, as for upstream's picker."""
    spec = getattr(objective, "spec", None) or {}
    ref = spec.get("poolRef") or {}
    deleting = objective.metadata is not None and objective.metadata.deletionTimestamp is not None
    mine = (
        not deleting
        and ref.get("name") == pool_name
        and (ref.get("group") or POOL_GROUP) == POOL_GROUP
    )
    priority = spec.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, int):
        priority = None
    return mine, priority


class _ListWatch(abc.ABC):
    """List, publish, watch, publish after every event; list again on any failure."""

    _what = ""
    """What is watched, for the log."""

    def __init__(
        self,
        name: str,
        client_factory: Callable[[], AsyncClient],
        sync_timeout: float,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        namespace, _, pool_name = name.rpartition("/")
        self._namespace = namespace or None
        self._name = pool_name
        self._client_factory = client_factory
        self._sync_timeout = sync_timeout
        self._sleep = sleep
        self._client: AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()
        """Set once the first list was published."""
        self.relists = 0
        self._log = structlog.get_logger("extproc.pool")

    async def start(self) -> None:
        self._client = self._client_factory()
        self._task = asyncio.create_task(self._run())
        # Serve once the Pods are known, or after a bounded wait on a slow API server.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.synced.wait(), self._sync_timeout)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    @abc.abstractmethod
    async def _list_and_watch(self) -> None:
        """One round: list, publish, then apply watch events until the watch ends."""

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            relists = self.relists
            try:
                await self._list_and_watch()
            except ApiError as error:
                if error.status.code == 410:
                    self._log.info("watch expired (410 Gone): listing again", watch=self._what)
                    continue
                self._log.warning("watch failed", watch=self._what, error=str(error))
            except (httpx2.HTTPError, PoolSpecError, ValueError) as error:
                self._log.warning("watch failed", watch=self._what, error=str(error))
            if self.relists != relists:  # this round listed: the API server was up
                backoff = BACKOFF_FIRST
            await self._sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


class InferencePoolWatch(_ListWatch):
    """Keep `pool`'s "kubernetes" source equal to the InferencePool's ready Pods."""

    _what = "InferencePool Pods"

    def __init__(
        self,
        pool: EndpointPool,
        name: str,
        client_factory: Callable[[], AsyncClient] = AsyncClient,
        sync_timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(name, client_factory, sync_timeout, sleep)
        self._pool = pool
        self._pods: dict[str, Pod] = {}
        self._ports: tuple[int, ...] = ()

    async def _list_and_watch(self) -> None:
        client = self._client
        assert client is not None
        inference_pool = await client.get(InferencePool, self._name, namespace=self._namespace)
        match_labels, self._ports = pool_spec(inference_pool)
        labels: LabelSelector = dict(match_labels)
        pods = client.list(Pod, namespace=self._namespace, labels=labels)
        self._pods = {_name(pod): pod async for pod in pods if _name(pod)}
        self.relists += 1
        self._publish()
        self.synced.set()
        watch = client.watch(
            Pod, namespace=self._namespace, labels=labels, resource_version=pods.resourceVersion
        )
        async for kind, pod in watch:
            name = _name(pod)
            if not name:
                continue
            if kind == "DELETED":
                self._pods.pop(name, None)
            else:
                self._pods[name] = pod
            self._publish()

    def _publish(self) -> None:
        endpoints: dict[str, bool] = {}
        for pod in self._pods.values():
            ip = pod.status.podIP if pod.status else None
            if not ip:
                continue
            ready = pod_ready(pod)
            for port in self._ports:
                endpoints[format_address(ip, port)] = ready
        self._pool.update("kubernetes", endpoints)


class InferenceObjectiveWatch(_ListWatch):
    """Keep `table` equal to the priorities of the pool's InferenceObjectives."""

    _what = "InferenceObjectives"

    def __init__(
        self,
        table: ObjectiveTable,
        name: str,
        client_factory: Callable[[], AsyncClient] = AsyncClient,
        sync_timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(name, client_factory, sync_timeout, sleep)
        self._table = table
        self._objectives: dict[str, int | None] = {}

    async def _list_and_watch(self) -> None:
        client = self._client
        assert client is not None
        listed = client.list(InferenceObjective, namespace=self._namespace)
        self._objectives = {}
        async for objective in listed:
            self._apply("ADDED", objective)
        self.relists += 1
        self._table.replace(self._objectives)
        self.synced.set()
        watch = client.watch(
            InferenceObjective, namespace=self._namespace, resource_version=listed.resourceVersion
        )
        async for kind, objective in watch:
            self._apply(kind, objective)
            self._table.replace(self._objectives)

    def _apply(self, kind: str, objective: Any) -> None:
        name = _name(objective)
        if not name:
            return
        mine, priority = objective_priority(objective, self._name)
        if kind == "DELETED" or not mine:  # deleted, or moved to another pool
            self._objectives.pop(name, None)
        else:
            self._objectives[name] = priority
