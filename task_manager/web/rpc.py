"""This gateway's own API over HTTP: every method of task_manager.v1.TaskManager, as JSON.

    POST /rpc/task_manager.v1.TaskManager/<Method>    body: the request message's JSON

The path is the gRPC method's own, under /rpc; the body and the answer are the request
and response messages in the protobuf JSON mapping (protojson.py), a key that is no
field of the request refused (INVALID_ARGUMENT naming it: a misspelt field would else
be dropped unnoticed; the Lattice routes ignore one, for an SDK newer than this gateway).
A unary method
answers its response; a server-streaming one (WatchTasks, ListenAsAgent,
DownloadPayload) answers Server-Sent Events, one response each: `event:` the name of the
response's set oneof field (or "message"), `data:` its JSON. A browser's EventSource
cannot POST, so a stream that only reads may also be a GET, with the request's JSON in
the `request` query parameter. (A payload's raw bytes, for a link or curl: downloads.py.)

WatchTasks's events carry `id:` (calls.resume_id): the revision after which it resumes.
An EventSource that reconnects sends it back as Last-Event-ID, and the watch starts
after it (start_revision), exactly as a gRPC watcher resumes: nothing missed, nothing
twice, across a restart of the gateway too. A revision compacted away meanwhile ends
the stream with an `error` event (OUT_OF_RANGE, compactRevision): re-list, then watch.

The client-streaming methods (ReportStatus, UploadPayload) are gRPC's only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from task_manager.auth import Caller
from task_manager.errors import InvalidArgument
from task_manager.service import SERVICE_DESCRIPTORS, Gate, TaskManagerService
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.web.calls import (
    Event,
    Events,
    EventStream,
    RequestContext,
    answer_call,
    answer_events,
    decoded,
    json_body,
    resume_id,
    resumed_after,
    with_heartbeats,
)
from task_manager.web.protojson import from_json, to_json

SERVICE = SERVICE_DESCRIPTORS[0]
"""task_manager.v1.TaskManager: this gateway's full API (the Lattice one is a subset)."""
PREFIX = f"/rpc/{SERVICE.full_name}/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
KEEPALIVE_S = 15.0
"""A stream with nothing to say sends an SSE comment this often."""
READ_ONLY_STREAMS = frozenset({"WatchTasks", "DownloadPayload"})
"""The streams a GET may open (an EventSource): those that only read. Any page a browser
shows can make it GET a URL, so a GET must not do anything; an agent's stream does (a
pool hands it tasks), so it is POST only, with a JSON body (calls.json_body)."""


class RpcRoutes:
    def __init__(self, service: TaskManagerService, gate: Gate) -> None:
        self._service = service
        self._gate = gate

    def add_to(self, router: web.UrlDispatcher) -> None:
        for method in SERVICE.methods:
            if method.client_streaming:
                continue
            if method.server_streaming:
                handler = self._stream(method)
                router.add_post(PREFIX + method.name, handler)
                if method.name in READ_ONLY_STREAMS:
                    router.add_get(PREFIX + method.name, handler)
            else:
                router.add_post(PREFIX + method.name, self._unary(method))

    def _unary(self, method: MethodDescriptor) -> Handler:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(self._service, method.name)

        async def handle(request: web.Request) -> web.Response:
            async def call(caller: Caller) -> dict[str, Any]:
                message = from_json(await json_body(request), request_type, "body", strict=True)
                answer = await behaviour(message, RequestContext(request), caller)
                return to_json(decoded(answer, response_type))

            return await answer_call(self._gate, request, method.name, call)

        return handle

    def _stream(self, method: MethodDescriptor) -> Handler:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(self._service, method.name)
        (oneof,) = method.output_type.oneofs or (None,)

        async def handle(request: web.Request) -> web.StreamResponse:
            async def start(caller: Caller, events: EventStream) -> Events:
                body = await _stream_body(request)
                message = from_json(body, request_type, "request", strict=True)
                watched, rate_limited = isinstance(message, pb.WatchTasksRequest), False
                if isinstance(message, pb.WatchTasksRequest):
                    _resume(request, message)
                    rate_limited = message.rate_limit.update_per_task_limit_ms > 0
                responses = behaviour(message, events, caller)
                named = oneof.name if oneof else ""
                return _events(responses, response_type, named, watched, rate_limited)

            return await answer_events(self._gate, request, method.name, start)

        return handle


async def _events(
    responses: AsyncGenerator[Any, None],
    response_type: type[Message],
    oneof: str,
    watched: bool,
    rate_limited: bool,
) -> Events:
    """A stream's responses as events: each named for its set oneof field (or
    "message"); a watch's with the id it resumes after."""
    # WatchTasks sends heartbeats of its own; the others are kept alive here, so that a
    # client gone without a word is noticed by a failed write.
    kept = _never_idle(responses) if watched else with_heartbeats(responses, KEEPALIVE_S)
    async with contextlib.aclosing(responses), contextlib.aclosing(kept):
        async for answer in kept:
            if answer is None:
                yield None
                continue
            response = decoded(answer, response_type)
            kind = response.WhichOneof(oneof) if oneof else None
            event_id = resume_id(response, rate_limited) if watched else ""
            yield Event(kind or "message", to_json(response), event_id)


async def _never_idle(responses: AsyncIterator[T]) -> AsyncGenerator[T | None, None]:
    """A stream with heartbeats of its own, as with_heartbeats would give it."""
    async for response in responses:
        yield response


async def _stream_body(request: web.Request) -> dict[str, Any]:
    if request.method == "POST":
        return await json_body(request)
    text = request.query.get("request", "")
    try:
        parsed = json.loads(text) if text.strip() else {}
    except ValueError as bad:
        raise InvalidArgument("request", f"(the query parameter) is not JSON: {bad}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("request", "(the query parameter) must be a JSON object")
    return parsed


def _resume(request: web.Request, watch: pb.WatchTasksRequest) -> None:
    """A reconnecting EventSource's watch: from after the revision it last saw."""
    after = resumed_after(request)
    if after is not None:
        watch.start_revision = after + 1
        watch.include_preexisting = False  # its snapshot was sent the first time
