"""The baselines: a raw grpc.aio server that does nothing but answer and push.

`Echo` decodes the same request type and returns a response of the same size as
UpdateStatus, so the ratio against it isolates what the Task Manager itself costs.
`Push` does the same and also puts one watch-event-sized message on every open `Listen`
stream: the fan-out floor of grpc.aio, with no store and no watch logic.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import StringValue

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


class Listener:
    """One open Listen stream: what is waiting for it, and how to wake it (as cheaply as
    the Task Manager's own watches)."""

    def __init__(self) -> None:
        self.pending: deque[bytes] = deque()
        self.wakeup = Wakeup()


async def serve(listen: str) -> None:
    response = typical_response()
    change = pb.TaskEvent(
        event_type=pb.EVENT_TYPE_UPDATE,
        task=response.task,
        task_view=pb.TASK_VIEW_MANAGER,
        time=response.task.last_update_time,
    )
    event = pb.WatchTasksResponse(revision=12, event=change).SerializeToString()
    listeners: set[Listener] = set()

    async def echo(request: pb.UpdateStatusRequest, context: Any) -> pb.UpdateStatusResponse:
        return response

    async def push(request: pb.UpdateStatusRequest, context: Any) -> pb.UpdateStatusResponse:
        for listener in listeners:
            listener.pending.append(event)
            listener.wakeup.set()
        return response

    async def listen_for_pushes(request: Empty, context: Any) -> AsyncIterator[bytes]:
        listener = Listener()
        listeners.add(listener)
        try:
            await context.send_initial_metadata(())
            while True:
                while listener.pending:
                    yield listener.pending.popleft()
                await listener.wakeup.wait()
        finally:
            listeners.discard(listener)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=pb.UpdateStatusRequest.FromString,
            response_serializer=pb.UpdateStatusResponse.SerializeToString,
        )
        for name, behaviour in (("Echo", echo), ("Push", push))
    }
    handlers["Listen"] = grpc.unary_stream_rpc_method_handler(
        listen_for_pushes, request_deserializer=Empty.FromString, response_serializer=bytes
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", handlers)])
    port = server.add_insecure_port(listen)
    await server.start()
    tune_garbage_collector()  # as task-manager serve: the ratios compare code, not settings
    print(f"echo: serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(serve(parser.parse_args().listen))
