"""--log-format json: one JSON object a line, with the task, agent, revision and request
id as fields, from a real `task-manager serve` process."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import pytest

from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1 import task_manager_pb2_grpc
from tests.helpers import ServerProcess, create_request, wait_until


def test_json_logs_carry_the_task_the_revision_and_the_request_id(database: str) -> None:
    credential, token = new_token("ops", Role.OPERATOR, (), time.time_ns())
    add_credential(database, credential)
    served = ServerProcess(database, options=["--log-format", "json", "--log-level", "debug"])
    logged_before = len(served.log_text())  # SQLite's log is beside the file, appended
    served.start()
    try:
        with grpc.insecure_channel(served.address) as channel:
            stub = task_manager_pb2_grpc.TaskManagerStub(channel)
            signed = (("authorization", f"Bearer {token}"),)
            created = stub.CreateTask(create_request("drone-1"), metadata=signed).task
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateTask(
                    create_request("drone-1"),
                    metadata=(("authorization", "Bearer tmk_x_y"), ("x-request-id", "req-7")),
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for _ in range(2):  # without an id of the client's: one made up for each
                with pytest.raises(grpc.RpcError):
                    stub.GetTask(
                        pb.GetTaskRequest(task_id="x"),
                        metadata=(("authorization", "Bearer tmk_x_y"),),
                    )

        def lines() -> list[dict[str, Any]]:
            text = served.log_text()[logged_before:]
            return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

        def change_line() -> dict[str, Any] | None:
            return next(
                (
                    line
                    for line in lines()
                    if line["logger"] == "task_manager.changes" and line.get("status") == "SENT"
                ),
                None,
            )

        sent = wait_until(change_line, what="the change's log line")
        assert sent["task_id"] == created.version.task_id
        assert sent["agent"] == "drone-1"
        assert isinstance(sent["revision"], int) and sent["revision"] >= 2
        assert sent["level"] == "debug"
        denied = next(line for line in lines() if line["message"].startswith("denied CreateTask"))
        assert denied["request_id"] == "req-7"
        unnamed = [line for line in lines() if line["message"].startswith("denied GetTask")]
        made_up = [line["request_id"] for line in unnamed]
        assert len(made_up) == 2 and made_up[0] != made_up[1], made_up
        assert all(len(made) == 16 and int(made, 16) >= 0 for made in made_up), made_up
        assert denied["level"] == "warning"
    finally:
        assert served.terminate() == 0
    # Every line of the server's own was JSON (the process writes nothing else there).
    tail = served.log_text()[logged_before:].splitlines()
    assert tail and all(line.startswith("{") for line in tail), tail[:5]
