"""The baselines: a raw grpc.aio server that does nothing but answer and push.

`Echo` decodes the same request type and returns a response of the same size as
UpdateStatus, so the ratio against it isolates what the Task Manager itself costs.
`Push` does the same and also puts one watch-event-sized message on every open `Listen`
stream: the fan-out floor of grpc.aio, with no store and no watch logic.

It also serves the three Task Manager methods the lifecycle and dispatch scenarios call,
with nothing behind them (`Floor`): `CreateTask` pushes the new task to its assignee's
`ListenAsAgent` streams and answers it, and `ReportStatus` answers each report with the
task at the next status_version. Nothing is stored or checked, so the same clients
measure the floor that grpc.aio sets for those scenarios on this machine.

And the data plane's baseline (`bench.Payloads`): `UploadPayload` takes the messages
the Task Manager's does (a header, then chunks) and only counts the bytes, keeping the
size under the header's sha256; `DownloadPayload` streams as many bytes for that sha256
in the messages the Task Manager streams, chunks of the size it reads and sends
(storage.blobs.READ_CHUNK_BYTES), cut from one block made at startup. Nothing is hashed,
written or read from anywhere.

With --http-listen, the REST baseline too (`NoopHttp`): an aiohttp server on the same
event loop, as the Task Manager runs its HTTP front, whose one route `PUT /noop/{id}`
reads the JSON body the Lattice API's `PUT /api/v1/tasks/{taskId}/status` takes and
answers a JSON body about the size of the Task it answers. It prints its address on a
second line, as `task-manager serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import StringValue

from storage.blobs import READ_CHUNK_BYTES
from task_manager.cli import tune_garbage_collector
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.wakeup import Wakeup


def typical_response() -> pb.UpdateStatusResponse:
    """About the size of the Task Manager's answer to bench.load.typical_update."""
    task = pb.Task(display_name="bench", version=pb.TaskVersion(task_id="x" * 36))
    task.version.definition_version, task.version.status_version = 1, 12
    task.status.status = pb.STATUS_EXECUTING
    task.status.progress.Pack(StringValue(value="leg 3 of 7"))
    task.last_updated_by.system.entity_id = "bench-agent"
    for stamp in (task.create_time, task.last_update_time):
        stamp.GetCurrentTime()
    return pb.UpdateStatusResponse(task=task)


def typical_task_json() -> dict[str, Any]:
    """About the size of the Task JSON the Lattice API answers to bench.load's
    typical_update_json (about 430 bytes): typical_response's task with the default
    policy the Task Manager's answer also carries, rendered by the protobuf JSON mapping
    as the Task Manager renders it."""
    task = typical_response().task
    task.policy.max_attempts = 1
    return json_format.MessageToDict(task)


class Listener:
    """One open stream: what is waiting for it, and how to wake it (as cheaply as the
    Task Manager's own watches)."""

    def __init__(self) -> None:
        self.pending: deque[bytes] = deque()
        self.wakeup = Wakeup()


class Listeners:
    """Open streams by key (what a stream's request names), and what is pushed to them."""

    def __init__(self, keys_of: Callable[[Any], Iterable[str]]) -> None:
        self.keys_of = keys_of
        self.by_key: dict[str, set[Listener]] = {}

    def push(self, key: str, message: bytes) -> None:
        for listener in self.by_key.get(key, ()):
            listener.pending.append(message)
            listener.wakeup.set()

    async def listen(self, request: Any, context: Any) -> AsyncIterator[bytes]:
        """The stream handler: headers at once (so the client knows it is subscribed),
        then every message pushed to one of its keys."""
        listener = Listener()
        keys = list(self.keys_of(request))
        for key in keys:
            self.by_key.setdefault(key, set()).add(listener)
        try:
            await context.send_initial_metadata(())
            while True:
                while listener.pending:
                    yield listener.pending.popleft()
                await listener.wakeup.wait()
        finally:
            for key in keys:
                self.by_key[key].discard(listener)


class Floor:
    """CreateTask, ListenAsAgent and ReportStatus with no store and no checks."""

    def __init__(self) -> None:
        self.agents = Listeners(lambda request: request.entity_ids.entity_ids)
        self.task_numbers = itertools.count()

    async def create_task(
        self, request: pb.CreateTaskRequest, context: Any
    ) -> pb.CreateTaskResponse:
        task = pb.Task(display_name=request.display_name, relations=request.relations)
        task.version.task_id = request.task_id or f"floor-{next(self.task_numbers):012d}"
        task.version.definition_version, task.version.status_version = 1, 2
        task.status.status = pb.STATUS_SENT
        for stamp in (task.create_time, task.last_update_time):
            stamp.GetCurrentTime()
        execute = pb.ListenAsAgentResponse(execute_request=pb.ExecuteRequest(task=task))
        assignee = request.relations.assignee.system.entity_id
        self.agents.push(assignee, execute.SerializeToString())
        return pb.CreateTaskResponse(task=task)

    async def report_status(
        self, reports: AsyncIterator[pb.StatusReport], context: Any
    ) -> AsyncIterator[pb.StatusReportResult]:
        async for report in reports:
            update = report.status_update
            task = pb.Task(display_name="bench", status=update.status)
            task.version.task_id = update.version.task_id
            task.version.definition_version = 1
            task.version.status_version = update.version.status_version + 1
            for stamp in (task.create_time, task.last_update_time):
                stamp.GetCurrentTime()
            yield pb.StatusReportResult(report_id=report.report_id, task=task)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "task_manager.v1.TaskManager",
            {
                "CreateTask": grpc.unary_unary_rpc_method_handler(
                    self.create_task,
                    request_deserializer=pb.CreateTaskRequest.FromString,
                    response_serializer=pb.CreateTaskResponse.SerializeToString,
                ),
                "ListenAsAgent": grpc.unary_stream_rpc_method_handler(
                    self.agents.listen,
                    request_deserializer=pb.ListenAsAgentRequest.FromString,
                    response_serializer=bytes,
                ),
                "ReportStatus": grpc.stream_stream_rpc_method_handler(
                    self.report_status,
                    request_deserializer=pb.StatusReport.FromString,
                    response_serializer=pb.StatusReportResult.SerializeToString,
                ),
            },
        )


class RawPayloads:
    """UploadPayload's and DownloadPayload's messages with nothing behind them."""

    def __init__(self) -> None:
        # One block, sent over and over: as many bytes as a download's chunk, no copy.
        self.block = bytes(range(256)) * (READ_CHUNK_BYTES // 256)
        self.sizes: dict[str, int] = {}
        """What each upload brought, by its header's sha256: all a download needs."""

    async def upload(
        self, parts: AsyncIterator[pb.UploadPayloadRequest], context: Any
    ) -> pb.UploadPayloadResponse:
        header, received = pb.PayloadRef(), 0
        async for part in parts:
            if part.HasField("header"):
                header = part.header
            received += len(part.chunk)
        self.sizes[header.sha256] = received
        return pb.UploadPayloadResponse(payload=pb.PayloadRef(sha256=header.sha256, size=received))

    async def download(
        self, request: pb.DownloadPayloadRequest, context: Any
    ) -> AsyncIterator[pb.DownloadPayloadResponse]:
        size = self.sizes.get(request.sha256, 0)
        for at in range(request.offset, size, len(self.block)):
            chunk = self.block if at + len(self.block) <= size else self.block[: size - at]
            yield pb.DownloadPayloadResponse(offset=at, chunk=chunk)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "bench.Payloads",
            {
                "UploadPayload": grpc.stream_unary_rpc_method_handler(
                    self.upload,
                    request_deserializer=pb.UploadPayloadRequest.FromString,
                    response_serializer=pb.UploadPayloadResponse.SerializeToString,
                ),
                "DownloadPayload": grpc.unary_stream_rpc_method_handler(
                    self.download,
                    request_deserializer=pb.DownloadPayloadRequest.FromString,
                    response_serializer=pb.DownloadPayloadResponse.SerializeToString,
                ),
            },
        )


class NoopHttp:
    """`PUT /noop/{id}`: the REST UpdateStatus's HTTP with nothing behind it. The body is
    read and parsed as the Task Manager's routes read it (text, then json.loads); the
    answer is encoded for each request, as json_response encodes the Task's."""

    def __init__(self) -> None:
        self.answer = typical_task_json()

    async def noop(self, request: web.Request) -> web.Response:
        json.loads(await request.text())
        body = json.dumps(self.answer, separators=(",", ":"))
        return web.Response(body=body, content_type="application/json")

    async def start(self, listen: str) -> int:
        """Serves on listen; the port bound."""
        app = web.Application()
        app.router.add_put("/noop/{id}", self.noop)
        # The Task Manager's runner settings (task_manager/web/server.py): the ratio
        # compares code, not settings.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        await runner.setup()
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(runner, host, int(port), reuse_port=False)
        await site.start()
        return int(runner.addresses[0][1])


async def serve(listen: str, http_listen: str | None) -> None:
    response = typical_response()
    change = pb.TaskEvent(
        event_type=pb.EVENT_TYPE_UPDATE,
        task=response.task,
        task_view=pb.TASK_VIEW_MANAGER,
        time=response.task.last_update_time,
    )
    event = pb.WatchTasksResponse(revision=12, event=change).SerializeToString()
    listeners = Listeners(lambda request: ("",))  # every Listen stream hears every Push

    async def echo(request: pb.UpdateStatusRequest, context: Any) -> pb.UpdateStatusResponse:
        return response

    async def push(request: pb.UpdateStatusRequest, context: Any) -> pb.UpdateStatusResponse:
        listeners.push("", event)
        return response

    # The Task Manager's message limit (--max-request-bytes, 4 MiB by default): the
    # uploads' 1 MiB chunks fit either way.
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 << 20)]
    )
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=pb.UpdateStatusRequest.FromString,
            response_serializer=pb.UpdateStatusResponse.SerializeToString,
        )
        for name, behaviour in (("Echo", echo), ("Push", push))
    }
    handlers["Listen"] = grpc.unary_stream_rpc_method_handler(
        listeners.listen, request_deserializer=Empty.FromString, response_serializer=bytes
    )
    echo_handler = grpc.method_handlers_generic_handler("bench.Echo", handlers)
    server.add_generic_rpc_handlers([echo_handler, Floor().handler(), RawPayloads().handler()])
    port = server.add_insecure_port(listen)
    await server.start()
    http_port = None if http_listen is None else await NoopHttp().start(http_listen)
    tune_garbage_collector()  # as task-manager serve: the ratios compare code, not settings
    print(f"echo: serving on 127.0.0.1:{port}", flush=True)
    if http_port is not None:
        print(f"echo: HTTP on http://127.0.0.1:{http_port}/ (PUT /noop/ID)", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--http-listen", help="also NoopHttp, on HOST:PORT (0: a free port)")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.http_listen))
