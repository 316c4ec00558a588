"""OpenTelemetry, when the `otel` extra is installed: a trace goes from create to agent.

The operator client sends the current trace context with each create (the `traceparent`
metadata, through the globally configured propagator); the gateway keeps it on the task
(Task.trace_context); the agent runs each handler in a span that is its child, current
while the handler runs, so the handler's own spans join the same trace. Without the
extra, or with no tracer provider configured, this costs nothing and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from task_manager.v1 import task_manager_pb2 as pb

try:
    from opentelemetry import propagate, trace
except ImportError:  # the otel extra is not installed
    propagate = trace = None  # type: ignore[assignment]

TRACER_NAME = "agent_kit"


def outgoing() -> tuple[tuple[str, str], ...]:
    """The current trace context as call metadata (none without the extra)."""
    if propagate is None:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


@contextmanager
def execution(task: pb.Task, agent: str) -> Iterator[None]:
    """Runs the block (a handler) in a span continuing the task's trace, or starting
    one if it carries none. An exception leaving the block marks the span failed."""
    if trace is None or propagate is None:
        yield
        return
    carrier = {}
    if task.HasField("trace_context"):
        carrier["traceparent"] = task.trace_context.traceparent
        if task.trace_context.tracestate:
            carrier["tracestate"] = task.trace_context.tracestate
    kind = task.task_type.name or task.specification.TypeName() or "task"
    with trace.get_tracer(TRACER_NAME).start_as_current_span(
        f"execute {kind}",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "task_manager.task_id": task.version.task_id,
            "task_manager.attempt": task.attempt,
            "task_manager.agent": agent,
        },
    ):
        yield
