"""What every HTTP route that calls a service method shares: admission, the JSON body,
the answer, and the Server-Sent Events answer of a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf.message import Message

from task_manager.auth import Caller
from task_manager.errors import InvalidArgument, PermissionDenied, Unauthenticated
from task_manager.service import Gate
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.web.answers import error_body, error_response, http_error_response, json_response

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
T = TypeVar("T")


async def answer_call(
    gate: Gate,
    request: web.Request,
    method: str,
    call: Callable[[Caller], Awaitable[dict[str, Any]]],
) -> web.Response:
    """Admits the request as a call of method (by its Authorization header), runs call
    for the caller and answers its JSON, or the error (answers.py) it failed with."""
    try:
        caller = admit(gate, request, method)
        return json_response(await call(caller))
    except Exception as failed:  # a bug, among them, is logged with an id by status_for
        return refusal(request, failed)


def refusal(request: web.Request, error: Exception) -> web.Response:
    """The answer to a request that failed with error; a denial is logged, as over gRPC."""
    if isinstance(error, web.HTTPException):  # aiohttp's own: a body over the size limit
        return http_error_response(error)
    if isinstance(error, Unauthenticated | PermissionDenied):
        log.warning("denied %s %s to %s: %s", request.method, request.path, request.remote, error)
    return error_response(error)


def admit(gate: Gate, request: web.Request, method: str) -> Caller:
    """The caller of a request, by its credentials (authorization), admitted to method."""
    return gate.admit_http(method, authorization(request))


def authorization(request: web.Request) -> str | None:
    """A request's Authorization header; a GET (a browser's EventSource or link, which
    cannot send headers) may give the token as ?access_token= instead (RFC 6750,
    section 2.3)."""
    given = request.headers.get("Authorization")
    if given is None and request.method == "GET" and "access_token" in request.query:
        given = f"Bearer {request.query['access_token']}"
    return given


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body), sent as application/json.

    Only as that: a web page of another site can make a browser send a form or a text
    body anywhere unasked, but not a JSON one (that needs a CORS preflight, which this
    server does not grant). So a page cannot create or cancel tasks on a gateway that
    runs without authentication on its user's machine."""
    if request.content_type != "application/json":
        raise InvalidArgument(
            "Content-Type", f"must be application/json, not {request.content_type!r}"
        )
    try:
        text = (await request.read()).decode("utf-8")
        body = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError) as bad:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument("body", f"is not JSON in UTF-8: {bad}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", f"must be a JSON object, not {type(body).__name__}")
    return body


def decoded(answer: M | bytes, message_type: type[M]) -> M:
    """A method's answer as a message (methods answer a changed task already encoded)."""
    return message_type.FromString(answer) if isinstance(answer, bytes) else answer


class RequestContext:
    """The call context of a route that answers once: the request's headers as the
    call's metadata, and nothing to send before the answer."""

    def __init__(self, request: web.Request) -> None:
        self._request = request

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return _metadata(self._request)

    async def send_initial_metadata(
        self, initial_metadata: Sequence[tuple[str, str | bytes]]
    ) -> None:
        return None


def _metadata(request: web.Request) -> list[tuple[str, str | bytes]]:
    """Headers as gRPC metadata: lower-case keys, in order."""
    return [(key.lower(), value) for key, value in request.headers.items()]


class EventStream:
    """One Server-Sent Events answer, and the call context of the method behind it:
    opened when the method says the call is under way (send_initial_metadata, as a gRPC
    call sends its headers), so a request refused before that still gets a plain JSON
    error with its HTTP status."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold events back
            }
        )

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return _metadata(self._request)

    async def send_initial_metadata(
        self, initial_metadata: Sequence[tuple[str, str | bytes]]
    ) -> None:
        if not self._response.prepared:
            await self._response.prepare(self._request)

    async def send(self, event: str, data: dict[str, Any], event_id: str = "") -> None:
        """One event: its type, its JSON data, and the id a client resumes after."""
        await self.send_initial_metadata(())
        head = f"id: {event_id}\n" if event_id else ""
        line = json.dumps(data, separators=(",", ":"))
        await self._response.write(f"{head}event: {event}\ndata: {line}\n\n".encode())

    async def comment(self, text: str) -> None:
        """A line clients ignore: it only shows the connection is alive (and finds out
        whether it still is)."""
        await self.send_initial_metadata(())
        await self._response.write(f": {text}\n\n".encode())

    async def failed(self, error: Exception) -> web.StreamResponse:
        """Ends the answer with error: its HTTP status if nothing was sent yet, else a
        last `error` event ({"httpStatus", "code", "status", "message"}) and the end."""
        if isinstance(error, ConnectionResetError):  # the client went away
            return self._response
        if not self._response.prepared:
            return refusal(self._request, error)
        http_status, body = error_body(error)
        with contextlib.suppress(ConnectionResetError):
            await self.send("error", {"event": "error", "httpStatus": http_status, **body})
        return await self.close()

    async def close(self) -> web.StreamResponse:
        with contextlib.suppress(ConnectionResetError):
            await self.send_initial_metadata(())
            await self._response.write_eof()
        return self._response


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: its type, its JSON data, and the id a client resumes after."""

    kind: str
    data: dict[str, Any]
    event_id: str = ""


Events = AsyncGenerator[Event | None, None]
"""A stream's events as a route makes them from its method's answers; None: nothing to
say for a while (a comment then shows the connection is alive, or finds it gone)."""


async def answer_events(
    gate: Gate,
    request: web.Request,
    method: str,
    start: Callable[[Caller, EventStream], Awaitable[Events]],
) -> web.StreamResponse:
    """Admits the request as a call of method (as answer_call does), lets start read the
    request and call the method for the caller, and answers the events it makes as
    Server-Sent Events. The stream counts among the caller's open ones (and ends if its
    credential is revoked); a failure before the stream opens answers a JSON error with
    its HTTP status, one after it a last `error` event (EventStream.failed)."""
    events = EventStream(request)
    try:
        caller = admit(gate, request, method)
        stream = await start(caller, events)
        with gate.stream_of(caller):
            async with contextlib.aclosing(stream):
                async for event in stream:
                    if event is None:
                        await events.comment("keepalive")
                    else:
                        await events.send(event.kind, event.data, event.event_id)
    except Exception as failed:
        return await events.failed(failed)
    return await events.close()


async def with_heartbeats(
    items: AsyncIterator[T], interval_s: float
) -> AsyncGenerator[T | None, None]:
    """items, with a None after every interval_s in which none came."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending


LAST_EVENT_ID = "Last-Event-ID"


def resume_id(response: pb.WatchTasksResponse, rate_limited: bool) -> str:
    """The SSE id of a watch's response: its revision, after which a watch resumes
    (start_revision = id + 1) with no gap and no repeat. A snapshot's tasks have none:
    each carries the snapshot's revision, and resuming after one would skip the rest;
    the heartbeat that ends the snapshot carries it. Nor do a rate-limited watch's
    events: one held back for its window has an older revision than those sent after
    it, so only its heartbeats (bookmarks that allow for what is held) are safe."""
    if response.HasField("event") and (
        rate_limited or response.event.event_type == pb.EVENT_TYPE_PREEXISTING
    ):
        return ""
    return str(response.revision)


def resumed_after(request: web.Request) -> int | None:
    """The revision a reconnecting EventSource last saw (its Last-Event-ID), if any."""
    last = request.headers.get(LAST_EVENT_ID, "").strip()
    if not last:
        return None
    if not (last.isascii() and last.isdigit()) or int(last) >= 2**63:
        raise InvalidArgument(LAST_EVENT_ID, f"must be a revision (an event's id), not {last!r}")
    return int(last)
