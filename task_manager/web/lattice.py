"""The Lattice Tasks API over HTTP, as the current Lattice SDK (anduril-lattice-sdk 5.x)
calls it: REST for tasks, Server-Sent Events for the streams, a long poll, an OAuth token.

Each route turns its JSON into the request message of a gRPC method, calls that method
of the same TaskManagerService (admitted by the same Gate, for the same role), and turns
its answer back into the JSON the SDK parses (protojson.py). So no rule is written twice:
what gRPC refuses, HTTP refuses, with the same message (answers.py maps the status).

Where the SDK's shapes differ from the gRPC messages, the route maps them (the README's
"The Lattice REST API" lists it all):
- create, get, status and cancel answer the Task itself, not a response holding it;
- a task's deliveryConstraints.deliverAfter and executionConstraints.startAfter hold it
  in the manager until then (scheduledTime; the later one wins). retryStrategy,
  deliverBefore, requireAcknowledgement, completeBefore and initialEntities are
  accepted and not acted on: retries and timeouts are the task's policy (`policy`,
  accepted too, as are this gateway's other CreateTask fields);
- stream events carry their type inside the JSON (`"event": "task_event"`), which is how
  the SDK tells them apart; the SSE `id:` of a live event or a heartbeat is its
  revision (see resume_id).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp

from task_manager import statuses, validation
from task_manager.auth import TOKEN_PREFIX, Caller
from task_manager.clock import timestamp
from task_manager.errors import InvalidArgument, Unauthenticated
from task_manager.service import Gate, TaskManagerService
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.web.answers import json_response
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
    with_heartbeats,
)
from task_manager.web.protojson import from_json, to_json

API = "/api/v1/"
LONG_POLL_S = 50.0
"""How long agent/listen waits for a request before it answers `{}` (poll again): under
the SDK's default read timeout of 60 s."""
MAX_HEARTBEAT_MS = 30_000
"""A stream sends something at least this often, whatever the client asked: the SDK's
read timeout (60 s) counts between bytes."""
MIN_HEARTBEAT_MS = validation.MIN_HEARTBEAT_MS
"""And at most this often (100 ms), whatever the client asked: a heartbeat only shows
the stream is alive, and one every millisecond would have the gateway spend its loop
writing them for a single client. It is WatchTasks's own floor, so tasks/stream and
agent/stream take the same intervals; a shorter one is raised to it, as a longer one
than MAX_HEARTBEAT_MS is lowered (the SDK sends what its caller gave, unchecked)."""
TOKEN_LIFETIME_S = 3600
"""What the token endpoint says a token lasts (the SDK asks again before then). The
token is the credential's own, valid until revoked: this is only the SDK's cue."""

TASK_ID = "{taskId:[^/]+(?:/[^/]+)?}"
"""A task id in a path: a scoped one is "<scope>/<id>" (scopes.py), and the SDK sends it
as it is, its slash unencoded."""


class LatticeRoutes:
    """The routes under /api/v1/ of the Lattice SDK."""

    def __init__(self, service: TaskManagerService, gate: Gate) -> None:
        self._service = service
        self._gate = gate

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_post(f"{API}oauth/token", self.token)
        router.add_post(f"{API}tasks", self.create_task)
        router.add_post(f"{API}tasks/query", self.query_tasks)
        router.add_post(f"{API}tasks/stream", self.stream_tasks)
        router.add_get(API + f"tasks/{TASK_ID}", self.get_task)
        router.add_put(API + f"tasks/{TASK_ID}/status", self.update_status)
        router.add_put(API + f"tasks/{TASK_ID}/cancel", self.cancel_task)
        router.add_post(f"{API}agent/listen", self.listen_as_agent)
        router.add_post(f"{API}agent/stream", self.stream_as_agent)

    # -- unary ------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        """OAuth 2 client credentials: a credential's id and secret (the two halves of
        the token `task-manager tokens add` printed, tmk_<id>_<secret>) for its token."""
        form = await request.post()
        grant_type, client_id, secret = (
            str(form.get(key, "")) for key in ("grant_type", "client_id", "client_secret")
        )
        if grant_type != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", "grant_type must be client_credentials"
            )
        token = f"{TOKEN_PREFIX}_{client_id}_{secret}"
        try:
            if self._gate.credentials.required:
                self._gate.credentials.by_token(token)
        except Unauthenticated:
            return _oauth_error(
                401, "invalid_client", "unknown client_id, or a wrong client_secret"
            )
        answer = json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_S}
        )
        answer.headers["Cache-Control"] = "no-store"  # RFC 6749, section 5.1
        return answer

    async def create_task(self, request: web.Request) -> web.Response:
        async def call(caller: Caller) -> dict[str, Any]:
            body = await json_body(request)
            create = from_json(body, pb.CreateTaskRequest, "body")
            _release_time(body, create)
            answer = await self._service.CreateTask(create, RequestContext(request), caller)
            return to_json(decoded(answer, pb.CreateTaskResponse).task)

        return await answer_call(self._gate, request, "CreateTask", call)

    async def get_task(self, request: web.Request) -> web.Response:
        async def call(caller: Caller) -> dict[str, Any]:
            get = pb.GetTaskRequest(task_id=request.match_info["taskId"])
            return to_json((await self._service.GetTask(get, RequestContext(request), caller)).task)

        return await answer_call(self._gate, request, "GetTask", call)

    async def update_status(self, request: web.Request) -> web.Response:
        async def call(caller: Caller) -> dict[str, Any]:
            body = await json_body(request)
            update = pb.StatusUpdate(
                version=pb.TaskVersion(
                    task_id=request.match_info["taskId"],
                    status_version=_integer(body, "statusVersion"),
                ),
                status=from_json(body.get("newStatus"), pb.TaskStatus, "newStatus"),
                author=from_json(body.get("author"), pb.Principal, "author"),
            )
            if not body.get("author"):
                update.ClearField("author")
            answer = await self._service.UpdateStatus(
                pb.UpdateStatusRequest(status_update=update), RequestContext(request), caller
            )
            return to_json(decoded(answer, pb.UpdateStatusResponse).task)

        return await answer_call(self._gate, request, "UpdateStatus", call)

    async def cancel_task(self, request: web.Request) -> web.Response:
        async def call(caller: Caller) -> dict[str, Any]:
            body = await json_body(request)
            cancel = pb.CancelTaskRequest(task_id=request.match_info["taskId"])
            if body.get("author"):
                cancel.author.CopyFrom(from_json(body["author"], pb.Principal, "author"))
            answer = await self._service.CancelTask(cancel, RequestContext(request), caller)
            return to_json(decoded(answer, pb.CancelTaskResponse).task)

        return await answer_call(self._gate, request, "CancelTask", call)

    async def query_tasks(self, request: web.Request) -> web.Response:
        async def call(caller: Caller) -> dict[str, Any]:
            body = await json_body(request)
            query = pb.QueryTasksRequest(
                page_token=_string(body, "pageToken"), parent_task_id=_string(body, "parentTaskId")
            )
            status_filter = _object(body, "statusFilter")
            wanted = status_filter.get("status")
            for name in wanted if isinstance(wanted, list) else [wanted] if wanted else []:
                query.status_filter.status.append(_status(name, "statusFilter.status"))
            if status_filter.get("filterType"):
                query.status_filter.filter_type = _enum(
                    pb.QueryTasksRequest.FilterType, status_filter["filterType"], "filterType"
                )
            window = _object(body, "updateTimeRange")
            for key, target in (
                ("startTime", query.update_time_range.update_start_time),
                ("endTime", query.update_time_range.update_end_time),
            ):
                if window.get(key):
                    target.CopyFrom(_time(window[key], f"updateTimeRange.{key}"))
            answer = await self._service.QueryTasks(query, RequestContext(request), caller)
            return {
                "tasks": [to_json(task) for task in answer.tasks],
                "nextPageToken": answer.page_token,
            }

        return await answer_call(self._gate, request, "QueryTasks", call)

    async def listen_as_agent(self, request: web.Request) -> web.Response:
        """A long poll: the agent's next request (ExecuteRequest, CancelRequest,
        CompleteRequest), or `{}` after LONG_POLL_S. A request is offered again on
        every poll until the agent acts on it (a task stays at SENT until its agent
        reports receipt), as a reconnecting gRPC stream offers it: at least once."""

        async def call(caller: Caller) -> dict[str, Any]:
            listen = _listen_request(await json_body(request))
            requests = self._service.ListenAsAgent(listen, RequestContext(request), caller)
            with self._gate.stream_of(caller):
                try:
                    first = await asyncio.wait_for(anext(requests), LONG_POLL_S)
                except (TimeoutError, StopAsyncIteration):
                    return {}
                finally:
                    await requests.aclose()
            return to_json(decoded(first, pb.ListenAsAgentResponse))

        return await answer_call(self._gate, request, "ListenAsAgent", call)

    # -- streams ----------------------------------------------------------------------

    async def stream_tasks(self, request: web.Request) -> web.StreamResponse:
        """Task events as SSE: the unfinished tasks first (EVENT_TYPE_PREEXISTING) unless
        excludePreexistingTasks, then every change, with heartbeats."""

        async def start(caller: Caller, events: EventStream) -> Events:
            watch, matches = _watch_request(await json_body(request))
            rate_limited = watch.rate_limit.update_per_task_limit_ms > 0
            responses = self._service.WatchTasks(watch, events, caller)
            return _task_events(responses, matches, rate_limited)

        return await answer_events(self._gate, request, "WatchTasks", start)

    async def stream_as_agent(self, request: web.Request) -> web.StreamResponse:
        """The agent's requests as SSE, with a heartbeat when none came for the interval."""

        async def start(caller: Caller, events: EventStream) -> Events:
            body = await json_body(request)
            listen = _listen_request(body)
            requests = self._service.ListenAsAgent(listen, events, caller)
            return self._agent_events(requests, _heartbeat_ms(body) / 1000)

        return await answer_events(self._gate, request, "ListenAsAgent", start)

    async def _agent_events(
        self, requests: AsyncGenerator[pb.ListenAsAgentResponse | bytes, None], interval_s: float
    ) -> Events:
        beating = with_heartbeats(requests, interval_s)
        async with contextlib.aclosing(requests), contextlib.aclosing(beating):
            async for answer in beating:
                if answer is None:  # stamped by the service's clock, as its own heartbeats
                    now = timestamp(self._service.clock.now_ns())
                    yield Event("heartbeat", _heartbeat(now))
                    continue
                agent_request = to_json(decoded(answer, pb.ListenAsAgentResponse))
                yield Event("agent_request", {"event": "agent_request", **agent_request})


# -- JSON to requests -----------------------------------------------------------------------


def _object(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(key, "must be a JSON object")
    return value


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(key, "must be a string")
    return value


def _integer(body: dict[str, Any], key: str) -> int:
    """An integer field, given as a number or (as JSON renders 64-bit ones) a string."""
    value = body.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(key, "must be an integer")
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(key, f"must be an integer, not {value!r}") from None
    if not 0 <= number < 2**32:
        raise InvalidArgument(key, f"must be between 0 and {2**32 - 1}")
    return number


def _boolean(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(key, f"must be true or false, not {value!r}")
    return bool(value)


def _enum(enum: Any, name: object, field: str) -> Any:
    names = enum.keys()
    if not isinstance(name, str) or name not in names:
        raise InvalidArgument(field, f"must be one of {', '.join(names)}, not {name!r}")
    return enum.Value(name)


def _status(name: object, field: str) -> pb.Status.ValueType:
    return _enum(pb.Status, name, field)  # type: ignore[no-any-return]


def _time(value: object, field: str) -> Timestamp:
    stamp = Timestamp()
    try:
        stamp.FromJsonString(str(value))
    except ValueError:
        raise InvalidArgument(field, f"must be an RFC 3339 time, not {value!r}") from None
    return stamp


def _release_time(body: dict[str, Any], create: pb.CreateTaskRequest) -> None:
    """deliverAfter and startAfter, the SDK's ways of saying "not before": the task is
    held until the later of them (unless scheduledTime says when)."""
    if create.HasField("scheduled_time"):
        return
    times = [
        _time(value, f"{outer}.{key}")
        for outer, key in (
            ("deliveryConstraints", "deliverAfter"),
            ("executionConstraints", "startAfter"),
        )
        if (value := _object(body, outer).get(key))
    ]
    if times:
        create.scheduled_time.CopyFrom(max(times, key=lambda t: (t.seconds, t.nanos)))


def _listen_request(body: dict[str, Any]) -> pb.ListenAsAgentRequest:
    listen = from_json(
        {key: value for key, value in body.items() if key != "agentSelector"},
        pb.ListenAsAgentRequest,
        "body",
    )
    selector = _object(body, "agentSelector")
    entity_ids = selector.get("entityIds")
    if entity_ids is not None:
        if not isinstance(entity_ids, list) or not all(isinstance(e, str) for e in entity_ids):
            raise InvalidArgument("agentSelector.entityIds", "must be a list of strings")
        listen.entity_ids.entity_ids.extend(entity_ids)
    return listen


def _heartbeat_ms(body: dict[str, Any]) -> int:
    asked = _integer(body, "heartbeatIntervalMs")
    return min(max(asked, MIN_HEARTBEAT_MS), MAX_HEARTBEAT_MS) if asked else MAX_HEARTBEAT_MS


def _watch_request(
    body: dict[str, Any],
) -> tuple[pb.WatchTasksRequest, Callable[[pb.TaskEvent], bool]]:
    """The WatchTasks request a tasks/stream body asks for, and the test of the filters
    WatchTasks has no field for (the specification's type, updateStartTime)."""
    watch = pb.WatchTasksRequest(
        include_preexisting=not _boolean(body, "excludePreexistingTasks"),
        heartbeat_interval_ms=_heartbeat_ms(body),
    )
    watch.rate_limit.update_per_task_limit_ms = _integer(body, "rateLimit")
    watch.filter.parent_task_id = _string(body, "parentTaskId")
    if body.get("assignee"):
        assignee = from_json(body["assignee"], pb.Principal, "assignee")
        kind = assignee.WhichOneof("agent")
        entity_id = assignee.system.entity_id if kind == "system" else assignee.team.entity_id
        if not entity_id:
            raise InvalidArgument("assignee", "must name a system or team entityId")
        watch.filter.assignee_entity_ids.append(entity_id)
    status_filter = _object(body, "statusFilter")
    named = {_status(name, "statusFilter.statuses") for name in status_filter.get("statuses") or []}
    if named:
        filter_type = status_filter.get("filterType") or "FILTER_TYPE_INCLUSIVE"
        if filter_type not in ("FILTER_TYPE_INCLUSIVE", "FILTER_TYPE_EXCLUSIVE"):
            raise InvalidArgument(
                "statusFilter.filterType",
                f"must be FILTER_TYPE_INCLUSIVE or FILTER_TYPE_EXCLUSIVE, not {filter_type!r}",
            )
        exclusive = filter_type == "FILTER_TYPE_EXCLUSIVE"
        if exclusive and named >= statuses.ALL:
            raise InvalidArgument("statusFilter", "excludes every status: no task could match")
        watch.filter.statuses.extend(sorted(statuses.ALL - named if exclusive else named))
    task_type = _object(body, "taskType")
    urls = task_type.get("taskTypeUrls") or []
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise InvalidArgument("taskType.taskTypeUrls", "must be a list of strings")
    prefix = _string(task_type, "taskTypePrefix")
    since = (
        _time(body["updateStartTime"], "updateStartTime") if body.get("updateStartTime") else None
    )

    def matches(event: pb.TaskEvent) -> bool:
        type_url = event.task.specification.type_url
        if urls and type_url not in urls:
            return False
        if prefix and not type_url.startswith(prefix):
            return False
        if since is not None and event.event_type == pb.EVENT_TYPE_PREEXISTING:
            updated = event.task.last_update_time
            return (updated.seconds, updated.nanos) >= (since.seconds, since.nanos)
        return True

    return watch, matches


# -- answers --------------------------------------------------------------------------


async def _task_events(
    responses: AsyncGenerator[pb.WatchTasksResponse | bytes, None],
    matches: Callable[[pb.TaskEvent], bool],
    rate_limited: bool,
) -> Events:
    """A watch's responses as the SDK's events: heartbeats, and the task events that
    pass the filters WatchTasks has no field for."""
    async with contextlib.aclosing(responses):
        async for answer in responses:
            response = decoded(answer, pb.WatchTasksResponse)
            if response.HasField("heartbeat"):
                stamp = response.heartbeat.timestamp
                yield Event("heartbeat", _heartbeat(stamp), resume_id(response, rate_limited))
            elif matches(response.event):
                event = to_json(response.event)
                event.pop("taskView", None)  # ours; the SDK has no such field
                body = {"event": "task_event", "taskEvent": event}
                yield Event("task_event", body, resume_id(response, rate_limited))


def _heartbeat(stamp: Timestamp) -> dict[str, Any]:
    return {"event": "heartbeat", "timestamp": stamp.ToJsonString()}


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return json_response({"error": error, "error_description": description}, status)
