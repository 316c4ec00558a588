"""A trace goes with its task: from the operator's create, through the gateway, to the
agent's handler (agent_kit with the otel extra), over gRPC and HTTP alike.

The spans are read from OpenTelemetry's own SDK (an in-memory exporter) set as the
process's tracer provider: what agent_kit makes is what any exporter would be given.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span

from agent_kit import Agent, OperatorClient, TaskContext
from task_manager import tracing
from task_manager.server import TaskManagerServer
from tests.helpers import AsyncStub, create_request, http_session, running

pytestmark = pytest.mark.anyio
WAIT_S = 30.0
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CREATE_OVER_HTTP = "rpc/task_manager.v1.TaskManager/CreateTask"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    # A process sets its global provider once: the first module to need one sets it.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()  # later modules' spans go nowhere


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The spans finished during the test."""
    exporter.clear()
    return exporter


async def finished(spans: InMemorySpanExporter, name: str, task_id: str) -> ReadableSpan:
    """The one finished span called name for task_id. Polled: it ends on the agent's
    own task, after the handler returns, and nothing there can be waited on."""
    with anyio.fail_after(WAIT_S):
        while True:
            found = [
                span
                for span in spans.get_finished_spans()
                if span.name == name
                and span.attributes is not None
                and span.attributes.get("task_manager.task_id") == task_id
            ]
            if found:
                assert len(found) == 1, found
                return found[0]
            await anyio.sleep(0.01)


def ids(span: Span | ReadableSpan) -> tuple[str, str]:
    """A span's trace id and span id, in hex as a traceparent writes them."""
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def parent_of(span: ReadableSpan) -> tuple[str, str]:
    assert span.parent is not None, f"{span.name} has no parent"
    return f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}"


class Handler:
    """A handler that makes a span of its own, and says when it has run."""

    def __init__(self) -> None:
        self.ran = anyio.Event()

    async def __call__(self, task: TaskContext) -> None:
        with trace.get_tracer("tests").start_as_current_span("handler's own work"):
            pass
        self.ran.set()


async def test_a_create_under_a_span_is_continued_by_the_agents_handler(
    server: TaskManagerServer, spans: InMemorySpanExporter
) -> None:
    handler = Handler()
    async with (
        running(Agent(server.address, "drone-1", handler)),
        OperatorClient(server.address) as client,
    ):
        with trace.get_tracer("tests").start_as_current_span("operator") as operator:
            task = await client.create_task(assignee_entity_id="drone-1")
        with anyio.fail_after(WAIT_S):
            await handler.ran.wait()
        task_id = task.version.task_id
        execute = await finished(spans, "execute task", task_id)
    own = [span for span in spans.get_finished_spans() if span.name == "handler's own work"]

    trace_id, operator_id = ids(operator)
    # The gateway kept the operator's context on the task ...
    assert task.trace_context.traceparent.startswith(f"00-{trace_id}-{operator_id}-")
    # ... the agent's span continues it, and the handler's own spans are inside that.
    assert parent_of(execute) == (trace_id, operator_id)
    assert execute.kind == trace.SpanKind.CONSUMER
    assert execute.attributes is not None
    assert execute.attributes["task_manager.attempt"] == 1
    assert execute.attributes["task_manager.agent"] == "drone-1"
    assert [parent_of(span) for span in own] == [ids(execute)]


async def test_over_http_the_traceparent_header_travels_to_the_agent(
    server: TaskManagerServer, spans: InMemorySpanExporter
) -> None:
    handler = Handler()
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}
    body = {"relations": {"assignee": {"system": {"entityId": "drone-1"}}}}
    async with running(Agent(server.address, "drone-1", handler)):
        async with (
            http_session(server) as session,
            session.post(CREATE_OVER_HTTP, json=body, headers=headers) as response,
        ):
            assert response.status == 200, await response.text()
            task = (await response.json())["task"]
        assert task["traceContext"] == {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}
        with anyio.fail_after(WAIT_S):
            await handler.ran.wait()
        execute = await finished(spans, "execute task", task["version"]["taskId"])
    assert parent_of(execute) == (TRACE_ID, PARENT_ID)
    assert execute.context is not None
    assert execute.context.trace_state.get("vendor") == "opaque"


async def test_a_sessions_tasks_carry_the_trace_it_was_submitted_in(
    server: TaskManagerServer, spans: InMemorySpanExporter
) -> None:
    async with OperatorClient(server.address) as client:
        with trace.get_tracer("tests").start_as_current_span("submit") as submit:
            tasks = [client.task_request(assignee_entity_id="drone-1") for _ in range(3)]
            session = await client.submit_session(tasks)
        stored = [await client.get_task(task_id) for task_id in session.task_ids]
    trace_id, submit_id = ids(submit)
    assert [task.trace_context.traceparent[:-2] for task in stored] == [
        f"00-{trace_id}-{submit_id}-"
    ] * 3


async def test_a_malformed_traceparent_is_ignored_and_a_retry_keeps_the_first(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    junk = await stub.CreateTask(create_request(), metadata=(("traceparent", "not-a-trace"),))
    assert junk.task.version.task_id
    assert not junk.task.HasField("trace_context")

    first = await stub.CreateTask(
        create_request(task_id="traced-1"), metadata=(("traceparent", TRACEPARENT),)
    )
    other = f"00-{TRACE_ID}-{'1' * 16}-01"
    retry = await stub.CreateTask(
        create_request(task_id="traced-1"), metadata=(("traceparent", other),)
    )
    # The trace is the call's, not the task's content: a retry under another span is
    # still the same request, and the task keeps the trace it was created in.
    assert retry.already_existed
    assert (
        retry.task.trace_context.traceparent
        == TRACEPARENT
        == (first.task.trace_context.traceparent)
    )


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([("traceparent", TRACEPARENT)], (TRACEPARENT, "")),
        (
            [("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")],
            (TRACEPARENT, "a=1,b=2"),
        ),
        # A later version may add fields; version 00 may not.
        (
            [("traceparent", f"01-{TRACE_ID}-{PARENT_ID}-01-x")],
            (f"01-{TRACE_ID}-{PARENT_ID}-01-x", ""),
        ),
        ([("traceparent", TRACEPARENT + "-x")], None),
        ([("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01")], None),
        ([("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01")], None),
        ([("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01")], None),
        ([("traceparent", TRACEPARENT.upper())], None),
        ([("tracestate", "a=1")], None),  # a state without a parent is no context
        # Too long a state is dropped whole, the parent kept.
        ([("traceparent", TRACEPARENT), ("tracestate", "a=" + "x" * 600)], (TRACEPARENT, "")),
        ([("traceparent", TRACEPARENT.encode())], None),  # binary metadata is not one
        (None, None),
    ],
)
def test_which_trace_contexts_are_carried(
    metadata: list[tuple[str, str | bytes]] | None, expected: tuple[str, str] | None
) -> None:
    carried = tracing.carried(metadata)
    assert (None if carried is None else (carried.traceparent, carried.tracestate)) == expected
