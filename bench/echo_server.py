"""The baseline: a raw grpc.aio unary server that does nothing but answer.

It decodes the same request type and returns a response of the same size as
UpdateStatus, so the ratio against it isolates what the Task Manager itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
from google.protobuf.wrappers_pb2 import StringValue

from task_manager.v1 import task_manager_pb2 as pb


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


async def serve(listen: str) -> None:
    response = typical_response()

    async def echo(request: pb.UpdateStatusRequest, context: Any) -> pb.UpdateStatusResponse:
        return response

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=pb.UpdateStatusRequest.FromString,
        response_serializer=pb.UpdateStatusResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})]
    )
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"echo: serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(serve(parser.parse_args().listen))
