"""W3C Trace Context, carried with a task from the call that creates it to its agent.

The gateway makes no spans of its own: it keeps the creating call's `traceparent` and
`tracestate` (gRPC metadata or HTTP headers, as OpenTelemetry's propagators send them)
on the task, and the task carries them to its agent, which continues the trace where the
operator left off (agent_kit does, with its `otel` extra installed). So the gateway
needs no tracing library, and a call without a trace costs one scan of its metadata.

A malformed traceparent is ignored, not refused: the W3C recommendation says a receiver
must ignore it, and a tracing header is not the request (a proxy's broken one must not
fail a create). A tracestate is kept only beside a valid traceparent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from task_manager.v1.task_manager_pb2 import TraceContext

TRACEPARENT_KEY = "traceparent"
TRACESTATE_KEY = "tracestate"

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
MAX_TRACESTATE_CHARS = 512
"""The recommendation's limit on what a propagator must pass on (32 members may be
longer; a longer one is dropped whole, never cut, as cutting could break a member)."""
_TRACESTATE = re.compile(r"[\x20-\x7e]*")


def carried(metadata: Iterable[tuple[str, str | bytes]] | None) -> TraceContext | None:
    """The trace context a call's metadata (lower-case keys) carries, if a valid one."""
    traceparent = tracestate = ""
    for key, value in metadata or ():
        if key == TRACEPARENT_KEY and isinstance(value, str):
            traceparent = value.strip()
        elif key == TRACESTATE_KEY and isinstance(value, str):
            # Several tracestate headers are one list (RFC 9110 field combination).
            tracestate = f"{tracestate},{value.strip()}" if tracestate else value.strip()
    if not traceparent or not _valid_traceparent(traceparent):
        return None
    context = TraceContext(traceparent=traceparent)
    if len(tracestate) <= MAX_TRACESTATE_CHARS and _TRACESTATE.fullmatch(tracestate):
        context.tracestate = tracestate
    return context


def _valid_traceparent(value: str) -> bool:
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace_id, parent_id, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return False  # ff is no version; version 00 has exactly four fields
    return trace_id != "0" * 32 and parent_id != "0" * 16
