"""Workloads the operator defines (`--workloads FILE`): weights, criticality bounds, caps, access.

The file is a YAML mapping from workload id to its entry; the entry `default`
applies, per workload, to every id not listed::

    default: {max_criticality: 3, max_queued: 50}
    team-a: {weight: 4, max_in_flight: 8}
    batch: {criticality: 1, max_criticality: 2}

Each entry (every key optional): `weight` (fair-share weight, overriding the
criticality-derived one, and the workload's weight in the full queue's
shares), `criticality` (used when the client claims none), `max_criticality`
(a claim above it is clamped, and counted), `max_in_flight` (its requests on
the backend at once; more wait), `max_queued` (its requests waiting; more are
refused 429 `workload-limit`), `allow` (false: refused 403; on `default`, only
listed ids are served).

Ids are the keys exactly as written: YAML 1.1 would read `0042`, `12:30`, `on`
as 34, 750 and True, so every mapping key is kept as its text, and a key given
twice in one mapping is an error naming it and its line. A `weight` must be
within `fair_share.MIN_WEIGHT..MAX_WEIGHT` (finite).

Lifecycle: read and validated with pydantic at start (a bad file stops the
process); then `Workloads.reload_if_changed`, called every second by the
service, re-reads the file when its bytes changed. A bad
edit keeps the last good table, logs why and counts it in `errors`; the next
good edit takes effect. On every change the listeners (the flow controller's
`reconfigure`) are called, so new weights and caps apply to queued requests.

Concurrency: one event loop reads and swaps the table; readers get the
current frozen table, never a half-built one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator

from extproc.context import (
    DEFAULT_CRITICALITY,
    MAX_CRITICALITY,
    MIN_CRITICALITY,
    ContextError,
    WorkloadContext,
    check_id,
)
from extproc.flowcontrol.admission import NO_LIMITS, WorkloadLimits
from extproc.flowcontrol.fair_share import MAX_WEIGHT, MIN_WEIGHT

DEFAULT_ENTRY = "default"
Criticality = Annotated[int, Field(ge=MIN_CRITICALITY, le=MAX_CRITICALITY)]


class WorkloadsFileError(ValueError):
    """The workloads file cannot be used; the message names the file, the entry and the field."""


class WorkloadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float | None = Field(None, ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)
    criticality: Criticality | None = None
    max_criticality: Criticality | None = None
    max_in_flight: int | None = Field(None, ge=1)
    max_queued: int | None = Field(None, ge=0)
    allow: bool = True

    @model_validator(mode="after")
    def _criticality_within_bound(self) -> WorkloadSpec:
        bound = self.max_criticality
        if bound is not None and self.criticality is not None and self.criticality > bound:
            raise ValueError(f"criticality {self.criticality} is above max_criticality {bound}")
        return self

    def limits(self) -> WorkloadLimits:
        return WorkloadLimits(self.weight, self.max_in_flight, self.max_queued)


_OPEN = WorkloadSpec()


class _BadKey(yaml.YAMLError):
    def __init__(self, problem: str, node: yaml.Node) -> None:
        super().__init__(f"line {node.start_mark.line + 1}: {problem}")


try:  # libyaml: fast, and refuses nesting past 1000 levels with an error
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover -- PyYAML's wheels ship libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _Loader(_SafeLoader):
    """Safe YAML whose mapping keys stay the text written, each at most once."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, object]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _BadKey("a key must be a plain string", key_node)
            if key_node.value in seen:
                raise _BadKey(f"duplicate key {key_node.value!r}", key_node)
            seen.add(key_node.value)
        self.flatten_mapping(node)  # `<<` merges: later keys override merged ones
        mapping: dict[Hashable, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _BadKey("a key must be a plain string", key_node)
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


def _load(path: Path) -> object:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except _BadKey as error:
        raise WorkloadsFileError(f"{path} {error}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        one_line = " ".join(str(error).split())
        raise WorkloadsFileError(f"{path}: {one_line}") from None
    except RecursionError:
        raise WorkloadsFileError(f"{path}: nested too deeply to read") from None


class _Entries(RootModel[dict[str, WorkloadSpec]]):
    pass


@dataclass(frozen=True, slots=True)
class Admission:
    """What the table makes of one request's workload context."""

    context: WorkloadContext
    allowed: bool
    clamped: bool
    """The client claimed a criticality above the workload's max_criticality."""


@dataclass(frozen=True)
class WorkloadTable:
    entries: dict[str, WorkloadSpec]

    @classmethod
    def read(cls, path: Path) -> WorkloadTable:
        raw = _load(path)
        if raw is None:
            return cls({})
        if not isinstance(raw, dict):
            raise WorkloadsFileError(f"{path}: expected a mapping of workload id to its entry")
        try:
            entries = _Entries.model_validate(raw).root
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            message = str(first["msg"]).removeprefix("Value error, ")
            raise WorkloadsFileError(f"{path}: {where}: {message}") from None
        for workload_id in entries:
            try:
                check_id("--workloads", "workload id", workload_id)
            except ContextError as error:
                raise WorkloadsFileError(f"{path}: {workload_id!r}: {error.detail}") from None
        return cls(entries)

    def spec(self, workload_id: str) -> WorkloadSpec:
        """The entry in force for this workload: its own, else `default`'s."""
        entries = self.entries
        return entries.get(workload_id) or entries.get(DEFAULT_ENTRY) or _OPEN

    def admit(self, context: WorkloadContext) -> Admission:
        spec = self.spec(context.workload_id)
        if not context.claimed:
            criticality = spec.criticality or DEFAULT_CRITICALITY
            if spec.max_criticality is not None:
                criticality = min(criticality, spec.max_criticality)
            return Admission(_with(context, criticality), spec.allow, False)
        bound = spec.max_criticality
        if bound is not None and context.criticality > bound:
            return Admission(_with(context, bound), spec.allow, True)
        return Admission(context, spec.allow, False)

    def as_json(self) -> dict[str, dict[str, object]]:
        return {
            workload_id: spec.model_dump(exclude_defaults=True)
            for workload_id, spec in self.entries.items()
        }


def _with(context: WorkloadContext, criticality: int) -> WorkloadContext:
    return WorkloadContext(context.workload_id, criticality, context.claimed)


class Workloads:
    """The table in force, reloaded from its file when that changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.table = WorkloadTable.read(path) if path is not None else WorkloadTable({})
        self.errors = 0
        """Edits of the file that could not be used (each kept the last good table)."""
        self.reloads = 0
        self._signature = _signature(path)
        self._listeners: list[Callable[[], None]] = []
        self._log = structlog.get_logger("extproc.workloads")

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def admit(self, context: WorkloadContext) -> Admission:
        if not self.table.entries:
            return Admission(context, True, False)
        return self.table.admit(context)

    def limits(self, workload_id: str) -> WorkloadLimits:
        if not self.table.entries:
            return NO_LIMITS
        return self.table.spec(workload_id).limits()

    def weight(self, workload_id: str) -> float | None:
        return self.limits(workload_id).weight

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; True when a new table is in force."""
        if self.path is None:
            return False
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            table = WorkloadTable.read(self.path)
        except Exception as error:  # whatever an edit holds, the reloading goes on
            self.errors += 1
            self._log.error(
                "workloads file rejected; keeping the last good table", error=str(error)
            )
            return False
        self.table = table
        self.reloads += 1
        self._log.info("workloads file reloaded", path=str(self.path), entries=len(table.entries))
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                self._log.exception("workloads change listener failed")
        return True


def _signature(path: Path | None) -> bytes | None:
    # The file is small: comparing its bytes catches edits that keep size and mtime.
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return b""
