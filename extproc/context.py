"""Which workload a request belongs to, read from its headers.

Order of precedence:
1. `x-workload-context: {"workload_id": "...", "criticality": 1..5}`
   (criticality defaults to 3; unknown fields are ignored);
2. `x-gateway-inference-fairness-id: <id>` (the Gateway API Inference
   Extension's header), criticality 3. Read as upstream's endpoint picker
   reads it: an empty value, or the header sent more than once, is the
   default flow (the default workload; upstream calls it `default-flow`, the
   name used here when `--on-missing-context reject` leaves no default),
   never a 400;
3. neither: the configured default workload, or an error when none is set.

With an objective table (`--inference-pool`), a request that claims no
criticality in `x-workload-context` takes the one its
`x-gateway-inference-objective` names (see `objectives.py`); it counts as a
claim, so the workloads table's `max_criticality` still bounds it.

With an identity header (`--workload-header NAME`, set by the gateway after
authentication) the id comes from that header alone, and `x-workload-context`
only contributes its `criticality` (its `workload_id`, and the fairness-id
header, are ignored): the client can no longer choose whose share it uses.

Reserved ids: `overflow` (the registry's shared workload), `other` (the
metrics' aggregate of the less busy workloads) and the default workload's
name are internal. A request naming one in `x-workload-context` or the
identity header is refused (400), so it cannot merge into their counts or
series. A fairness id is not refused (upstream accepts any id) but escaped:
a reserved id, or one starting with `~`, gets a `~` in front (`overflow` ->
`~overflow`, `~x` -> `~~x`). The escape is one-to-one, so two fairness ids
never share a workload and none lands on an internal one; the length limit
applies to the escaped id.

Anything malformed raises `ContextError`, which the server answers with a 400.
A bad header is never turned into a fresh workload: that would let every
request mint a registry entry and jump the queue as a newcomer.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field

from extproc.objectives import OBJECTIVE_HEADER, ObjectiveTable

WORKLOAD_CONTEXT_HEADER = "x-workload-context"
FAIRNESS_ID_HEADER = "x-gateway-inference-fairness-id"
MAX_HEADER_BYTES = 1024
MAX_ID_BYTES = 128
MIN_CRITICALITY = 1
MAX_CRITICALITY = 5
DEFAULT_CRITICALITY = 3
OVERFLOW_WORKLOAD = "overflow"
OTHER_WORKLOADS = "other"
DEFAULT_FLOW = "default-flow"
RESERVED_ESCAPE = "~"

# C0/C1 controls, format characters (bidi overrides, zero-width), line and
# paragraph separators, lone surrogates: anything that could forge or hide a
# log line or a header.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@dataclass(frozen=True, slots=True)
class WorkloadContext:
    workload_id: str
    criticality: int = DEFAULT_CRITICALITY
    claimed: bool = field(default=False, compare=False)
    """The request named its criticality (the workloads table clamps claims)."""


class ContextError(ValueError):
    """The request's workload headers are unusable; `str(error)` says why."""

    def __init__(self, header: str, detail: str) -> None:
        super().__init__(f"{header}: {detail}")
        self.header = header
        self.detail = detail


class ContextParser:
    def __init__(
        self,
        default_workload: str | None = "default",
        identity_header: str | None = None,
        objectives: ObjectiveTable | None = None,
    ) -> None:
        if default_workload is not None:
            check_id("--default-workload", "default workload", default_workload)
        self._default = default_workload
        self._default_flow = default_workload or DEFAULT_FLOW
        self.identity_header = identity_header.lower() if identity_header else None
        self._reserved = frozenset({OVERFLOW_WORKLOAD, OTHER_WORKLOADS, self._default_flow})
        self._objectives = objectives

    @property
    def headers(self) -> frozenset[str]:
        """The headers `parse` reads."""
        read = {WORKLOAD_CONTEXT_HEADER, FAIRNESS_ID_HEADER}
        if self.identity_header is not None:
            read.add(self.identity_header)
        if self._objectives is not None:
            read.add(OBJECTIVE_HEADER)
        return frozenset(read)

    def parse(self, headers: dict[str, list[bytes]]) -> WorkloadContext:
        """Headers by lower-case name, each with every value it was sent with."""
        context = self._parse(headers)
        if self._objectives is None or context.claimed:
            return context
        name = _objective_name(headers)
        criticality = None if name is None else self._objectives.criticality(name)
        if criticality is None:
            return context
        return WorkloadContext(context.workload_id, criticality, claimed=True)

    def _parse(self, headers: dict[str, list[bytes]]) -> WorkloadContext:
        if self.identity_header is not None:
            return self._parse_identified(headers, self.identity_header)
        context = headers.get(WORKLOAD_CONTEXT_HEADER)
        if context is not None:
            value = _context_object(_single(WORKLOAD_CONTEXT_HEADER, context))
            workload_id = value.get("workload_id")
            if not isinstance(workload_id, str):
                raise ContextError(WORKLOAD_CONTEXT_HEADER, "workload_id must be a string")
            return self._context(WORKLOAD_CONTEXT_HEADER, "workload_id", workload_id, value)
        fairness = headers.get(FAIRNESS_ID_HEADER)
        if fairness is not None:
            return self._fairness(fairness)
        return self._missing(f"send {WORKLOAD_CONTEXT_HEADER} or {FAIRNESS_ID_HEADER}")

    def _parse_identified(self, headers: dict[str, list[bytes]], header: str) -> WorkloadContext:
        claims: dict[str, object] = {}
        context = headers.get(WORKLOAD_CONTEXT_HEADER)
        if context is not None:
            claims = _context_object(_single(WORKLOAD_CONTEXT_HEADER, context))
        identity = headers.get(header)
        if identity is None:
            missing = self._missing(f"the gateway did not set {header}")
            return WorkloadContext(missing.workload_id, *_criticality(claims))
        workload_id = _decode(header, _single(header, identity))
        return self._context(header, "workload id", workload_id, claims)

    def _fairness(self, values: list[bytes]) -> WorkloadContext:
        if len(values) != 1 or not values[0]:
            return WorkloadContext(self._default_flow)
        header = FAIRNESS_ID_HEADER
        workload_id = _decode(header, _single(header, values))
        if workload_id in self._reserved or workload_id.startswith(RESERVED_ESCAPE):
            workload_id = RESERVED_ESCAPE + workload_id
        # Checked escaped: the id the registry keeps must fit its limit too.
        return WorkloadContext(check_id(header, "workload id", workload_id))

    def _context(
        self, header: str, what: str, workload_id: str, claims: dict[str, object]
    ) -> WorkloadContext:
        check_id(header, what, workload_id)
        if workload_id in self._reserved:
            raise ContextError(header, f"{what} {workload_id!r} is reserved")
        return WorkloadContext(workload_id, *_criticality(claims))

    def _missing(self, hint: str) -> WorkloadContext:
        if self._default is None:
            raise ContextError(self.identity_header or WORKLOAD_CONTEXT_HEADER, f"missing: {hint}")
        return WorkloadContext(self._default)


def _objective_name(headers: dict[str, list[bytes]]) -> str | None:
    """The objective named, or None when absent, repeated, empty or not UTF-8."""
    values = headers.get(OBJECTIVE_HEADER)
    if values is None or len(values) != 1 or not values[0]:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _single(header: str, values: list[bytes]) -> bytes:
    if len(values) != 1:
        raise ContextError(header, f"sent {len(values)} times; send it once")
    if len(values[0]) > MAX_HEADER_BYTES:
        raise ContextError(header, f"longer than {MAX_HEADER_BYTES} bytes")
    return values[0]


def _decode(header: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ContextError(header, "not valid UTF-8") from None


def _context_object(raw: bytes) -> dict[str, object]:
    header = WORKLOAD_CONTEXT_HEADER
    text = _decode(header, raw)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ContextError(header, "not valid JSON") from None
    if not isinstance(value, dict):
        raise ContextError(header, "must be a JSON object")
    return value


def _criticality(claims: dict[str, object]) -> tuple[int, bool]:
    """The claimed criticality (or the default) and whether one was claimed."""
    if "criticality" not in claims:
        return DEFAULT_CRITICALITY, False
    criticality = claims["criticality"]
    header = WORKLOAD_CONTEXT_HEADER
    # bool is an int in Python; `true` is not a criticality.
    if not isinstance(criticality, int) or isinstance(criticality, bool):
        raise ContextError(header, "criticality must be an integer")
    if not MIN_CRITICALITY <= criticality <= MAX_CRITICALITY:
        raise ContextError(
            header,
            f"criticality must be from {MIN_CRITICALITY} to {MAX_CRITICALITY}, got {criticality}",
        )
    return criticality, True


def check_id(header: str, what: str, workload_id: str) -> str:
    """`workload_id` if usable as a workload id, else ContextError naming `header`."""
    if not workload_id:
        raise ContextError(header, f"{what} must not be empty")
    try:
        size = len(workload_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ContextError(header, f"{what} is not valid Unicode") from None
    if size > MAX_ID_BYTES:
        raise ContextError(header, f"{what} longer than {MAX_ID_BYTES} bytes")
    if not (workload_id.isascii() and workload_id.isprintable()) and any(
        unicodedata.category(char) in _UNSAFE_CATEGORIES for char in workload_id
    ):
        raise ContextError(header, f"{what} contains control characters")
    return workload_id
